"""The sweep report: one table (CSV, Markdown) and one plot for every job of a multirun.

`SweepReport` is a Hydra Callback: `recap-embed-train` registers it, and any app can too
(`hydra.callbacks.sweep_report._target_=recap_embed.train.report.SweepReport`). It reads each
job's `metrics.json` and `.hydra/overrides.yaml`, and the sweeper's `optimization_results.yaml`
when there is one (Optuna). No torch here; matplotlib is imported only when the plot is drawn.

What it shows: the overrides every job shares once, above the table; per job only the swept keys
(those whose values differ between jobs); the best job marked (Optuna's best trial when Optuna ran,
else the job with the highest objective: the validation AUC the app returns). The plot puts the
first numeric swept key on the x axis and draws one line per value of the other swept keys.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recap_embed.files import atomic_write_text

log = logging.getLogger("recap_embed.train")

#: Metrics per job, in table order (keys of metrics.json; best_step comes from its `best`).
METRICS = ("validation_auroc", "eval_auroc", "eval_loss", "best_step", "steps", "seconds_per_step", "train_seconds")
BEST = "★"


def collect(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per job directory holding a metrics.json, in job order."""
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job_dir = metrics_path.parent
        metrics = json.loads(metrics_path.read_text())
        overrides: List[str] = []
        overrides_path = job_dir / ".hydra" / "overrides.yaml"
        if overrides_path.exists():
            overrides = [str(o) for o in (yaml.safe_load(overrides_path.read_text()) or [])]
        row: Dict[str, Any] = {"job": job_dir.name}
        for key in METRICS:
            row[key] = metrics.get(key)
        best = metrics.get("best") or {}
        row["best_step"] = best.get("step")
        row["params"] = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o and not o.lstrip("+~").startswith("hydra"))
        rows.append(row)
    return rows


