"""`recap-embed-train`: the Hydra training app (also `python -m recap_embed.train`).

Its primary config `recap_embed_train` is found through recap_embed's search-path plugin, so
the app has no config dir of its own. torch is imported only when a job runs: `--help`,
`--cfg job` and `--info` stay fast.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import recap_embed.config  # noqa: F401  (registers the groups)
from recap_embed.errors import current_rank
import recap_embed.train.config  # noqa: F401  (registers the app's schema)

log = logging.getLogger("recap_embed.train")


# `${recap_embed_rank0:value}`: the value on rank 0, null elsewhere (files written once).
OmegaConf.register_new_resolver("recap_embed_rank0", lambda value: value if current_rank() == 0 else None, replace=True)


def _quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors to the console only, never to the run's log file."""
    if current_rank() == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _compact_yaml_errors() -> None:
    """Report a YAML syntax error in a config file as one message, not Hydra's traceback.

    Hydra 1.3 loads config files before the app runs and prints anything but its own composition
    errors with the whole stack; a typo in a user's preset is a bad input like any other. Only
    this app's process is affected; without the Hydra internals this relies on, nothing changes.
    """
    try:
        import yaml
        from hydra._internal.config_repository import ConfigRepository
        from hydra.errors import ConfigCompositionException
    except ImportError:  # pragma: no cover - another Hydra layout
        return
    load = ConfigRepository.load_config
    if getattr(load, "_recap_embed", False):
        return

    def load_config(self, config_path):  # type: ignore[no-untyped-def]
        try:
            return load(self, config_path)
        except yaml.YAMLError as e:
            raise ConfigCompositionException(f"{config_path} is not valid YAML: {' '.join(str(e).split())}") from e

    load_config._recap_embed = True  # type: ignore[attr-defined]
    ConfigRepository.load_config = load_config  # type: ignore[method-assign]


_compact_yaml_errors()


@hydra.main(config_path=None, config_name="recap_embed_train", version_base=None)
def main(cfg: DictConfig) -> float:
    """Train once; returns what a sweeper optimises: the validation AUROC of the best step (the
    eval split is reported, never tuned on), or the eval AUROC without a validation split."""
    from hydra.core.hydra_config import HydraConfig

    from recap_embed.errors import report_and_exit

    _quiet_other_ranks()
    # torchrec's own deprecation notices about its DDP wrapper say nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*DTensor instead.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with report_and_exit(log):
        from .loop import train  # torch and torchrec load here, not at start-up

        metrics = train(cfg, output_dir)
    objective = metrics["validation_auroc"]
    return float(metrics["eval_auroc"] if objective is None else objective)


if __name__ == "__main__":
    sys.exit(main())
