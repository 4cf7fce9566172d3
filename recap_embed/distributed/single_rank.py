"""World size 1: the sharded tables' kernels called directly, without the distribution machinery.

With one rank, torchrec's sharded ``EmbeddingBagCollection`` still runs its whole distributed
forward on every step: the input dist (KJT splits and an all-to-all over the one-rank group),
awaitables, the lookup wrapper, the output dist (another all-to-all, with copies of the output
and, in backward, of its gradient). All of it moves data from rank 0 to rank 0; it cost 5-10% of
a training step of four 1M-row tables on one CPU thread (BENCHMARKS.md §1).

`install_single_rank_path(model)` (`shard` calls it when the world size is 1) replaces the forward
of each sharded EBC in the model by a `SingleRankLookup`: the input KJT is permuted into the
kernels' feature order (only when it is not already in it) and split per kernel, each kernel
module (torchrec's ``BatchedFusedEmbeddingBag`` / ``BatchedDenseEmbeddingBag``, i.e. the FBGEMM
TBE) is called on its part, and the pooled outputs are concatenated into the same
``KeyedTensor`` torchrec's output dist builds (same keys, same order, same values). The TBE's
autograd function does the fused update in backward exactly as before.

Nothing else changes: the modules, parameters, ``state_dict`` (ShardedTensor values),
``dmp.fused_optimizer``, the plan. Checkpoints, `load_pretrained`, `table_stats`, the scheduler,
plan files and `describe_plan` see the same model, and a checkpoint written on this path is
byte-for-byte the one the distributed path writes (tested). `shard` also skips DDP around the
dense modules at world size 1 (an all-reduce over one rank is an identity).

It applies to a sharded EBC whose every table is whole on this rank (table_wise,
data_parallel; a table split into column shards needs torchrec's output permutation) and that
uses no mean-pooling callback, feature-score collection or lookup trackers; otherwise the
module keeps torchrec's forward and `install_single_rank_path` says why (logged at INFO). A
batch with a variable batch size per feature, or with per-id weights given to an unweighted
collection, is passed to torchrec's forward as well.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["SingleRankLookup", "install_single_rank_path", "single_rank_modules"]

logger = logging.getLogger(__name__)


class SingleRankLookup:
    """The forward of a one-rank sharded EBC: its kernels called on the input, outputs concatenated.

    Not an ``nn.Module`` (it holds references to the EBC's own kernel modules, which stay where
    torchrec registered them, so ``state_dict`` and ``parameters()`` are unchanged).
    """

    def __init__(self, ebc: nn.Module, kernels: List[Tuple[nn.Module, List[str]]], fallback: Callable[..., Any]) -> None:
        from torchrec import KeyedTensor

        self._keyed_tensor = KeyedTensor
        self.kernels = [k for k, _ in kernels]
        self.features: List[str] = [f for _, fs in kernels for f in fs]
        self.splits: List[int] = [len(fs) for _, fs in kernels]
        self.embedding_names: List[str] = list(ebc._embedding_names)
        self.embedding_dims: List[int] = list(ebc._embedding_dims)
        self.weighted = bool(ebc._is_weighted)
        self.fallback = fallback  # torchrec's own forward of the module
        self._last_keys: Optional[List[str]] = None
        self._order: Optional[List[int]] = None  # permutation of the last key list (None: in order)
        self._order_tensor: Optional[torch.Tensor] = None

    def __call__(self, features: Any) -> Any:
        if features.variable_stride_per_key() or (not self.weighted and features.weights_or_none() is not None):
            return self.fallback(features)
        keys = features.keys()
        if keys is not self._last_keys:
            self._set_order(keys, features.device())
        if self._order is not None:
            features = features.permute(self._order, self._order_tensor)
        parts = [features] if len(self.kernels) == 1 else features.split(self.splits)
        outputs = [kernel(part) for kernel, part in zip(self.kernels, parts)]
        values = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return self._keyed_tensor(keys=self.embedding_names, length_per_key=self.embedding_dims, values=values, key_dim=1)

    def _set_order(self, keys: List[str], device: torch.device) -> None:
        if list(keys) == self.features:
            self._order = self._order_tensor = None
        else:
            missing = [f for f in self.features if f not in keys]
            if missing:
                raise KeyError(f"the input has no feature(s) {missing}; every table's features must be present (an empty bag is fine)")
            self._order = [keys.index(f) for f in self.features]
            self._order_tensor = torch.tensor(self._order, dtype=torch.int32, device=device)
        self._last_keys = keys


def _kernels(ebc: nn.Module) -> Tuple[Optional[List[Tuple[nn.Module, List[str]]]], str]:
    """The EBC's kernel modules with their input features, in the order torchrec feeds and
    concatenates them; or None and the reason the direct path cannot reproduce torchrec's."""
    from torch.nn.parallel import DistributedDataParallel
    from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup

    for attr, bad, why in (
        ("_has_mean_pooling_callback", True, "mean pooling is applied by a callback after the output dist"),
        ("_enabled_feature_score_auto_collection", True, "feature scores are collected in the input dist"),
        ("post_lookup_tracker_fn", "set", "a post-lookup tracker is registered"),
        ("post_odist_tracker_fn", "set", "a post-output-dist tracker is registered"),
    ):
        value = getattr(ebc, attr, None)
        if (bad == "set" and value is not None) or (bad is True and value):
            return None, why
    kernels: List[Tuple[nn.Module, List[str]]] = []
    names: List[str] = []
    dims: List[int] = []
    shardings = getattr(ebc, "_embedding_shardings", None)
    lookups = getattr(ebc, "_lookups", None)
    if shardings is None or lookups is None or len(shardings) != len(lookups):
        return None, "not a torchrec ShardedEmbeddingBagCollection of the expected layout"
    sharding_types = list(getattr(ebc, "_sharding_types", None) or ["?"] * len(shardings))
    for sharding, lookup, sharding_type in zip(shardings, lookups, sharding_types):
        if isinstance(lookup, DistributedDataParallel):  # data_parallel tables (an identity at world size 1)
            lookup = lookup.module
        if not isinstance(lookup, GroupedPooledEmbeddingsLookup):
            return None, f"lookup {type(lookup).__name__} is not a pooled table-batched lookup"
        modules = list(lookup._emb_modules)
        group_features: List[str] = []
        for m in modules:
            config = getattr(m, "config", None)
            if config is None or not hasattr(m, "emb_module"):
                return None, f"kernel {type(m).__name__} is not a table-batched embedding bag"
            for t in config.embedding_tables:
                if t.local_rows != t.num_embeddings or t.local_cols != t.embedding_dim:
                    return None, f"table {t.name!r} is split into shards on this rank ({sharding_type})"
            features = list(config.feature_names())
            group_features.extend(features)
            kernels.append((m, features))
            names.extend(config.embedding_names())
            dims.extend(config.embedding_dims())
        if group_features != list(sharding.feature_names()) or \
                list(getattr(lookup, "_feature_splits", [])) != [len(m.config.feature_names()) for m in modules]:
            return None, f"the kernels' feature order differs from the {sharding_type} sharding's"
    if names != list(ebc._embedding_names) or dims != list(ebc._embedding_dims):
        return None, "the kernels' outputs are not concatenated in the collection's output order"
    if not kernels:
        return None, "no kernels on this rank"
    return kernels, ""


