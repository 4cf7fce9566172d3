"""Optimizers of the large tables: fused per-table optimizers, how to combine them with the
dense optimizer, and per-table learning-rate schedules."""

from .fused import (
    apply_fused_optimizers,
    combined_optimizer,
    dense_parameters,
    fused_optimizer,
    fused_optimizer_args,
    table_optimizer,
)
from .scheduler import EmbeddingLRScheduler
from .schedules import lr_at, schedule_name

__all__ = [
    "EmbeddingLRScheduler",
    "apply_fused_optimizers",
    "combined_optimizer",
    "dense_parameters",
    "fused_optimizer",
    "fused_optimizer_args",
    "lr_at",
    "schedule_name",
    "table_optimizer",
]
