"""What a finished run reports: the record in ``metrics.json`` and the closing log lines.

`metrics.json` is what a sweeper, the sweep report and a rerun read (a rerun of a finished run
returns it as it is), so it is written atomically (a crash never leaves half a file) with NaN as
null, and rewritten as each later part (the final checkpoint, the best step's eval) is known.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from recap_embed.files import atomic_write_text

from .config import DataSource
from .data import oracle_auroc

__all__ = ["best_record", "last_validation", "log_evals", "metrics_record", "write_json"]

log = logging.getLogger("recap_embed.train")

Record = Dict[str, Any]


def last_validation(curve: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """The latest validation point of the eval curve, or None (no validation split)."""
    last = curve[-1] if curve else {}
    if "validation_auroc" not in last:
        return None
    return {"auroc": last["validation_auroc"], "loss": last["validation_loss"]}


def best_record(keep_best: Any, has_validation: bool, final_eval: Dict[str, float], step: int) -> Optional[Record]:
    """The best validation step (`KeepBest`) and its checkpoint; its eval is known here only when
    it is the last step (else None until its checkpoint is restored and scored)."""
    if not has_validation or keep_best.best_step < 0:
        return None
    return {"step": keep_best.best_step, "validation": keep_best.best_metrics, "eval": final_eval if keep_best.best_step == step else None,
            "checkpoint": str(keep_best.checkpoint) if keep_best.checkpoint else None}


def metrics_record(run: Any, *, wall: float, step_time: float, trained: int, stats: Dict[str, Any], final: Record,
                   best: Optional[Record]) -> Record:
    """The record of the `Trainer` `run` that just ended: its sizes, speed (over the `trained`
    steps this process took, in `wall` seconds, `step_time` of them in steps), the curve, the final
    and best steps, data and table statistics. `eval` is the last step's until `run` replaces it
    with the kept model's (the best step's with keep-best)."""
    cfg = run.cfg.train
    final_eval = final["eval"]
    return {
        "steps": run.step,
        "examples": run.step * cfg.batch_size,
        "world_size": run.world,
        "device": str(run.device),
        "threads": run.threads,
        "resumed_from": str(run.resume_from) if run.resume_from is not None else None,
        "train_seconds": wall,
        "seconds_per_step": step_time / trained,
        "examples_per_second": trained * cfg.batch_size / max(wall, 1e-9),
        "final_train_loss": run.running,
        "rows": {split: len(e) for split, e in run.examples.items()},
        # The model this run keeps: the best validation step's with keep-best, else the last
        # step's (set once the best step's eval is known).
        "eval": final_eval,
        "eval_auroc": final_eval["auroc"],
        "eval_loss": final_eval["loss"],
        # What a sweeper optimises: validation, never eval (None without a validation split).
        "validation_auroc": best["validation"].get("auroc") if best is not None else None,
        "best": best,
        "final": final,
        "stopped_early": run.stopped_early,
        "best_possible_eval_auroc": oracle_auroc(Path(run.cfg.data.dir)) if run.cfg.data.source == DataSource.synthetic else None,
        "curve": run.curve,
        "table_stats": stats,
        "oov_rate": run.oov.get("eval", {}),
        "oov_rate_by_split": run.oov,
        "unseen_discrete_rate": run.unseen,
        "pretrained": {k: str(v) for k, v in (run.pretrained or {}).items()},
        "embedding_dims": {s.name: s.embedding_dim for s in run.specs},
        "checkpoint": None,
    }


def log_evals(metrics: Record, keep_best: Any) -> None:
    """The closing lines: the kept model's eval (the best and the last step's when they differ)."""
    best, final_eval = metrics["best"], metrics["final"]["eval"]
    if best is not None and best["eval"] is not None and best["step"] != metrics["steps"]:
        log.info("eval of the best step %d (validation %s %.4f): %s", best["step"], keep_best.metric, keep_best.best_value, _fmt(best["eval"]))
        log.info("eval of the last step %d: %s", metrics["steps"], _fmt(final_eval))
    else:
        log.info("eval: %s", _fmt(metrics["eval"]))
    if metrics["best_possible_eval_auroc"] is not None:
        log.info("best possible eval auroc on this synthetic log: %.4f", metrics["best_possible_eval_auroc"])


def _fmt(values: Dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in values.items())


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    """Write atomically: a crash never leaves half a metrics file."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
