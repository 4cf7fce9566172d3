"""What `recap-embed-plan` reports: a row per table and per rank, the totals, and how they print and save."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from recap_embed.files import atomic_write_text

from recap_embed.config import ComputeKernel, ShardingType, TablePlacement
from recap_embed.distributed.planner import STORAGE_MARGIN, save_plan_file

from recap_embed.units import format_bytes

from .config import TopologyConfig


GB = 1024**3
#: Kernels that keep a table's weights in GPU memory.
HBM_KERNELS = {ComputeKernel.fused.value, ComputeKernel.dense.value}


@dataclass
class TableRow:
    """One table as planned. Bytes of weights and optimizer state count one copy of the table;
    `hbm_bytes`/`ddr_bytes` are the planner's estimate summed over all shards (replicas included)."""

    key: str  # key under embeddings.tables (the plan file's key)
    name: str
    rows: int
    dim: int
    data_type: str
    optimizer: str  # algorithm
    weight_bytes: int  # rows × dim × bytes per element
    optimizer_bytes: int  # optimizer state; row-wise state counts the rows of each column shard
    sharding_type: str
    compute_kernel: str
    ranks: List[int]  # ranks holding a shard, in shard order (data_parallel: every rank)
    shards: List[Tuple[int, int, int]]  # (rows, cols, rank) per shard or replica
    hbm_bytes: int
    ddr_bytes: int
    perf_ms: float  # sum of the shards' estimated cost per step
    explicit: bool  # placed by sharding.plan / sharding.plan_file, not chosen by the planner

    @property
    def replicas(self) -> int:
        return len(self.shards) if self.sharding_type == ShardingType.data_parallel.value else 1

    @property
    def state_bytes(self) -> int:
        """Weights and optimizer state of one copy."""
        return self.weight_bytes + self.optimizer_bytes


@dataclass
class RankRow:
    """One rank: memory used by its shards against what the planner could use, and cost per step."""

    rank: int
    hbm_bytes: int  # planner's estimate for the rank's shards
    ddr_bytes: int
    hbm_usable: int  # after the planner's reservation (margin, inputs, dense model)
    ddr_usable: int
    state_bytes: int  # weights and optimizer state of the rank's shards and replicas
    shards: int
    fwd_compute: float = 0.0  # ms per step
    fwd_comms: float = 0.0
    bwd_compute: float = 0.0
    bwd_comms: float = 0.0
    prefetch_compute: float = 0.0

    @property
    def perf_ms(self) -> float:
        """torchrec's total: compute and communication, forward and backward (and prefetch)."""
        return self.fwd_compute + self.fwd_comms + self.bwd_compute + self.bwd_comms + self.prefetch_compute


