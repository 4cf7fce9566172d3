"""Faults: a checkpoint save killed mid-write, and a rank that fails while the others go on.

(a) A process saving a ~200 MB checkpoint is SIGKILLed at random points of the write, several
    times: the previous checkpoint stays complete and restores to its exact values, the partial
    one is ignored by `latest_checkpoint`, and a later save of the same step replaces it.
(b) Two-rank runs of the training app where every rank, or only rank 1, fails during setup
    (a pretrained snapshot that is missing, or has the wrong rows on rank 1 only, found after the
    tables are sharded): every rank exits non-zero within a bounded time (no rank is left waiting
    in a collective), and the cause is printed once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from torchsnapshot import Snapshot, StateDict

from launch import finish, free_port, python_c, python_m, run, start, stop, torchrun, wait_for
from recap_embed.io.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints, restore_checkpoint, save_checkpoint

# Real training runs and subprocesses: deselect with -m "not slow" for a fast loop.
pytestmark = pytest.mark.slow

ELEMENTS = 50 * 1024 * 1024  # float32: 200 MiB
RUN_LIMIT = 60.0  # seconds a failing 2-rank job may take, start-up included


def values(step: int, n: int = ELEMENTS) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).mul_(1e-7).add_(float(step))


def state(step: int) -> Dict[str, StateDict]:
    return {"model": StateDict(w=values(step), step=step)}


def restored(path: Path) -> Tuple[int, torch.Tensor]:
    dest = {"model": StateDict(w=torch.zeros(ELEMENTS), step=-1)}
    restore_checkpoint(path, dest)
    return int(dest["model"]["step"]), dest["model"]["w"]


SAVER = textwrap.dedent(
    """
    import sys, torch
    from torchsnapshot import StateDict
    from recap_embed.io.checkpoint import save_checkpoint
    directory, step, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    w = torch.arange(n, dtype=torch.float32).mul_(1e-7).add_(float(step))
    print("writing", flush=True)
    save_checkpoint(directory, step, {"model": StateDict(w=w, step=step)})
    print("saved", flush=True)
    """
)


def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    t0 = time.perf_counter()
    first = save_checkpoint(ckpts, 1, state(1))
    write_seconds = time.perf_counter() - t0
    rng = random.Random(1234)
    outcomes: List[str] = []
    for attempt, step in enumerate(range(2, 6)):
        # Early kills land in the tensor writes, later ones near the manifest and the rename.
        delay = rng.uniform(0.0, 0.3) if attempt < 2 else rng.uniform(0.3, 1.2) * write_seconds
        proc = start(python_c(SAVER, ckpts, step, ELEMENTS), stderr=subprocess.PIPE)
        try:
            assert [line.strip() for line in wait_for(proc, "writing", timeout=120)] == ["writing"]
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            stop(proc)  # reaped (and anything left of it killed) before the directory is read
        done = checkpoint_step(ckpts / f"step_{step}") == step
        outcomes.append("completed" if done else "killed mid-write")
        complete = list_checkpoints(ckpts)
        latest = latest_checkpoint(ckpts)
        assert latest is not None and all(checkpoint_step(p) is not None for p in complete)
        # Nothing but complete step_N directories and the killed save's leftovers.
        for child in ckpts.iterdir():
            assert checkpoint_step(child) is not None or child.name.startswith(".step_"), child
        got_step, got = restored(latest)
        assert got_step == checkpoint_step(latest) and torch.equal(got, values(got_step))
    assert "killed mid-write" in outcomes, outcomes
    # The first checkpoint is intact after all of that.
    got_step, got = restored(first)
    assert got_step == 1 and torch.equal(got, values(1))
    # A later save of a step whose writing was killed replaces the leftovers.
    killed = [s for s, o in zip(range(2, 6), outcomes) if o == "killed mid-write"][0]
    again = save_checkpoint(ckpts, killed, state(killed))
    assert checkpoint_step(again) == killed and torch.equal(restored(again)[1], values(killed))
    assert not (ckpts / f".step_{killed}.incomplete").exists()


# --------------------------------------------------------------------------- failing ranks

TINY = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=50", "data.synthetic.num_train=2000",
    "data.synthetic.num_eval=500", "train.progress=false", "train.max_steps=2", "train.batch_size=256",
]


def run_ranks_by_hand(args: List[str], cwd: Path) -> Tuple[List[int], str, float]:
    """Two ranks of `python -m recap_embed.train`, started without torchrun (no watchdog would
    stop a rank left waiting): (exit codes, combined output, seconds)."""
    port = free_port()
    procs = []
    t0 = time.perf_counter()
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(start(python_m("recap_embed.train", *args), cwd=cwd, env=env))
    outputs, codes = [], []
    try:
        for p in procs:
            done = finish(p, timeout=max(1.0, RUN_LIMIT - (time.perf_counter() - t0)))
            outputs.append(done.stdout)
            codes.append(done.returncode)
    finally:
        for p in procs:
            stop(p)
    return codes, "\n".join(outputs), time.perf_counter() - t0


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> Dict[str, Path]:
    """Generated data; a snapshot for rank 0 with the user table's rows, one for rank 1 with fewer."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    import recap_embed.train.config  # noqa: F401
    from recap_embed.io.vocab import Vocab
    from recap_embed.train.data import generate_synthetic

    root = tmp_path_factory.mktemp("ranks")
    GlobalHydra.instance().clear()
    with initialize(version_base=None, config_path=None):
        cfg = compose("recap_embed_train", overrides=[f"data.dir={root / 'data'}", *TINY])
    GlobalHydra.instance().clear()
    generate_synthetic(root / "data", cfg.data.synthetic, 0)
    rows = Vocab.load(root / "data" / "vocab" / "user", table="user", num_embeddings=None, oov_policy="default_row").required_rows
    dim = int(cfg.embeddings.embedding_dim)
    Snapshot.take(str(root / "rows_0"), app_state={"model": StateDict(user=torch.randn(rows, dim))})
    Snapshot.take(str(root / "rows_1"), app_state={"model": StateDict(user=torch.randn(rows - 7, dim))})
    Snapshot.take(str(root / "only_0"), app_state={"model": StateDict(user=torch.randn(rows, dim))})
    return {"root": root, "data": root / "data"}


