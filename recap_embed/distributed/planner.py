"""From a `ShardingConfig` to a torchrec ShardingPlan: constraints, topology, explicit placements.

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
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from recap_embed.units import format_bytes

from recap_embed.config import (
    CPU_COMPUTE_KERNELS,
    CPU_SHARDING_TYPES,
    ComputeKernel,
    ConfigError,
    ConfigValidationError,
    DataType,
    OptimizerAlgorithm,
    ParsedConfig,
    ShardingConfig,
    ShardingType,
    TablePlacement,
    TableSpec,
)
from recap_embed.config.resolve import config_prefix, parse_section
from recap_embed.files import atomic_write_text

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

PLAN_FORMAT = "recap_embed.plan"
PLAN_VERSION = 1

_GB = 1024**3

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
#: Share of each device's HBM the planner keeps free (torchrec's heuristic reservation margin).
STORAGE_MARGIN = 0.15


# --------------------------------------------------------------------------- memory of a table

#: Bytes of one weight element per data type.
_ELEMENT_BYTES = {DataType.fp32: 4, DataType.fp16: 2, DataType.bf16: 2}
#: Optimizer state floats (fp32) per element and per row, per algorithm.
_STATE_PER_ELEMENT = {
    OptimizerAlgorithm.sgd: 0,
    OptimizerAlgorithm.adagrad: 1,
    OptimizerAlgorithm.rowwise_adagrad: 0,
    OptimizerAlgorithm.adam: 2,
    OptimizerAlgorithm.partial_rowwise_adam: 1,
    OptimizerAlgorithm.lamb: 2,
}
_STATE_PER_ROW = {OptimizerAlgorithm.rowwise_adagrad: 1, OptimizerAlgorithm.partial_rowwise_adam: 1}


def element_bytes(data_type: Union[DataType, str]) -> int:
    """Bytes of one weight element: fp32 4, fp16 and bf16 2."""
    dt = data_type if isinstance(data_type, DataType) else DataType[str(data_type)]
    return _ELEMENT_BYTES[dt]


def optimizer_state_bytes(algorithm: Union[OptimizerAlgorithm, str], rows: int, cols: int) -> int:
    """Bytes of optimizer state for a block of `rows` × `cols` (a table or one shard).

    One fp32 per element for adagrad, two for adam and lamb, one per row for rowwise_adagrad, one
    per element plus one per row for partial_rowwise_adam, none for sgd. Row-wise state on column
    shards is kept per row *of each shard*, so sum this over the shards of a placed table.
    """
    a = algorithm if isinstance(algorithm, OptimizerAlgorithm) else OptimizerAlgorithm[str(algorithm)]
    return 4 * (int(rows) * int(cols) * _STATE_PER_ELEMENT[a] + int(rows) * _STATE_PER_ROW.get(a, 0))


def table_bytes(spec: TableSpec) -> Tuple[int, int]:
    """``(weights, optimizer state)`` bytes of a whole (unsharded) table; rows must be known."""
    rows, dim = int(spec.num_embeddings or 0), int(spec.embedding_dim)
    return rows * dim * element_bytes(spec.data_type), optimizer_state_bytes(spec.optimizer.algorithm, rows, dim)


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


# --------------------------------------------------------------------------- plan files


@dataclass
class PlanFile:
    """The content of a plan file: placements keyed by table key, and what it was written for."""

    tables: Dict[str, TablePlacement] = field(default_factory=dict)
    world_size: Optional[int] = None
    device_type: Optional[str] = None
    version: int = PLAN_VERSION


def _placement_dict(p: Union[TablePlacement, Mapping[str, Any]]) -> Dict[str, Any]:
    if isinstance(p, TablePlacement):
        st, ck, ranks = p.sharding_type, p.compute_kernel, p.ranks
    else:
        st, ck, ranks = p["sharding_type"], p["compute_kernel"], p.get("ranks", [])
    return {
        "sharding_type": st.value if isinstance(st, ShardingType) else str(st),
        "compute_kernel": ck.value if isinstance(ck, ComputeKernel) else str(ck),
        "ranks": [int(r) for r in ranks],
    }


def save_plan_file(
    path: Union[str, os.PathLike],
    placements: Mapping[str, Union[TablePlacement, Mapping[str, Any]]],
    *,
    world_size: Optional[int] = None,
    device_type: Optional[str] = None,
) -> None:
    """Write placements (keyed by table key) as a version-1 plan file (format in module doc)."""
    doc: Dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION}
    if world_size is not None:
        doc["world_size"] = int(world_size)
    if device_type is not None:
        doc["device_type"] = str(device_type)
    tables = {key: _placement_dict(p) for key, p in placements.items()}
    # One line per table (a row-wise table lists every rank): readable and diffable at any size.
    head = json.dumps(doc, indent=2)[:-2]
    body = ",\n".join(f"    {json.dumps(key)}: {json.dumps(entry)}" for key, entry in tables.items())
    text = head + ',\n  "tables": {' + (f"\n{body}\n  " if body else "") + "}\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def load_plan_file(path: Union[str, os.PathLike], *, config_path: str = "sharding.plan_file") -> PlanFile:
    """Read and check a plan file; errors name the file and the offending entry."""
    where = f"{config_path} ({str(path)!r})"
    try:
        doc = json.loads(Path(os.path.expanduser(str(path))).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found; write one with recap-embed-plan or save_plan_file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text
        raise ConfigError(f"{where}: cannot be read as a plan file ({type(e).__name__}: {e}); give the plan.json recap-embed-plan wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{where}: not a plan file (expected \"format\": {PLAN_FORMAT!r})")
    version = doc.get("version")
    if version != PLAN_VERSION:
        raise ConfigError(f"{where}: version {version!r} is not supported; this recap_embed reads version {PLAN_VERSION}")
    tables = doc.get("tables")
    if not isinstance(tables, dict):
        raise ConfigError(f"{where}: \"tables\" must map table keys to placements")
    problems: List[Tuple[str, str]] = []
    out: Dict[str, TablePlacement] = {}
    for key, entry in tables.items():
        p = f"{where}: tables.{key}"
        if not isinstance(entry, dict):
            problems.append((p, "must be an object with sharding_type, compute_kernel, ranks"))
            continue
        unknown = set(entry) - {"sharding_type", "compute_kernel", "ranks"}
        if unknown:
            problems.append((p, f"unknown field(s) {sorted(unknown)}; allowed: sharding_type, compute_kernel, ranks"))
        try:
            st = ShardingType(entry.get("sharding_type"))
        except ValueError:
            problems.append((f"{p}.sharding_type", f"{entry.get('sharding_type')!r} is not a sharding type; allowed: {[t.value for t in ShardingType]}"))
            continue
        try:
            ck = ComputeKernel(entry.get("compute_kernel"))
        except ValueError:
            problems.append((f"{p}.compute_kernel", f"{entry.get('compute_kernel')!r} is not a compute kernel; allowed: {[k.value for k in ComputeKernel]}"))
            continue
        ranks = entry.get("ranks", [])
        if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            problems.append((f"{p}.ranks", f"{ranks!r} is not a list of integer ranks"))
            continue
        out[key] = TablePlacement(sharding_type=st, compute_kernel=ck, ranks=list(ranks))
    if problems:
        raise ConfigValidationError(problems)
    ws = doc.get("world_size")
    return PlanFile(tables=out, world_size=int(ws) if ws is not None else None, device_type=doc.get("device_type"), version=version)


# --------------------------------------------------------------------------- explicit placements


def explicit_placements(
    values: ShardingConfig,
    prefix: str,
    specs: List[TableSpec],
    *,
    world_size: int,
    device_type: str,
    local_size: Optional[int] = None,
) -> Dict[str, TablePlacement]:
    """Checked explicit placements keyed by table *name*: plan file entries, then ``plan`` entries.

    Raises ConfigValidationError naming ``<prefix>.plan.<key>...`` or the plan file entry for a
    table that does not exist, a sharding type or kernel the device cannot run, ranks outside the
    world, or a column split the fused kernels cannot take. Runs no collective.
    """
    local_size = local_size or world_size
    by_key = {s.key: s for s in specs}
    entries: Dict[str, Tuple[TablePlacement, str]] = {}
    problems: List[Tuple[str, str]] = []
    if values.plan_file:
        file_path = f"{prefix}.plan_file"
        pf = load_plan_file(values.plan_file, config_path=file_path)
        where = f"{file_path} ({values.plan_file!r})"
        if pf.world_size is not None and pf.world_size != world_size:
            problems.append((where, f"was written for world_size {pf.world_size}; this job has {world_size} ranks. Re-plan with recap-embed-plan"))
        for key, placement in pf.tables.items():
            entries[key] = (placement, f"{where}: tables.{key}")
    for key, placement in values.plan.items():
        entries[key] = (placement, f"{prefix}.plan.{key}")

    out: Dict[str, TablePlacement] = {}
    for key, (placement, path) in entries.items():
        spec = by_key.get(key)
        if spec is None:
            problems.append((path, f"places {key!r}, which is not a table; tables: {sorted(by_key)}"))
            continue
        before = len(problems)
        _check_placement(placement, spec, path, world_size, local_size, device_type, problems)
        if len(problems) == before:
            out[spec.name] = placement
    if problems:
        raise ConfigValidationError(problems)
    return out


def _check_placement(
    p: TablePlacement,
    spec: TableSpec,
    path: str,
    world_size: int,
    local_size: int,
    device_type: str,
    problems: List[Tuple[str, str]],
) -> None:
    st, ck, ranks = p.sharding_type, p.compute_kernel, list(p.ranks)
    if not isinstance(st, ShardingType):
        problems.append((f"{path}.sharding_type", f"missing or invalid ({st!r}); allowed: {[t.name for t in ShardingType]}"))
        return
    if not isinstance(ck, ComputeKernel):
        problems.append((f"{path}.compute_kernel", f"missing or invalid ({ck!r}); allowed: {[k.name for k in ComputeKernel]}"))
        return
    if device_type != "cuda":
        if st not in CPU_SHARDING_TYPES:
            allowed = ", ".join(sorted(t.name for t in CPU_SHARDING_TYPES))
            problems.append((f"{path}.sharding_type", f"{st.name} needs CUDA (gloo on CPU lacks reduce_scatter); allowed on CPU: {allowed}"))
            return
        if ck not in CPU_COMPUTE_KERNELS:
            problems.append((f"{path}.compute_kernel", f"{ck.name} needs CUDA; allowed on CPU: dense (data_parallel), fused"))
            return
    if (st is ShardingType.data_parallel) != (ck is ComputeKernel.dense):
        problems.append((f"{path}.compute_kernel", f"{ck.name} does not go with {st.name}: data_parallel tables use the dense kernel, every other sharding type a fused kernel"))
        return
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        problems.append((f"{path}.ranks", f"{bad} outside this job's ranks 0..{world_size - 1}"))
        return
    if len(set(ranks)) != len(ranks) and st is not ShardingType.column_wise:
        problems.append((f"{path}.ranks", f"{ranks} repeats a rank"))
        return
    everyone = list(range(world_size))
    if st is ShardingType.table_wise:
        if len(ranks) != 1:
            problems.append((f"{path}.ranks", f"table_wise takes exactly one rank, got {ranks}"))
    elif st in (ShardingType.column_wise, ShardingType.table_column_wise):
        if not ranks:
            problems.append((f"{path}.ranks", f"{st.name} needs one rank per column shard, got none"))
            return
        dim = spec.embedding_dim
        if dim % len(ranks) or (dim // len(ranks)) % 4:
            problems.append((f"{path}.ranks", f"{len(ranks)} column shards of embedding_dim {dim} are not equal multiples of 4 (fused kernels need dim % 4 == 0 per shard)"))
        if st is ShardingType.table_column_wise and len({r // local_size for r in ranks}) > 1:
            problems.append((f"{path}.ranks", f"table_column_wise keeps a table on one host; {ranks} span several (local size {local_size})"))
    elif st in (ShardingType.data_parallel, ShardingType.row_wise):
        if ranks and sorted(ranks) != everyone:
            problems.append((f"{path}.ranks", f"{st.name} uses every rank; give [] or {everyone}, got {ranks}"))
    elif st is ShardingType.table_row_wise:
        hosts = {r // local_size for r in ranks}
        if len(hosts) != 1 or sorted(ranks) != [next(iter(hosts)) * local_size + i for i in range(local_size)]:
            problems.append((f"{path}.ranks", f"table_row_wise uses all ranks of one host (local size {local_size}), got {ranks}"))
    elif st is ShardingType.grid_shard:
        hosts = sorted({r // local_size for r in ranks})
        if not hosts or sorted(ranks) != [h * local_size + i for h in hosts for i in range(local_size)]:
            problems.append((f"{path}.ranks", f"grid_shard uses all ranks of whole hosts (local size {local_size}), got {ranks}"))


def placement_generator(placement: TablePlacement, local_size: int) -> Callable[..., Any]:
    """The torchrec ParameterShardingGenerator of a checked placement."""
    from torchrec.distributed import sharding_plan as sp

    st, kernel, ranks = placement.sharding_type, placement.compute_kernel.value, list(placement.ranks)
    if st is ShardingType.table_wise:
        return sp.table_wise(rank=ranks[0], compute_kernel=kernel)
    if st is ShardingType.column_wise:
        return sp.column_wise(ranks=ranks, compute_kernel=kernel)
    if st is ShardingType.data_parallel:
        return sp.data_parallel()
    if st is ShardingType.row_wise:
        return sp.row_wise(compute_kernel=kernel)

    def retyped(gen: Callable[..., Any], sharding_type: Optional[str] = None) -> Callable[..., Any]:
        def _gen(*args: Any) -> Any:
            ps = gen(*args)
            changes = {"compute_kernel": kernel}
            if sharding_type:
                changes["sharding_type"] = sharding_type
            return dataclasses.replace(ps, **changes)

        return _gen

    if st is ShardingType.table_column_wise:
        # torchrec has no generator for it: column shards on one host, typed table_column_wise.
        return retyped(sp.column_wise(ranks=ranks, compute_kernel=kernel), ShardingType.table_column_wise.value)
    if st is ShardingType.table_row_wise:
        return retyped(sp.table_row_wise(host_index=ranks[0] // local_size))
    if st is ShardingType.grid_shard:
        return retyped(sp.grid_shard(host_indexes=sorted({r // local_size for r in ranks})))
    raise ValueError(f"unknown sharding type {st}")


# --------------------------------------------------------------------------- planner inputs


def _kernel_ok(st: ShardingType, ck: ComputeKernel) -> bool:
    return (st is ShardingType.data_parallel) == (ck is ComputeKernel.dense)


def build_constraints(
    values: ShardingConfig,
    prefix: str,
    specs: List[TableSpec],
    device_type: str,
    explicit: Optional[Mapping[str, TablePlacement]] = None,
    *,
    default_pooling_factor: Optional[float] = None,
) -> Dict[str, Any]:
    """torchrec ``ParameterConstraints`` per table name from the global and per-table settings.

    A table placed explicitly is pinned to its sharding type and kernel, and a column-wise one to
    its number of column shards, so the planner's memory accounting sees it where it will be.
    `default_pooling_factor` is the pooling factor of tables that set none (torchrec's default: 1).
    Raises ConfigValidationError when a table's allowed sharding types and kernels leave no
    combination the device can run.
    """
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import CacheParams

    from recap_embed.optim.fused import DENSE_OPTIMIZER_CLASSES

    explicit = explicit or {}
    per_table = values.tables
    problems: List[Tuple[str, str]] = []
    out: Dict[str, Any] = {}
    for spec in specs:
        t = per_table.get(spec.key)
        path = f"{prefix}.tables.{spec.key}" if t is not None else prefix
        types: List[ShardingType] = list((t.sharding_types if t else None) or values.sharding_types)
        kernels: List[ComputeKernel] = list((t.compute_kernels if t else None) or values.compute_kernels)
        if spec.name in explicit:
            types, kernels = [explicit[spec.name].sharding_type], [explicit[spec.name].compute_kernel]
        if device_type != "cuda":
            bad = [k.name for k in kernels if k not in CPU_COMPUTE_KERNELS]
            if bad:
                problems.append((f"{path}.compute_kernels", f"{bad} need CUDA; allowed on CPU: dense, fused"))
                continue
        cand_types = types or list(ShardingType if device_type == "cuda" else CPU_SHARDING_TYPES)
        if OptimizerAlgorithm(spec.optimizer.algorithm) not in DENSE_OPTIMIZER_CLASSES:
            # No torch optimizer to train a replicated copy with: fused placements only.
            if types and ShardingType.data_parallel in types and len(types) == 1:
                problems.append((f"{path}.sharding_types", f"table {spec.key!r}: data_parallel needs a torch optimizer, and {spec.optimizer.algorithm.name} has none; allowed: any other sharding type"))
                continue
            cand_types = [st for st in cand_types if st is not ShardingType.data_parallel]
            types = cand_types
        cand_kernels = kernels or list(ComputeKernel if device_type == "cuda" else CPU_COMPUTE_KERNELS)
        if not any(_kernel_ok(st, ck) for st in cand_types for ck in cand_kernels):
            problems.append((
                path,
                f"table {spec.key!r}: sharding types {[s.name for s in cand_types]} and compute kernels "
                f"{[k.name for k in cand_kernels]} leave no combination (data_parallel runs only the dense "
                f"kernel, the other sharding types only fused kernels)",
            ))
            continue
        kwargs: Dict[str, Any] = {}
        if types:
            kwargs["sharding_types"] = [st.value for st in types]
        if kernels:
            kwargs["compute_kernels"] = [ck.value for ck in kernels]
        if t is not None and t.pooling_factor is not None:
            kwargs["pooling_factors"] = [float(t.pooling_factor)] * len(spec.feature_names)
        elif default_pooling_factor is not None:
            kwargs["pooling_factors"] = [float(default_pooling_factor)] * len(spec.feature_names)
        placed = explicit.get(spec.name)
        if placed is not None and placed.sharding_type in (ShardingType.column_wise, ShardingType.table_column_wise) and placed.ranks:
            kwargs["min_partition"] = spec.embedding_dim // len(placed.ranks)  # checked: equal multiples of 4
        if t is not None and t.cache_load_factor is not None:
            if device_type == "cuda":
                kwargs["cache_params"] = CacheParams(load_factor=float(t.cache_load_factor))
            else:
                logger.info("%s.cache_load_factor: ignored on CPU (no HBM cache)", path)
        if kwargs:
            out[spec.name] = ParameterConstraints(**kwargs)
    if problems:
        raise ConfigValidationError(problems)
    return out


def build_topology(
    values: ShardingConfig, *, world_size: int, device_type: str, local_world_size: Optional[int] = None
) -> Any:
    """The planner's Topology: ranks, device type and the memory caps of the config (GB)."""
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    hbm, ddr = values.hbm_cap_gb, values.ddr_cap_gb
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size or world_size,
        hbm_cap_bytes=int(hbm * _GB) if hbm is not None else None,
        ddr_cap_bytes=int(ddr * _GB) if ddr is not None else None,
    )
    return TopologyFactory.create_topology(trainer, kernel_config=KernelConfig(compute_device=device_type))