@dataclass
class PlanReport:
    """A plan with its memory and cost per table and per rank; `format` prints it, `save` writes it."""

    topology: TopologyConfig  # local_world_size resolved
    tables: List[TableRow]
    ranks: List[RankRow]
    placements: Dict[str, TablePlacement]  # by table key: what plan.json holds
    planner_seconds: float
    num_proposals: int
    num_plans: int
    notes: List[str] = field(default_factory=list)

    @property
    def device_type(self) -> str:
        return self.topology.compute_device.value

    @property
    def max_perf_ms(self) -> float:
        """The busiest rank's estimated cost per step: the plan's critical path."""
        return max((r.perf_ms for r in self.ranks), default=0.0)

    def totals(self) -> Dict[str, int]:
        return {
            "rows": sum(t.rows for t in self.tables),
            "weight_bytes": sum(t.weight_bytes for t in self.tables),
            "optimizer_bytes": sum(t.optimizer_bytes for t in self.tables),
            "hbm_bytes": sum(r.hbm_bytes for r in self.ranks),
            "ddr_bytes": sum(r.ddr_bytes for r in self.ranks),
            "hbm_usable": sum(r.hbm_usable for r in self.ranks),
            "ddr_usable": sum(r.ddr_usable for r in self.ranks),
        }

    # ------------------------------------------------------------------ output

    def save(self, out_dir: Union[str, Path]) -> Dict[str, Path]:
        """Write ``plan.json`` (load with ``sharding.plan_file=...``) and ``plan.txt`` (the full printout)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"plan.json": out / "plan.json", "plan.txt": out / "plan.txt"}
        save_plan_file(paths["plan.json"], self.placements, world_size=self.topology.world_size, device_type=self.device_type)
        atomic_write_text(paths["plan.txt"], self.format() + "\n")
        return paths

    def format(self, max_rows: Optional[int] = None) -> str:
        """The plan as fixed-width text. With `max_rows`, longer lists show the largest tables and
        the busiest ranks only (totals always cover everything)."""
        topo, cuda = self.topology, self.device_type == "cuda"
        hosts = topo.world_size // int(topo.local_world_size or topo.world_size)
        mem = f"{topo.hbm_cap_gb:g} GB HBM + {topo.ddr_cap_gb:g} GB DDR" if cuda else f"{topo.ddr_cap_gb:g} GB DDR"
        tot = self.totals()
        lines = [
            f"plan: {len(self.tables)} tables, {tot['rows']:,} rows on {topo.world_size} {self.device_type} ranks "
            f"({hosts} host{'s' if hosts != 1 else ''} of {topo.local_world_size}), {mem} per rank, "
            f"batch {topo.batch_size} per rank",
            f"planner: {self.planner_seconds:.1f} s, {self.num_proposals} proposals, {self.num_plans} plans; "
            + "; ".join(self.notes),
            "",
        ]
        # Tables
        tables = self.tables
        shown = tables
        if max_rows and len(tables) > max_rows:
            shown = sorted(tables, key=lambda t: -t.state_bytes * t.replicas)[:max_rows]
        header = ["table", "rows", "dim", "dtype", "optimizer", "weights", "opt state", "sharding", "kernel", "ranks"]
        header += ["HBM", "DDR"] if cuda else ["DDR"]
        body = []
        for t in shown:
            row = [t.key + ("*" if t.explicit else ""), f"{t.rows:,}", str(t.dim), t.data_type, t.optimizer,
                   format_bytes(t.weight_bytes), format_bytes(t.optimizer_bytes), t.sharding_type, t.compute_kernel,
                   format_ranks(t.ranks)]
            row += [format_bytes(t.hbm_bytes), format_bytes(t.ddr_bytes)] if cuda else [format_bytes(t.ddr_bytes)]
            body.append(row)
        total = ["total", f"{tot['rows']:,}", "", "", "", format_bytes(tot["weight_bytes"]), format_bytes(tot["optimizer_bytes"]), "", "", ""]
        total += [format_bytes(tot["hbm_bytes"]), format_bytes(tot["ddr_bytes"])] if cuda else [format_bytes(tot["ddr_bytes"])]
        title = "Tables (weights, opt state: one copy; "
        title += "HBM, DDR" if cuda else "DDR"
        title += ": the planner's estimate over all shards and replicas, with buffers)"
        if shown is not tables:
            title += f"; the {len(shown)} largest of {len(tables)}, all in plan.txt"
        if any(t.explicit for t in tables):
            title += "; * placed explicitly"
        lines += [title] + _table(header, body, total, right={1, 2, 5, 6, 10, 11}) + [""]

        # Ranks
        ranks = self.ranks
        shown_ranks = ranks
        if max_rows and len(ranks) > max_rows:
            shown_ranks = sorted(ranks, key=lambda r: (-r.perf_ms, r.rank))[:max_rows]
        header = ["rank"] + (["HBM used", "usable", "%"] if cuda else []) + ["DDR used", "usable", "%", "state", "shards",
                  "cost ms", "fwd comp", "fwd comms", "bwd comp", "bwd comms"]
        d = _decimals(r.perf_ms for r in ranks)
        body = []
        for r in shown_ranks:
            row = [str(r.rank)]
            if cuda:
                row += [format_bytes(r.hbm_bytes), format_bytes(r.hbm_usable), _pct(r.hbm_bytes, r.hbm_usable)]
            row += [format_bytes(r.ddr_bytes), format_bytes(r.ddr_usable), _pct(r.ddr_bytes, r.ddr_usable),
                    format_bytes(r.state_bytes), str(r.shards), _ms(r.perf_ms, d), _ms(r.fwd_compute, d),
                    _ms(r.fwd_comms, d), _ms(r.bwd_compute, d), _ms(r.bwd_comms, d)]
            body.append(row)
        total = ["total"]
        if cuda:
            total += [format_bytes(tot["hbm_bytes"]), format_bytes(tot["hbm_usable"]), _pct(tot["hbm_bytes"], tot["hbm_usable"])]
        total += [format_bytes(tot["ddr_bytes"]), format_bytes(tot["ddr_usable"]), _pct(tot["ddr_bytes"], tot["ddr_usable"]),
                  format_bytes(sum(r.state_bytes for r in ranks)), str(sum(r.shards for r in ranks)), "", "", "", "", ""]
        cap = f"{topo.hbm_cap_gb:g} GB HBM cap − {STORAGE_MARGIN:.0%} margin − inputs and dense model" if cuda else f"{topo.ddr_cap_gb:g} GB DDR"
        title = f"Ranks (usable: {cap}; state: weights and optimizer state; cost: the planner's estimate per step)"
        if shown_ranks is not ranks:
            title += f"; the {len(shown_ranks)} busiest of {len(ranks)}, all in plan.txt"
        n = 4 if cuda else 1
        lines += [title] + _table(header, body, total, right=set(range(1, n + 10)))
        if ranks:
            busiest = max(ranks, key=lambda r: r.perf_ms)
            used = [r.hbm_bytes if cuda else r.ddr_bytes for r in ranks]
            lines += [
                "",
                f"critical path: {_ms(busiest.perf_ms, d)} ms on rank {busiest.rank}; cost per rank min/mean/max "
                f"{_ms(min(r.perf_ms for r in ranks), d)}/{_ms(sum(r.perf_ms for r in ranks) / len(ranks), d)}/{_ms(busiest.perf_ms, d)} ms; "
                f"{'HBM' if cuda else 'DDR'} per rank min/max {format_bytes(min(used))}/{format_bytes(max(used))}",
            ]
        return "\n".join(lines)


def format_ranks(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'; order kept (column shards list their ranks in shard order)."""
    parts: List[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if j == i else f"{ranks[i]}-{ranks[j]}" if j > i + 1 else f"{ranks[i]},{ranks[j]}")
        i = j + 1
    return ",".join(parts)


def _ms(x: float, decimals: int = 3) -> str:
    return f"{x:.{decimals}f}"


def _decimals(values: Iterable[float]) -> int:
    """Decimals that show about 4 significant digits of the largest value."""
    top = max((abs(v) for v in values), default=0.0)
    return 3 if top <= 0 else min(6, max(0, 3 - math.floor(math.log10(top))))


def _pct(used: int, usable: int) -> str:
    return f"{100.0 * used / usable:.0f}%" if usable > 0 else "-"


def _table(header: List[str], body: List[List[str]], total: Optional[List[str]], right: Iterable[int] = ()) -> List[str]:
    right = set(right)
    rows = [header] + body + ([total] if total else [])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: List[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    if total:
        out += ["  ".join("-" * w for w in widths), line(total)]
    return out