def assert_stopped_once(codes: List[int], output: str, seconds: float, cause: str, run_dir: Path) -> None:
    assert seconds < RUN_LIMIT, f"took {seconds:.0f} s"
    assert all(c != 0 for c in codes), (codes, output[-3000:])
    assert output.count(cause) == 1, output[-4000:]  # printed by one rank only
    assert f"{os.sep}recap_embed{os.sep}" not in output and "Error executing job" not in output, output[-4000:]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def test_every_rank_fails_alike_under_torchrun(tmp_path: Path, snapshots: Dict[str, Path]) -> None:
    """The snapshot is missing on every rank: both stop in the setup checks, one prints the cause."""
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"data.dir={snapshots['data']}", *TINY,
            f"embeddings.tables.user.pretrained.embedding_snapshot_uri={tmp_path / 'nowhere'}"]
    t0 = time.perf_counter()
    out = run(torchrun("-m", "recap_embed.train", *args, nproc_per_node=2), cwd=tmp_path, timeout=RUN_LIMIT + 30, expect=None)
    output = out.output
    # torchrun's own report (ChildFailedError) is a traceback of torchrun, not of the ranks.
    ranks_output = output.split("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")[0]
    ranks_output = "\n".join(line for line in ranks_output.splitlines() if "/torch/distributed/" not in line and "torchrun" not in line)
    assert_stopped_once([out.returncode], ranks_output, time.perf_counter() - t0, "nowhere' does not exist", run_dir)
    assert "exitcode  : 2" in output, output[-3000:]


def test_one_rank_fails_in_setup(tmp_path: Path, snapshots: Dict[str, Path]) -> None:
    """Only rank 1's snapshot is missing (the URI depends on RANK): rank 1 prints why, rank 0 says
    it stopped because of rank 1; both exit 2, long before any collective could time out."""
    run_dir = tmp_path / "run"
    uri = str(snapshots["root"] / "only_${oc.env:RANK}")
    codes, output, seconds = run_ranks_by_hand(
        [f"hydra.run.dir={run_dir}", f"data.dir={snapshots['data']}", *TINY, f"embeddings.tables.user.pretrained.embedding_snapshot_uri={uri}"],
        tmp_path,
    )
    assert_stopped_once(codes, output, seconds, "only_1' does not exist", run_dir)
    assert codes == [2, 2], (codes, output[-3000:])
    assert "[rank 1] embeddings.tables.user.pretrained.embedding_snapshot_uri" in output
    assert "stopped: rank 1 failed" in output


def test_one_rank_fails_after_sharding(tmp_path: Path, snapshots: Dict[str, Path]) -> None:
    """Rank 1's snapshot has the wrong rows, which shows only once the tables exist (their rows
    come from the vocab): the ranks have sharded, and stop at load_pretrained's agreement."""
    run_dir = tmp_path / "run"
    uri = str(snapshots["root"] / "rows_${oc.env:RANK}")
    codes, output, seconds = run_ranks_by_hand(
        [f"hydra.run.dir={run_dir}", f"data.dir={snapshots['data']}", *TINY, f"embeddings.tables.user.pretrained.embedding_snapshot_uri={uri}"],
        tmp_path,
    )
    assert_stopped_once(codes, output, seconds, "row count differs", run_dir)
    assert codes == [2, 2], (codes, output[-3000:])
    assert "[rank 1] embeddings.tables.user.pretrained: row count differs" in output
    assert "stopped: rank 1 failed" in output
