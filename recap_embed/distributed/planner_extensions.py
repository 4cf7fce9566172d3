"""Extensions of torchrec's planner: a storage reservation sized from the dense parameters, a perf
estimator that evaluates each distinct shard once, and a proposer that gives up when nothing fits."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

#: Share of each device's HBM the planner keeps free (torchrec's heuristic reservation margin).
STORAGE_MARGIN = 0.15


def storage_reservation(model: nn.Module, percentage: float = STORAGE_MARGIN) -> Any:
    """torchrec's default reservation, given the dense size from parameter shapes (known on meta).

    Same heuristic as torchrec (6x the dense parameter bytes: weights, optimizer state, DDP
    buckets) plus 15% margin; passing the estimate avoids torchrec's dry-run warning.
    """
    import warnings

    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.sharding_plan import get_module_to_default_sharders

    types = tuple(get_module_to_default_sharders())
    shardable = {id(p) for m in model.modules() if isinstance(m, types) for p in m.parameters()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in shardable)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
        return HeuristicalStorageReservation(percentage=percentage, dense_tensor_estimate=max(1, 6 * dense))


_MEMO_CLASS: Optional[type] = None


def _memo_class() -> Optional[type]:
    """A subclass of torchrec's perf estimator that evaluates each distinct shard context once.

    torchrec 1.8 evaluates every shard separately (~0.5 ms each); a row-wise or data-parallel
    option over 512 ranks holds 512 shards whose contexts are equal. The context
    (``ShardPerfContext``: sizes, batch, pooling, bandwidths, flags) is all an evaluator reads, so
    equal contexts give equal perfs: the numbers are exactly torchrec's. None when this torchrec
    lacks the pieces (then torchrec's own estimator is used).
    """
    global _MEMO_CLASS
    if _MEMO_CLASS is not None:
        return _MEMO_CLASS
    try:
        from torchrec.distributed.planner.estimator.estimator import (
            EmbeddingPerfEstimator,
            get_embedding_perf_sharding_evaluator,
        )
        from torchrec.distributed.planner.estimator.types import ShardPerfContext
    except ImportError:  # pragma: no cover - another torchrec layout
        return None

    class MemoPerfEstimator(EmbeddingPerfEstimator):  # type: ignore[misc, valid-type]
        def estimate(self, sharding_options: List[Any], sharder_data_map: Any) -> None:
            done: Dict[Tuple[Any, ...], List[Tuple[Any, Any]]] = {}
            for option in sharding_options:
                self._config.validate_sharding_type(option.sharding_type)
                shard_sizes = [shard.size for shard in option.shards]
                contexts = ShardPerfContext.build_shard_perf_contexts(
                    config=self._config,
                    shard_sizes=shard_sizes,
                    sharding_option=option,
                    topology=self._topology,
                    constraints=self._constraints,
                    sharder_data=sharder_data_map[option.module_type_key],
                    is_inference=self._is_inference,
                    use_batch_inputs_for_expected_cache_fetches=self._use_batch_inputs_for_expected_cache_fetches,
                    use_linear_regression_prefetch_estimate=self._use_linear_regression_prefetch_estimate,
                )
                if contexts:
                    option.is_weighted = contexts[0].is_weighted
                for shard, ctx in zip(option.shards, contexts):
                    evaluator = get_embedding_perf_sharding_evaluator(sharding_type=ctx.sharding_type, is_inference=ctx.is_inference)
                    bucket = done.setdefault((type(evaluator), ctx.table_name, ctx.hash_size, ctx.emb_dim), [])
                    perf = next((p for c, p in bucket if c.__dict__ == ctx.__dict__), None)
                    if perf is None:
                        perf = evaluator.compute_perf(ctx=ctx, config=self._config)
                        bucket.append((ctx, perf))
                    shard.perf = dataclasses.replace(perf)
                perfs = self._config.post_process_perfs(
                    shard_perfs=[shard.perf for shard in option.shards if shard.perf is not None],
                    shard_sizes=shard_sizes,
                    sharding_type=option.sharding_type,
                    uneven_sharding_perf_multiplier=self._topology.uneven_sharding_perf_multiplier,
                )
                for shard, perf in zip(option.shards, perfs):
                    shard.perf = perf

    _MEMO_CLASS = MemoPerfEstimator
    return _MEMO_CLASS


def memo_perf_estimator(topology: Any, constraints: Optional[Dict[str, Any]]) -> Any:
    """torchrec's default perf estimator, evaluating each distinct shard once (same numbers)."""
    from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
    from torchrec.distributed.planner.estimator.estimator import EmbeddingPerfEstimatorFactory

    default = EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology, constraints=constraints)
    cls = _memo_class()
    if cls is None or type(default) is not cls.__mro__[1]:  # pragma: no cover - another torchrec
        return default
    return cls(topology=topology, constraints=constraints, config=default.config)


def bounded_proposer(inner: Any, max_failures: int) -> Any:
    """`inner` (a torchrec Proposer) that stops after `max_failures` unpartitionable proposals in a row."""
    from torchrec.distributed.planner.types import Proposer

    class BoundedProposer(Proposer):
        def __init__(self) -> None:
            self.inner, self.failures = inner, 0

        def load(self, search_space: List[Any], enumerator: Optional[Any] = None) -> None:
            self.failures = 0
            self.inner.load(search_space=search_space, enumerator=enumerator)

        def propose(self) -> Optional[List[Any]]:
            return None if self.failures >= max_failures else self.inner.propose()

        def feedback(self, partitionable: bool, plan: Optional[List[Any]] = None, perf_rating: Optional[float] = None,
                     storage_constraint: Optional[Any] = None) -> None:
            self.failures = 0 if partitionable else self.failures + 1
            self.inner.feedback(partitionable=partitionable, plan=plan, perf_rating=perf_rating, storage_constraint=storage_constraint)

    BoundedProposer.__name__ = type(inner).__name__  # torchrec logs proposers by class name
    return BoundedProposer()
