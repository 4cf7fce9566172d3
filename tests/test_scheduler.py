"""Fused updates and per-table learning rates, observed through the weights (one process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from multiprocess import full_weight, load_full_weights
from recap_embed.distributed import describe_plan, shard
from recap_embed.modules import LargeEmbeddings
from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer, dense_parameters, fused_optimizer, table_optimizer


PIECEWISE = {"piecewise_constant": {"learning_rate_boundaries": [1], "learning_rate_values": [0.1, 1.0]}}


def batch(keys, bags) -> KeyedJaggedTensor:
    """The same bags for every key: bags = [[ids of example 0], [ids of example 1]]."""
    lengths = [len(b) for _ in keys for b in bags]
    values = [i for _ in keys for b in bags for i in b]
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.tensor(values), lengths=torch.tensor(lengths))


class Net(nn.Module):
    def __init__(self, emb: LargeEmbeddings) -> None:
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(4, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.emb(features).values().reshape(-1, 4))


def toy(plan, schedules, algorithm="sgd"):
    tables = {
        t: {"num_embeddings": 6, "optimizer": {"learning_rate": schedules[t]} if schedules.get(t) else {}}
        for t in plan
    }
    emb = LargeEmbeddings.from_config(
        {"tables": tables, "embedding_dim": 4, "optimizer": {"algorithm": algorithm, "init_learning_rate": 0.1}}
    )
    placement = {
        t: {"sharding_type": st, "compute_kernel": "dense" if st == "data_parallel" else "fused", "ranks": [0] if st == "table_wise" else []}
        for t, st in plan.items()
    }
    model = shard(Net(emb), {"device": "cpu", "plan": placement})
    w0 = {t: torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8 for t in plan}
    load_full_weights(model, w0)
    return model, w0


C = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.25, 1.0, -1.0, 2.0]])  # d loss / d pooled output of each example


def train_step(model, opt, sched, keys):
    """One step; every feature gets the same bags, the loss reads only `keys`."""
    out = model.module.emb(batch(model.module.emb.feature_names, [[1, 2], [2]])).to_dict()
    loss = sum((out[k] * C).sum() for k in keys)
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_fused_sgd_step_equals_hand_computed_update_and_schedule_scales_it():
    model, w0 = toy({"a": "table_wise", "b": "table_wise"}, {"a": PIECEWISE})
    assert {r["table"]: r["compute_kernel"] for r in describe_plan(model)} == {"a": "fused", "b": "fused"}
    opt = combined_optimizer(model, lambda params: torch.optim.SGD(params, lr=0.0))
    sched = EmbeddingLRScheduler(model, opt)
    # a and b share algorithm and init lr but not the schedule: two kernels, two param groups.
    assert sorted(g["lr"] for g in fused_optimizer(model).param_groups) == pytest.approx([0.1, 0.1])
    assert len(fused_optimizer(model).param_groups) == 2

    train_step(model, opt, sched, ["a", "b"])
    grad = torch.zeros(6, 4)
    grad[1] = C[0]  # row 1 is in example 0 only
    grad[2] = C[0] + C[1]  # row 2 in both (sum pooling)
    for t in "ab":
        torch.testing.assert_close(full_weight(model, t), w0[t] - 0.1 * grad, atol=1e-6, rtol=0)
    assert sched.get_last_lr() == {"a": pytest.approx(1.0), "b": pytest.approx(0.1)}

    w1 = {t: full_weight(model, t) for t in "ab"}
    train_step(model, opt, sched, ["a", "b"])
    delta_a = w1["a"] - full_weight(model, "a")
    delta_b = w1["b"] - full_weight(model, "b")
    torch.testing.assert_close(delta_a, 1.0 * grad, atol=1e-5, rtol=0)  # 10x the first update
    torch.testing.assert_close(delta_b, 0.1 * grad, atol=1e-6, rtol=0)  # b's schedule is constant


def test_data_parallel_table_trains_with_its_own_optimizer_and_schedule():
    model, w0 = toy({"d": "data_parallel", "f": "table_wise"}, {"d": PIECEWISE})
    assert {r["table"]: (r["sharding_type"], r["compute_kernel"]) for r in describe_plan(model)} == {
        "d": ("data_parallel", "dense"),
        "f": ("table_wise", "fused"),
    }
    dense = dense_parameters(model)
    assert sorted(dense) == ["head.bias", "head.weight"]  # neither table is left to the dense optimizer
    opt = combined_optimizer(model, lambda params: torch.optim.SGD(params, lr=0.0))
    assert [k for k, _ in table_optimizer(model).optimizers] == ["fused", "data_parallel.d"]
    assert EmbeddingLRScheduler(model, fused_optimizer(model)).unscheduled == ["d"]  # not in dmp.fused_optimizer
    sched = EmbeddingLRScheduler(model, opt)
    assert sched.unscheduled == []
    grad = torch.zeros(6, 4)
    grad[1], grad[2] = C[0], C[0] + C[1]
    train_step(model, opt, sched, ["d"])
    torch.testing.assert_close(full_weight(model, "d"), w0["d"] - 0.1 * grad, atol=1e-6, rtol=0)
    w1 = full_weight(model, "d")
    train_step(model, opt, sched, ["d"])
    torch.testing.assert_close(w1 - full_weight(model, "d"), 1.0 * grad, atol=1e-5, rtol=0)
    assert table_optimizer(model).optimizers[1][1].param_groups[0]["lr"] == pytest.approx(1.0)


def test_fused_rowwise_adagrad_step_equals_hand_computed_update():
    model, w0 = toy({"r": "table_wise"}, {}, algorithm="rowwise_adagrad")
    opt = combined_optimizer(model)
    sched = EmbeddingLRScheduler(model, opt)
    grad = torch.zeros(6, 4)
    grad[1], grad[2] = C[0], C[0] + C[1]
    state = torch.zeros(6)
    w = w0["r"].clone()
    for _ in range(2):
        train_step(model, opt, sched, ["r"])
        state += grad.pow(2).mean(dim=1)
        w -= 0.1 * grad / (state.sqrt() + 1e-8).unsqueeze(1)
    torch.testing.assert_close(full_weight(model, "r"), w, atol=1e-5, rtol=0)


def test_scheduler_state_round_trip_and_protocol():
    ramp = {"linear_ramp_to_constant": {"learning_rate": 0.4, "num_ramp_steps": 4}}
    model, _ = toy({"a": "table_wise", "d": "data_parallel"}, {"a": ramp, "d": ramp})
    opt = combined_optimizer(model)
    sched = EmbeddingLRScheduler(model, opt)
    assert sched.get_last_lr() == {"a": 0.0, "d": 0.0}  # the ramp starts at 0
    for _ in range(3):
        sched.step()
    assert sched.get_last_lr() == {"a": pytest.approx(0.3), "d": pytest.approx(0.3)}
    state = sched.state_dict()
    assert state == {"last_step": 3, "last_lr": {"a": pytest.approx(0.3), "d": pytest.approx(0.3)}}

    resumed = EmbeddingLRScheduler(model, opt)  # back at step 0 ...
    assert fused_optimizer(model).param_groups[0]["lr"] == 0.0
    resumed.load_state_dict(state)  # ... and at step 3 again, in every optimizer
    assert resumed.last_step == 3 and resumed.get_last_lr() == sched.get_last_lr()
    assert fused_optimizer(model).param_groups[0]["lr"] == pytest.approx(0.3)
    assert table_optimizer(model).optimizers[1][1].param_groups[0]["lr"] == pytest.approx(0.3)
    assert sorted(resumed.tables_on_this_rank) == ["a", "d"]
    # The kernel itself got the rate, not only the param group.
    kernel_lrs = [o._emb_module.get_learning_rate() for _, o in _fused_leaves(fused_optimizer(model))]
    assert kernel_lrs == [pytest.approx(0.3)]


def _fused_leaves(opt, prefix=""):
    subs = getattr(opt, "optimizers", None)
    if subs:
        for k, sub in subs:
            yield from _fused_leaves(sub, f"{prefix}.{k}")
    else:
        yield prefix, opt
