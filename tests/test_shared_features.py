"""A feature several tables read, end to end on two gloo ranks: sharded, trained, warm-started.

torchrec's sharded EmbeddingBagCollection supports it (its outputs are named `feature@table`,
``get_embedding_names_by_table``; the input dist permutes the batch's features into every
sharding's order, repeating a shared one). The checks: the pooled outputs equal plain torch on
whole tables, three fused SGD steps (table_wise, column_wise) and three data_parallel steps give
the reference weights, and the trained tables load back from a checkpoint into another placement.
The training app with such a table is tested in tests/test_interop.py.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from multiprocess import run_ranks

pytestmark = pytest.mark.slow

BAGS = 4  # examples per rank and step
STEPS = 3
# `f` is read by a (table_wise) and b (column_wise); `g` by b and c (data_parallel).
TABLES: Dict[str, Dict[str, Any]] = {
    "a": {"num_embeddings": 40, "feature_names": ["f"], "optimizer": {"init_learning_rate": 0.1}},
    "b": {"num_embeddings": 32, "feature_names": ["f", "g"], "pooling": "mean", "optimizer": {"init_learning_rate": 0.05}},
    "c": {"num_embeddings": 36, "feature_names": ["g"], "optimizer": {"init_learning_rate": 0.2}},
}
ROWS = {"f": 32, "g": 32}  # ids of each feature stay below every reading table's rows
OUTPUTS = ["f@a", "f@b", "g@b", "g@c"]
PLAN = {"a": ("table_wise", [0]), "b": ("column_wise", [1, 0]), "c": ("data_parallel", [])}
RESHARDED = {"a": ("column_wise", [0, 1]), "b": ("table_wise", [1]), "c": ("data_parallel", [])}


def _config(pretrained: str = "") -> Dict[str, Any]:
    tables = {k: dict(v) for k, v in TABLES.items()}
    if pretrained:
        for t in tables.values():
            t["pretrained"] = {"embedding_snapshot_uri": pretrained}
    return {"tables": tables, "embedding_dim": 8, "optimizer": {"algorithm": "sgd"}}


def _plan(plan: Dict[str, Any]) -> Dict[str, Any]:
    return {t: {"sharding_type": st, "compute_kernel": "dense" if st == "data_parallel" else "fused", "ranks": r}
            for t, (st, r) in plan.items()}


def _batch(step: int, rank: int):
    """{feature: (ids, lengths)} of one rank's examples, and {output: coef} of its loss."""
    import torch

    g = torch.Generator().manual_seed(100 * step + rank)
    feats = {}
    for f, rows in ROWS.items():
        lengths = torch.randint(0, 4, (BAGS,), generator=g)
        feats[f] = (torch.randint(0, rows, (int(lengths.sum()),), generator=g), lengths)
    coefs = {k: torch.randn(BAGS, 8, generator=g) for k in OUTPUTS}
    return feats, coefs


def _kjt(feats):
    import torch
    from torchrec import KeyedJaggedTensor

    keys = list(feats)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat([feats[k][0] for k in keys]),
                                               lengths=torch.cat([feats[k][1] for k in keys]).int())


def _reference_outputs(ref, feats):
    from multiprocess import reference_pool

    out = {}
    for key in OUTPUTS:
        feature, table = key.split("@")
        ids, lengths = feats[feature]
        out[key] = reference_pool(ref[table], ids, lengths, TABLES[table].get("pooling", "sum"))
    return out


def _two_ranks(rank: int, world_size: int, ckpt_dir: str) -> Dict[str, Any]:
    import torch

    from multiprocess import load_full_weights, max_piece_diff
    from recap_embed.distributed import shard
    from recap_embed.io.checkpoint import save_checkpoint
    from recap_embed.io.pretrained import load_pretrained
    from recap_embed.modules import LargeEmbeddings
    from recap_embed.optim import combined_optimizer

    result: Dict[str, Any] = {}
    model = shard(LargeEmbeddings.from_config(_config()), {"device": "cpu", "plan": _plan(PLAN)})
    result["embedding_names"] = model.module.embedding_names
    ref = {t: torch.randn(s["num_embeddings"], 8, generator=torch.Generator().manual_seed(i)) for i, (t, s) in enumerate(TABLES.items())}
    load_full_weights(model, ref)
    opt = combined_optimizer(model)
    result["output_diff"], result["keys"] = 0.0, None
    for step in range(STEPS):
        feats, coefs = _batch(step, rank)
        out = model(_kjt(feats))
        result["keys"] = list(out.keys())
        out = out.to_dict()
        want = _reference_outputs(ref, feats)
        result["output_diff"] = max(result["output_diff"], max(float((out[k] - want[k]).abs().max()) for k in OUTPUTS))
        sum((out[k] * coefs[k]).sum() for k in OUTPUTS).backward()
        opt.step()
        opt.zero_grad()
        # Reference: the mean of both ranks' losses on whole tables, then SGD.
        w = {t: ref[t].clone().requires_grad_(True) for t in TABLES}
        total = 0.0
        for r in range(world_size):
            f_r, c_r = _batch(step, r)
            pooled = _reference_outputs(w, f_r)
            total = total + sum((pooled[k] * c_r[k]).sum() for k in OUTPUTS)
        grads = torch.autograd.grad(total / world_size, [w[t] for t in TABLES])
        for (t, s), grad in zip(TABLES.items(), grads):
            ref[t] = ref[t] - s["optimizer"]["init_learning_rate"] * grad
    result["weight_diff"] = {t: max_piece_diff(model, t, ref[t]) for t in TABLES}
    path = save_checkpoint(ckpt_dir, STEPS, {"model": model})

    # Warm start another placement from the trained tables.
    fresh = shard(LargeEmbeddings.from_config(_config(pretrained=str(path))), {"device": "cpu", "plan": _plan(RESHARDED)})
    reports = load_pretrained(fresh, fresh.module.specs)
    result["loaded"] = sorted(reports)
    result["loaded_diff"] = {t: max_piece_diff(fresh, t, ref[t]) for t in TABLES}
    feats, _ = _batch(STEPS, rank)
    out = fresh(_kjt(feats)).to_dict()
    want = _reference_outputs(ref, feats)
    result["loaded_output_diff"] = max(float((out[k] - want[k]).abs().max()) for k in OUTPUTS)
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> List[Dict[str, Any]]:
    ckpt = tmp_path_factory.mktemp("shared_ckpt")
    return run_ranks(_two_ranks, 2, str(ckpt), timeout=300)


def test_outputs_are_named_feature_at_table(ranks):
    for r in ranks:
        assert r["embedding_names"] == OUTPUTS and r["keys"] == OUTPUTS


def test_sharded_outputs_and_updates_equal_plain_torch(ranks):
    for r in ranks:
        assert r["output_diff"] < 1e-5, r["output_diff"]
        assert max(r["weight_diff"].values()) < 1e-5, r["weight_diff"]


def test_trained_tables_warm_start_another_placement(ranks):
    for r in ranks:
        assert r["loaded"] == sorted(TABLES)
        assert max(r["loaded_diff"].values()) < 1e-6, r["loaded_diff"]
        assert r["loaded_output_diff"] < 1e-5
