"""Stratifiers and stratified metrics, checked against torchmetrics on the masked subsets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

import recap_embed.config  # noqa: F401  (registers the groups)
import recap_embed.modules
from multiprocess import run_ranks
from recap_embed.config import ConfigValidationError, StratifierConfig
from recap_embed.modules.stratify import (
    StratifiedMetric,
    StratifiedMetrics,
    StratifierError,
    Stratifiers,
    metric_name,
)

STRATA = {
    "device_0": StratifierConfig(index=1, value=0),
    "device_1": StratifierConfig(index=1, value=1),
    "country_0": StratifierConfig(index=0, value=0),
    "nobody": StratifierConfig(index=0, value=999),  # matches no row
}
NAMES = ["device_0", "device_1", "country_0", "nobody"]


def data(rows: int, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    discrete = torch.stack([torch.randint(0, 4, (rows,), generator=g), torch.randint(0, 3, (rows,), generator=g)], 1)
    target = torch.randint(0, 2, (rows,), generator=g)
    preds = (0.3 * target + 0.7 * torch.rand(rows, generator=g)).clamp(0, 1)
    loss = torch.rand(rows, generator=g)
    return {"discrete": discrete, "target": target, "preds": preds, "loss": loss}


def direct(metric, preds: torch.Tensor, target=None) -> float:
    """torchmetrics on a subset, computed directly."""
    if target is None:
        metric.update(preds)
    else:
        metric.update(preds, target)
    return float(metric.compute())


def test_masks_follow_index_and_value() -> None:
    strat = Stratifiers(STRATA)
    assert strat.names == NAMES and len(strat) == 4
    discrete = torch.tensor([[0, 0], [0, 1], [2, 1], [3, 2]])
    masks = strat.masks(discrete)
    assert list(masks) == NAMES
    assert masks["device_0"].tolist() == [True, False, False, False]
    assert masks["device_1"].tolist() == [False, True, True, False]
    assert masks["country_0"].tolist() == [True, True, False, False]
    assert masks["nobody"].dtype == torch.bool and not masks["nobody"].any()


def test_stratum_beyond_the_input_width_is_a_clear_error() -> None:
    strat = Stratifiers({"hour_3": {"index": 2, "value": 3}})
    with pytest.raises(StratifierError, match=r"stratifiers\.strata\.hour_3: .*column 2.*only 2 columns"):
        strat.masks(torch.zeros(5, 2, dtype=torch.long))


def test_invalid_strata_are_reported_with_paths() -> None:
    with pytest.raises(ConfigValidationError, match=r"stratifiers\.strata\.a\.index: -1"):
        Stratifiers({"a": {"index": -1, "value": 0}})
    with pytest.raises(ConfigValidationError, match=r"stratifiers\.strata\.b\.value"):
        Stratifiers({"b": {"index": 0}})


def test_default_metric_names() -> None:
    assert metric_name(BinaryAUROC()) == "auroc"
    assert metric_name(MeanMetric()) == "mean"
    assert metric_name(BinaryAccuracy()) == "accuracy"


@pytest.mark.parametrize("as_instance", [False, True])
def test_auroc_overall_and_per_stratum_match_torchmetrics_on_the_subset(as_instance: bool) -> None:
    strat = Stratifiers(STRATA)
    metric = StratifiedMetric(BinaryAUROC() if as_instance else BinaryAUROC, strat)
    batches = [data(200, seed) for seed in range(3)]
    for b in batches:
        metric.update(b["preds"], b["target"], b["discrete"])
    result = metric.compute()
    assert list(result) == ["auroc"] + [f"auroc/{n}" for n in NAMES] == metric.names
    preds = torch.cat([b["preds"] for b in batches])
    target = torch.cat([b["target"] for b in batches])
    masks = strat.masks(torch.cat([b["discrete"] for b in batches]))
    assert result["auroc"] == pytest.approx(direct(BinaryAUROC(), preds, target), abs=1e-6)
    for name in ["device_0", "device_1", "country_0"]:
        m = masks[name]
        assert m.sum() > 20
        assert result[f"auroc/{name}"] == pytest.approx(direct(BinaryAUROC(), preds[m], target[m]), abs=1e-6)
    assert math.isnan(result["auroc/nobody"])  # no rows: NaN, no exception


def test_one_class_stratum_is_nan_for_auroc_but_not_for_accuracy() -> None:
    strat = Stratifiers(STRATA)
    discrete = torch.tensor([[0, 0], [0, 0], [1, 1], [1, 1]])
    target = torch.tensor([1, 1, 0, 1])  # device_0 holds positives only
    preds = torch.tensor([0.9, 0.2, 0.4, 0.7])
    auroc = StratifiedMetric(BinaryAUROC, strat)
    accuracy = StratifiedMetric(BinaryAccuracy, strat)
    for m in (auroc, accuracy):
        m.update(preds, target, discrete)
    a, acc = auroc.compute(), accuracy.compute()
    assert math.isnan(a["auroc/device_0"]) and a["auroc/device_1"] == 1.0
    assert acc["accuracy/device_0"] == 0.5 and acc["accuracy/device_1"] == 1.0
    assert math.isnan(a["auroc/nobody"]) and math.isnan(acc["accuracy/nobody"])


def test_mean_loss_per_stratum_and_reset() -> None:
    strat = Stratifiers(STRATA)
    loss = StratifiedMetric(MeanMetric, strat, name="loss")
    b = data(100, 7)
    loss.update(b["loss"], None, b["discrete"])
    result = loss.compute()
    masks = strat.masks(b["discrete"])
    assert result["loss"] == pytest.approx(float(b["loss"].mean()), abs=1e-6)
    for name in ["device_0", "device_1", "country_0"]:
        assert result[f"loss/{name}"] == pytest.approx(float(b["loss"][masks[name]].mean()), abs=1e-6)
    assert math.isnan(result["loss/nobody"])
    loss.reset()
    assert all(math.isnan(v) for v in loss.compute().values())  # nothing seen since the reset
    loss.update(torch.tensor([2.0]), None, torch.tensor([[0, 1]]))
    assert loss.compute()["loss"] == 2.0 and loss.compute()["loss/device_1"] == 2.0


def test_stratified_metrics_share_masks_and_take_named_inputs() -> None:
    strat = Stratifiers(STRATA)
    metrics = StratifiedMetrics({"auroc": BinaryAUROC, "loss": MeanMetric}, strat)
    b = data(300, 3)
    metrics.update(b["preds"], b["target"], b["discrete"], loss=b["loss"])
    result = metrics.compute()
    assert list(result) == metrics.names == ["auroc"] + [f"auroc/{n}" for n in NAMES] + ["loss"] + [
        f"loss/{n}" for n in NAMES
    ]
    m = strat.masks(b["discrete"])["device_1"]
    assert result["auroc/device_1"] == pytest.approx(direct(BinaryAUROC(), b["preds"][m], b["target"][m]), abs=1e-6)
    assert result["loss/device_1"] == pytest.approx(float(b["loss"][m].mean()), abs=1e-6)
    with pytest.raises(ValueError, match="name no metric"):
        metrics.update(b["preds"], b["target"], b["discrete"], los=b["loss"])


# --------------------------------------------------------------------------- Hydra


@pytest.fixture
def hydra_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "app.yaml").write_text("defaults:\n  - stratifiers: synthetic\n  - _self_\n")
    GlobalHydra.instance().clear()
    yield tmp_path
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset,names", [("synthetic", ["device_0", "device_1", "country_0"]), ("empty", [])])
def test_instantiate_presets(hydra_dir: Path, preset: str, names: List[str]) -> None:
    assert hasattr(recap_embed.modules, "Stratifiers"), "recap_embed.modules must export Stratifiers (the schema's _target_)"
    with initialize_config_dir(config_dir=str(hydra_dir), version_base="1.3"):
        cfg = compose("app", overrides=[f"stratifiers={preset}"])
    strat = instantiate(cfg.stratifiers)
    assert isinstance(strat, Stratifiers) and strat.names == names
    metric = StratifiedMetric(BinaryAUROC, strat)
    metric.update(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), torch.tensor([[0, 0, 5], [3, 1, 7]]))
    assert list(metric.compute()) == ["auroc"] + [f"auroc/{n}" for n in names]


# --------------------------------------------------------------------------- distributed sync


def _stratified_on_this_rank(rank: int, world: int) -> Dict[str, torch.Tensor]:
    """One rank's metrics, synced over the process group `run_ranks` set up."""
    b = data(120, seed=10 + rank)
    if rank == 1:
        b["discrete"][:, 0] = 1  # country_0 has rows on rank 0 only
    metrics = StratifiedMetrics(
        {"auroc": BinaryAUROC, "accuracy": BinaryAccuracy, "loss": MeanMetric}, Stratifiers(STRATA)
    )
    metrics.update(b["preds"], b["target"], b["discrete"], loss=b["loss"])
    return metrics.compute()


