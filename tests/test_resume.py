"""Never losing work, with real processes, real signals and real files: periodic checkpoints,
automatic resume (bit-exact), SIGTERM / SIGINT / SIGKILL mid-run, a second run into a directory
in use, a full file system at the final save, a loss that turns to NaN, and two ranks stopped by
a signal sent to one of them."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import pytest

import launch
from launch import free_port, python_m, stop, wait_for

# 2,000 examples (1,800 after the validation split) in batches of 128: 14 steps per epoch, ~3 ms each.
TINY = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=50", "data.synthetic.num_train=2000",
    "data.synthetic.num_eval=500", "train.progress=false", "train.batch_size=128", "train.eval_every=50",
    "train.early_stopping.patience=null",  # these runs are about stopping and resuming, not early stopping
]
# 1,800 training rows after the validation split: 14 steps per epoch; 1,200 steps in all.
LONG = [*TINY, "train.epochs=90", "train.max_steps=1200", "train.checkpoint_every=100"]


def train(args: List[str], cwd: Path, timeout: float = 240, preexec=None) -> Tuple[int, str]:
    """(exit status, stdout + stderr) of the training app run to its end."""
    out = launch.run(python_m("recap_embed.train", *args), cwd=cwd, timeout=timeout, expect=None, preexec_fn=preexec)
    return out.returncode, out.output


def start(args: List[str], cwd: Path, **env: str) -> subprocess.Popen:
    """The training app, running; stdout and stderr merged, for `wait_for` and signals."""
    return launch.start(python_m("recap_embed.train", *args), cwd=cwd, env=env)


def finish(proc: subprocess.Popen, timeout: float = 120) -> Tuple[int, str]:
    done = launch.finish(proc, timeout=timeout)
    return done.returncode, done.stdout


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoints(run_dir: Path) -> List[str]:
    """The periodic and final checkpoints (keep-best's `best/` aside)."""
    d = run_dir / "checkpoints"
    return sorted(p.name for p in d.iterdir() if p.name != "best") if d.exists() else []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One generated data dir shared by every run (its fingerprint matches TINY)."""
    root = tmp_path_factory.mktemp("data")
    code, out = train([f"hydra.run.dir={root / 'gen'}", f"data.dir={root / 'data'}", *TINY, "train.max_steps=1", "train.checkpoint=false"], root)
    assert code == 0, out[-3000:]
    return root / "data"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data: Path) -> dict:
    """The reference: the long run in one go."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    code, out = train([f"hydra.run.dir={run_dir}", f"data.dir={data}", *LONG], run_dir.parent)
    assert code == 0, out[-3000:]
    assert checkpoints(run_dir) == ["step_1100", "step_1200"], checkpoints(run_dir)  # keep_checkpoints=2
    return metrics(run_dir)


def same_result(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"]
    assert a["eval_auroc"] == b["eval_auroc"] and a["eval_loss"] == b["eval_loss"], (a["eval"], b["eval"])
    assert a["final_train_loss"] == b["final_train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_run_resumes_to_the_same_result(tmp_path: Path, data: Path, uninterrupted: dict, sig: int) -> None:
    """A signal mid-run: SIGTERM/SIGINT save a checkpoint and exit 128 + signum with one line;
    SIGKILL leaves the last periodic checkpoint. The same command again resumes from the latest
    complete checkpoint, says so, and ends with exactly the uninterrupted run's result."""
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"data.dir={data}", *LONG]
    proc = start(args, tmp_path)
    try:
        wait_for(proc, f"saved checkpoint {run_dir / 'checkpoints' / 'step_'}")  # a periodic one (not keep-best's)
        proc.send_signal(sig)
        code, out = finish(proc)
    finally:
        stop(proc)
    assert not (run_dir / "metrics.json").exists()
    saved = checkpoints(run_dir)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert saved and all(s.startswith("step_") or s.startswith(".step_") for s in saved), saved
    else:
        assert code == 128 + sig, out[-3000:]
        name = signal.Signals(sig).name
        stopped = [line for line in out.splitlines() if f"stopped by {name} at step" in line]
        assert len(stopped) == 1 and "run the same command again to resume" in stopped[0], out[-3000:]
        step = int(stopped[0].split("at step ")[1].split(":")[0])
        assert f"step_{step}" in saved, saved
        assert "Traceback" not in out, out[-3000:]
    latest = max((int(s.split("_")[1]) for s in saved if s.startswith("step_")))
    code, out = train(args, tmp_path)
    assert code == 0, out[-3000:]
    assert f"resuming from checkpoint {run_dir / 'checkpoints' / f'step_{latest}'} (step {latest})" in out, out[-3000:]
    same_result(metrics(run_dir), uninterrupted)
    assert metrics(run_dir)["resumed_from"].endswith(f"step_{latest}")


@pytest.mark.slow
def test_rerun_of_a_finished_run_trains_nothing_and_resume_false_starts_afresh(tmp_path: Path, data: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"data.dir={data}", *TINY, "train.max_steps=20", "train.checkpoint_every=10"]
    assert train(args, tmp_path)[0] == 0
    first = metrics(run_dir)
    code, out = train(args, tmp_path)
    assert code == 0 and "already finished at step 20" in out, out[-3000:]
    assert metrics(run_dir) == first and checkpoints(run_dir) == ["step_10", "step_20"]
    # More steps: continues from step 20 instead of starting over.
    code, out = train([*args[:-2], "train.max_steps=30", "train.checkpoint_every=10"], tmp_path)
    assert code == 0 and "(step 20)" in out and metrics(run_dir)["steps"] == 30, out[-3000:]
    # Afresh: the earlier checkpoints and metrics are moved aside, not deleted.
    code, out = train([*args, "train.resume=false"], tmp_path)
    assert code == 0 and "starting afresh" in out, out[-3000:]
    aside = [p for p in run_dir.iterdir() if p.name.startswith("checkpoints.superseded-")]
    assert len(aside) == 1 and checkpoints(aside[0]) == ["step_20", "step_30"]
    assert json.loads((aside[0] / "metrics.json").read_text())["steps"] == 30
    assert metrics(run_dir)["steps"] == 20 and metrics(run_dir)["resumed_from"] is None


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_at_start(tmp_path: Path, data: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"data.dir={data}", *LONG]
    first = start(args, tmp_path)
    try:
        wait_for(first, "saved checkpoint")
        config_before = (run_dir / ".hydra" / "config.yaml").read_text()
        t0 = time.perf_counter()
        code, out = train([*args, "train.dense_optimizer.lr=0.02"], tmp_path)
        assert code == 2, out[-3000:]
        assert "is in use by a running job (pid" in out and "set another hydra.run.dir" in out, out[-3000:]
        assert time.perf_counter() - t0 < 60 and "Traceback" not in out
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config_before  # the running job's config is intact
    finally:
        first.send_signal(signal.SIGTERM)
        finish(first)
    # Once the first is gone (its lock with it), the directory is usable again: it resumes.
    code, out = train(args, tmp_path)
    assert code == 0 and "resuming from checkpoint" in out, out[-3000:]


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_keeps_the_metrics(tmp_path: Path, data: Path) -> None:
    """`ulimit -f` (RLIMIT_FSIZE) below the checkpoint's size: the metrics of the finished run are
    on disk, the partial checkpoint directory is gone, and one line names it and the free space."""
    run_dir = tmp_path / "run"
    limit = 4 * 1024 * 1024  # the user table below is 12.8 MB; data, logs and metrics are far smaller

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [f"hydra.run.dir={run_dir}", f"data.dir={data}", *TINY, "train.max_steps=5", "train.checkpoint_every=0",
            "train.keep_best=false", "embeddings.tables.user.num_embeddings=200000"]
    code, out = train(args, tmp_path, preexec=small_files)
    assert code == 2, out[-3000:]
    line = [x for x in out.splitlines() if "saving checkpoint" in x]
    assert len(line) == 1, out[-3000:]
    assert str(run_dir / "checkpoints" / "step_5") in line[0] and "partial directory" in line[0] and "free of" in line[0], line
    assert "File too large" in line[0] or "Errno 27" in line[0], line
    assert "Traceback" not in out, out[-3000:]
    done = metrics(run_dir)
    assert done["steps"] == 5 and done["eval_auroc"] > 0 and done["checkpoint"] is None
    assert not checkpoints(run_dir), checkpoints(run_dir)


@pytest.mark.slow
def test_a_loss_that_turns_nan_stops_at_once_and_saves_nothing_broken(tmp_path: Path, data: Path) -> None:
    from recap_embed.io.pretrained import SnapshotReader

    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"data.dir={data}", *TINY, "train.epochs=20", "train.checkpoint_every=1",
            "train.keep_checkpoints=1000", "train.dense_optimizer.name=sgd", "train.dense_optimizer.lr=1e30"]
    code, out = train(args, tmp_path)
    assert code == 2, out[-3000:]
    assert "Traceback" not in out
    line = [x for x in out.splitlines() if "[ERROR]" in x]
    assert len(line) == 1 and ("the loss is nan at step" in line[0] or "holds non-finite values" in line[0]), out[-3000:]
    assert "train.dense_optimizer.lr=1e+30" in line[0] or "learning rates too high" in line[0]
    assert not (run_dir / "metrics.json").exists()
    for name in checkpoints(run_dir):  # every checkpoint that exists holds finite weights only
        import numpy as np

        reader = SnapshotReader(str(run_dir / "checkpoints" / name))
        for lp in reader.logical_paths():
            if not lp.startswith("model/"):
                continue
            src = reader.source(lp)
            for p in src.pieces:
                values = np.frombuffer(reader.read_range(p.location, p.byte_start, p.byte_end), dtype=np.float32)
                assert np.isfinite(values).all(), (name, lp)
        reader.close()


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_gets_sigterm(tmp_path: Path, data: Path) -> None:
    """SIGTERM to rank 1 only: both ranks learn it at the same step, save one sharded checkpoint
    together and exit 143; the stop is reported once. A rerun on two ranks resumes from it."""
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"data.dir={data}", *LONG, "sharding=table_wise"]

    def ranks() -> List[subprocess.Popen]:
        port = str(free_port())
        return [start(args, tmp_path, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TORCHELASTIC_RUN_ID="resume-test") for r in range(2)]

    procs = ranks()
    try:
        wait_for(procs[0], "saved checkpoint")
        procs[1].send_signal(signal.SIGTERM)
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            stop(p)
    codes = [c for c, _ in results]
    output = "".join(o for _, o in results)
    assert codes == [143, 143], (codes, output[-4000:])
    assert output.count("stopped by SIGTERM at step") == 1, output[-4000:]
    step = int(output.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert f"step_{step}" in checkpoints(run_dir)
    procs = ranks()
    results = [finish(p, timeout=240) for p in procs]
    assert [c for c, _ in results] == [0, 0], results[0][1][-3000:]
    assert f"(step {step})" in results[0][1]
    assert metrics(run_dir)["steps"] == 1200
