"""Metrics overall and per stratum (e.g. per country or device), as in tml's stratifiers.

A stratum is the set of rows whose discrete feature in column `index` equals `value`.
`StratifiedMetric` keeps one torchmetrics metric for all rows and one per stratum, so
`compute()` syncs across ranks like any torchmetrics metric.

Names (stable, config order): ``<metric>`` for all rows, ``<metric>/<stratum>`` per stratum,
where <stratum> is the stratifier's `name` (default: its key in `strata`), e.g. ``auroc``,
``auroc/device_0``.

Undefined values are NaN, never an exception: a stratum (or the whole set) with no rows in
any rank gives NaN; curve metrics (AUROC, average precision: torchmetrics
`BinaryPrecisionRecallCurve` subclasses) also give NaN when the rows hold only one class,
where torchmetrics would warn and return 0.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import BaseAggregator
from torchmetrics.classification import BinaryPrecisionRecallCurve

from recap_embed.config import ConfigError, ParsedConfig, StratifiersConfig, StratumSpec, validate
from recap_embed.config.resolve import config_prefix
from recap_embed.errors import UserError
from recap_embed.modules.small import section_of

from .discrete import check_columns

__all__ = ["StratifiedMetric", "StratifiedMetrics", "Stratifier", "Stratifiers", "StratifierError", "metric_name"]

SECTION = "stratifiers"

MetricLike = Union[Metric, Callable[[], Metric]]


class StratifierError(IndexError, UserError):
    """Discrete features too narrow for a stratifier's column (a data error)."""


#: One stratum with its name resolved (the config layer's parsed form).
Stratifier = StratumSpec


