"""One rank: the direct kernel path `shard` takes gives what torchrec's distributed path gives.

Two copies of one model are sharded from the same seed in one process, one with the
single-rank path (the default) and one with ``single_rank_fast_path=False``, and trained side
by side: outputs, weights, optimizer state, scheduler, table statistics, plans and checkpoints
must be equal bit for bit, and checkpoints must restore across the two.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import nn

from recap_embed.config.schema import EmbeddingSnapshot
from recap_embed.distributed import describe_plan, shard
from recap_embed.distributed.single_rank import single_rank_modules
from recap_embed.io.checkpoint import restore_checkpoint, save_checkpoint
from recap_embed.io.pretrained import load_pretrained
from recap_embed.modules import LargeEmbeddings, table_stats
from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer

PIECEWISE = {"piecewise_constant": {"learning_rate_boundaries": [2], "learning_rate_values": [0.1, 0.3]}}
TABLES: Dict[str, Dict[str, Any]] = {
    "sgd_a": {"num_embeddings": 600, "optimizer": {"algorithm": "sgd", "learning_rate": PIECEWISE}},
    "rwa": {"num_embeddings": 500, "pooling": "mean", "optimizer": {"algorithm": "rowwise_adagrad", "init_learning_rate": 0.1}},
    "ada": {"num_embeddings": 400, "embedding_dim": 4, "optimizer": {"algorithm": "adagrad", "init_learning_rate": 0.1}},
    "two": {"num_embeddings": 300, "feature_names": ["two_x", "two_y"]},
    "dp": {"num_embeddings": 20, "embedding_dim": 4},
}
PLAN = {t: {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [0]} for t in TABLES}
PLAN["dp"] = {"sharding_type": "data_parallel", "compute_kernel": "dense", "ranks": []}
FEATURES = ["sgd_a", "rwa", "ada", "two_x", "two_y", "dp"]
DIM = sum(t.get("embedding_dim", 8) for t in TABLES.values()) + 8  # two_y is a second output of 8
STEPS = 4


class Ranker(nn.Module):
    def __init__(self, weighted: bool = False, tables: Dict[str, Any] = TABLES) -> None:
        super().__init__()
        self.emb = LargeEmbeddings.from_config({"tables": tables, "embedding_dim": 8, "is_weighted": weighted,
                                                "tables_to_log": ["sgd_a", "dp"]})
        self.dense = nn.Linear(sum(s.embedding_dim * len(s.feature_names) for s in self.emb.specs), 1)

    def forward(self, kjt: Any) -> torch.Tensor:
        kt = self.emb(kjt)
        return self.dense(torch.cat([kt[f] for f in FEATURES], dim=1)).squeeze(1)


def _build(fast: bool, plan: Dict[str, Any] = PLAN, weighted: bool = False) -> Tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = shard(Ranker(weighted), {"device": "cpu", "plan": plan}, single_rank_fast_path=fast)
    opt = combined_optimizer(model, lambda params: torch.optim.Adam(params, lr=0.01))
    return model, opt, EmbeddingLRScheduler(model, opt)


def _kjt(step: int, keys: List[str], weighted: bool = False) -> Any:
    """A batch of 6 bags per feature; each feature's bags depend on (step, feature) only, not on
    where the feature sits in `keys`."""
    from torchrec import KeyedJaggedTensor

    lengths, values, weights = [], [], []
    for f in keys:
        g = torch.Generator().manual_seed(1000 * step + sum(map(ord, f)))
        rows = TABLES["two" if f.startswith("two") else f]["num_embeddings"] if f in FEATURES else 10
        n = torch.randint(0, 5, (6,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, rows, (int(n.sum()),), generator=g))
        weights.append(torch.rand(int(n.sum()), generator=g))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                             weights=torch.cat(weights) if weighted else None)


def _local(value: Any) -> List[torch.Tensor]:
    if hasattr(value, "local_shards"):
        return [s.tensor for s in value.local_shards()]
    return [value] if isinstance(value, torch.Tensor) else []


def _assert_state_equal(a: Dict[str, Any], b: Dict[str, Any], what: str) -> None:
    from torchsnapshot.flatten import flatten

    _, fa = flatten(a, prefix=what)
    _, fb = flatten(b, prefix=what)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        ta, tb = _local(fa[key]), _local(fb[key])
        assert len(ta) == len(tb), key
        if not ta:
            assert fa[key] == fb[key], key
        for x, y in zip(ta, tb):
            assert torch.equal(x, y), key


def _snapshot_contents(path: Path) -> Dict[str, Any]:
    """Every manifest entry with its bytes in place of where they are stored (torchsnapshot names
    its batched files with random UUIDs, so files cannot be compared by name)."""
    import dataclasses

    from recap_embed.io.pretrained import SnapshotReader

    with SnapshotReader(str(path)) as reader:
        def canonical(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                out = {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                       if f.name not in ("location", "byte_range")}
                if getattr(obj, "location", None) is not None:
                    out["bytes"] = reader._read(obj.location, obj.byte_range)
                return type(obj).__name__, out
            if isinstance(obj, (list, tuple)):
                return [canonical(v) for v in obj]
            if isinstance(obj, dict):
                return {k: canonical(v) for k, v in obj.items()}
            return obj

        return {key: canonical(entry) for key, entry in reader.metadata.manifest.items()}


def _step(model: Any, opt: Any, sched: Any, kjt: Any) -> torch.Tensor:
    out = model(kjt)
    loss = (out * torch.linspace(-1, 1, out.numel())).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return out.detach()


# Keys in table order, shuffled, and with a feature no table reads. torchrec's distributed forward
# fixes the key order at its first batch (a later batch in another order is read wrongly), so the
# distributed model always gets FEATURES; the single-rank path follows each batch's own order.
KEY_ORDERS = [FEATURES, ["dp", "two_y", "ada", "sgd_a", "two_x", "rwa"], ["extra"] + FEATURES[::-1]]


def test_fast_path_is_taken_and_trains_bit_for_bit_like_the_distributed_path(tmp_path: Path) -> None:
    fast, fast_opt, fast_sched = _build(True)
    dmp, dmp_opt, dmp_sched = _build(False)
    assert single_rank_modules(fast) and not single_rank_modules(dmp)
    assert describe_plan(fast) == describe_plan(dmp)
    _assert_state_equal(fast.state_dict(), dmp.state_dict(), "model")  # same start
    for step in range(STEPS):
        a = _step(fast, fast_opt, fast_sched, _kjt(step, KEY_ORDERS[step % len(KEY_ORDERS)]))
        b = _step(dmp, dmp_opt, dmp_sched, _kjt(step, FEATURES))
        assert torch.equal(a, b), step
    _assert_state_equal(fast.state_dict(), dmp.state_dict(), "model")
    _assert_state_equal(fast_opt.state_dict(), dmp_opt.state_dict(), "optimizer")
    assert fast_sched.state_dict() == dmp_sched.state_dict()
    assert table_stats(fast) == table_stats(dmp)

    # Equal checkpoints: the same entries with the same bytes, and each restores into the other.
    paths = {}
    for name, (m, o, s) in {"fast": (fast, fast_opt, fast_sched), "dmp": (dmp, dmp_opt, dmp_sched)}.items():
        paths[name] = save_checkpoint(tmp_path / name, STEPS, {"model": m, "optimizer": o, "scheduler": s})
    assert _snapshot_contents(paths["fast"]) == _snapshot_contents(paths["dmp"])

    # A checkpoint is a pretrained source for the fast path: the tables come back as saved.
    warm, _, _ = _build(True)
    specs = [replace(s, pretrained=EmbeddingSnapshot(emb_name=s.name, embedding_snapshot_uri=str(paths["fast"])))
             for s in warm.module.emb.specs]
    assert sorted(load_pretrained(warm, specs)) == sorted(TABLES)
    saved, loaded = fast.state_dict(), warm.state_dict()
    for s in specs:
        key = f"emb.ebc.embedding_bags.{s.name}.weight"
        assert all(torch.equal(x, y) for x, y in zip(_local(loaded[key]), _local(saved[key]))), key

    fresh_fast, ff_opt, ff_sched = _build(True)
    fresh_dmp, fd_opt, fd_sched = _build(False)
    for opt in (ff_opt, fd_opt):  # a fresh Adam has no state yet to restore into (restore fills what exists)
        dict(opt.optimizers)["dense"].init_state()
        opt.zero_grad()
    restore_checkpoint(paths["dmp"], {"model": fresh_fast, "optimizer": ff_opt, "scheduler": ff_sched})
    restore_checkpoint(paths["fast"], {"model": fresh_dmp, "optimizer": fd_opt, "scheduler": fd_sched})
    for step in range(STEPS, STEPS + 2):
        kjt = _kjt(step, FEATURES)
        want = _step(fast, fast_opt, fast_sched, kjt)
        assert torch.equal(_step(fresh_fast, ff_opt, ff_sched, kjt), want)
        assert torch.equal(_step(fresh_dmp, fd_opt, fd_sched, kjt), want)
    _assert_state_equal(fresh_fast.state_dict(), fast.state_dict(), "model")
    _assert_state_equal(fresh_dmp.state_dict(), fast.state_dict(), "model")


def test_weighted_collection_and_mean_pooling_match() -> None:
    fast, fast_opt, fast_sched = _build(True, weighted=True)
    dmp, dmp_opt, dmp_sched = _build(False, weighted=True)
    assert single_rank_modules(fast)
    for step in range(3):
        a = _step(fast, fast_opt, fast_sched, _kjt(step, KEY_ORDERS[step], weighted=True))
        assert torch.equal(a, _step(dmp, dmp_opt, dmp_sched, _kjt(step, FEATURES, weighted=True)))
    _assert_state_equal(fast.state_dict(), dmp.state_dict(), "model")


def test_column_shards_on_one_rank_keep_torchrecs_forward(caplog: pytest.LogCaptureFixture) -> None:
    plan = dict(PLAN, sgd_a={"sharding_type": "column_wise", "compute_kernel": "fused", "ranks": [0, 0]})
    with caplog.at_level(logging.INFO, logger="recap_embed.distributed.single_rank"):
        fast, fast_opt, fast_sched = _build(True, plan=plan)
    assert single_rank_modules(fast) == []
    assert any("keeps torchrec's distributed forward" in r.getMessage() and "sgd_a" in r.getMessage() for r in caplog.records)
    dmp, dmp_opt, dmp_sched = _build(False, plan=plan)
    kjt = _kjt(0, FEATURES)
    assert torch.equal(_step(fast, fast_opt, fast_sched, kjt), _step(dmp, dmp_opt, dmp_sched, kjt))
