"""Makes recap_embed's config groups visible to every Hydra app once the package is installed.

Hydra imports this module while discovering plugins, for every app, so it imports nothing of
recap_embed and registers nothing: the groups are YAML (``conf/``, installed as the package
``recap_embed.conf``), which Hydra reads only when an app uses them, and the typed schemas come
from `schema_source`, built only when a preset asks for one.
"""

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def conf_search_path() -> str:
    """`pkg://recap_embed.conf` when installed; the checkout's `conf/` in a development install."""
    spec = importlib.util.find_spec("recap_embed")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
        if (package / "conf" / "__init__.py").is_file():
            return "pkg://recap_embed.conf"
        checkout_conf = package.parent / "conf"
        if checkout_conf.is_dir():
            return checkout_conf.as_uri()
    return "pkg://recap_embed.conf"


class RecapEmbedSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="recap_embed", path=conf_search_path())
        search_path.append(provider="recap_embed", path="recap_embed://")
