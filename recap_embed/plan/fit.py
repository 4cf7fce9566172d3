"""Fit advice: a lower bound checked before the planner runs, and the message when the tables do not
fit (the largest tables, the totals, what to try)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from recap_embed.config import ConfigError, DataType, OptimizerAlgorithm, ShardingType, TableSpec
from recap_embed.distributed.planner import STORAGE_MARGIN, PlannerSetup, table_bytes

from recap_embed.units import format_bytes

from .config import TopologyConfig
from .summary import GB, HBM_KERNELS


#: How many of the largest tables an error names.
_NAMED_TABLES = 5


class PlanDoesNotFitError(ConfigError):
    """The tables do not fit the topology; the message names the largest tables and what to try."""


@dataclass
class _Need:
    """Memory a set of tables needs at least (weights and optimizer state), and where it may go."""

    spec: TableSpec
    weights: int
    optimizer: int
    copies: int  # world_size when the table may only be data_parallel
    hbm_only: bool  # only HBM kernels allowed (cuda)
    types: Optional[List[str]]  # allowed sharding types (None: any)

    @property
    def bytes(self) -> int:
        return (self.weights + self.optimizer) * self.copies


def _needs(specs: List[TableSpec], setup: PlannerSetup, topo: TopologyConfig) -> List[_Need]:
    out = []
    for spec in specs:
        c = setup.constraints.get(spec.name)
        types = list(c.sharding_types) if c is not None and c.sharding_types else None
        kernels = list(c.compute_kernels) if c is not None and c.compute_kernels else None
        weights, optimizer = table_bytes(spec)
        copies = topo.world_size if types == [ShardingType.data_parallel.value] else 1
        hbm_only = topo.compute_device.value == "cuda" and kernels is not None and set(kernels) <= HBM_KERNELS
        out.append(_Need(spec, weights, optimizer, copies, hbm_only, types))
    return out


def _capacity(topo: TopologyConfig) -> Tuple[int, int]:
    """Upper bounds of usable bytes per rank: (HBM after the planner's margin, DDR)."""
    hbm = int(topo.hbm_cap_gb * GB * (1 - STORAGE_MARGIN)) if topo.compute_device.value == "cuda" else 0
    return hbm, int(topo.ddr_cap_gb * GB)


def check_lower_bound(specs: List[TableSpec], setup: PlannerSetup, topo: TopologyConfig) -> None:
    """Fail fast, without the planner, when weights and optimizer state alone exceed the cluster."""
    needs = _needs(specs, setup, topo)
    hbm, ddr = _capacity(topo)
    ws = topo.world_size
    cuda = topo.compute_device.value == "cuda"
    problems: List[str] = []
    if cuda:
        need_hbm = sum(n.bytes for n in needs if n.hbm_only)
        need_all = sum(n.bytes for n in needs)
        if need_hbm > hbm * ws:
            problems.append(_totals_line(need_hbm, hbm * ws, ws, hbm, "HBM", [n for n in needs if n.hbm_only]))
        elif need_all > (hbm + ddr) * ws:
            problems.append(_totals_line(need_all, (hbm + ddr) * ws, ws, hbm + ddr, "HBM and DDR", needs))
    else:
        need_all = sum(n.bytes for n in needs)
        if need_all > ddr * ws:
            problems.append(_totals_line(need_all, ddr * ws, ws, ddr, "DDR", needs))
    # A table that may not be split, larger than one rank.
    per_rank = hbm if cuda else ddr
    for n in needs:
        unsplit = n.types is not None and set(n.types) <= {ShardingType.table_wise.value, ShardingType.data_parallel.value}
        if unsplit and n.hbm_only == cuda and n.weights + n.optimizer > per_rank:
            problems.append(
                f"table {n.spec.key!r} needs {format_bytes(n.weights + n.optimizer)} on one rank "
                f"({' or '.join(n.types or [])}), more than the {format_bytes(per_rank)} a rank can use; "
                f"allow column_wise{' or row_wise' if cuda else ''} (sharding.tables.{n.spec.key}.sharding_types)"
            )
    if problems:
        raise PlanDoesNotFitError(_message(problems, needs, topo))


def _totals_line(need: int, available: int, ws: int, per_rank: int, where: str, needs: List[_Need]) -> str:
    weights = sum(n.weights * n.copies for n in needs)
    return (
        f"they need at least {format_bytes(need)} of {where} (weights {format_bytes(weights)} + optimizer state "
        f"{format_bytes(need - weights)}), and {ws} rank{'s' if ws != 1 else ''} × {format_bytes(per_rank)} usable = "
        f"{format_bytes(available)} are available"
    )


def _message(problems: List[str], needs: List[_Need], topo: TopologyConfig, extra: str = "") -> str:
    cuda = topo.compute_device.value == "cuda"
    hbm, ddr = _capacity(topo)
    per_rank = hbm if cuda else ddr
    total = sum(n.bytes for n in needs)
    largest = sorted(needs, key=lambda n: -n.bytes)[:_NAMED_TABLES]
    named = ", ".join(
        f"{n.spec.key} ({n.spec.num_embeddings:,} × {n.spec.embedding_dim} {n.spec.data_type.name}, "
        f"{OptimizerAlgorithm(n.spec.optimizer.algorithm).name}: {format_bytes(n.bytes)})"
        for n in largest
    )
    lines = [
        f"the tables do not fit on {topo.world_size} {topo.compute_device.value} rank{'s' if topo.world_size != 1 else ''} "
        f"({format_bytes(per_rank)} usable {'HBM' if cuda else 'DDR'} per rank):"
    ]
    lines += [f"  {p}" for p in problems]
    if extra:
        lines.append(f"  {extra}")
    lines.append(f"  largest of {len(needs)} tables: {named}")
    tries = []
    if per_rank > 0:
        ranks = max(topo.world_size + 1, math.ceil(total / per_rank))
        local = int(topo.local_world_size or 1)
        ranks = math.ceil(ranks / local) * local
        tries.append(f"more ranks (topology.world_size={ranks} or more)")
    if cuda and any(n.hbm_only for n in needs):
        tries.append("UVM caching, rows in host memory with a GPU cache (sharding.compute_kernels=[fused_uvm_caching])")
    fp32 = [n for n in largest if n.spec.data_type is DataType.fp32]
    if fp32:
        tries.append(f"fp16 weights for the largest tables (embeddings.tables.{fp32[0].spec.key}.data_type=fp16 halves its weights)")
    heavy = [n for n in largest if n.optimizer > n.weights // 2]
    if heavy:
        tries.append(
            f"a lighter optimizer for tables such as {heavy[0].spec.key} "
            f"(rowwise_adagrad keeps one float per row: embeddings.tables.{heavy[0].spec.key}.optimizer.algorithm=rowwise_adagrad)"
        )
    lines.append("  try: " + "; ".join(tries))
    return "\n".join(lines)


def no_plan_message(specs: List[TableSpec], setup: PlannerSetup, topo: TopologyConfig, error: Exception, capture: Any) -> str:
    needs = _needs(specs, setup, topo)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    problems = [f"torchrec's planner found no placement: {first}"]
    proposal = capture.best_plan or []
    if proposal:
        hbm = sum(int(s.storage.hbm) for o in proposal for s in o.shards)
        ddr = sum(int(s.storage.ddr) for o in proposal for s in o.shards)
        cuda = topo.compute_device.value == "cuda"
        usable_hbm, usable_ddr = _capacity(topo)
        ws = topo.world_size
        if cuda:
            problems.append(
                f"its last proposal needed {format_bytes(hbm)} HBM and {format_bytes(ddr)} DDR (with buffers) "
                f"against {format_bytes(usable_hbm * ws)} HBM and {format_bytes(usable_ddr * ws)} DDR usable"
            )
        else:
            problems.append(f"its last proposal needed {format_bytes(ddr)} DDR (with buffers) against {format_bytes(usable_ddr * ws)} usable")
    need = sum(n.bytes for n in needs)
    searched = f"{capture.num_proposals} proposals"
    if setup.narrowed:
        searched += " (the narrowed search gives up after a run of proposals that do not fit)"
    problems.append(f"weights and optimizer state alone need {format_bytes(need)}; searched {searched}")
    return _message(problems, needs, topo)
