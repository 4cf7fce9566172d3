"""TorchRec embedding tables as Hydra structured configs.

Layers, each in its own folder:
- ``recap_embed.config``: dataclass configs, config groups, validation (no torch import);
- ``recap_embed.modules``, ``recap_embed.optim``, ``recap_embed.distributed``, ``recap_embed.io``:
  torchrec modules, fused optimizers and schedules, placement and sharding, snapshots and vocabs;
- ``recap_embed.train``: the Hydra training app and its sweep report.
"""

__version__ = "0.1.0"
