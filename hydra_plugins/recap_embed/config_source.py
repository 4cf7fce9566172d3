"""recap_embed's config groups, served to Hydra so that an app that does not use them pays nothing.

One config source, scheme ``recap_embed://<conf dir>``, serves two things:

- the YAML presets of ``conf/`` (``embeddings/twhin``, ``embeddings/optimizer/sgd``, ...), read only
  when an app selects one, as Hydra's file source reads them;
- the typed schemas of the sections, ``/recap_embed/schema/<section>``, which presets name in their
  defaults list (``- /recap_embed/schema/embeddings@_here_``). A ConfigStore would serve them too,
  but every node stored there is deep-copied for each group Hydra lists, in every app, and takes
  part in Hydra's automatic schema matching (which breaks an app with its own ``sharding/base.yaml``).
  Here a schema node is built only when loaded.

The groups stay out of the root listing (what ``--help`` shows) until the app has loaded one of
them: listing a group costs every ``--help`` a few milliseconds, and an app that never uses these
groups should see no difference at all. An app that uses them lists them as usual.
"""

from importlib import import_module
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult

#: The group the schemas live in, and the dataclass of each section.
SCHEMA_GROUP = "recap_embed/schema"
SCHEMAS = {
    "embeddings": "LargeEmbeddingsConfig",
    "small_embeddings": "SmallEmbeddingsConfig",
    "stratifiers": "StratifiersConfig",
    "sharding": "ShardingConfig",
}

#: Set once this process has loaded a config of ours: from then on the groups are listed.
_USED = {"value": False}


class RecapEmbedConfigSource(FileConfigSource):
    """The presets of ``conf/`` and the section schemas, under scheme ``recap_embed``."""

    @staticmethod
    def scheme() -> str:
        return "recap_embed"

    @staticmethod
    def _schema(config_path: str) -> Optional[str]:
        path = config_path.strip("/")
        if path.endswith(".yaml"):
            path = path[: -len(".yaml")]
        group, _, name = path.rpartition("/")
        return name if group == SCHEMA_GROUP and name in SCHEMAS else None

    def load_config(self, config_path: str) -> ConfigResult:
        _USED["value"] = True
        name = self._schema(config_path)
        if name is None:
            return super().load_config(config_path)
        from omegaconf import OmegaConf

        node = OmegaConf.structured(getattr(import_module("recap_embed.config.schema"), SCHEMAS[name]))
        return ConfigResult(config=node, path=f"{self.scheme()}://{self.path}", provider=self.provider, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") in ("recap_embed", SCHEMA_GROUP):
            return True
        return super().is_group(config_path)

    def is_config(self, config_path: str) -> bool:
        return self._schema(config_path) is not None or super().is_config(config_path)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        if path == SCHEMA_GROUP:
            return sorted(SCHEMAS) if results_filter in (None, ObjectType.CONFIG) else []
        if path == "recap_embed":
            return ["schema"] if results_filter in (None, ObjectType.GROUP) else []
        if path == "" and not _USED["value"]:
            return []  # an app that uses none of our groups lists none of them
        if not super().is_group(config_path):
            return []
        return [f for f in super().list(config_path, results_filter) if f not in ("__init__", "__init__.py")]
