"""The good-neighbour promise: with recap_embed installed, an unrelated Hydra app composes exactly as before.

The app under test (`tests/apps/neighbour`) has its own `sharding/base.yaml` (`strategy: ddp`),
`embeddings/optimizer/adam.yaml` (`lr: 0.001`) and `embeddings/mine.yaml`: the names recap_embed's
groups use, with unrelated values. Hydra merges a ConfigStore node with the same group and name into
such a file as its schema ("automatic schema matching"), so a library that stored `sharding/base`
there broke the app. Each test first checks that recap_embed's plugin really is on the app's search
path, so that none passes merely because the package was not found.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch import Completed, python_c, python_script, run

APP = Path(__file__).resolve().parent / "apps" / "neighbour"

#: What the app's own files say, and nothing else.
OWN_VALUES: Dict[str, Any] = {
    "sharding": {"strategy": "ddp"},
    "embeddings": {"optimizer": {"lr": 0.001}, "vocab_size": 30522, "dim": 128},
    "service": "neighbour",
}


def run_app(*args: str) -> Completed:
    """The neighbour app in the tests' clean environment (no HYDRA_* variables); it exits 0."""
    return run(python_script(APP / "app.py", *args), cwd=APP, timeout=120)


def help_groups(text: str) -> Dict[str, List[str]]:
    """Group -> options, as listed under ``== Configuration groups ==`` of an app's --help."""
    groups: Dict[str, List[str]] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("== Configuration groups =="):
            inside = True
        elif inside and line.startswith("=="):
            break
        elif inside and ": " in line and " " not in line.split(": ", 1)[0]:
            group, options = line.split(": ", 1)
            groups[group] = [o.strip() for o in options.split(",")]
    return groups


@pytest.mark.parametrize("version_base", [None, "1.3"])
def test_compose_gives_exactly_the_apps_own_values(version_base):
    with initialize_config_dir(config_dir=str(APP / "conf"), version_base=version_base):
        cfg = compose(config_name="config", return_hydra_config=True)
        providers = {source.provider for source in cfg.hydra.runtime.config_sources}
        assert "recap_embed" in providers, providers  # the plugin was discovered: the test means something
        own = compose(config_name="config")
    assert OmegaConf.to_container(own) == OWN_VALUES
    # Plain nodes, no schema merged in from anywhere: any key may still be added or changed.
    assert OmegaConf.get_type(own.sharding) is dict and OmegaConf.get_type(own.embeddings.optimizer) is dict


def test_overrides_of_the_apps_own_keys_work():
    with initialize_config_dir(config_dir=str(APP / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sharding.strategy=fsdp", "embeddings.optimizer.lr=0.01",
                                                       "+embeddings.optimizer.betas=[0.9,0.98]"])
    assert cfg.sharding == {"strategy": "fsdp"}
    assert OmegaConf.to_container(cfg.embeddings.optimizer) == {"lr": 0.01, "betas": [0.9, 0.98]}


def test_app_main_composes_its_own_values():
    info = run_app("--info", "searchpath")
    assert "recap_embed" in info.stdout, info.stdout  # recap_embed's search path is active in this app
    job = run_app("--cfg", "job")
    assert yaml.safe_load(job.stdout) == OWN_VALUES
    ran = run_app("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")
    assert yaml.safe_load(ran.stdout) == OWN_VALUES


def test_help_lists_no_recap_embed_group():
    out = run_app("--help")
    groups = help_groups(out.stdout)
    assert "mine" in groups.get("embeddings", []) and "adam" in groups.get("embeddings/optimizer", []), groups
    assert "base" in groups.get("sharding", []), groups
    assert not [g for g in groups if g.split("/")[0] == "recap_embed"], groups


#: Run in a fresh interpreter, so that no other test's imports (an app's own schema) are in its store.
STORE_PROBE = textwrap.dedent(
    """
    import json, sys
    from hydra.core.config_store import ConfigStore, ConfigNode

    def recap_nodes():
        found, total = [], 0
        def walk(tree, path):
            nonlocal total
            for key, value in tree.items():
                if isinstance(value, dict):
                    walk(value, path + [key])
                    continue
                total += 1
                assert isinstance(value, ConfigNode)
                where = "/".join(path + [key])
                types = set()
                try:
                    from omegaconf import OmegaConf
                    types.add(getattr(OmegaConf.get_type(value.node), "__module__", ""))
                except Exception:
                    pass
                if (value.provider or "").startswith("recap_embed") or "recap_embed" in where \\
                        or any(t.startswith("recap_embed") for t in types):
                    found.append(where)
        walk(ConfigStore.instance().repo, [])
        return found, total

    report = {}
    report["before"] = recap_nodes()
    import recap_embed.config  # noqa: F401
    report["after_import_config"] = recap_nodes()
    import recap_embed  # noqa: F401
    report["after_import_package"] = recap_nodes()
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin
    plugins = [f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(SearchPathPlugin)]
    report["plugins"] = plugins
    report["after_discovery"] = recap_nodes()
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        compose(config_name="config")
    report["after_compose"] = recap_nodes()
    print(json.dumps(report))
    """
)


def test_config_store_holds_no_recap_embed_node():
    proc = run(python_c(STORE_PROBE, APP / "conf"), timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "hydra_plugins.recap_embed.searchpath.RecapEmbedSearchPathPlugin" in report["plugins"], report["plugins"]
    for stage in ("before", "after_import_config", "after_import_package", "after_discovery", "after_compose"):
        found, total = report[stage]
        assert found == [], f"{stage}: recap_embed nodes in the ConfigStore: {found}"
    # The walk saw the store's real contents (Hydra's own nodes), so an empty `found` is not an empty walk.
    assert report["after_compose"][1] > 0
