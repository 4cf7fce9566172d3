"""Two ranks on gloo: sharded tables compute and train exactly like plain torch on whole tables.

One spawned run does every check (starting ranks costs seconds) and returns numbers; the
parent asserts on them. The reference is plain torch on the full tables, from the same start,
with the global batch (the mean of both ranks' losses, as torchrec and DDP average gradients
over ranks) and the update rules of the fused kernels.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest

from multiprocess import run_ranks

BAGS = 4  # examples per rank and step
STEPS = 3
PIECEWISE = {"piecewise_constant": {"learning_rate_boundaries": [2], "learning_rate_values": [0.1, 0.3]}}

TABLES: Dict[str, Dict[str, Any]] = {
    "tw_sgd": {"num_embeddings": 50, "optimizer": {"algorithm": "sgd", "learning_rate": PIECEWISE}},
    "cw_sgd": {"num_embeddings": 40, "optimizer": {"algorithm": "sgd", "init_learning_rate": 0.05}},
    "twcw_sgd": {"num_embeddings": 24, "pooling": "mean", "optimizer": {"algorithm": "sgd", "init_learning_rate": 0.2}},
    "tw_rwa": {"num_embeddings": 30, "optimizer": {"algorithm": "rowwise_adagrad", "init_learning_rate": 0.1}},
    "cw_rwa": {"num_embeddings": 60, "pooling": "mean", "optimizer": {"algorithm": "rowwise_adagrad", "init_learning_rate": 0.2}},
    "dp_sgd": {"num_embeddings": 20, "embedding_dim": 4, "optimizer": {"algorithm": "sgd", "learning_rate": PIECEWISE}},
}
PLAN = {
    "tw_sgd": ("table_wise", [1]),
    "cw_sgd": ("column_wise", [0, 1]),
    "twcw_sgd": ("table_column_wise", [1, 0]),
    "tw_rwa": ("table_wise", [0]),
    "cw_rwa": ("column_wise", [1, 0]),
    "dp_sgd": ("data_parallel", []),
}
LOGGED = ["tw_sgd", "cw_rwa", "dp_sgd"]
#: Columns of each column shard (row-wise optimizer state is kept per row of each shard).
SHARD_COLS = {t: [4, 4] if "cw" in t else [TABLES[t].get("embedding_dim", 8)] for t in TABLES}


def _config() -> Dict[str, Any]:
    return {"tables": TABLES, "embedding_dim": 8, "tables_to_log": LOGGED}


def _plan() -> Dict[str, Any]:
    return {
        t: {"sharding_type": st, "compute_kernel": "dense" if st == "data_parallel" else "fused", "ranks": ranks}
        for t, (st, ranks) in PLAN.items()
    }


def _batch(step: int, rank: int):
    """{table: (ids, lengths, coef)} of one rank's examples; the same on every rank that asks."""
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    out = {}
    for t, spec in TABLES.items():
        lengths = torch.randint(0, 4, (BAGS,), generator=g)
        ids = torch.randint(0, spec["num_embeddings"], (int(lengths.sum()),), generator=g)
        coef = torch.randn(BAGS, spec.get("embedding_dim", 8), generator=g)
        out[t] = (ids, lengths, coef)
    return out


def _kjt(batch):
    import torch
    from torchrec import KeyedJaggedTensor

    keys = list(batch)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([batch[k][0] for k in keys]),
        lengths=torch.cat([batch[k][1] for k in keys]).int(),
    )


