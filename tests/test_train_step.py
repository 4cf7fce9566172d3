"""`Trainer.train_step` is the one training step: the loop takes every step through it, and a step
that turns to NaN stops before the dense update is kept."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

import recap_embed.train.config  # noqa: F401  (registers the app's schema)
from recap_embed.train.data import Batch, batches
from recap_embed.train.guards import NonFiniteLossError

TINY = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=50", "data.synthetic.num_train=1000", "data.synthetic.num_eval=300",
    "train.progress=false", "train.batch_size=64", "train.max_steps=5", "train.eval_every=0", "train.checkpoint=false",
]


@pytest.fixture
def trainer(tmp_path: Path):
    from recap_embed.train.loop import Trainer

    with initialize(version_base=None, config_path=None):
        cfg = compose("recap_embed_train", overrides=[f"data.dir={tmp_path / 'data'}", *TINY])
    return Trainer(cfg, tmp_path / "run")


def first_batch(trainer) -> Batch:
    return next(iter(batches(trainer.examples["train"], trainer.cfg.train.batch_size)))


def mlp_weights(trainer):
    """The dense MLP's weights: updated by `optimizer.step()` (the tables update during backward)."""
    return [p.detach().clone() for p in trainer.model.module.mlp.parameters()]


def test_the_loop_takes_every_step_through_train_step(trainer) -> None:
    calls = []
    step = trainer.train_step

    def counted(batch, signum=None):
        calls.append(trainer.step)
        return step(batch, signum)

    trainer.train_step = counted
    metrics = trainer.run()
    assert calls == [0, 1, 2, 3, 4] and metrics["steps"] == trainer.step == 5


def test_a_step_updates_counts_and_returns_the_agreed_loss_and_signal(trainer) -> None:
    before = mlp_weights(trainer)
    loss, signum = trainer.train_step(first_batch(trainer))
    assert isinstance(loss, float) and 0 < loss < 10 and signum is None
    assert trainer.step == 1 and trainer.scheduler.last_step == 1
    assert all(not torch.equal(a, b) for a, b in zip(mlp_weights(trainer), before))  # the optimizer stepped
    assert trainer.train_step(first_batch(trainer), signal.SIGTERM)[1] == signal.SIGTERM  # one rank: its own signal


def test_a_nan_loss_stops_the_step_before_the_dense_update(trainer) -> None:
    batch = first_batch(trainer)
    bad = Batch(batch.sparse, batch.discrete, torch.full_like(batch.labels, float("nan")))
    before = mlp_weights(trainer)
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 1: .*train\.dense_optimizer\.lr="):
        trainer.train_step(bad)
    assert all(torch.equal(a, b) for a, b in zip(mlp_weights(trainer), before)) and trainer.step == 0
    assert trainer.scheduler.last_step == 0
