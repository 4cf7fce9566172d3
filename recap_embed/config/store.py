"""Registers the schemas and the Python-defined group options in Hydra's ConfigStore.

YAML presets (tables, collections, strata, placements) live in the package's ``conf/`` folder,
which the search-path plugin adds to every Hydra app; the options that are pure schema live
here so they are typed. Group names are public: other apps and tests rely on them.
"""

from __future__ import annotations

from dataclasses import fields

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .schema import (
    EMBEDDINGS_KEY,
    ITEMS,
    EmbeddingOptimizerConfig,
    LargeEmbeddingsConfig,
    LearningRate,
    LinearRampToConstant,
    LinearRampToCosine,
    OptimizerAlgorithm,
    PiecewiseConstant,
    ShardingConfig,
    SmallEmbeddingsConfig,
    StratifiersConfig,
)

PROVIDER = "recap_embed"

#: The sections an app's root config may hold (each a group with a `base` schema option).
SECTIONS = {
    EMBEDDINGS_KEY: LargeEmbeddingsConfig,
    "small_embeddings": SmallEmbeddingsConfig,
    "stratifiers": StratifiersConfig,
    "sharding": ShardingConfig,
}

#: Options of `embeddings/optimizer`, each a fused algorithm with sensible hyper-parameters.
OPTIMIZERS = {
    "sgd": EmbeddingOptimizerConfig(algorithm=OptimizerAlgorithm.sgd, init_learning_rate=0.01),
    "adagrad": EmbeddingOptimizerConfig(algorithm=OptimizerAlgorithm.adagrad, init_learning_rate=0.01),
    "rowwise_adagrad": EmbeddingOptimizerConfig(
        algorithm=OptimizerAlgorithm.rowwise_adagrad, init_learning_rate=0.01
    ),
    "adam": EmbeddingOptimizerConfig(algorithm=OptimizerAlgorithm.adam, init_learning_rate=0.001),
    "partial_rowwise_adam": EmbeddingOptimizerConfig(
        algorithm=OptimizerAlgorithm.partial_rowwise_adam, init_learning_rate=0.001
    ),
    "lamb": EmbeddingOptimizerConfig(algorithm=OptimizerAlgorithm.lamb, init_learning_rate=0.001),
}

# Schedules follow the optimizer's init_learning_rate unless overridden (relative interpolation
# from the schedule node up to `embeddings.optimizer`).
_PEAK = "${...init_learning_rate}"

#: Options of `embeddings/lr`, the four schedules of tml (the collection's schedule).
SCHEDULES = {
    "constant": LearningRate(constant="${..init_learning_rate}"),  # type: ignore[arg-type]
    "linear_ramp_to_constant": LearningRate(
        linear_ramp_to_constant=LinearRampToConstant(learning_rate=_PEAK, num_ramp_steps=1000)  # type: ignore[arg-type]
    ),
    "linear_ramp_to_cosine": LearningRate(
        linear_ramp_to_cosine=LinearRampToCosine(
            learning_rate=_PEAK,  # type: ignore[arg-type]
            final_learning_rate=0.0,
            num_ramp_steps=1000,
            final_num_steps=10000,
        )
    ),
    "piecewise_constant": LearningRate(
        piecewise_constant=PiecewiseConstant(
            learning_rate_boundaries=[1000, 5000],
            learning_rate_values=["${....init_learning_rate}", 0.001, 0.0001],  # type: ignore[list-item]
        )
    ),
}


def schema_node(schema: type) -> DictConfig:
    """`schema` as a node whose keyed collections (see `schema.keyed`) are open mappings."""
    node = OmegaConf.structured(schema)
    for f in fields(schema):
        if ITEMS in f.metadata:
            OmegaConf.set_struct(node[f.name], False)
    return node


def register_configs() -> None:
    """Store every schema and option; idempotent (the ConfigStore overwrites same names)."""
    cs = ConfigStore.instance()
    for group, schema in SECTIONS.items():
        cs.store(group=group, name="base", node=schema_node(schema), provider=PROVIDER)
    for name, optimizer in OPTIMIZERS.items():
        cs.store(group=f"{EMBEDDINGS_KEY}/optimizer", name=name, node=optimizer, provider=PROVIDER)
    for name, schedule in SCHEDULES.items():
        cs.store(
            group=f"{EMBEDDINGS_KEY}/lr",
            name=name,
            node=schedule,
            package=f"{EMBEDDINGS_KEY}.optimizer.learning_rate",
            provider=PROVIDER,
        )