def test_compute_syncs_across_ranks_with_strata_empty_on_some_ranks() -> None:
    """Two gloo ranks; a stratum empty on one rank, one empty on both: no hang, pooled values."""
    results = run_ranks(_stratified_on_this_rank, 2, timeout=120)
    pooled = [data(120, seed=10), data(120, seed=11)]
    pooled[1]["discrete"][:, 0] = 1
    preds, target, loss, discrete = (torch.cat([b[k] for b in pooled]) for k in ("preds", "target", "loss", "discrete"))
    masks = Stratifiers(STRATA).masks(discrete)
    for rank in (0, 1):
        r = results[rank]
        assert r["auroc"] == pytest.approx(direct(BinaryAUROC(), preds, target), abs=1e-6)
        for name in ["device_0", "country_0"]:
            m = masks[name]
            assert r[f"auroc/{name}"] == pytest.approx(direct(BinaryAUROC(), preds[m], target[m]), abs=1e-6)
            assert r[f"accuracy/{name}"] == pytest.approx(direct(BinaryAccuracy(), preds[m], target[m]), abs=1e-6)
            assert r[f"loss/{name}"] == pytest.approx(float(loss[m].mean()), abs=1e-6)
        assert all(math.isnan(r[f"{k}/nobody"]) for k in ("auroc", "accuracy", "loss"))