def split_params(rows: List[Dict[str, Any]]) -> Tuple[Dict[str, str], List[str]]:
    """(overrides every job has with the same value, keys that differ between jobs in first-seen order)."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r["params"] if k not in keys]
    fixed, swept = {}, []
    for key in keys:
        values = [r["params"].get(key) for r in rows]
        if len(rows) > 1 and len(set(values)) > 1:
            swept.append(key)
        elif values[0] is not None and all(v == values[0] for v in values):
            fixed[key] = values[0]
        else:
            swept.append(key)
    return fixed, swept


def _number(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _objective(row: Dict[str, Any]) -> Optional[float]:
    value = row.get("validation_auroc")
    return row.get("eval_auroc") if value is None else value


def best_job(rows: List[Dict[str, Any]], sweep_dir: Path) -> Tuple[Optional[str], str]:
    """(the best job's name, how it was chosen): Optuna's best trial when its results are there."""
    results_path = sweep_dir / "optimization_results.yaml"
    # Jobs are ranked by validation AUC when any has one (eval is never tuned on), else by eval AUC.
    scored = [r for r in rows if r.get("validation_auroc") is not None] or [r for r in rows if r.get("eval_auroc") is not None]
    if results_path.exists():
        results = yaml.safe_load(results_path.read_text()) or {}
        params = {str(k): str(v) for k, v in (results.get("best_params") or {}).items()}
        matching = [r for r in scored if params and all(str(r["params"].get(k)) == v for k, v in params.items())]
        if matching:
            chosen = max(matching, key=_objective)
            return chosen["job"], f"{results.get('name', 'the sweeper')}'s best trial (best value {results.get('best_value')})"
    if not scored:
        return None, ""
    chosen = max(scored, key=_objective)
    what = "validation AUC" if chosen.get("validation_auroc") is not None else "eval AUC"
    return chosen["job"], f"highest {what}"


def x_axis(rows: List[Dict[str, Any]], swept: List[str]) -> Optional[str]:
    """The first swept key whose values are all numbers."""
    for key in swept:
        if all(_number(r["params"].get(key)) is not None for r in rows):
            return key
    return None


def write_report(sweep_dir: Path) -> Optional[Dict[str, Path]]:
    """Write summary.csv, summary.md and sweep.png into `sweep_dir`; None when no job finished."""
    rows = collect(sweep_dir)
    if not rows:
        log.warning("sweep report: no metrics.json under %s", sweep_dir)
        return None
    fixed, swept = split_params(rows)
    axis = x_axis(rows, swept)
    others = [k for k in swept if k != axis]

    def order(r: Dict[str, Any]) -> tuple:
        return (tuple(str(r["params"].get(k)) for k in others), _number(r["params"].get(axis)) if axis else 0.0, len(r["job"]), r["job"])

    rows.sort(key=order)
    best, how = best_job(rows, sweep_dir)
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "sweep.png"}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["job", *swept, *METRICS, "best"])
    for r in rows:
        writer.writerow([r["job"], *(r["params"].get(k, "") for k in swept), *("" if r[m] is None else r[m] for m in METRICS), int(r["job"] == best)])
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["md"], markdown(rows, fixed, swept, best, how))
    plot(rows, axis, others, best, paths["png"])
    return paths


def markdown(rows: List[Dict[str, Any]], fixed: Dict[str, str], swept: List[str], best: Optional[str], how: str) -> str:
    over = ", ".join(f"`{k}`" for k in swept) or "nothing (every job had the same overrides)"
    lines = [f"Sweep of {len(rows)} job(s) over {over}."]
    if fixed:
        lines.append("Every job also had: " + " ".join(f"`{k}={v}`" for k, v in fixed.items()))
    if best is not None:
        lines.append(f"{BEST} best: job {best} ({how}).")
    head = ["job", *swept, "val AUC", "eval AUC", "eval loss", "best step / steps", "ms/step", "train s"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        job = f"{r['job']} {BEST}" if r["job"] == best else r["job"]
        steps = f"{'n/a' if r['best_step'] is None else r['best_step']} / {'n/a' if r['steps'] is None else r['steps']}"
        ms = None if r["seconds_per_step"] is None else 1000 * r["seconds_per_step"]
        cells = [job, *(f"`{r['params'].get(k, '')}`" for k in swept), _num(r["validation_auroc"], 4), _num(r["eval_auroc"], 4),
                 _num(r["eval_loss"], 4), steps, _num(ms, 2), _num(r["train_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def line_groups(rows: List[Dict[str, Any]], others: List[str]) -> Dict[tuple, List[Dict[str, Any]]]:
    """{values of the non-axis swept keys: their rows}: one line of the plot each."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["params"].get(k) for k in others), []).append(r)
    return groups


def plot(rows: List[Dict[str, Any]], axis: Optional[str], others: List[str], best: Optional[str], path: Path) -> None:
    """Three panels (validation AUC, eval AUC, ms/step) against `axis`; one line per value of `others`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = line_groups(rows, others)
    xs_all = [_number(r["params"][axis]) for r in rows] if axis else list(range(len(rows)))
    log_x = bool(axis) and all(x > 0 for x in xs_all) and max(xs_all) / min(xs_all) >= 4
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("validation_auroc", "validation AUC (best step)"), ("eval_auroc", "eval AUC (kept model)"), ("seconds_per_step", "ms per step"))
    for ax, (key, title) in zip(axes, panels):
        for group, members in groups.items():
            xs = [_number(r["params"][axis]) if axis else rows.index(r) for r in members]
            ys = [None if r[key] is None else (1000 * r[key] if key == "seconds_per_step" else r[key]) for r in members]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or None
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
            for x, y, r in zip(xs, ys, members):
                if r["job"] == best and y is not None and key != "seconds_per_step":
                    ax.plot([x], [y], marker="*", markersize=16, color="gold", markeredgecolor="black", zorder=5)
        ax.set_title(title)
        ax.set_xlabel(axis or "job")
        if log_x:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(xs_all))
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.grid(alpha=0.3)
    if others:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"sweep over {', '.join([axis] + others) if axis else ', '.join(others) or 'jobs'}" + (f"  ({BEST} best)" if best else ""))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _num(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


class SweepReport(Callback):
    """Writes the sweep report when a multirun ends (basic, joblib and Optuna alike)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = write_report(Path(config.hydra.sweep.dir))
        if paths:
            log.info("sweep report: %s", ", ".join(str(p) for p in paths.values()))