class Stratifiers:
    """The strata of a config: `masks(discrete)` gives one boolean row mask per stratum.

    Built by ``hydra.utils.instantiate(cfg.stratifiers)`` (kwarg `strata`) or
    `Stratifiers.from_config`. Not a module: no parameters, only the index/value tensors cached per device.
    """

    def __init__(self, strata: Any = None, *, path: str = SECTION) -> None:
        if isinstance(strata, tuple) and all(isinstance(s, StratumSpec) for s in strata):
            self.strata: Tuple[Stratifier, ...] = strata  # parsed already (`validate(cfg).stratifiers`)
        else:
            parsed = validate({"strata": strata or {}}, section=SECTION, path=path)
            assert parsed.stratifiers is not None
            self.strata = parsed.stratifiers
        self._cache: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> "Stratifiers":
        """From a `StratifiersConfig` (dataclass or DictConfig), a root config holding one, or a
        `ParsedConfig` (not checked again)."""
        if isinstance(cfg, ParsedConfig):
            if cfg.stratifiers is None:
                raise ConfigError("the parsed config holds no stratifiers section")
            return cls(cfg.stratifiers)
        section = section_of(cfg, SECTION, "strata", StratifiersConfig)
        path = config_prefix(section, SECTION)
        parsed = validate(section, section=SECTION, path=path)
        return cls(parsed.stratifiers)

    @property
    def names(self) -> List[str]:
        """Stratum names in config order."""
        return [s.name for s in self.strata]

    def __len__(self) -> int:
        return len(self.strata)

    def __iter__(self) -> Iterator[Stratifier]:
        return iter(self.strata)

    def mask_matrix(self, discrete: torch.Tensor) -> torch.Tensor:
        """BoolTensor [S, B]: row s marks the rows of stratum s (one comparison for all strata)."""
        check_columns(discrete, ((s.path, "stratum", s.name, s.index) for s in self.strata), path=SECTION, error=StratifierError)
        if not self.strata:
            return torch.zeros(0, discrete.shape[0], dtype=torch.bool, device=discrete.device)
        if discrete.device not in self._cache:
            self._cache[discrete.device] = (
                torch.tensor([s.index for s in self.strata], device=discrete.device),
                torch.tensor([s.value for s in self.strata], device=discrete.device),
            )
        index, value = self._cache[discrete.device]
        return (discrete.index_select(1, index) == value.to(discrete.dtype)).T

    def masks(self, discrete: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{stratum name: BoolTensor [B]} with ``discrete[:, index] == value``."""
        return dict(zip(self.names, self.mask_matrix(discrete).unbind(0)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}: col {s.index} == {s.value}" for s in self.strata)
        return f"Stratifiers({inner})"


def metric_name(metric: Metric) -> str:
    """A short default name: BinaryAUROC -> 'auroc', MeanMetric -> 'mean', BinaryAccuracy -> 'accuracy'."""
    name = re.sub(r"^(Binary|Multiclass|Multilabel)", "", type(metric).__name__)
    name = re.sub(r"(?<=.)Metric$", "", name)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class _RowCounts(Metric):
    """Rows and rows of each class per group, summed across ranks: decides what is undefined."""

    full_state_update = False

    def __init__(self, groups: int) -> None:
        super().__init__()
        for state in ("rows", "positives", "negatives"):
            self.add_state(state, default=torch.zeros(groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, masks: torch.Tensor, target: Optional[torch.Tensor]) -> None:  # type: ignore[override]
        self.rows += masks.sum(1)
        if target is not None and target.numel():
            flat = target.reshape(target.shape[0], -1)
            self.positives += (masks & (flat == 1).any(1)).sum(1)
            self.negatives += (masks & (flat == 0).any(1)).sum(1)

    def compute(self) -> torch.Tensor:
        """LongTensor [3, groups]: rows, positives, negatives (never squeezed to a scalar)."""
        return torch.stack([self.rows, self.positives, self.negatives])


def _has_list_state(metric: Metric) -> bool:
    return any(isinstance(default, list) for default in metric._defaults.values())


class StratifiedMetric(nn.Module):
    """One torchmetrics metric over all rows and over each stratum.

    `metric` is a metric instance (cloned for the strata) or a factory such as
    ``BinaryAUROC`` or ``functools.partial(BinaryAUROC, thresholds=200)``. Aggregators
    (``MeanMetric``, ``SumMetric`` ...) are updated with `preds` alone: pass the per-example
    value (e.g. the loss) as `preds`; `target` may be None. `needs_both_classes` (default:
    True for curve metrics such as AUROC) reports NaN where the rows hold one class only.
    """

    def __init__(
        self,
        metric: MetricLike,
        stratifiers: Stratifiers,
        *,
        name: Optional[str] = None,
        needs_both_classes: Optional[bool] = None,
    ) -> None:
        super().__init__()
        first = metric if isinstance(metric, Metric) else metric()
        if not isinstance(first, Metric):
            raise TypeError(f"expected a torchmetrics Metric or a factory of one, got {type(first).__name__}")
        copies = [metric.clone() if isinstance(metric, Metric) else metric() for _ in stratifiers.strata]
        self.metrics = nn.ModuleList([first, *copies])  # 0: all rows; 1 + s: stratum s
        for m in self.metrics:
            m.reset()
        self.counts = _RowCounts(len(self.metrics))
        self.stratifiers = stratifiers
        self.name = name or metric_name(first)
        self.aggregator = isinstance(first, BaseAggregator)
        self.needs_both_classes = (
            isinstance(first, BinaryPrecisionRecallCurve) if needs_both_classes is None else needs_both_classes
        )
        self._list_state = _has_list_state(first)

    @property
    def names(self) -> List[str]:
        """Result keys in order: the metric's name, then ``<name>/<stratum>`` per stratum."""
        return [self.name] + [f"{self.name}/{s}" for s in self.stratifiers.names]

    def update(self, preds: torch.Tensor, target: Optional[torch.Tensor], discrete: torch.Tensor) -> None:
        """Update with a batch: `preds`/`target` rows align with `discrete` rows."""
        self._update(preds, target, self._all_masks(discrete, preds.shape[0]))

    def _all_masks(self, discrete: torch.Tensor, batch: int) -> torch.Tensor:
        if discrete.shape[0] != batch:
            raise ValueError(f"{self.name}: preds have {batch} rows but discrete features have {discrete.shape[0]}")
        strata = self.stratifiers.mask_matrix(discrete)
        everything = torch.ones(1, discrete.shape[0], dtype=torch.bool, device=discrete.device)
        return torch.cat([everything, strata.to(everything.device)], 0)

    def _update(self, preds: torch.Tensor, target: Optional[torch.Tensor], masks: torch.Tensor) -> None:
        masks = masks.to(preds.device)
        self.counts.update(masks, None if self.aggregator else target)
        sizes = masks.sum(1).tolist()  # one sync for all groups
        for metric, mask, size in zip(self.metrics, masks, sizes):
            if size == 0 and not (self._list_state and self._lists_empty(metric)):
                # Nothing to add. A list-state metric still takes one empty update, so that every
                # rank has a tensor to all_gather at compute (an empty list on one rank hangs sync).
                continue
            if self.aggregator:
                metric.update(preds[mask])
            else:
                metric.update(preds[mask], target[mask] if target is not None else None)

    @staticmethod
    def _lists_empty(metric: Metric) -> bool:
        return any(isinstance(getattr(metric, k), list) and not getattr(metric, k) for k in metric._defaults)

    def compute(self) -> Dict[str, float]:
        """{name: value}; NaN where undefined (no rows; one class only for curve metrics)."""
        out: Dict[str, float] = {}
        with warnings.catch_warnings():
            # A stratum with rows on other ranks only was never updated here; its sync is still right.
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            rows, positives, negatives = self.counts.compute().tolist()
            for i, key in enumerate(self.names):
                undefined = rows[i] == 0 or (self.needs_both_classes and (positives[i] == 0 or negatives[i] == 0))
                out[key] = float("nan") if undefined else _scalar(self.metrics[i].compute(), key)
        return out

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()
        self.counts.reset()


def _scalar(value: Any, key: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"{key}: the metric returned {type(value).__name__}, not a scalar; stratify scalar metrics only")


class StratifiedMetrics(nn.Module):
    """Several stratified metrics over one set of strata, sharing the masks of each batch.

    ``StratifiedMetrics({"auroc": BinaryAUROC, "loss": MeanMetric}, strata)`` then
    ``update(probs, labels, discrete, loss=per_example_loss)``: a keyword named like a metric
    replaces `preds` for that metric. `compute()` merges the names of all metrics.
    """

    def __init__(self, metrics: Mapping[str, MetricLike], stratifiers: Stratifiers) -> None:
        super().__init__()
        bad = [n for n in metrics if not n or "." in n or "/" in n]
        if bad:
            raise ValueError(f"metric names must be non-empty, without '.' or '/': {bad}")
        self.stratifiers = stratifiers
        self.metrics = nn.ModuleDict({n: StratifiedMetric(m, stratifiers, name=n) for n, m in metrics.items()})

    @property
    def names(self) -> List[str]:
        return [k for m in self.metrics.values() for k in m.names]

    def update(
        self, preds: torch.Tensor, target: Optional[torch.Tensor], discrete: torch.Tensor, **inputs: torch.Tensor
    ) -> None:
        unknown = set(inputs) - set(self.metrics)
        if unknown:
            raise ValueError(f"inputs {sorted(unknown)} name no metric; metrics: {list(self.metrics)}")
        masks = None
        for name, metric in self.metrics.items():
            values = inputs.get(name, preds)
            if masks is None:
                masks = metric._all_masks(discrete, values.shape[0])
            metric._update(values, target, masks)

    def compute(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for metric in self.metrics.values():
            out.update(metric.compute())
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