def _two_ranks(rank: int, world_size: int, steps: int = STEPS) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist

    from multiprocess import load_full_weights, max_piece_diff, reference_pool, table_weight_entry
    from recap_embed.config import ConfigValidationError
    from recap_embed.distributed import describe_plan, shard
    from recap_embed.modules import LargeEmbeddings, table_stats
    from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer, lr_at

    result: Dict[str, Any] = {}

    # 1. CPU-impossible placements fail on every rank before any collective; the group stays usable.
    try:
        bad = dict(_plan(), tw_sgd={"sharding_type": "row_wise", "compute_kernel": "fused"})
        shard(LargeEmbeddings.from_config(_config()), {"device": "cpu", "plan": bad})
        result["refused"] = None
    except ConfigValidationError as e:
        result["refused"] = str(e)
    flag = torch.tensor([1.0])
    dist.all_reduce(flag)
    result["group_alive"] = float(flag)

    # 2. The planner path (collective plan from rank 0): both ranks get the same plan.
    planned = shard(LargeEmbeddings.from_config(_config()), {"device": "cpu", "sharding_types": ["table_wise", "column_wise", "data_parallel"]})
    result["planned"] = [(r["table"], r["sharding_type"], r["shards"]) for r in describe_plan(planned)]
    del planned

    # 3. The explicit plan, from identical full tables.
    model = shard(LargeEmbeddings.from_config(_config()), {"device": "cpu", "plan": _plan()})
    result["plan"] = {r["table"]: (r["sharding_type"], r["compute_kernel"], r["ranks"], r["shards"]) for r in describe_plan(model)}
    dp = table_weight_entry(model, "dp_sgd").clone()
    copies = [torch.empty_like(dp) for _ in range(world_size)]
    dist.all_gather(copies, dp)
    result["dp_replicas_equal"] = all(torch.equal(copies[0], c) for c in copies)
    ref = {t: torch.randn(s["num_embeddings"], s.get("embedding_dim", 8), generator=torch.Generator().manual_seed(i))
           for i, (t, s) in enumerate(TABLES.items())}
    load_full_weights(model, ref)

    opt = combined_optimizer(model)
    sched = EmbeddingLRScheduler(model, opt)
    result["tables_on_this_rank"] = sched.tables_on_this_rank
    state = {t: torch.zeros(s["num_embeddings"], len(SHARD_COLS[t])) for t, s in TABLES.items()}
    whole_row = {"w": ref["cw_rwa"].clone(), "state": torch.zeros(TABLES["cw_rwa"]["num_embeddings"])}
    touched = {t: set() for t in LOGGED}
    specs = {s.name: s for s in model.module.specs}
    result["output_diff"] = {}
    for step in range(steps):
        mine = _batch(step, rank)
        out = model(_kjt(mine)).to_dict()
        if step == 0:
            for t, (ids, lengths, _) in mine.items():
                want = reference_pool(ref[t], ids, lengths, TABLES[t].get("pooling", "sum"))
                result["output_diff"][t] = float((out[t] - want).abs().max())
        loss = sum((out[t] * mine[t][2]).sum() for t in mine)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

        # Reference: the global batch on whole tables, then the kernels' update rules.
        for t, s in TABLES.items():
            w = ref[t].clone().requires_grad_(True)
            total = 0.0
            for r in range(world_size):
                ids, lengths, coef = _batch(step, r)[t]
                total = total + (reference_pool(w, ids, lengths, s.get("pooling", "sum")) * coef).sum()
                if t in touched:
                    touched[t].update(ids.tolist())
            # torchrec divides gradients by the world size (comm_ops.GRADIENT_DIVISION, as DDP does):
            # the reference loss is the mean of the ranks' losses.
            (grad,) = torch.autograd.grad(total / world_size, w)
            opt_cfg = specs[t].optimizer
            lr = lr_at(opt_cfg.learning_rate, step, opt_cfg.init_learning_rate)
            if opt_cfg.algorithm.name == "sgd":
                ref[t] = ref[t] - lr * grad
            else:  # rowwise_adagrad: one accumulator per row of each column shard
                pieces = grad.split(SHARD_COLS[t], dim=1)
                state[t] += torch.stack([p.pow(2).mean(dim=1) for p in pieces], dim=1)
                scale = (state[t].sqrt() + opt_cfg.eps).repeat_interleave(torch.tensor(SHARD_COLS[t]), dim=1)
                ref[t] = ref[t] - lr * grad / scale
                if t == "cw_rwa":  # what one accumulator per whole row would give
                    wr = whole_row["w"].clone().requires_grad_(True)
                    total_wr = sum((reference_pool(wr, *_batch(step, r)[t][:2], "mean") * _batch(step, r)[t][2]).sum() for r in range(world_size))
                    (g_wr,) = torch.autograd.grad(total_wr / world_size, wr)
                    whole_row["state"] += g_wr.pow(2).mean(dim=1)
                    whole_row["w"] = whole_row["w"] - lr * g_wr / (whole_row["state"].sqrt() + opt_cfg.eps).unsqueeze(1)
    result["weight_diff"] = {t: max_piece_diff(model, t, ref[t]) for t in TABLES}
    result["cw_rwa_whole_row_diff"] = max_piece_diff(model, "cw_rwa", whole_row["w"])
    result["last_lr"] = sched.get_last_lr()

    # 4. Statistics across ranks against the reference tables.
    stats = table_stats(model, LOGGED)
    result["stats"] = stats
    result["ref_stats"] = {
        t: {"mean_row_norm": float(ref[t].norm(dim=1).mean()), "max_row_norm": float(ref[t].norm(dim=1).max()),
            "touched_fraction": len(touched[t]) / TABLES[t]["num_embeddings"]}
        for t in LOGGED
    }
    return result


