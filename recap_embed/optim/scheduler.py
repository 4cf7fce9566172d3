"""Per-table learning-rate schedules for the large tables.

`EmbeddingLRScheduler` follows the ``torch.optim.lr_scheduler.LRScheduler`` protocol (``step()``,
``get_last_lr()``, ``state_dict()``, ``load_state_dict()``), with learning rates keyed by table
name. Every table has its own schedule (`TableSpec.optimizer.learning_rate`, evaluated by
`recap_embed.optim.schedules.lr_at`); the scheduler writes it into whichever optimizer updates the
table on this rank:

* fused tables: the param group of ``dmp.fused_optimizer`` whose kernel holds the table, and the
  rate is pushed into the FBGEMM kernel at once (its ``step()`` does only that), so the next
  backward uses it whether or not the loop calls ``optimizer.step()`` before ``scheduler.step()``;
* data_parallel tables: the torch optimizer `recap_embed.optim.table_optimizer` built for them
  (it runs in ``optimizer.step()``, after backward).

A rank that holds no shard of a table has nothing to set; the rate is still computed and reported.
Step convention as in torch: after construction the rates are those of step 0; after n calls to
``step()`` those of step n.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from recap_embed.config import TableSpec
from recap_embed.modules.tables import large_embeddings, table_parameters

from .fused import table_optimizer

from .schedules import lr_at

__all__ = ["EmbeddingLRScheduler"]

logger = logging.getLogger(__name__)


class EmbeddingLRScheduler:
    """Sets each large table's learning rate from its own schedule, every step.

    Args:
        model: the sharded model (returned by `recap_embed.distributed.shard`).
        optimizer: the optimizer the loop steps: `combined_optimizer(...)` or
            `table_optimizer(model)`; default: `table_optimizer(model)` (the same cached
            instance `combined_optimizer` uses).
        last_step: resume at this step (-1: start; the constructor then moves to step 0).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[Any] = None, last_step: int = -1) -> None:
        self.model = model
        self.optimizer = optimizer if optimizer is not None else table_optimizer(model)
        self.specs: Dict[str, TableSpec] = {}
        fqn_to_table: Dict[str, str] = {}
        for path, le in large_embeddings(model):
            for spec in le.specs:
                if spec.name in self.specs:
                    raise ValueError(f"table name {spec.name!r} is used by two LargeEmbeddings; names must be unique")
                self.specs[spec.name] = spec
                fqn_to_table[f"{path + '.' if path else ''}ebc.embedding_bags.{spec.name}.weight"] = spec.name
        # (param group, its fused optimizer or None, tables) for every group holding a table.
        self._groups: List[Tuple[Dict[str, Any], Optional[Any], List[str]]] = _table_groups(self.optimizer, fqn_to_table)
        for group, _, tables in self._groups:
            schedules = {_schedule_repr(self.specs[t]) for t in tables}
            if len(schedules) > 1:
                raise ValueError(
                    f"tables {tables} share one optimizer param group but have different learning-rate "
                    f"schedules; attach optimizers with recap_embed.optim.apply_fused_optimizers (shard() does)"
                )
        held = {spec.name for _, spec, kind, w in table_parameters(model)
                if kind == "dense" or (kind == "fused" and w is not None and w.numel() > 0)}
        missing = sorted(held - {t for _, _, tables in self._groups for t in tables})
        if missing:
            logger.warning(
                "tables %s are on this rank but not in the optimizer given to EmbeddingLRScheduler; their "
                "learning rate is not scheduled. Pass combined_optimizer(model, ...) or table_optimizer(model) "
                "(data_parallel tables are not in dmp.fused_optimizer).", missing,
            )
        self.unscheduled: List[str] = missing
        self.last_step = last_step
        self._last_lr: Dict[str, float] = {}
        self.last_step += 1
        self._apply(force=True)

    # ------------------------------------------------------------------ protocol

    def lr_at(self, table: str, step: int) -> float:
        """The learning rate of `table` at `step`, from its schedule."""
        spec = self.specs[table]
        return lr_at(spec.optimizer.learning_rate, step, spec.optimizer.init_learning_rate)

    def step(self) -> None:
        """Advance one step and set every table's learning rate for it."""
        self.last_step += 1
        self._apply()

    def _apply(self, force: bool = False) -> None:
        self._last_lr = {name: self.lr_at(name, self.last_step) for name in self.specs}
        for group, fused, tables in self._groups:
            lr = self._last_lr[tables[0]]
            if not force and group.get("lr") == lr:
                continue  # unchanged: the kernel already has it (most steps of most schedules)
            group["lr"] = lr
            if fused is not None:
                fused.step()  # EmbeddingFusedOptimizer.step only pushes param_groups[0]["lr"] into the kernel

    def get_last_lr(self) -> Dict[str, float]:
        """Learning rate of every table at the current step, keyed by table name."""
        return dict(self._last_lr)

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step, "last_lr": dict(self._last_lr)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume at the saved step; the rates are recomputed from the (current) schedules."""
        self.last_step = int(state_dict["last_step"])
        self._apply(force=True)
        saved = state_dict.get("last_lr") or {}
        changed = {t: (saved[t], lr) for t, lr in self._last_lr.items() if t in saved and abs(saved[t] - lr) > 1e-12 * max(1.0, abs(lr))}
        if changed:
            logger.warning("learning-rate schedules changed since the checkpoint (table: saved -> now): %s", changed)

    @property
    def tables_on_this_rank(self) -> List[str]:
        """Tables whose learning rate this rank sets (it holds a shard or a replica)."""
        return sorted({t for _, _, tables in self._groups for t in tables})


def _schedule_repr(spec: TableSpec) -> str:
    return repr((spec.optimizer.learning_rate, spec.optimizer.init_learning_rate))


_TABLE_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.weight$")


def _leaves(opt: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """(key prefix, optimizer) of the leaves of a (possibly nested) CombinedOptimizer."""
    subs = getattr(opt, "optimizers", None)
    if isinstance(subs, list) and subs and isinstance(subs[0], tuple):
        out = []
        for key, sub in subs:
            out.extend(_leaves(sub, f"{prefix}.{key}" if prefix and key else (key or prefix)))
        return out
    return [(prefix, opt)]


def _table_groups(optimizer: Any, tables: Dict[str, str]) -> List[Tuple[Dict[str, Any], Optional[Any], List[str]]]:
    """Param groups of `optimizer` that hold table weights (keys ``...embedding_bags.<name>.weight``)."""
    from torchrec.distributed.batched_embedding_kernel import EmbeddingFusedOptimizer

    names = set(tables.values())
    out = []
    for _, leaf in _leaves(optimizer):
        by_id = {id(p): key for key, p in getattr(leaf, "params", {}).items()}
        fused = leaf if isinstance(leaf, EmbeddingFusedOptimizer) else None
        for group in leaf.param_groups:
            found: List[str] = []
            for p in group["params"]:
                m = _TABLE_KEY.search(by_id.get(id(p), ""))
                if m and m.group(1) in names and m.group(1) not in found:
                    found.append(m.group(1))
            if found:
                out.append((group, fused, found))
    return out
