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
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch  # noqa: F401  (loaded before torchrec)
import torchrec  # noqa: F401  (loads fbgemm_gpu, which logs each library at INFO: the app quiets that)
from omegaconf import DictConfig, OmegaConf

from recap_embed.files import atomic_write_text

from recap_embed.config import (
    ComputeKernel,
    ConfigError,
    ConfigValidationError,
    DataType,
    OptimizerAlgorithm,
    ShardingType,
    TablePlacement,
    TableSpec,
    validate,
)
from recap_embed.config.resolve import parse_section, resolve_device_type
from recap_embed.distributed.planner import (
    STORAGE_MARGIN,
    PlannerSetup,
    apply_explicit_placements,
    element_bytes,
    explicit_placements,
    make_planner,
    optimizer_state_bytes,
    save_plan_file,
    sharding_values,
    table_bytes,
)

from recap_embed.units import format_bytes

from .config import DEFAULT_LOCAL_WORLD_SIZE, TopologyConfig

__all__ = ["PlanDoesNotFitError", "PlanReport", "RankRow", "TableRow", "format_bytes", "plan_report"]

log = logging.getLogger("recap_embed.plan")

GB = 1024**3
#: Kernels that keep a table's weights in GPU memory.
_HBM_KERNELS = {ComputeKernel.fused.value, ComputeKernel.dense.value}
#: How many of the largest tables an error names.
_NAMED_TABLES = 5


class PlanDoesNotFitError(ConfigError):
    """The tables do not fit the topology; the message names the largest tables and what to try."""


# --------------------------------------------------------------------------- the report


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
    hbm_cap: int
    ddr_cap: int
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


# --------------------------------------------------------------------------- planning


def plan_report(cfg: Any) -> PlanReport:
    """Plan the tables of ``cfg.embeddings`` under ``cfg.sharding`` for ``cfg.topology``.

    `cfg`: the app's root config (DictConfig from Hydra or compose, a dict, or a `PlanAppConfig`);
    ``topology`` may be missing (defaults). Raises ConfigValidationError naming config paths for a
    bad value, PlanDoesNotFitError when the tables do not fit.
    """
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import get_default_sharders

    from recap_embed.modules.large import LargeEmbeddings
    from recap_embed.optim.fused import apply_fused_optimizers

    root = _root(cfg)
    topo = _topology(root)
    device_type = topo.compute_device.value
    world_size, local_size = topo.world_size, int(topo.local_world_size or 1)
    if "embeddings" not in root or root.embeddings is None:
        raise ConfigError("embeddings: missing; select a collection (embeddings=twhin) or add tables")
    sharding_node = root.sharding if "sharding" in root else None
    parsed = validate(root if sharding_node is not None else {"embeddings": root.embeddings}, device=device_type)
    prefix, values = sharding_values(parsed if sharding_node is not None else None)
    _warn_overridden(values, prefix, topo)
    values = replace(values, device=device_type, batch_size=topo.batch_size, hbm_cap_gb=topo.hbm_cap_gb, ddr_cap_gb=topo.ddr_cap_gb)

    model = LargeEmbeddings.from_config(parsed)
    specs = model.specs
    explicit = explicit_placements(values, prefix, specs, world_size=world_size, device_type=device_type, local_size=local_size)
    apply_fused_optimizers(model)  # the planner counts each table's optimizer state, as in `shard`
    capture = _capture_stats()
    setup = make_planner(
        model, values, prefix, specs,
        world_size=world_size, device_type=device_type, local_world_size=local_size, explicit=explicit,
        default_pooling_factor=topo.pooling_factor, stats=[capture],
    )
    _check_lower_bound(specs, setup, topo, explicit)

    start = time.perf_counter()
    try:
        plan = setup.planner.plan(model, get_default_sharders())
    except PlannerError as e:
        raise PlanDoesNotFitError(_no_plan_message(specs, setup, topo, e, capture)) from None
    except RuntimeError as e:
        if "No available sharding type and compute kernel combination" in str(e):
            raise ConfigError(f"{prefix}: {str(e).splitlines()[0]} (check {prefix}.sharding_types, {prefix}.compute_kernels and {prefix}.tables)") from None
        raise
    seconds = time.perf_counter() - start
    if capture.best_plan is None:  # pragma: no cover - torchrec always logs stats
        raise RuntimeError("torchrec's planner returned no stats")
    plan = apply_explicit_placements(plan, model, explicit, world_size=world_size, device_type=device_type, local_world_size=local_size)
    tables, ranks = _rows(specs, plan, capture, setup, topo, explicit)
    placements = _placements(tables)
    _check_plan_file(placements, values, prefix, specs, world_size, device_type, local_size)
    return PlanReport(
        topology=topo,
        tables=tables,
        ranks=ranks,
        placements=placements,
        planner_seconds=seconds,
        num_proposals=capture.num_proposals,
        num_plans=capture.num_plans,
        notes=list(setup.notes),
    )


