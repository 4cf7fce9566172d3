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

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "validate": "recap_embed.config",
    "table_specs": "recap_embed.config",
    "instantiate": "recap_embed.instantiate",
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

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recap_embed' has no attribute {name!r}")
