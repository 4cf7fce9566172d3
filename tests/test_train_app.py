"""The main job as a user runs it: the console script, a sweep, torchrun, warm start, the example app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TESTS
from launch import Completed, python_c, python_m, python_script, run, torchrun

# Real training runs and subprocesses: deselect with -m "not slow" for a fast loop.
pytestmark = pytest.mark.slow

REPO = TESTS.parent
# The default run (about 10 s on 2 cores) with the progress bar off.
DEFAULT = ["train.progress=false"]


def train_cli(*overrides: str, cwd: Path) -> Completed:
    """`python -m recap_embed.train overrides`; it exits 0 or the test fails with its output."""
    return run(python_m("recap_embed.train", *overrides), cwd=cwd, timeout=300)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """One default training, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("run1")
    train_cli(*DEFAULT, f"hydra.run.dir={run_dir}", cwd=run_dir)
    return run_dir


def test_default_training_beats_chance_and_writes_its_outputs(first_run: Path):
    metrics = metrics_of(first_run)
    assert metrics["eval_auroc"] > 0.75, metrics["eval"]
    assert metrics["eval_auroc"] < metrics["best_possible_eval_auroc"]
    # Strata derived from the data: the most frequent values of each discrete column.
    for name in ("auroc/device=0", "auroc/device=3", "auroc/hour=12", "loss"):
        assert name in metrics["eval"]
    assert metrics["rows"] == {"train": 450_000, "validation": 50_000, "eval": 50_000}
    assert metrics["steps"] <= 5 * (450_000 // 1024) and metrics["threads"] == 1
    best = metrics["best"]
    assert metrics["eval"] == best["eval"] and metrics["validation_auroc"] == best["validation"]["auroc"]
    assert Path(best["checkpoint"]).name == f"step_{best['step']}" and Path(best["checkpoint"]).parent.name == "best"
    assert {"user", "item"} <= set(metrics["table_stats"])
    assert 0 < metrics["table_stats"]["user"]["touched_fraction"] <= 1
    assert metrics["oov_rate"]["user"] > 0  # the eval split holds unseen users
    assert (first_run / ".hydra" / "config.yaml").exists()
    plan = json.loads((first_run / "plan.json").read_text())
    assert set(plan["tables"]) == {"user", "item"}
    checkpoint = Path(metrics["checkpoint"])
    assert checkpoint.name == f"step_{metrics['steps']}" and (checkpoint / "COMPLETE").exists()
    assert len(metrics["curve"]) >= 3


def test_warm_start_reaches_the_first_runs_auc_in_fewer_steps(first_run: Path, tmp_path: Path):
    first = metrics_of(first_run)
    ckpt = first["checkpoint"]
    train_cli(
        *DEFAULT,
        "train.max_steps=700",
        f"hydra.run.dir={tmp_path}",
        f"data.dir={first_run / 'data'}",  # the same ids, vocab rows and validation rows as the first run
        "train.early_stopping.patience=null",
        f"embeddings.tables.user.pretrained.embedding_snapshot_uri={ckpt}",
        f"embeddings.tables.item.pretrained.embedding_snapshot_uri={ckpt}",
        cwd=tmp_path,
    )
    second = metrics_of(tmp_path)
    target = first["validation_auroc"] - 0.005

    def steps_to(curve):
        return next((p["step"] for p in curve if p["validation_auroc"] >= target), float("inf"))

    assert set(second["pretrained"]) == {"user", "item"}
    assert steps_to(second["curve"]) < steps_to(first["curve"]), (first["curve"], second["curve"])


def test_sweep_over_embedding_dim_writes_summary_and_plot(tmp_path: Path):
    train_cli("-m", "embeddings.embedding_dim=4,8", f"hydra.sweep.dir={tmp_path}", "train.progress=false", "train.max_steps=60", "data.synthetic.num_train=60000", cwd=tmp_path)
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("job,embeddings.embedding_dim,validation_auroc,eval_auroc")
    assert len(rows) == 3 and rows[1].startswith("0,4,") and rows[2].startswith("1,8,")
    summary = (tmp_path / "summary.md").read_text()
    assert "| eval AUC |" in summary and summary.count("train.max_steps=60") == 1  # fixed overrides once
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for job, dim in (("0", 4), ("1", 8)):
        assert metrics_of(tmp_path / job)["embedding_dims"] == {"user": dim, "item": dim}


def test_torchrun_two_processes_share_one_run_dir_and_one_checkpoint(tmp_path: Path):
    run(
        torchrun("-m", "recap_embed.train", f"hydra.run.dir={tmp_path}",
                 "train.progress=false", "train.max_steps=40", "data.synthetic.num_train=60000", "sharding=table_wise",
                 nproc_per_node=2),
        cwd=tmp_path,
        timeout=300,
    )
    metrics = metrics_of(tmp_path)
    assert metrics["world_size"] == 2
    checkpoints = sorted(p for p in (tmp_path / "checkpoints").iterdir() if p.name != "best")
    assert [c.name for c in checkpoints] == ["step_40"]
    assert [c.name for c in (tmp_path / "checkpoints" / "best").iterdir()] == [f"step_{metrics['best']['step']}"]
    manifest = (checkpoints[0] / ".snapshot_metadata").read_text()
    assert "0/model" in manifest and "1/model" in manifest  # both ranks wrote their shards
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert sorted(r for t in plan["tables"].values() for r in t["ranks"]) == [0, 1]  # one table per rank
    log = (tmp_path / "recap_embed_train.log").read_text()
    assert log.count("eval: auroc=") == 1  # written once, by rank 0


def test_example_app_runs_from_a_temporary_directory(tmp_path: Path):
    app_dir = tmp_path / "ranker"
    shutil.copytree(REPO / "examples" / "ranker", app_dir)
    out = run(python_script("app.py", "embeddings.embedding_dim=8", "embeddings/optimizer=rowwise_adagrad", f"hydra.run.dir={tmp_path / 'out'}"), cwd=app_dir, timeout=300)
    assert "trained 20 steps" in out.stdout
    assert "'user': 0.01" in out.stdout and "'tweet': 0.005" in out.stdout  # per-table schedules applied


def test_config_only_commands_do_not_import_torch():
    code = (
        "import sys, runpy; sys.argv = ['recap-embed-train', '--cfg', 'job'];"
        "import recap_embed.train.app as app\n"
        "try:\n    app.main()\nexcept SystemExit:\n    pass\n"
        "sys.exit('torch was imported' if 'torch' in sys.modules else 0)"
    )
    out = run(python_c(code), cwd=TESTS, timeout=300)
    assert "embeddings:" in out.stdout


def test_own_parquet_data_with_the_same_columns(tmp_path: Path):
    from recap_embed.train.config import SyntheticConfig
    from recap_embed.train.data import generate_synthetic

    # "Your own data": parquet files and vocabs somewhere else, named on the command line.
    own = generate_synthetic(tmp_path / "mine", SyntheticConfig(num_train=40_000, num_eval=8_000), seed=3)
    train_cli(
        "train.progress=false", "train.max_steps=30", f"hydra.run.dir={tmp_path / 'run'}",
        "data.source=parquet", f"data.train_path={own / 'train.parquet'}", f"data.eval_path={own / 'eval.parquet'}",
        f"embeddings.tables.user.vocab={own / 'vocab' / 'user'}", f"embeddings.tables.item.vocab={own / 'vocab' / 'item'}",
        cwd=tmp_path,
    )
    metrics = metrics_of(tmp_path / "run")
    assert metrics["steps"] == 30 and metrics["best_possible_eval_auroc"] is None
    assert not (tmp_path / "run" / "data").exists()  # nothing generated
