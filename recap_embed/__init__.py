"""TorchRec embedding tables as Hydra structured configs.

Layers, each in its own folder:
- ``recap_embed.config``: dataclass configs, config groups, validation (no torch import);
- ``recap_embed.modules``, ``recap_embed.optim``, ``recap_embed.distributed``, ``recap_embed.io``:
  torchrec modules, fused optimizers and schedules, placement and sharding, snapshots and vocabs;
- ``recap_embed.interop``: torchrec table configs in and out;
- ``recap_embed.train``: the Hydra training app and its sweep report.

The names most programs need are importable from here; torch-backed ones are loaded on first
use, so ``import recap_embed`` (done by Hydra's plugin discovery in every app) stays light.
"""

import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "validate": "recap_embed.config",
    "table_specs": "recap_embed.config",
    "instantiate": "recap_embed._instantiate",
    "build": "recap_embed._instantiate",
    "check_targets": "recap_embed._instantiate",
    "UntrustedTargetError": "recap_embed._instantiate",
    "DEFAULT_ALLOWED_TARGETS": "recap_embed._instantiate",
    "LargeEmbeddings": "recap_embed.modules",
    "SmallEmbeddings": "recap_embed.modules",
    "Stratifiers": "recap_embed.modules",
    "StratifiedMetrics": "recap_embed.modules",
    "table_stats": "recap_embed.modules",
    "shard": "recap_embed.distributed",
    "combined_optimizer": "recap_embed.optim",
    "EmbeddingLRScheduler": "recap_embed.optim",
    "lr_at": "recap_embed.optim",
    "load_pretrained": "recap_embed.io.pretrained",
    "save_checkpoint": "recap_embed.io.checkpoint",
    "restore_checkpoint": "recap_embed.io.checkpoint",
    "latest_checkpoint": "recap_embed.io.checkpoint",
    "from_torchrec": "recap_embed.interop",
    "to_torchrec": "recap_embed.interop",
}

__all__ = [
    "__version__",
    "validate",
    "table_specs",
    "instantiate",
    "build",
    "check_targets",
    "UntrustedTargetError",
    "DEFAULT_ALLOWED_TARGETS",
    "LargeEmbeddings",
    "SmallEmbeddings",
    "Stratifiers",
    "StratifiedMetrics",
    "table_stats",
    "shard",
    "combined_optimizer",
    "EmbeddingLRScheduler",
    "lr_at",
    "load_pretrained",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "from_torchrec",
    "to_torchrec",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # the next look-up is a plain attribute
        return value
    raise AttributeError(f"module 'recap_embed' has no attribute {name!r}")


def __dir__() -> Any:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The root package. Importing a submodule binds its name here (the import system's
    ``setattr(parent, child, module)``); a deprecated submodule named like a public function
    (``recap_embed.instantiate``) would then hide the function. Public names keep their objects."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and ``from ... import``
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