# --------------------------------------------------------------------------- planner settings


def _storage_reservation(model: nn.Module, percentage: float = STORAGE_MARGIN) -> Any:
    """torchrec's default reservation, given the dense size from parameter shapes (known on meta).

    Same heuristic as torchrec (6x the dense parameter bytes: weights, optimizer state, DDP
    buckets) plus 15% margin; passing the estimate avoids torchrec's dry-run warning.
    """
    import warnings

    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.sharding_plan import get_module_to_default_sharders

    types = tuple(get_module_to_default_sharders())
    shardable = {id(p) for m in model.modules() if isinstance(m, types) for p in m.parameters()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in shardable)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
        return HeuristicalStorageReservation(percentage=percentage, dense_tensor_estimate=max(1, 6 * dense))


_MEMO_CLASS: Optional[type] = None


def _memo_class() -> Optional[type]:
    """A subclass of torchrec's perf estimator that evaluates each distinct shard context once.

    torchrec 1.8 evaluates every shard separately (~0.5 ms each); a row-wise or data-parallel
    option over 512 ranks holds 512 shards whose contexts are equal. The context
    (``ShardPerfContext``: sizes, batch, pooling, bandwidths, flags) is all an evaluator reads, so
    equal contexts give equal perfs: the numbers are exactly torchrec's. None when this torchrec
    lacks the pieces (then torchrec's own estimator is used).
    """
    global _MEMO_CLASS
    if _MEMO_CLASS is not None:
        return _MEMO_CLASS
    try:
        from torchrec.distributed.planner.estimator.estimator import (
            EmbeddingPerfEstimator,
            get_embedding_perf_sharding_evaluator,
        )
        from torchrec.distributed.planner.estimator.types import ShardPerfContext
    except ImportError:  # pragma: no cover - another torchrec layout
        return None

    class MemoPerfEstimator(EmbeddingPerfEstimator):  # type: ignore[misc, valid-type]
        def estimate(self, sharding_options: List[Any], sharder_data_map: Any) -> None:
            done: Dict[Tuple[Any, ...], List[Tuple[Any, Any]]] = {}
            for option in sharding_options:
                self._config.validate_sharding_type(option.sharding_type)
                shard_sizes = [shard.size for shard in option.shards]
                contexts = ShardPerfContext.build_shard_perf_contexts(
                    config=self._config,
                    shard_sizes=shard_sizes,
                    sharding_option=option,
                    topology=self._topology,
                    constraints=self._constraints,
                    sharder_data=sharder_data_map[option.module_type_key],
                    is_inference=self._is_inference,
                    use_batch_inputs_for_expected_cache_fetches=self._use_batch_inputs_for_expected_cache_fetches,
                    use_linear_regression_prefetch_estimate=self._use_linear_regression_prefetch_estimate,
                )
                if contexts:
                    option.is_weighted = contexts[0].is_weighted
                for shard, ctx in zip(option.shards, contexts):
                    evaluator = get_embedding_perf_sharding_evaluator(sharding_type=ctx.sharding_type, is_inference=ctx.is_inference)
                    bucket = done.setdefault((type(evaluator), ctx.table_name, ctx.hash_size, ctx.emb_dim), [])
                    perf = next((p for c, p in bucket if c.__dict__ == ctx.__dict__), None)
                    if perf is None:
                        perf = evaluator.compute_perf(ctx=ctx, config=self._config)
                        bucket.append((ctx, perf))
                    shard.perf = dataclasses.replace(perf)
                perfs = self._config.post_process_perfs(
                    shard_perfs=[shard.perf for shard in option.shards if shard.perf is not None],
                    shard_sizes=shard_sizes,
                    sharding_type=option.sharding_type,
                    uneven_sharding_perf_multiplier=self._topology.uneven_sharding_perf_multiplier,
                )
                for shard, perf in zip(option.shards, perfs):
                    shard.perf = perf

    _MEMO_CLASS = MemoPerfEstimator
    return _MEMO_CLASS


