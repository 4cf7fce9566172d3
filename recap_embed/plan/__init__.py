"""`recap-embed-plan`: the sharding plan and memory per rank for a target cluster, from the config
alone (no GPU, no table memory: the tables are built on meta and only torchrec's planner runs).

From Python::

    from recap_embed.plan import plan_report
    report = plan_report(cfg)          # cfg: embeddings, sharding, topology (PlanAppConfig)
    print(report.format())
    report.save(out_dir)               # plan.json (for sharding.plan_file=...) and plan.txt

`plan_report` and friends import torch; importing this package does not (the CLI's --help stays fast).
"""

from typing import Any

from .config import ComputeDevice, PlanAppConfig, TopologyConfig

__all__ = ["ComputeDevice", "PlanAppConfig", "PlanDoesNotFitError", "PlanReport", "TopologyConfig", "plan_report"]


def __getattr__(name: str) -> Any:  # lazy: report.py imports torch and torchrec
    if name in ("plan_report", "PlanReport", "PlanDoesNotFitError"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
