"""The typed schemas of recap_embed's sections, served to Hydra only when a config asks for one.

Presets select a schema with ``- /recap_embed/schema/embeddings@_here_`` in their defaults list.
A ConfigStore would do the same, but everything stored there costs every Hydra app in the
environment (Hydra deep-copies the store for each group it lists) and takes part in Hydra's
automatic schema matching, which breaks an app with its own ``sharding/base.yaml``. This source
holds no nodes: it imports the dataclasses and builds a node only in a load, and it does not
show in group listings (``--help``), so an app that never names it is unaffected.
"""

from importlib import import_module
from typing import List, Optional

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource

#: The group the schemas live in, and the dataclass of each (module, class).
GROUP = "recap_embed/schema"
SCHEMAS = {
    "embeddings": ("recap_embed.config.schema", "LargeEmbeddingsConfig"),
    "small_embeddings": ("recap_embed.config.schema", "SmallEmbeddingsConfig"),
    "stratifiers": ("recap_embed.config.schema", "StratifiersConfig"),
    "sharding": ("recap_embed.config.schema", "ShardingConfig"),
}


class RecapEmbedSchemaSource(ConfigSource):
    """Config source ``recap_embed://``: group `GROUP`, one option per section schema."""

    @staticmethod
    def scheme() -> str:
        return "recap_embed"

    @staticmethod
    def _name(config_path: str) -> Optional[str]:
        path = config_path.strip("/")
        if path.endswith(".yaml"):
            path = path[: -len(".yaml")]
        group, _, name = path.rpartition("/")
        return name if group == GROUP and name in SCHEMAS else None

    def load_config(self, config_path: str) -> ConfigResult:
        from omegaconf import OmegaConf

        name = self._name(config_path)
        if name is None:
            raise ConfigLoadError(f"recap_embed schema not found: {config_path}")
        module, cls = SCHEMAS[name]
        node = OmegaConf.structured(getattr(import_module(module), cls))
        return ConfigResult(config=node, path=f"{self.scheme()}://{self.path}", provider=self.provider, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        path = config_path.strip("/")
        return path in ("recap_embed", GROUP)

    def is_config(self, config_path: str) -> bool:
        return self._name(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        # Listed only when asked for by name: the root listing (--help) stays the app's own.
        if config_path.strip("/") == GROUP and results_filter in (None, ObjectType.CONFIG):
            return sorted(SCHEMAS)
        if config_path.strip("/") == "recap_embed" and results_filter in (None, ObjectType.GROUP):
            return ["schema"]
        return []