def memo_perf_estimator(topology: Any, constraints: Optional[Dict[str, Any]]) -> Any:
    """torchrec's default perf estimator, evaluating each distinct shard once (same numbers)."""
    from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
    from torchrec.distributed.planner.estimator.estimator import EmbeddingPerfEstimatorFactory

    default = EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology, constraints=constraints)
    cls = _memo_class()
    if cls is None or type(default) is not cls.__mro__[1]:  # pragma: no cover - another torchrec
        return default
    return cls(topology=topology, constraints=constraints, config=default.config)


def _bounded_proposer(inner: Any, max_failures: int) -> Any:
    """`inner` (a torchrec Proposer) that stops after `max_failures` unpartitionable proposals in a row."""
    from torchrec.distributed.planner.types import Proposer

    class BoundedProposer(Proposer):
        def __init__(self) -> None:
            self.inner, self.failures = inner, 0

        def load(self, search_space: List[Any], enumerator: Optional[Any] = None) -> None:
            self.failures = 0
            self.inner.load(search_space=search_space, enumerator=enumerator)

        def propose(self) -> Optional[List[Any]]:
            return None if self.failures >= max_failures else self.inner.propose()

        def feedback(self, partitionable: bool, plan: Optional[List[Any]] = None, perf_rating: Optional[float] = None,
                     storage_constraint: Optional[Any] = None) -> None:
            self.failures = 0 if partitionable else self.failures + 1
            self.inner.feedback(partitionable=partitionable, plan=plan, perf_rating=perf_rating, storage_constraint=storage_constraint)

    BoundedProposer.__name__ = type(inner).__name__  # torchrec logs proposers by class name
    return BoundedProposer()


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
        proposer = _bounded_proposer(GreedyProposer(threshold=GREEDY_THRESHOLD), MAX_FAILED_PROPOSALS)
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
        storage_reservation=_storage_reservation(model),
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


def _ebc_paths(model: nn.Module) -> Dict[str, Any]:
    """``{module path of the EBC: LargeEmbeddings}`` as keys of a torchrec ShardingPlan."""
    from recap_embed.optim.fused import large_embeddings

    return {(f"{path}." if path else "") + "ebc": le for path, le in large_embeddings(model)}


def apply_explicit_placements(
    plan: Any,
    model: nn.Module,
    explicit: Mapping[str, TablePlacement],
    *,
    world_size: int,
    device_type: str,
    local_world_size: Optional[int] = None,
) -> Any:
    """Replace the planner's choice for every explicitly placed table (name -> placement) in
    `plan` (a torchrec ShardingPlan, edited in place and returned)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    local_size = local_world_size or world_size
    sharder = EmbeddingBagCollectionSharder()
    for path, le in _ebc_paths(model).items():
        params = sharder.shardable_parameters(le.ebc)
        for s in le.specs:
            if s.name in explicit:
                gen = placement_generator(explicit[s.name], local_size)
                plan.plan[path][s.name] = gen(params[s.name], local_size, world_size, device_type, sharder)
    return plan


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
    ebc_paths = _ebc_paths(model)
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
