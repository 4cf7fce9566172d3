"""Makes recap_embed's config groups visible to every Hydra app once the package is installed.

Hydra imports this module while discovering plugins, for every app: it must stay cheap
(no torch). Importing `recap_embed.config` registers the typed schemas and the optimizer
and schedule options; the YAML presets come from the package `recap_embed.conf` (the
repository's top-level `conf/` folder, installed under that name).
"""

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

import recap_embed.config  # noqa: F401  (registers the ConfigStore groups)


def conf_search_path() -> str:
    """`pkg://recap_embed.conf` when installed; the checkout's `conf/` in a development install."""
    if importlib.util.find_spec("recap_embed.conf") is not None:
        return "pkg://recap_embed.conf"
    checkout_conf = Path(recap_embed.config.__file__).resolve().parents[2] / "conf"
    return checkout_conf.as_uri()


class RecapEmbedSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="recap_embed", path=conf_search_path())
