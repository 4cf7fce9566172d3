"""Placing the large tables: `shard` (one call to a trainable model), the readable plan, plan files,
and the collectives every layer uses (`collectives`).

The names below are loaded on first use, so importing `recap_embed.distributed.collectives` (which
the error policy does on the way out) does not load torchrec's planner.
"""

from importlib import import_module
from typing import Any

#: Public name -> the submodule that defines it.
_LAZY = {
    "PlanFile": "planner",
    "build_plan": "planner",
    "load_plan_file": "planner",
    "resolve_device": "planner",
    "save_plan_file": "planner",
    "describe_plan": "sharding",
    "format_plan": "sharding",
    "plan_placements": "sharding",
    "shard": "sharding",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
