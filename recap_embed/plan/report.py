"""The plan of `recap-embed-plan`, usable from Python: `plan_report(cfg) -> PlanReport`.

Builds the tables on meta (no table memory), runs torchrec's planner with recap_embed's settings
(`recap_embed.distributed.planner.make_planner`, the same planner `shard` runs) for the cluster
in `topology`, and reads torchrec's per-shard estimates: ``Shard.storage`` (HBM and DDR bytes:
weights, optimizer state, cache and I/O buffers) and ``Shard.perf`` (ms per step: forward and
backward compute and communication). Nothing here needs a GPU or a process group.

Tables that cannot fit are reported before the planner runs when a lower bound (weights and
optimizer state alone) already exceeds the cluster, and otherwise when torchrec's planner finds no
placement (its PlannerError): both raise `PlanDoesNotFitError`, a ConfigError whose message names
the largest tables, the totals and what to try.

The parts: `summary` (rows and printing), `planning` (running the planner), `fit` (does-not-fit
advice); their public names are re-exported here.
"""

from __future__ import annotations

from recap_embed.units import format_bytes

from .summary import PlanReport, RankRow, TableRow
from .fit import PlanDoesNotFitError
from .planning import plan_report


__all__ = ["PlanDoesNotFitError", "PlanReport", "RankRow", "TableRow", "format_bytes", "plan_report"]