@pytest.fixture(scope="module")
def ranks() -> List[Dict[str, Any]]:
    return run_ranks(_two_ranks, 2, timeout=240)


def test_cpu_impossible_plan_is_refused_on_every_rank_before_a_collective(ranks):
    for r in ranks:
        assert r["refused"] is not None and "sharding.plan.tw_sgd.sharding_type: row_wise needs CUDA" in r["refused"]
        assert r["group_alive"] == 2.0  # both ranks reached the next collective


def test_planner_runs_once_and_every_rank_gets_its_plan(ranks):
    assert ranks[0]["planned"] == ranks[1]["planned"]
    assert {t for t, _, _ in ranks[0]["planned"]} == set(TABLES)
    assert all(st in ("table_wise", "column_wise", "data_parallel") for _, st, _ in ranks[0]["planned"])


def test_explicit_plan_is_applied_exactly(ranks):
    plan = ranks[0]["plan"]
    assert plan == ranks[1]["plan"]
    for t, (st, want_ranks) in PLAN.items():
        got_st, kernel, got_ranks, shards = plan[t]
        assert got_st == st and kernel == ("dense" if st == "data_parallel" else "fused")
        if st != "data_parallel":
            assert got_ranks == want_ranks
    assert plan["cw_sgd"][3] == [[40, 4, 0], [40, 4, 1]]  # two column shards of 4
    assert plan["cw_rwa"][3] == [[60, 4, 1], [60, 4, 0]]
    assert set(ranks[0]["tables_on_this_rank"]) == {"cw_sgd", "twcw_sgd", "tw_rwa", "cw_rwa", "dp_sgd"}
    assert set(ranks[1]["tables_on_this_rank"]) == {"tw_sgd", "cw_sgd", "twcw_sgd", "cw_rwa", "dp_sgd"}
    assert all(r["dp_replicas_equal"] for r in ranks)


def test_sharded_outputs_equal_plain_torch(ranks):
    for r in ranks:
        assert set(r["output_diff"]) == set(TABLES)
        assert max(r["output_diff"].values()) < 1e-5, r["output_diff"]


@pytest.mark.parametrize("table", ["tw_sgd", "cw_sgd", "twcw_sgd", "dp_sgd"])
def test_three_fused_sgd_steps_equal_the_unsharded_reference(ranks, table):
    for r in ranks:
        assert r["weight_diff"][table] < 1e-5, (table, r["weight_diff"][table])


@pytest.mark.parametrize("table", ["tw_rwa", "cw_rwa"])
def test_three_fused_rowwise_adagrad_steps_equal_the_unsharded_reference(ranks, table):
    for r in ranks:
        assert r["weight_diff"][table] < 1e-5, (table, r["weight_diff"][table])


def test_column_shards_keep_their_own_rowwise_state(ranks):
    # Row-wise Adagrad on column shards: one accumulator per row *of each shard* (what the
    # reference above does), not per whole row; the difference is visible after 3 steps.
    for r in ranks:
        assert r["cw_rwa_whole_row_diff"] > 1e-3


def test_schedules_are_followed_on_every_rank(ranks):
    for r in ranks:
        assert r["last_lr"]["tw_sgd"] == pytest.approx(0.3) and r["last_lr"]["dp_sgd"] == pytest.approx(0.3)
        assert r["last_lr"]["cw_sgd"] == pytest.approx(0.05)


def test_table_stats_reduce_across_ranks(ranks):
    for r in ranks:
        for t in LOGGED:
            for k, want in r["ref_stats"][t].items():
                assert math.isclose(r["stats"][t][k], want, rel_tol=1e-5, abs_tol=1e-6), (t, k, r["stats"][t][k], want)
