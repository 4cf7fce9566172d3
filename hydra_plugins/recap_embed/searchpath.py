"""Makes recap_embed's config groups visible to every Hydra app once the package is installed.

Hydra imports this module while discovering plugins, for every app, so it imports nothing of
recap_embed and registers nothing: it adds one entry to the search path, served by
`config_source.RecapEmbedConfigSource` (the YAML presets of ``conf/``, installed as the package
``recap_embed.conf``, and the typed schemas, each read only when an app uses it).
"""

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def conf_dir() -> Path:
    """The presets: ``recap_embed/conf`` when installed, the checkout's ``conf/`` in a development
    install (found without importing the package)."""
    spec = importlib.util.find_spec("recap_embed")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("recap_embed is not installed: its search-path plugin has no presets to serve")
    package = Path(list(spec.submodule_search_locations)[0])
    installed = package / "conf"
    return installed if (installed / "__init__.py").is_file() else package.parent / "conf"


class RecapEmbedSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="recap_embed", path=f"recap_embed://{conf_dir()}")