def _root(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    return OmegaConf.structured(cfg)


def _topology(root: DictConfig) -> TopologyConfig:
    problems: List[Tuple[str, str]] = []
    node = root.get("topology")
    topo = parse_section(node if node is not None else {}, TopologyConfig, "topology", problems)
    if topo is not None:
        if topo.world_size < 1:
            problems.append(("topology.world_size", f"{topo.world_size!r} is not allowed; use a positive number of ranks"))
        else:
            local = topo.local_world_size if topo.local_world_size is not None else min(topo.world_size, DEFAULT_LOCAL_WORLD_SIZE)
            if local < 1 or topo.world_size % local:
                problems.append(("topology.local_world_size", f"{local!r} is not allowed; use ranks per host that divide world_size {topo.world_size} (null: min(world_size, {DEFAULT_LOCAL_WORLD_SIZE}))"))
            topo = replace(topo, local_world_size=local)
        for name in ("hbm_cap_gb", "ddr_cap_gb", "pooling_factor"):
            if not getattr(topo, name) > 0:
                problems.append((f"topology.{name}", f"{getattr(topo, name)!r} is not allowed; use a positive number"))
        if topo.batch_size < 1:
            problems.append(("topology.batch_size", f"{topo.batch_size!r} is not allowed; use a positive number of examples per rank"))
    if problems or topo is None:
        raise ConfigValidationError(problems)
    return topo


def _warn_overridden(values: Any, prefix: str, topo: TopologyConfig) -> None:
    """The topology section replaces what the sharding section says about the training machine."""
    device = str(values.device).strip().lower()
    if device != "auto" and resolve_device_type(device) != topo.compute_device.value:
        log.warning("%s.device=%s is ignored: the plan is for topology.compute_device=%s", prefix, values.device, topo.compute_device.name)
    if int(values.batch_size) != topo.batch_size:
        log.warning("%s.batch_size=%s is ignored: the plan uses topology.batch_size=%d", prefix, values.batch_size, topo.batch_size)
    for name in ("hbm_cap_gb", "ddr_cap_gb"):
        value = getattr(values, name)
        if value is not None and float(value) != float(getattr(topo, name)):
            log.warning("%s.%s=%s is ignored: the plan uses topology.%s=%s", prefix, name, value, name, getattr(topo, name))


def _capture_stats() -> Any:
    """A torchrec planner ``Stats`` that keeps what the planner reports instead of logging it."""
    from torchrec.distributed.planner.types import Stats

    class Capture(Stats):
        def __init__(self) -> None:
            self.best_plan: Optional[List[Any]] = None
            self.num_proposals = 0
            self.num_plans = 0
            self.storage_reservation: Any = None

        def log(self, sharding_plan: Any, topology: Any, batch_size: int, storage_reservation: Any, num_proposals: int,
                num_plans: int, run_time: float, best_plan: List[Any], *args: Any, **kwargs: Any) -> None:
            self.best_plan = best_plan
            self.num_proposals, self.num_plans = num_proposals, num_plans
            self.storage_reservation = storage_reservation

    return Capture()


# --------------------------------------------------------------------------- rows


def _rows(
    specs: List[TableSpec], plan: Any, capture: Any, setup: PlannerSetup, topo: TopologyConfig, explicit: Mapping[str, TablePlacement]
) -> Tuple[List[TableRow], List[RankRow]]:
    world_size = topo.world_size
    module_plan: Dict[str, Any] = {}
    for per_module in plan.plan.values():
        module_plan.update(per_module)
    options = {option.name: option for option in capture.best_plan}
    devices = setup.topology.devices
    reserved = getattr(capture.storage_reservation, "last_reserved_topology", None)
    usable = reserved.devices if reserved is not None else devices
    ranks = [
        RankRow(
            rank=r, hbm_bytes=0, ddr_bytes=0, hbm_usable=int(usable[r].storage.hbm), ddr_usable=int(usable[r].storage.ddr),
            hbm_cap=int(devices[r].storage.hbm), ddr_cap=int(devices[r].storage.ddr), state_bytes=0, shards=0,
        )
        for r in range(world_size)
    ]
    tables: List[TableRow] = []
    for spec in specs:
        ps, option = module_plan[spec.name], options[spec.name]
        final = {} if ps.sharding_type == ShardingType.data_parallel.value else _final_ranks(ps)
        algorithm = OptimizerAlgorithm(spec.optimizer.algorithm)
        el = element_bytes(spec.data_type)
        shards: List[Tuple[int, int, int]] = []
        hbm = ddr = 0
        perf_ms = 0.0
        opt_bytes = 0
        for shard in option.shards:
            rank = final.get(tuple(int(x) for x in shard.offset), shard.rank)
            rows, cols = int(shard.size[0]), int(shard.size[1])
            state = optimizer_state_bytes(algorithm, rows, cols)
            shards.append((rows, cols, int(rank)))
            rr = ranks[int(rank)]
            rr.hbm_bytes += int(shard.storage.hbm)
            rr.ddr_bytes += int(shard.storage.ddr)
            rr.state_bytes += rows * cols * el + state
            rr.shards += 1
            p = shard.perf
            rr.fwd_compute += p.fwd_compute
            rr.fwd_comms += p.fwd_comms
            rr.bwd_compute += p.bwd_compute
            rr.bwd_comms += p.bwd_comms
            rr.prefetch_compute += p.prefetch_compute
            hbm += int(shard.storage.hbm)
            ddr += int(shard.storage.ddr)
            perf_ms += p.total
            opt_bytes += state
        if ps.sharding_type == ShardingType.data_parallel.value and shards:
            opt_bytes //= len(shards)  # one replica
        tables.append(
            TableRow(
                key=spec.key, name=spec.name, rows=int(spec.num_embeddings), dim=int(spec.embedding_dim),
                data_type=spec.data_type.name, optimizer=algorithm.name, weight_bytes=table_bytes(spec)[0],
                optimizer_bytes=opt_bytes, sharding_type=ps.sharding_type, compute_kernel=ps.compute_kernel,
                ranks=[int(r) for r in (ps.ranks or [])], shards=shards, hbm_bytes=hbm, ddr_bytes=ddr, perf_ms=perf_ms,
                explicit=spec.name in explicit,
            )
        )
    return tables, ranks


def _final_ranks(ps: Any) -> Dict[Tuple[int, ...], int]:
    """{shard offsets: rank} of a final ParameterSharding (explicit placements move shards)."""
    if ps.sharding_spec is None or not hasattr(ps.sharding_spec, "shards"):
        return {}
    return {tuple(int(x) for x in m.shard_offsets): int(m.placement.rank()) for m in ps.sharding_spec.shards}


def _placements(tables: List[TableRow]) -> Dict[str, TablePlacement]:
    return {
        t.key: TablePlacement(
            sharding_type=ShardingType(t.sharding_type),
            compute_kernel=ComputeKernel(t.compute_kernel),
            ranks=[] if t.sharding_type == ShardingType.data_parallel.value else list(t.ranks),
        )
        for t in tables
    }


def _check_plan_file(placements: Dict[str, TablePlacement], values: Any, prefix: str, specs: List[TableSpec],
                     world_size: int, device_type: str, local_size: int) -> None:
    """The training app must accept plan.json as it is: run its own checks on the placements."""
    try:
        explicit_placements(replace(values, plan=placements, plan_file=None), prefix, specs,
                            world_size=world_size, device_type=device_type, local_size=local_size)
    except ConfigValidationError as e:
        lines = "\n".join(f"  {path}: {msg}" for path, msg in e.problems)
        raise ConfigError(f"the planned placement cannot be written as a plan file the training app accepts:\n{lines}") from None


# --------------------------------------------------------------------------- does not fit


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
        hbm_only = topo.compute_device.value == "cuda" and kernels is not None and set(kernels) <= _HBM_KERNELS
        out.append(_Need(spec, weights, optimizer, copies, hbm_only, types))
    return out


def _capacity(topo: TopologyConfig) -> Tuple[int, int]:
    """Upper bounds of usable bytes per rank: (HBM after the planner's margin, DDR)."""
    hbm = int(topo.hbm_cap_gb * GB * (1 - STORAGE_MARGIN)) if topo.compute_device.value == "cuda" else 0
    return hbm, int(topo.ddr_cap_gb * GB)


def _check_lower_bound(specs: List[TableSpec], setup: PlannerSetup, topo: TopologyConfig, explicit: Mapping[str, Any]) -> None:
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
        raise PlanDoesNotFitError(_message(problems, needs, topo, setup))


def _totals_line(need: int, available: int, ws: int, per_rank: int, where: str, needs: List[_Need]) -> str:
    weights = sum(n.weights * n.copies for n in needs)
    return (
        f"they need at least {format_bytes(need)} of {where} (weights {format_bytes(weights)} + optimizer state "
        f"{format_bytes(need - weights)}), and {ws} rank{'s' if ws != 1 else ''} × {format_bytes(per_rank)} usable = "
        f"{format_bytes(available)} are available"
    )


def _message(problems: List[str], needs: List[_Need], topo: TopologyConfig, setup: PlannerSetup, extra: str = "") -> str:
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


def _no_plan_message(specs: List[TableSpec], setup: PlannerSetup, topo: TopologyConfig, error: Exception, capture: Any) -> str:
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
    return _message(problems, needs, topo, setup)