def install_single_rank_path(model: nn.Module) -> List[str]:
    """Give every sharded EBC of a one-rank `model` the direct forward; returns the module paths done.

    Call after ``DistributedModelParallel`` built the model, on a world size of 1 only (`shard`
    does both). Modules it cannot take keep torchrec's forward (logged with the reason).
    """
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    done: List[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, ShardedEmbeddingBagCollection) or isinstance(module.__dict__.get("forward"), SingleRankLookup):
            continue
        env = getattr(module, "_env", None)
        if env is not None and int(env.world_size) != 1:
            raise RuntimeError(f"{path}: sharded over {env.world_size} ranks; the single-rank path needs one")
        kernels, why = _kernels(module)
        if kernels is None:
            logger.info("%s: keeps torchrec's distributed forward: %s", path or "model", why)
            continue
        fallback = type(module).forward.__get__(module)
        # An instance attribute: nn.Module.__call__ (hooks included) calls it instead of the class's forward.
        module.forward = SingleRankLookup(module, kernels, fallback)
        done.append(path)
    return done


def single_rank_modules(model: nn.Module) -> List[str]:
    """Paths of the sharded EBCs of `model` that run the single-rank direct forward."""
    return [path for path, m in model.named_modules() if isinstance(m.__dict__.get("forward"), SingleRankLookup)]
