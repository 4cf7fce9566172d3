"""Placing the large tables: `shard` (one call to a trainable model), the readable plan, plan files."""

from .planner import PlanFile, build_plan, load_plan_file, resolve_device, save_plan_file
from .sharding import describe_plan, format_plan, plan_placements, shard

__all__ = [
    "PlanFile",
    "build_plan",
    "describe_plan",
    "format_plan",
    "load_plan_file",
    "plan_placements",
    "resolve_device",
    "save_plan_file",
    "shard",
]
