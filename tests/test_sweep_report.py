"""The sweep report as people read it: a real two-key sweep, an Optuna sweep, and the rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List

import pytest
import yaml

from launch import Completed, python_m, run
from recap_embed.train.report import collect, line_groups, split_params, write_report

TINY = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=50", "data.synthetic.num_train=2000",
    "data.synthetic.num_eval=500", "train.progress=false", "train.max_steps=6", "train.batch_size=256", "train.eval_every=3",
]


def train_multirun(args: List[str], cwd: Path) -> Completed:
    """A sweep of the training app; it exits 0 or the test fails with its output."""
    return run(python_m("recap_embed.train", "-m", *args), cwd=cwd, timeout=400)


@pytest.mark.slow  # a real sweep of the training app in a subprocess
def test_two_key_sweep_reports_fixed_overrides_once_and_one_line_per_second_key(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    train_multirun(["embeddings.embedding_dim=4,8", "train.dense_optimizer.lr=0.01,0.001", f"hydra.sweep.dir={sweep}", f"data.dir={tmp_path / 'data'}", *TINY], tmp_path)
    summary = (sweep / "summary.md").read_text()
    head, table = summary.split("\n\n", 1)
    assert "over `embeddings.embedding_dim`, `train.dense_optimizer.lr`" in head
    for fixed in TINY:  # every fixed override once, above the table, never in a row
        assert head.lower().count(fixed.lower()) == 1 and fixed.lower() not in table.lower(), fixed
    lines = table.strip().splitlines()
    assert lines[0].startswith("| job | embeddings.embedding_dim | train.dense_optimizer.lr | val AUC | eval AUC |")
    assert len(lines) == 2 + 4 and sum("★" in line for line in lines) == 1
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["embeddings.embedding_dim"], r["train.dense_optimizer.lr"]) for r in rows] == [("4", "0.001"), ("8", "0.001"), ("4", "0.01"), ("8", "0.01")]
    assert sum(int(r["best"]) for r in rows) == 1
    best = max(rows, key=lambda r: float(r["validation_auroc"]))
    assert best["best"] == "1"
    # The plot: x = the first swept key, one line per value of the second.
    collected = collect(sweep)
    fixed, swept = split_params(collected)
    groups = line_groups(collected, swept[1:])
    assert sorted(groups) == [("0.001",), ("0.01",)] and all(len(v) == 2 for v in groups.values())
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a real Optuna sweep of the training app in a subprocess
def test_optuna_sweep_of_three_trials_marks_its_best_trial(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed (requirements/test.txt)")
    sweep = tmp_path / "sweep"
    train_multirun(
        ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=1",
         "embeddings.embedding_dim=choice(4,8,16)", f"hydra.sweep.dir={sweep}", f"data.dir={tmp_path / 'data'}", *TINY],
        tmp_path,
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert len(jobs) == 3
    # Optuna maximised what the app returned: the validation AUC of each trial's best step.
    values = [json.loads((j / "metrics.json").read_text())["validation_auroc"] for j in jobs]
    assert results["best_value"] == pytest.approx(max(values))
    summary = (sweep / "summary.md").read_text()
    assert "optuna's best trial" in summary and summary.count("★") == 2  # the legend line and the row
    row = next(line for line in summary.splitlines() if line.startswith("| ") and "★" in line)
    assert f"`{results['best_params']['embeddings.embedding_dim']}`" in row


def fake_job(sweep: Path, name: str, overrides: List[str], metrics: dict) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_rules_on_written_jobs(tmp_path: Path) -> None:
    base = {"eval_auroc": 0.7, "eval_loss": 0.5, "steps": 10, "seconds_per_step": 0.002, "train_seconds": 1.0, "best": {"step": 8}}
    fake_job(tmp_path, "0", ["a=1", "data.dir=/x", "hydra.job.chdir=false"], {**base, "validation_auroc": 0.61})
    fake_job(tmp_path, "1", ["a=2", "data.dir=/x"], {**base, "validation_auroc": 0.65})
    fake_job(tmp_path, "2", ["a=4", "data.dir=/x"], {**base, "validation_auroc": None, "eval_auroc": 0.9, "best": None})
    paths = write_report(tmp_path)
    md = paths["md"].read_text()
    assert "Every job also had: `data.dir=/x`" in md and "hydra.job" not in md
    assert "| 1 ★ | `2` |" in md and "highest validation AUC" in md  # a job without validation is not ranked above
    assert "| 8 / 10 |" in md and "n/a / 10" in md
