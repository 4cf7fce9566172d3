"""The parts of a run built from the parsed config and the data in memory: the embedding modules
with their vocabs, each split's rows, the stratified metrics and the optimizers.

Each builder takes the `ParsedConfig` `preflight` returned (nothing is parsed twice) and runs the
checks that need the data or the built tables, so a config that cannot train stops here, before
anything is sharded or loaded. `loop.Trainer` calls them in order; none talks to the other ranks.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from recap_embed._instantiate import build
from recap_embed.config import ConfigError, ParsedConfig, validate
from recap_embed.io.vocab import Vocab
from recap_embed.io.vocab_mapper import VocabMapper
from recap_embed.modules import StratifiedMetrics, Stratifiers
from recap_embed.optim import EmbeddingLRScheduler, combined_optimizer

from . import derive
from .data import Examples
from .fingerprint import check_warm_start_vocabs
from .guards import check_examples, dense_optimizer_class
from .own_data import DiscreteCodes
from .splits import data_paths

__all__ = ["build_embeddings", "build_metrics", "build_optimizer", "rows_of_split"]

log = logging.getLogger("recap_embed.train")


def build_embeddings(
    cfg: DictConfig, parsed: ParsedConfig, allowed_targets: Any, derived_small: Optional[Dict[str, Any]],
    codes: DiscreteCodes, examples: Mapping[str, Examples],
) -> Tuple[Any, Any]:
    """The large and small embedding modules (on meta), every large table's vocab loaded, and the
    checks that need the data: codes within the small tables, raw ids within tables without a
    vocab, warm-start vocabs, each split against the batch size."""
    large = build(cfg.embeddings, parsed, allowed_targets=allowed_targets)
    if derived_small is not None:  # through the section's own `_target_`, which may be the user's
        derived = validate({"tables": derived_small}, section="small_embeddings", num_discrete_features=len(codes.columns))
        small = build(cfg.small_embeddings, replace(parsed, small_embeddings=derived.small_embeddings),
                      allowed_targets=allowed_targets, tables=derived_small)
    else:
        small = build(cfg.small_embeddings, parsed, allowed_targets=allowed_targets)
        top = {i: max(int(e.discrete[:, i].max()) for e in examples.values() if len(e)) for i in range(len(codes.columns))}
        derive.check_given_small_tables(small.tables, codes, top)
    _load_given_vocabs(large)
    _check_raw_ids(large, examples)
    check_warm_start_vocabs(large.specs, large.vocabs)
    check_examples(examples, int(cfg.train.batch_size), list(small.tables), data_paths(cfg.data))
    return large, small


def _load_given_vocabs(large: Any) -> None:
    """A table with a vocab and its own num_embeddings: its rows still come from the vocab (raw
    ids are meaningless as rows); the vocab must fit in num_embeddings."""
    for spec in large.specs:
        if spec.vocab and spec.name not in large.vocabs:
            large.vocabs[spec.name] = Vocab.load(
                spec.vocab, table=spec.name, num_embeddings=spec.num_embeddings,
                oov_policy=spec.oov_policy, oov_buckets=spec.oov_buckets, config_path=spec.path,
            )


def _check_raw_ids(large: Any, examples: Mapping[str, Examples]) -> None:
    """A table without a vocab takes raw ids as rows: every split's ids must be rows of it."""
    for spec in large.specs:
        if spec.name in large.vocabs:
            continue
        for feature in spec.feature_names:
            for split, split_examples in examples.items():
                ids = split_examples.user_ids if feature == "user" else split_examples.item_ids
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_embeddings):
                    raise ConfigError(
                        f"{spec.path}: has no vocab, so the raw ids of feature {feature!r} are its rows, but the "
                        f"{split} data has ids in [{int(ids.min())}, {int(ids.max())}], outside the table's "
                        f"{spec.num_embeddings} rows; allowed: ids in [0, {spec.num_embeddings}); set "
                        f"{spec.path}.vocab to a vocab directory (id -> row)"
                    )


def rows_of_split(mapper: VocabMapper, split: str, examples: Examples, rank: int) -> Tuple[Examples, Dict[str, float]]:
    """A split's raw ids as rows, mapped once over the whole split (vectorised), so the step does
    not pay for it (the mapper would do the same per batch; see BENCHMARKS.md, section 7).
    Returns the rows and the share of ids each table's vocab lacks (OOV), logged for validation and eval."""
    vocabs = mapper.vocabs
    mapper.reset_counts()
    user = vocabs["user"].map(examples.user_ids) if "user" in vocabs else examples.user_ids
    item = vocabs["item"].map(examples.item_ids) if "item" in vocabs else examples.item_ids
    oov = mapper.oov_rates()
    if rank == 0 and split != "train" and oov:
        log.info("%s: ids not in the table's vocab (OOV): %s", split, ", ".join(f"{t} {r:.2%}" for t, r in oov.items()))
    return Examples(user, item, examples.discrete, examples.clicks), oov


def build_metrics(
    cfg: DictConfig, parsed: ParsedConfig, allowed_targets: Any, derived_strata: Optional[Dict[str, Any]],
    codes: DiscreteCodes, rank: int, device: torch.device,
) -> Tuple[StratifiedMetrics, StratifiedMetrics]:
    """(eval metrics, per stratum too; validation metrics, overall only): AUROC and mean loss.
    Validation runs every `train.eval_every` steps, so it skips the strata; they are for eval."""
    if derived_strata is not None:
        parsed = replace(parsed, stratifiers=validate({"strata": derived_strata}, section="stratifiers").stratifiers)
        strata = build(cfg.stratifiers, parsed, allowed_targets=allowed_targets, strata=derived_strata)
    else:
        strata = build(cfg.stratifiers, parsed, allowed_targets=allowed_targets)
        if rank == 0:
            for note in derive.describe_given_strata(list(strata), codes):
                log.warning("%s", note)
    metrics = StratifiedMetrics({"auroc": BinaryAUROC(), "loss": MeanMetric()}, strata).to(device)
    validation = StratifiedMetrics({"auroc": BinaryAUROC(), "loss": MeanMetric()}, Stratifiers()).to(device)
    return metrics, validation


def build_optimizer(model: Any, dense: Any) -> Tuple[Any, EmbeddingLRScheduler]:
    """The one optimizer the step calls (the tables' fused optimizers plus the dense one that
    `train.dense_optimizer` describes), and the per-table learning-rate scheduler over it."""
    dense_cls = dense_optimizer_class(dense.name)
    optimizer = combined_optimizer(model, lambda params: dense_cls(params, lr=dense.lr, weight_decay=dense.weight_decay))
    return optimizer, EmbeddingLRScheduler(model, optimizer)
