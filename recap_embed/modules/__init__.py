"""torch modules built from the configs.

- `LargeEmbeddings`: the large tables, one torchrec EmbeddingBagCollection with fused optimizers;
  `table_stats` reports their statistics for logging.
- `SmallEmbeddings`: small tables inside the model, trained by the dense optimizer.
- `Stratifiers`, `StratifiedMetric(s)`: masks per stratum and any torchmetrics metric per stratum.
"""

from .large import LargeEmbeddings
from .small import SmallEmbeddings, SmallEmbeddingsError
from .stats import table_stats
from .stratify import StratifiedMetric, StratifiedMetrics, StratifierError, Stratifiers

__all__ = [
    "LargeEmbeddings",
    "SmallEmbeddings",
    "SmallEmbeddingsError",
    "StratifiedMetric",
    "StratifiedMetrics",
    "StratifierError",
    "Stratifiers",
    "table_stats",
]
