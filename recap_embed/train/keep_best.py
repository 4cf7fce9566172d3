"""Early stopping and keep-best on the validation split.

`KeepBest` watches one validation metric (AUROC: higher is better; loss: lower is better) at
every evaluation: it remembers the best step and its metrics, says when `patience` evaluations in
a row have not improved on it by more than `min_delta` (then training stops), and keeps the
checkpoint of the best evaluation in ``<checkpoints>/best/step_<N>`` (the previous best is removed
once the new one is complete, so a crash never leaves no best). It is a Stateful (``state_dict``
/ ``load_state_dict``), so a checkpoint that carries it resumes with the same best and patience.

Every rank calls it with the same value (torchmetrics syncs across ranks), so every rank takes the
same decision; saving is collective.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from recap_embed.config import ConfigError
from recap_embed.distributed.collectives import rank_and_world
from recap_embed.io.checkpoint import PendingCheckpoint, list_checkpoints, save_checkpoint

from .config import ValidationMetric

__all__ = ["KeepBest", "BEST_DIR"]

log = logging.getLogger("recap_embed.train")

#: Sub-directory of the checkpoint directory holding the best checkpoint.
BEST_DIR = "best"


class KeepBest:
    """The best validation evaluation so far, patience, and the best checkpoint."""

    def __init__(self, metric: str, higher_is_better: bool, patience: Optional[int], min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ConfigError(f"train.early_stopping.patience: {patience} is not allowed; use a positive number of evaluations, or null to never stop early")
        if min_delta < 0 or not math.isfinite(min_delta):
            raise ConfigError(f"train.early_stopping.min_delta: {min_delta} is not allowed; use a non-negative number")
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best_step = -1
        self.best_value = -math.inf if higher_is_better else math.inf
        self.best_metrics: Dict[str, float] = {}
        self.evals_since_best = 0
        self.checkpoint: Optional[Path] = None

    @classmethod
    def from_config(cls, train_cfg: Any) -> "KeepBest":
        """From the app's `train` section: `early_stopping.metric`, `patience`, `min_delta` (checked)."""
        stop = train_cfg.early_stopping
        metric = stop.metric if isinstance(stop.metric, ValidationMetric) else ValidationMetric[str(stop.metric)]
        return cls(metric.value, metric is ValidationMetric.auroc, stop.patience, stop.min_delta)

    # ------------------------------------------------------------------ decisions

    def update(self, step: int, metrics: Dict[str, float]) -> bool:
        """Record an evaluation; True when it is a new best. NaN never improves."""
        value = float(metrics[self.metric])
        gain = value - self.best_value if self.higher_is_better else self.best_value - value
        if math.isfinite(value) and (self.best_step < 0 or gain > self.min_delta):
            self.best_step, self.best_value, self.best_metrics = int(step), value, dict(metrics)
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def stop_reason(self) -> str:
        return (
            f"validation {self.metric} has not improved on {self.best_value:.4f} (step {self.best_step}) "
            f"for {self.evals_since_best} evaluations (train.early_stopping.patience={self.patience})"
        )

    # ------------------------------------------------------------------ best checkpoint

    def save(self, directory: Path, step: int, app_state: Dict[str, Any],
             write_extra: Optional[Callable[[Path], None]] = None) -> Path:
        """Save the best checkpoint (collective), then remove the older ones under ``best/``.

        `write_extra` writes the files every checkpoint of the run carries (the vocab fingerprints
        a warm start from it is checked against), as for the periodic ones."""
        root = Path(directory) / BEST_DIR
        path = save_checkpoint(root, step, app_state, write_extra=write_extra)
        if isinstance(path, PendingCheckpoint):  # pragma: no cover - saved synchronously above
            path = path.wait()
        if rank_and_world()[0] == 0:
            for old in list_checkpoints(root):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        self.checkpoint = path
        return path

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> Dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_value": self.best_value,
            "evals_since_best": self.evals_since_best,
            "best_metrics": {str(k): float(v) for k, v in self.best_metrics.items()},
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else "",
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_step = int(state["best_step"])
        self.best_value = float(state["best_value"])
        self.evals_since_best = int(state["evals_since_best"])
        self.best_metrics = {str(k): float(v) for k, v in (state.get("best_metrics") or {}).items()}
        self.checkpoint = Path(state["checkpoint"]) if state.get("checkpoint") else None
