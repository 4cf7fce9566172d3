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
from recap_embed import hydra_guards
from recap_embed.errors import current_rank, report_and_exit
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
        else:  # loggers the logging config sets to INFO (recap_embed's) still reach the console here
            handler.setLevel(max(handler.level, logging.WARNING))
    root.setLevel(logging.WARNING)


# Bounded config files, one-line YAML errors, the allowlist for what Hydra builds itself
# (hydra.callbacks, logging): this app's process only.
hydra_guards.install(lock_run_dir=True)


@hydra.main(config_path=None, config_name="recap_embed_train", version_base=None)
def main(cfg: DictConfig) -> float:
    """Train once; returns what a sweeper optimises: the validation AUROC of the best step (the
    eval split is reported, never tuned on), or the eval AUROC without a validation split."""
    from hydra.core.hydra_config import HydraConfig

    from recap_embed.distributed.collectives import leave_on_exit  # torch loads here, when the job runs

    _quiet_other_ranks()
    # torchrec's own deprecation notices about its DDP wrapper say nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*DTensor instead.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with report_and_exit(log, leave=leave_on_exit):
        from .loop import train  # torch and torchrec load here, not at start-up

        metrics = train(cfg, output_dir)
    objective = metrics["validation_auroc"]
    return float(metrics["eval_auroc"] if objective is None else objective)


if __name__ == "__main__":
    sys.exit(main())
