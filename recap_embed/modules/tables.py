"""Finding the large tables inside any model: `large_embeddings(model)` and `table_parameters(model)`.

The optimizers, the scheduler, `shard`, the statistics and the checkpoint code all walk a model
(plain, or wrapped by DMP/DDP) to its `LargeEmbeddings` and their weights; this is the one walk.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module

from recap_embed.config import TableSpec

from .large import LargeEmbeddings

__all__ = ["large_embeddings", "table_parameters", "weight_fqn"]


def large_embeddings(model: nn.Module) -> List[Tuple[str, LargeEmbeddings]]:
    """``(path, module)`` of every `LargeEmbeddings` in `model` (unwrapping DMP/DDP)."""
    root = get_unwrapped_module(model)
    return [(path, m) for path, m in root.named_modules() if isinstance(m, LargeEmbeddings)]


def weight_fqn(path: str, table: str) -> str:
    """The state-dict key of `table`'s weight in the `LargeEmbeddings` at `path`."""
    return f"{path}.ebc.embedding_bags.{table}.weight" if path else f"ebc.embedding_bags.{table}.weight"


def table_parameters(model: nn.Module) -> Iterator[Tuple[str, TableSpec, str, Any]]:
    """``(fqn, spec, kind, weight)`` per table weight present on this rank.

    `kind` is ``"fused"`` (a weight the FBGEMM kernel updates in backward), ``"dense"`` (a plain
    replicated tensor: a data_parallel table) or ``"unsharded"`` (the module was not sharded).
    """
    for path, le in large_embeddings(model):
        bags = getattr(le.ebc, "embedding_bags", None)
        plan = getattr(le.ebc, "module_sharding_plan", None)
        for spec in le.specs:
            weight = getattr(bags[spec.name], "weight", None) if bags is not None and spec.name in bags else None
            if plan is None:
                kind = "unsharded"
            elif plan[spec.name].sharding_type == "data_parallel":
                kind = "dense"
            else:
                kind = "fused"
            yield weight_fqn(path, spec.name), spec, kind, weight
