"""The sweep report: one table (CSV, Markdown) and one plot for every job of a multirun.

`SweepReport` is a Hydra Callback: `recap-embed-train` registers it, and any app can too
(`hydra.callbacks.sweep_report._target_=recap_embed.train.report.SweepReport`). It reads each
job's `metrics.json` (eval_auroc, eval_loss, seconds_per_step) and `.hydra/overrides.yaml`.
No torch here; matplotlib is imported only when the plot is drawn.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recap_embed.files import atomic_write_text

log = logging.getLogger("recap_embed.train")

COLUMNS = ("job", "overrides", "eval_auroc", "eval_loss", "seconds_per_step", "train_seconds", "steps")


def collect(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per job directory holding a metrics.json, in job order."""
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job_dir = metrics_path.parent
        metrics = json.loads(metrics_path.read_text())
        overrides: List[str] = []
        overrides_path = job_dir / ".hydra" / "overrides.yaml"
        if overrides_path.exists():
            overrides = list(yaml.safe_load(overrides_path.read_text()) or [])
        row: Dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides)}
        for key in COLUMNS[2:]:
            row[key] = metrics.get(key)
        row["params"] = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra"))
        rows.append(row)
    return rows


def swept_axis(rows: List[Dict[str, Any]]) -> Optional[str]:
    """The first overridden key whose values are numbers and differ between jobs."""
    keys = [k for k in (rows[0]["params"] if rows else {})]
    for key in keys:
        values = [r["params"].get(key) for r in rows]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if len(set(numbers)) > 1:
            return key
    return None


def write_report(sweep_dir: Path) -> Optional[Dict[str, Path]]:
    """Write summary.csv, summary.md and sweep.png into `sweep_dir`; None when no job finished."""
    rows = collect(sweep_dir)
    if not rows:
        log.warning("sweep report: no metrics.json under %s", sweep_dir)
        return None
    axis = swept_axis(rows)
    if axis is not None:
        rows.sort(key=lambda r: float(r["params"][axis]))
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "sweep.png"}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["md"], markdown_table(rows))
    plot(rows, axis, paths["png"])
    return paths


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = "| job | overrides | eval AUC | eval loss | ms/step | train s |\n|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['job']} | `{r['overrides']}` | {_num(r['eval_auroc'], 4)} | {_num(r['eval_loss'], 4)} "
        f"| {_num(None if r['seconds_per_step'] is None else 1000 * r['seconds_per_step'], 2)} | {_num(r['train_seconds'], 1)} |\n"
        for r in rows
    )
    return head + body


def plot(rows: List[Dict[str, Any]], axis: Optional[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(r["params"][axis]) for r in rows] if axis else list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("eval_auroc", "eval_loss", "seconds_per_step"), ("eval AUC", "eval loss", "ms per step")):
        ys = [None if r[key] is None else (1000 * r[key] if key == "seconds_per_step" else r[key]) for r in rows]
        ax.plot(xs, ys, marker="o")
        ax.set_title(label)
        ax.set_xlabel(axis or "job")
        if axis and all(x > 0 for x in xs) and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep over {axis}" if axis else "sweep")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _num(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


class SweepReport(Callback):
    """Writes the sweep report when a multirun ends (basic and joblib launchers alike)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = write_report(Path(config.hydra.sweep.dir))
        if paths:
            log.info("sweep report: %s", ", ".join(str(p) for p in paths.values()))
