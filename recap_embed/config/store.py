"""The sections an app's root config may hold, and an opt-in ConfigStore registration.

Nothing is registered on import: the groups are YAML presets under ``conf/`` and the schemas are
served by the search-path plugin's config source (``/recap_embed/schema/<section>``), so
installing the package changes nothing for an app that does not use them. `register_configs`
puts the same schemas into Hydra's ConfigStore, under the same private group, for a program
that composes without plugin discovery.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig, OmegaConf

from .schema import (
    EMBEDDINGS_KEY,
    EmbeddingOptimizerConfig,
    LargeEmbeddingsConfig,
    OptimizerAlgorithm,
    ShardingConfig,
    SmallEmbeddingsConfig,
    StratifiersConfig,
)

PROVIDER = "recap_embed"

#: The group of the section schemas (private: no app's own config file can match it).
SCHEMA_GROUP = "recap_embed/schema"

#: The sections an app's root config may hold, and the schema of each.
SECTIONS = {
    EMBEDDINGS_KEY: LargeEmbeddingsConfig,
    "small_embeddings": SmallEmbeddingsConfig,
    "stratifiers": StratifiersConfig,
    "sharding": ShardingConfig,
}


def register_configs() -> None:
    """Store every section schema as ``recap_embed/schema/<section>``; idempotent."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for section, schema in SECTIONS.items():
        cs.store(group=SCHEMA_GROUP, name=section, node=schema, provider=PROVIDER)


# --------------------------------------------------------------------------- the YAML options

#: The package folder of the YAML presets (``conf/`` of the repository, ``recap_embed/conf`` installed).
def conf_dir() -> Path:
    installed = Path(__file__).resolve().parents[1] / "conf"
    return installed if (installed / "__init__.py").is_file() else Path(__file__).resolve().parents[2] / "conf"


def preset(group: str, name: str) -> DictConfig:
    """The YAML option `name` of `group` (e.g. ``embeddings/lr``, ``constant``), unresolved."""
    node = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    assert isinstance(node, DictConfig)
    return node


def options(group: str) -> List[str]:
    """Names of the YAML options of `group`, sorted."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@lru_cache(maxsize=None)
def optimizer_options() -> Dict[str, EmbeddingOptimizerConfig]:
    """The ``embeddings/optimizer`` options, typed (read from their YAML files on first use)."""
    out = {}
    for name in options(f"{EMBEDDINGS_KEY}/optimizer"):
        values = OmegaConf.to_container(preset(f"{EMBEDDINGS_KEY}/optimizer", name))
        assert isinstance(values, dict)
        values["algorithm"] = OptimizerAlgorithm[values["algorithm"]]
        out[name] = EmbeddingOptimizerConfig(**values)
    return out


@lru_cache(maxsize=None)
def schedule_options() -> Dict[str, DictConfig]:
    """The ``embeddings/lr`` options (their interpolations follow ``init_learning_rate``), unresolved."""
    return {name: preset(f"{EMBEDDINGS_KEY}/lr", name) for name in options(f"{EMBEDDINGS_KEY}/lr")}
