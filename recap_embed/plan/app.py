"""`recap-embed-plan`: the Hydra planning app (also `python -m recap_embed.plan`).

Plans the tables of `embeddings` with the constraints of `sharding` for the cluster in
`topology`, prints per-table and per-rank memory and cost, and writes ``plan.json`` (load it in
the training app with ``sharding.plan_file=<run dir>/plan.json``) and ``plan.txt`` into the run
dir. Its primary config `recap_embed_plan` is found through recap_embed's search-path plugin.
torch is imported only when a job runs: `--help`, `--cfg job` and `--info` stay fast.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from recap_embed.config.errors import ConfigError

import recap_embed.config  # noqa: F401  (registers the groups)
from recap_embed import hydra_guards
import recap_embed.plan.config  # noqa: F401  (registers the app's schema)
from recap_embed.errors import report_and_exit

log = logging.getLogger("recap_embed.plan")


class _DropDataParallelNotice(logging.Filter):
    """torchrec's planner warns once per data_parallel table that it has no sharding spec (it never
    has one): noise in a report that lists every table anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Sharding spec not found for")


hydra_guards.install()  # bounded config files; the allowlist for what Hydra builds itself


class PlanTimeout(ConfigError):
    """Planning ran past `timeout_s`."""


@contextlib.contextmanager
def time_limit(seconds: float, cfg: DictConfig) -> Iterator[None]:
    """Stop the planner after `seconds` (SIGALRM; main thread only; 0: no limit) with one message."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        topo = cfg.get("topology") or {}
        tables = len((cfg.get("embeddings") or {}).get("tables") or {})
        raise PlanTimeout(
            f"timeout_s: planning {tables} tables for topology.world_size={topo.get('world_size')} did not finish within "
            f"{seconds:g} s; constrain the search (sharding.sharding_types, sharding.tables.<t>.sharding_types), plan "
            f"fewer ranks, or raise timeout_s"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@hydra.main(config_path=None, config_name="recap_embed_plan", version_base=None)
def main(cfg: DictConfig) -> float:
    """Plan once; returns the largest estimated cost of one rank in ms (what a sweep would minimise)."""
    from hydra.core.hydra_config import HydraConfig

    from recap_embed.distributed.collectives import leave_on_exit  # torch loads here, when the job runs

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    logging.getLogger("torchrec").setLevel(logging.WARNING)  # the planner logs every proposal at INFO
    logging.getLogger().addFilter(_DropDataParallelNotice())
    with report_and_exit(log, leave=leave_on_exit):
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # fbgemm_gpu logs each library it loads at INFO
        try:
            from .report import plan_report  # torch and torchrec load here, not at start-up
        finally:
            root.setLevel(level)

        with time_limit(float(cfg.get("timeout_s") or 0), cfg):
            report = plan_report(cfg)
        paths = report.save(output_dir)
        print(report.format(max_rows=int(cfg.get("max_rows") or 0) or None), flush=True)
        log.info("wrote %s and %s; train with sharding.plan_file=%s", paths["plan.json"], paths["plan.txt"], paths["plan.json"])
    return float(report.max_perf_ms)


if __name__ == "__main__":
    sys.exit(main())
