"""The config layer: structured configs, their groups and their rules. Imports no torch.

Importing this package registers the schemas and group options in Hydra's ConfigStore;
the search-path plugin imports it, so any Hydra app sees the groups once the package is
installed.
"""

from .errors import ConfigError, ConfigValidationError
from .resolve import TableSpec, effective_optimizer, resolve_device_type, table_specs
from .schema import (
    CPU_ALGORITHMS,
    CPU_SHARDING_TYPES,
    EMBEDDINGS_KEY,
    ComputeKernel,
    DataType,
    EmbeddingBagConfig,
    EmbeddingOptimizerConfig,
    EmbeddingSnapshot,
    LargeEmbeddingsConfig,
    LearningRate,
    LinearRampToConstant,
    LinearRampToCosine,
    OovPolicy,
    OptimizerAlgorithm,
    PiecewiseConstant,
    PoolingMode,
    ShardingConfig,
    ShardingType,
    SmallEmbeddingBagConfig,
    SmallEmbeddingsConfig,
    StratifierConfig,
    StratifiersConfig,
    TableOptimizerConfig,
    TablePlacement,
    TableShardingConfig,
)
from .store import register_configs
from .validate import validate

register_configs()

__all__ = [
    "CPU_ALGORITHMS",
    "CPU_SHARDING_TYPES",
    "EMBEDDINGS_KEY",
    "ComputeKernel",
    "ConfigError",
    "ConfigValidationError",
    "DataType",
    "EmbeddingBagConfig",
    "EmbeddingOptimizerConfig",
    "EmbeddingSnapshot",
    "LargeEmbeddingsConfig",
    "LearningRate",
    "LinearRampToConstant",
    "LinearRampToCosine",
    "OovPolicy",
    "OptimizerAlgorithm",
    "PiecewiseConstant",
    "PoolingMode",
    "ShardingConfig",
    "ShardingType",
    "SmallEmbeddingBagConfig",
    "SmallEmbeddingsConfig",
    "StratifierConfig",
    "StratifiersConfig",
    "TableOptimizerConfig",
    "TablePlacement",
    "TableShardingConfig",
    "TableSpec",
    "effective_optimizer",
    "register_configs",
    "resolve_device_type",
    "table_specs",
    "validate",
]
