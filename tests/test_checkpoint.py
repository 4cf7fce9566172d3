"""Checkpoints: complete-or-invisible, exact resume, asynchronous saves, 2 ranks -> 1 rank.

Spawned runs (each costs seconds, so each batches several checks):
  1. two ranks train 10 steps uninterrupted; then, from the same start, train 5, save
     (synchronously, and asynchronously while training goes on), leaving incomplete
     checkpoints next to them;
  2. two NEW ranks restore the latest complete checkpoint and train 5 more: bit-identical to
     the uninterrupted run (weights and row-wise Adagrad state, fused SGD with a stepped lr);
  3. one rank restores the 2-rank checkpoint into a differently sharded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
import torchsnapshot

from multiprocess import run_ranks
from recap_embed.config import table_specs
from recap_embed.io.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    PendingCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from recap_embed.io.pretrained import SnapshotReadError, load_pretrained

ROWS = {"user": 400, "item": 50}
DIM = 8
BAGS = 8


# --------------------------------------------------------------------------- helpers (ranks import them)


def build(rank: int, world: int):
    """user: fused row-wise Adagrad; item: fused SGD. Two ranks: table_wise on 0 and 1; one: both on 0."""
    import torchrec.optim as trec_optim
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=n, feature_names=[t]) for t, n in ROWS.items()],
        device=torch.device("meta"),
    )
    _apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, [ebc.embedding_bags["user"].weight], {"lr": 0.05, "eps": 1e-8})
    _apply_optimizer_in_backward(trec_optim.SGD, [ebc.embedding_bags["item"].weight], {"lr": 0.1})
    per = {"user": table_wise(rank=0), "item": table_wise(rank=world - 1)}
    plan = construct_module_sharding_plan(
        ebc, per_param_sharding=per, local_size=world, world_size=world, device_type="cpu", sharder=EmbeddingBagCollectionSharder()
    )
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}))


class StepLR:
    """A minimal schedule driving the fused optimizer's lr: base * 0.5 ** (step // 3)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.step_count = 0
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self._apply()

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * 0.5 ** (self.step_count // 3)
        self.optimizer.step()  # pushes the lr into the fused kernels

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        self._apply()


def app_state(dmp) -> Dict[str, Any]:
    return {
        "model": dmp,
        "optimizer": dmp.fused_optimizer,
        "scheduler": StepLR(dmp.fused_optimizer),
        "progress": torchsnapshot.StateDict(step=0),
    }


def train(state: Dict[str, Any], rank: int, steps: int) -> None:
    from torchrec import KeyedJaggedTensor

    dmp = state["model"]
    for _ in range(steps):
        step = state["progress"]["step"]
        g = torch.Generator().manual_seed(1000 * step + rank)
        lengths = torch.randint(0, 4, (2 * BAGS,), generator=g)
        n_user = int(lengths[:BAGS].sum())
        ids = torch.cat([torch.randint(0, ROWS["user"], (n_user,), generator=g),
                         torch.randint(0, ROWS["item"], (int(lengths.sum()) - n_user,), generator=g)])
        kjt = KeyedJaggedTensor(keys=["user", "item"], values=ids, lengths=lengths)
        out = dmp(kjt).values()
        (out * torch.linspace(-1, 1, out.shape[1])).pow(2).sum().backward()  # fused update here
        state["scheduler"].step()
        state["progress"]["step"] = step + 1


def snapshot_of(state: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Whole weights and optimizer state (every rank gets everything)."""
    import torch.distributed as dist

    mine = []
    opt = {f"opt/{k}/{kk}": vv for k, v in state["optimizer"].state_dict()["state"].items() for kk, vv in v.items()}
    for key, v in list(state["model"].state_dict().items()) + list(opt.items()):
        if hasattr(v, "local_shards"):
            for s in v.local_shards():
                mine.append((key, list(v.size()), list(s.metadata.shard_offsets), s.tensor.detach().numpy().copy()))
        else:
            mine.append((key, list(v.shape), [0] * v.dim(), v.detach().numpy().copy()))
    every = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    out: Dict[str, np.ndarray] = {}
    for pieces in every:
        for key, shape, off, arr in pieces:
            full = out.setdefault(key, np.full(shape, np.nan, dtype=arr.dtype))
            full[tuple(slice(o, o + n) for o, n in zip(off, arr.shape))] = arr
    return out


def assert_same(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k  # bit-identical


# --------------------------------------------------------------------------- spawned runs


def _save_run(rank: int, world: int, root: str) -> Dict[str, Any]:
    import torch.distributed as dist

    out: Dict[str, Any] = {}
    state = app_state(build(rank, world))
    out["start"] = snapshot_of(state)
    train(state, rank, 10)
    out["ten"] = snapshot_of(state)

    state = app_state(build(rank, world))
    train(state, rank, 5)
    path = save_checkpoint(Path(root) / "sync", 5, state)
    out["sync_path"] = str(path)
    out["five"] = snapshot_of(state)

    # asynchronous, with every tensor above 1 kB unbatched: the path where torchsnapshot 0.1.0
    # would otherwise write the live CPU tensors after training has moved on
    os.environ["TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE"] = "1024"
    pending = save_checkpoint(Path(root) / "async", 5, state, asynchronous=True)
    del os.environ["TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE"]
    assert isinstance(pending, PendingCheckpoint)
    train(state, rank, 2)  # the weights move on while the checkpoint is written
    out["async_path"] = str(pending.wait())
    out["seven"] = snapshot_of(state)

    if rank == 0:  # what crashes leave behind: never chosen
        (Path(root) / "sync" / ".step_7.incomplete").mkdir()
        (Path(root) / "sync" / "step_9").mkdir()
        (Path(root) / "sync" / "step_9" / ".snapshot_metadata").write_text("{}")
    dist.barrier()
    return out


def _resume_run(rank: int, world: int, root: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    state = app_state(build(rank, world))
    latest = latest_checkpoint(Path(root) / "sync")
    out["latest"] = latest.name
    out["step"] = restore_checkpoint(latest, state)
    out["restored"] = snapshot_of(state)
    out["progress"] = state["progress"]["step"]
    out["lrs"] = [g["lr"] for g in state["optimizer"].param_groups]
    train(state, rank, 5)
    out["resumed"] = snapshot_of(state)

    state = app_state(build(rank, world))
    restore_checkpoint(Path(root) / "async" / "step_5", state)
    out["async"] = snapshot_of(state)
    return out


def _one_rank_run(rank: int, world: int, root: str) -> Dict[str, Any]:
    state = app_state(build(rank, world))
    step = restore_checkpoint(Path(root) / "sync" / "step_5", state)
    return {"step": step, "restored": snapshot_of(state), "progress": state["progress"]["step"]}


@pytest.mark.slow
def test_resume_is_exact_async_and_two_ranks_to_one(tmp_path):
    root = str(tmp_path)
    saved = run_ranks(_save_run, 2, root, timeout=150)
    s0 = saved[0]
    assert s0["sync_path"] == str(tmp_path / "sync" / "step_5") and saved[1]["sync_path"] == s0["sync_path"]
    assert "opt/embedding_bags.user.weight/user.momentum1" in s0["five"]  # row-wise Adagrad state is in it
    assert not np.array_equal(s0["start"]["embedding_bags.user.weight"], s0["ten"]["embedding_bags.user.weight"])
    assert json.loads((tmp_path / "sync" / "step_5" / COMPLETE_MARKER).read_text())["world_size"] == 2
    assert [p.name for p in list_checkpoints(tmp_path / "sync")] == ["step_5"]

    resumed = run_ranks(_resume_run, 2, root, timeout=150)
    for r in resumed:
        assert r["latest"] == "step_5" and r["step"] == 5 and r["progress"] == 5
        assert_same(r["restored"], s0["five"])
        assert_same(r["resumed"], s0["ten"])  # 5 + save + restore in new processes + 5 == 10
        assert_same(r["async"], s0["five"])  # not the values of the 2 steps trained while it was written
    assert not np.array_equal(s0["seven"]["embedding_bags.user.weight"], s0["five"]["embedding_bags.user.weight"])
    assert resumed[0]["lrs"] == [pytest.approx(0.05 * 0.5)]  # step 5: the schedule's second level

    one = run_ranks(_one_rank_run, 1, root, timeout=120)[0]
    assert one["step"] == 5 and one["progress"] == 5
    assert_same(one["restored"], s0["five"])  # both tables on one rank, with their optimizer state

    # the same checkpoint restores into a plain, unsharded EBC ...
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    def plain():
        torch.manual_seed(3)
        return EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=n, feature_names=[t]) for t, n in ROWS.items()],
            device=torch.device("cpu"),
        )

    ebc = plain()
    restore_checkpoint(tmp_path / "sync" / "step_5", {"model": ebc})
    for t in ROWS:
        key = f"embedding_bags.{t}.weight"
        assert np.array_equal(ebc.state_dict()[key].numpy(), s0["five"][key])
    # ... and serves as the pretrained source of one table of another run
    ebc = plain()
    cfg = {"tables": {t: {"num_embeddings": n, "pretrained": {"embedding_snapshot_uri": str(tmp_path / "sync" / "step_5")}}
                      for t, n in ROWS.items()}, "embedding_dim": DIM}
    reports = load_pretrained(ebc, table_specs(cfg))
    assert "ShardedTensor" in reports["user"].source_entry
    for t in ROWS:
        key = f"embedding_bags.{t}.weight"
        assert np.array_equal(ebc.state_dict()[key].numpy(), s0["five"][key])


# --------------------------------------------------------------------------- one process


class Holder(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(64, 32)


def _plain_state(seed: int) -> Dict[str, Any]:
    model = Holder(seed)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    model.lin(torch.randn(4, 64)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)  # its state holds None / floats / lists
    return {"model": model, "optimizer": opt, "scheduler": sched, "progress": torchsnapshot.StateDict(step=seed, tag=None),
            "rng": torchsnapshot.RNGState()}


def test_single_process_roundtrip_and_latest(tmp_path):
    a = _plain_state(1)
    for step in (3, 10):
        a["progress"]["step"] = step
        assert save_checkpoint(tmp_path, step, a) == tmp_path / f"step_{step}"
    (tmp_path / "step_12").mkdir()  # no COMPLETE, no manifest
    (tmp_path / ".step_11.incomplete").mkdir()
    (tmp_path / "step_11").mkdir()
    (tmp_path / "step_11" / COMPLETE_MARKER).write_text("{}")  # a marker without a snapshot
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert latest_checkpoint(tmp_path / "nothing_here") is None

    expected_draw = torch.rand(3)  # the RNG state saved in step_10 was the one before this draw
    b = _plain_state(2)
    assert restore_checkpoint(latest_checkpoint(tmp_path), b) == 10
    assert torch.equal(torch.rand(3), expected_draw)
    assert torch.equal(b["model"].lin.weight, a["model"].lin.weight)
    sa, sb = a["optimizer"].state_dict()["state"], b["optimizer"].state_dict()["state"]
    assert all(torch.equal(sa[i]["sum"], sb[i]["sum"]) for i in sa)
    assert b["progress"]["step"] == 10 and b["progress"]["tag"] is None
    assert b["scheduler"].state_dict() == a["scheduler"].state_dict()

    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        restore_checkpoint(tmp_path / "step_12", b)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path, 10, a)


def test_restore_refuses_broken_or_mismatching_checkpoints_before_writing(tmp_path):
    a = _plain_state(1)
    path = save_checkpoint(tmp_path, 1, a)
    b = _plain_state(2)
    before = b["model"].lin.weight.detach().clone()

    wide = {"model": Holder(3)}
    wide["model"].lin = torch.nn.Linear(64, 33)
    with pytest.raises(CheckpointError, match=r"\[32, 64\].*\[33, 64\]"):
        restore_checkpoint(path, wide)
    with pytest.raises(CheckpointError, match="has no entry 'extra/"):
        restore_checkpoint(path, {**b, "extra": torchsnapshot.StateDict(x=torch.zeros(2))})
    assert torch.equal(b["model"].lin.weight, before)

    data = max((p for p in path.rglob("*") if p.is_file() and p.name not in (".snapshot_metadata", COMPLETE_MARKER)),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-64])
    with pytest.raises(SnapshotReadError, match="cut short"):
        restore_checkpoint(path, b)
    assert torch.equal(b["model"].lin.weight, before)


def test_async_checkpoint_holds_the_values_at_save_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE", "1024")
    big = torch.zeros(64, 1024)  # 256 kB: above the (lowered) batching threshold
    state = {"progress": torchsnapshot.StateDict(w=big, step=1)}
    pending = save_checkpoint(tmp_path, 1, state, asynchronous=True)
    big.fill_(1.0)  # training goes on
    path = pending.wait()
    assert pending.done() and path == tmp_path / "step_1" and latest_checkpoint(tmp_path) == path
    fresh = {"progress": torchsnapshot.StateDict(w=torch.full((64, 1024), 7.0), step=0)}
    restore_checkpoint(path, fresh)
    assert torch.count_nonzero(fresh["progress"]["w"]) == 0 and fresh["progress"]["step"] == 1
