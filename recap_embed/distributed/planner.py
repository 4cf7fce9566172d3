"""From a `ShardingConfig` to a torchrec ShardingPlan: the planner's settings and the plan.

Its parts live beside it: `table_size` (bytes of a table), `plan_file` (reading and writing plan
files), `placements` (explicit placements, constraints, topology) and `planner_extensions`
(torchrec estimator, proposer and reservation); their public names are re-exported here.

Everything here runs without a process group (the `recap-embed-plan` CLI plans a GPU cluster on
a laptop); only `build_plan` with a process group broadcasts the plan from rank 0.

Where a table goes, by precedence:

1. ``sharding.plan.<key>``: an explicit `TablePlacement` (sharding type, kernel, ranks);
2. ``sharding.plan_file``: the same placements read from a JSON plan file (see `save_plan_file`);
3. the torchrec planner, restricted by ``sharding.tables.<key>`` then the global
   ``sharding.sharding_types`` / ``sharding.compute_kernels`` and fed ``batch_size``,
   ``hbm_cap_gb``, ``ddr_cap_gb``, ``pooling_factor`` and (CUDA) ``cache_load_factor``.

When every table is placed explicitly the plan is built with torchrec's
``construct_module_sharding_plan`` and the planner does not run.

Planner settings (`make_planner`, shared by `shard` and ``recap-embed-plan`` so both plan alike):
torchrec's ``EmbeddingShardingPlanner`` with its default perf model, computed once per distinct
shard (`memo_perf_estimator`: the same numbers, without re-evaluating the identical shards of a
row-wise or data-parallel option on every rank). Big searches, more than `LARGE_SEARCH` tables ×
ranks, are narrowed, because torchrec's cost grows with the shards it enumerates and copies
(data_parallel and row_wise options hold one shard per rank) and its default proposers walk every
option of every table: tables without sharding-type constraints are offered data_parallel only up
to `DP_MAX_BYTES` and row_wise only when they do not fit on one device; on CUDA, tables without
kernel constraints get the HBM kernel (``fused``; UVM only when asked); a single
``GreedyProposer(threshold=GREEDY_THRESHOLD)`` proposes, giving up after `MAX_FAILED_PROPOSALS`
proposals in a row that do not fit, within `PLANNER_TIMEOUT_S`.

Plan file format (version 1), keyed by table key (the key under ``embeddings.tables``)::

    {
      "format": "recap_embed.plan",
      "version": 1,
      "world_size": 2,                       # optional; checked against the job
      "device_type": "cpu",                  # optional; informational
      "tables": {
        "user":  {"sharding_type": "column_wise", "compute_kernel": "fused", "ranks": [0, 1]},
        "tweet": {"sharding_type": "table_wise",  "compute_kernel": "fused", "ranks": [1]}
      }
    }

Ranks: table_wise one rank; column_wise / table_column_wise one rank per column shard, in
column order (the dim must split into equal shards, each a multiple of 4); data_parallel and
row_wise: empty (every rank) or every rank; table_row_wise: the ranks of one host; grid_shard: the
ranks of whole hosts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from recap_embed.config import (
    CPU_COMPUTE_KERNELS,
    CPU_SHARDING_TYPES,
    ComputeKernel,
    ConfigError,
    ConfigValidationError,
    ParsedConfig,
    ShardingConfig,
    ShardingType,
    TablePlacement,
    TableSpec,
)
from recap_embed.config.resolve import config_prefix, parse_section
from recap_embed.units import format_bytes
from recap_embed.distributed.table_size import element_bytes, optimizer_state_bytes, table_bytes
from recap_embed.distributed.plan_file import (
    PLAN_FORMAT,
    PLAN_VERSION,
    PlanFile,
    load_plan_file,
    save_plan_file,
)
from recap_embed.distributed.placements import (
    ebc_module_paths,
    apply_explicit_placements,
    build_constraints,
    build_topology,
    explicit_placements,
    placement_generator,
)
from recap_embed.distributed.planner_extensions import (
    STORAGE_MARGIN,
    bounded_proposer,
    storage_reservation,
    memo_perf_estimator,
)

__all__ = [
    "CPU_COMPUTE_KERNELS",
    "DP_MAX_BYTES",
    "GREEDY_THRESHOLD",
    "LARGE_SEARCH",
    "MAX_FAILED_PROPOSALS",
    "PLANNER_TIMEOUT_S",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "STORAGE_MARGIN",
    "PlanFile",
    "PlannerSetup",
    "apply_explicit_placements",
    "build_constraints",
    "build_plan",
    "build_topology",
    "element_bytes",
    "explicit_placements",
    "load_plan_file",
    "make_planner",
    "memo_perf_estimator",
    "optimizer_state_bytes",
    "placement_generator",
    "resolve_device",
    "save_plan_file",
    "sharding_values",
    "table_bytes",
]

logger = logging.getLogger(__name__)

#: Above this many tables × ranks the planner's search is narrowed (see the module doc).
LARGE_SEARCH = 4096
#: In a narrowed search, data_parallel is offered only to tables up to this size (weights and
#: optimizer state): every rank holds a replica and all-reduces its gradient each step, which
#: torchrec's perf model already rates worse than table_wise above a few thousand rows.
DP_MAX_BYTES = 1 << 20
#: In a narrowed search, the proposer stops after this many successive plans that are no better.
GREEDY_THRESHOLD = 3
#: In a narrowed search, the proposer gives up after this many proposals in a row that do not fit
#: (torchrec's greedy proposer otherwise walks every option of every table when nothing fits).
MAX_FAILED_PROPOSALS = 10
#: In a narrowed search, the planner stops proposing after this many seconds (keeping its best plan).
PLANNER_TIMEOUT_S = 120


# --------------------------------------------------------------------------- config values


def sharding_values(sharding_cfg: Any) -> Tuple[str, ShardingConfig]:
    """``(config path, typed ShardingConfig)`` of a sharding node (DictConfig, dataclass, dict or
    None for the defaults); per-table entries become `TableShardingConfig` / `TablePlacement`.

    Raises ConfigValidationError naming the path of a wrong key or type.
    """
    if sharding_cfg is None:
        return "sharding", ShardingConfig()
    if isinstance(sharding_cfg, ParsedConfig):
        return sharding_cfg.sharding_path, sharding_cfg.sharding or ShardingConfig()
    if isinstance(sharding_cfg, ShardingConfig):
        return "sharding", sharding_cfg
    prefix = config_prefix(sharding_cfg, "sharding")
    problems: List[Tuple[str, str]] = []
    values = parse_section(sharding_cfg, ShardingConfig, prefix, problems)
    if problems or values is None:
        raise ConfigValidationError(problems)
    return prefix, values


def resolve_device(device: Union[str, torch.device, None], *, path: str = "sharding.device") -> torch.device:
    """A torch.device from a config string: ``auto`` (``cuda:LOCAL_RANK`` when CUDA, else cpu),
    ``cpu``, ``cuda`` (``cuda:LOCAL_RANK``), ``cuda:N``; a torch.device is returned as is."""
    if isinstance(device, torch.device):
        return device
    text = str(device if device is not None else "auto").strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{path}: {device!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{path}: {device!r} is not allowed; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{path}: {device!r} but this machine has no CUDA device; use auto or cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


@dataclass
class PlannerSetup:
    """A configured torchrec planner and what was chosen for it (see `make_planner`)."""

    planner: Any  # torchrec EmbeddingShardingPlanner
    topology: Any  # its Topology
    constraints: Dict[str, Any]  # ParameterConstraints per table name, as the planner sees them
    narrowed: bool  # the search was narrowed (more than LARGE_SEARCH tables × ranks)
    hbm_only: List[str] = field(default_factory=list)  # tables the narrowing kept on HBM kernels
    notes: List[str] = field(default_factory=list)  # the settings, in words


def _narrow_search(
    constraints: Dict[str, Any],
    values: ShardingConfig,
    specs: List[TableSpec],
    device_type: str,
    topology: Any,
    explicit: Mapping[str, TablePlacement],
) -> List[str]:
    """Restrict tables the user left unconstrained (see the module doc); returns the tables kept
    on HBM kernels. Edits `constraints` in place."""
    from torchrec.distributed.planner.types import ParameterConstraints

    device = topology.devices[0].storage
    per_device = int(device.hbm * (1 - STORAGE_MARGIN)) if device_type == "cuda" else int(device.ddr)
    supported = [t for t in (ShardingType if device_type == "cuda" else CPU_SHARDING_TYPES) if t is not ShardingType.grid_shard]
    hbm_only: List[str] = []
    for spec in specs:
        if spec.name in explicit:
            continue
        t = values.tables.get(spec.key)
        changes: Dict[str, Any] = {}
        if not ((t.sharding_types if t else None) or values.sharding_types):
            size = sum(table_bytes(spec))
            types = [
                st for st in supported
                if not (st is ShardingType.data_parallel and size > DP_MAX_BYTES)
                and not (st is ShardingType.row_wise and size <= per_device)
            ]
            changes["sharding_types"] = [st.value for st in types]
        if device_type == "cuda" and not ((t.compute_kernels if t else None) or values.compute_kernels):
            changes["compute_kernels"] = [ComputeKernel.fused.value, ComputeKernel.dense.value]
            hbm_only.append(spec.name)
        if changes:
            current = constraints.get(spec.name)
            constraints[spec.name] = dataclasses.replace(current, **changes) if current is not None else ParameterConstraints(**changes)
    return hbm_only


def make_planner(
    model: nn.Module,
    values: ShardingConfig,
    prefix: str,
    specs: List[TableSpec],
    *,
    world_size: int,
    device_type: str,
    local_world_size: Optional[int] = None,
    explicit: Optional[Mapping[str, TablePlacement]] = None,
    default_pooling_factor: Optional[float] = None,
    stats: Optional[Any] = None,
) -> PlannerSetup:
    """torchrec's ``EmbeddingShardingPlanner`` for `model` with recap_embed's settings.

    Constraints from `build_constraints`, topology from `build_topology`, the storage reservation
    of the dense part of `model`, `memo_perf_estimator`, and, for more than `LARGE_SEARCH`
    tables × ranks, the narrowed search described in the module doc. `stats`: torchrec ``Stats``
    objects (default: torchrec's EmbeddingStats, which logs the plan). Nothing is planned yet:
    call ``setup.planner.plan(model, sharders)`` (or ``collective_plan``).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.proposers import GreedyProposer
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

    explicit = explicit or {}
    local_size = local_world_size or world_size
    batch_size = int(values.batch_size)
    topology = build_topology(values, world_size=world_size, device_type=device_type, local_world_size=local_size)
    constraints = build_constraints(values, prefix, specs, device_type, explicit, default_pooling_factor=default_pooling_factor)
    narrowed = len(specs) * world_size > LARGE_SEARCH
    hbm_only: List[str] = []
    notes = ["torchrec EmbeddingShardingPlanner, perf model evaluated once per distinct shard"]
    kwargs: Dict[str, Any] = {}
    if narrowed:
        hbm_only = _narrow_search(constraints, values, specs, device_type, topology, explicit)
        proposer = bounded_proposer(GreedyProposer(threshold=GREEDY_THRESHOLD), MAX_FAILED_PROPOSALS)
        kwargs.update(proposer=[proposer], timeout_seconds=PLANNER_TIMEOUT_S)
        notes.append(
            f"narrowed search ({len(specs)} tables × {world_size} ranks > {LARGE_SEARCH}): unconstrained tables get "
            f"data_parallel only up to {DP_MAX_BYTES / 2**20:g} MiB, row_wise only when larger than one device"
            + (", HBM kernels only (fused)" if hbm_only else "")
            + f"; GreedyProposer(threshold={GREEDY_THRESHOLD}), giving up after {MAX_FAILED_PROPOSALS} failed "
            f"proposals in a row or {PLANNER_TIMEOUT_S} s"
        )
    else:
        notes.append("torchrec's default proposers (grid search, greedy, uniform)")
    enumerator = EmbeddingEnumerator(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        estimator=[memo_perf_estimator(topology, constraints), EmbeddingStorageEstimator(topology=topology, constraints=constraints)],
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        enumerator=enumerator,
        constraints=constraints,
        storage_reservation=storage_reservation(model),
        stats=stats,
        debug=False,
        **kwargs,
    )
    return PlannerSetup(planner=planner, topology=topology, constraints=constraints, narrowed=narrowed, hbm_only=hbm_only, notes=notes)


# --------------------------------------------------------------------------- the plan


def _other_shardable_modules(model: nn.Module, ours: set) -> List[str]:
    from torchrec.distributed.sharding_plan import get_module_to_default_sharders

    types = tuple(get_module_to_default_sharders())
    return [path for path, m in model.named_modules() if isinstance(m, types) and path not in ours]


class PlanDoesNotFit(ConfigError):
    """torchrec's planner found no placement for the tables (a config error: sizes against the cluster)."""


def does_not_fit_message(specs: List[TableSpec], topology: Any, prefix: str, world_size: int, device_type: str, error: Exception) -> str:
    """One message: what the planner said, what the tables need, the largest tables, what to try."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    sizes = sorted(((sum(table_bytes(s)), s) for s in specs), key=lambda t: -t[0])
    total = sum(b for b, _ in sizes)
    storage = topology.devices[0].storage
    cap = f"{format_bytes(storage.hbm)} HBM" if device_type == "cuda" else f"{format_bytes(storage.ddr)} DDR"
    largest = ", ".join(f"{s.key} ({s.num_embeddings:,} x {s.embedding_dim} {s.data_type.name}: {format_bytes(b)})" for b, s in sizes[:5])
    return (
        f"{prefix}: the tables do not fit on {world_size} {device_type} rank{'s' if world_size != 1 else ''} "
        f"({cap} per rank, {prefix}.{'hbm' if device_type == 'cuda' else 'ddr'}_cap_gb): torchrec's planner found no "
        f"placement ({first}); weights and optimizer state need {format_bytes(total)}; largest: {largest}; try: more "
        f"ranks, fp16 weights (embeddings.tables.<name>.data_type=fp16), fewer rows, or see the memory per rank with "
        f"recap-embed-plan"
    )


def build_plan(
    model: nn.Module,
    sharding_cfg: Any = None,
    *,
    world_size: int,
    device_type: str,
    local_world_size: Optional[int] = None,
    pg: Optional[Any] = None,
    explicit: Optional[Mapping[str, TablePlacement]] = None,
) -> Any:
    """The torchrec ShardingPlan of every LargeEmbeddings in `model` (unsharded, tables on meta).

    `explicit` (table name -> placement) defaults to the checked placements of the config. With
    `pg` and more than one rank the planner runs on rank 0 and the plan is broadcast.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, get_default_sharders
    from torchrec.distributed.types import ShardingPlan

    prefix, values = sharding_values(sharding_cfg)
    local_size = local_world_size or world_size
    ebc_paths = ebc_module_paths(model)
    specs = [s for le in ebc_paths.values() for s in le.specs]
    if explicit is None:
        explicit = explicit_placements(values, prefix, specs, world_size=world_size, device_type=device_type, local_size=local_size)
    sharder = EmbeddingBagCollectionSharder()
    everything_placed = all(s.name in explicit for s in specs) and not _other_shardable_modules(model, set(ebc_paths))
    if everything_placed:
        plan = ShardingPlan(
            {
                path: construct_module_sharding_plan(
                    le.ebc,
                    {s.name: placement_generator(explicit[s.name], local_size) for s in le.specs},
                    sharder=sharder,
                    local_size=local_size,
                    world_size=world_size,
                    device_type=device_type,
                )
                for path, le in ebc_paths.items()
            }
        )
        return plan
    setup = make_planner(
        model, values, prefix, specs,
        world_size=world_size, device_type=device_type, local_world_size=local_size, explicit=explicit,
    )
    sharders = get_default_sharders()
    from torchrec.distributed.planner.types import PlannerError

    try:
        if pg is not None and world_size > 1:
            plan = setup.planner.collective_plan(model, sharders, pg)
        else:
            plan = setup.planner.plan(model, sharders)
    except PlannerError as e:
        raise PlanDoesNotFit(does_not_fit_message(specs, setup.topology, prefix, world_size, device_type, e)) from None
    except RuntimeError as e:
        if "No available sharding type and compute kernel combination" not in str(e):
            raise
        raise ConfigError(f"{prefix}: {str(e).splitlines()[0]} (check {prefix}.sharding_types, {prefix}.compute_kernels and {prefix}.tables)") from None
    return apply_explicit_placements(plan, model, explicit, world_size=world_size, device_type=device_type, local_world_size=local_size)
