"""Early stopping with patience on a validation split carved from training, and keep-best."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize

import recap_embed.train.config  # noqa: F401  (registers the app's schema)
from recap_embed.train.keep_best import KeepBest


def test_patience_counts_evaluations_without_improvement() -> None:
    kb = KeepBest("auroc", higher_is_better=True, patience=2, min_delta=0.01)
    assert kb.update(10, {"auroc": 0.60, "loss": 0.7})
    assert not kb.update(20, {"auroc": 0.605, "loss": 0.6})  # below min_delta
    assert not kb.should_stop
    assert kb.update(30, {"auroc": 0.70, "loss": 0.6})
    assert not kb.update(40, {"auroc": math.nan, "loss": 0.6})  # NaN never improves
    assert not kb.update(50, {"auroc": 0.65, "loss": 0.6})
    assert kb.should_stop and (kb.best_step, kb.best_value) == (30, 0.70)
    assert "step 30" in kb.stop_reason() and "patience=2" in kb.stop_reason()


def test_loss_is_lower_is_better_and_state_round_trips() -> None:
    kb = KeepBest("loss", higher_is_better=False, patience=None)
    kb.update(1, {"loss": 0.5})
    assert not kb.update(2, {"loss": 0.6}) and kb.update(3, {"loss": 0.4})
    assert not kb.should_stop  # no patience: never stops
    again = KeepBest("loss", higher_is_better=False, patience=None)
    again.load_state_dict(kb.state_dict())
    assert (again.best_step, again.best_value, again.evals_since_best) == (3, 0.4, 0)


# A tiny synthetic log that a 16-dim table per user overfits within a few epochs.
OVERFIT = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=50", "data.synthetic.num_train=3000", "data.synthetic.num_eval=1000",
    "data.validation_fraction=0.2", "train.progress=false", "train.batch_size=64", "train.epochs=60", "train.eval_every=20",
    "train.early_stopping.patience=3", "train.dense_optimizer.lr=0.03", "embeddings.optimizer.init_learning_rate=0.5",
]


def test_early_stop_keeps_the_best_checkpoint_and_reports_it(tmp_path: Path) -> None:
    from recap_embed.train.loop import Trainer

    with initialize(version_base=None, config_path=None):
        cfg = compose("recap_embed_train", overrides=[f"data.dir={tmp_path / 'data'}", *OVERFIT])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.examples["validation"].clicks.numel() == 600 and trainer.examples["train"].clicks.numel() == 2400
    metrics = trainer.run()
    best, final = metrics["best"], metrics["final"]
    assert metrics["stopped_early"] and "has not improved" in metrics["stopped_early"]
    assert metrics["steps"] < 60 * (2400 // 64)
    assert best["step"] < final["step"] == metrics["steps"], (best["step"], final["step"])
    assert final["step"] - best["step"] == 3 * 20  # patience: three evaluations after the best
    assert best["validation"]["auroc"] > final["validation"]["auroc"]
    # The one best checkpoint is kept beside the final one.
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "best").iterdir())
    assert kept == [f"step_{best['step']}"] and Path(best["checkpoint"]).name == kept[0]
    # It carries the vocab fingerprints like every periodic checkpoint, so a warm start from it is checked.
    from recap_embed.train.fingerprint import read_checkpoint_info

    info = read_checkpoint_info(best["checkpoint"])
    periodic = read_checkpoint_info(str(tmp_path / "run" / "checkpoints" / f"step_{final['step']}"))
    assert info is not None and set(info["vocabs"]) == {"user", "item"} and info["vocabs"] == periodic["vocabs"]
    assert all(fp is not None for fp in info["vocabs"].values())
    assert (tmp_path / "run" / "checkpoints" / f"step_{final['step']}" / "COMPLETE").exists()
    # The reported eval is the best model's, and the model now holds the best weights again.
    assert metrics["eval"] == best["eval"] and metrics["eval_auroc"] == best["eval"]["auroc"] != final["eval"]["auroc"]
    assert trainer.evaluate("validation")["auroc"] == pytest.approx(best["validation"]["auroc"], abs=1e-6)
    assert metrics["validation_auroc"] == best["validation"]["auroc"]
    assert [p["step"] for p in metrics["curve"]][:3] == [20, 40, 60] and "validation_auroc" in metrics["curve"][0]


def test_without_a_validation_split_the_curve_is_on_eval_and_nothing_is_kept(tmp_path: Path) -> None:
    from recap_embed.train.loop import Trainer

    with initialize(version_base=None, config_path=None):
        cfg = compose("recap_embed_train", overrides=[f"data.dir={tmp_path / 'data'}", *OVERFIT[:4], "data.validation_fraction=0",
                                                      "train.progress=false", "train.max_steps=6", "train.eval_every=3"])
    metrics = Trainer(cfg, tmp_path / "run").run()
    assert metrics["best"] is None and metrics["validation_auroc"] is None and "validation" not in metrics["rows"]
    assert [sorted(p) for p in metrics["curve"]] == [["eval_auroc", "eval_loss", "step", "train_loss"]] * 2
    assert metrics["eval"] == metrics["final"]["eval"] and not (tmp_path / "run" / "checkpoints" / "best").exists()
