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

from recap_embed.config import (
    CPU_SHARDING_TYPES,
    ComputeKernel,
    ConfigError,
    ConfigValidationError,
    ShardingConfig,
    ShardingType,
    TablePlacement,
    TableSpec,
)
from recap_embed.config.resolve import config_prefix, parse_section

__all__ = [
    "CPU_COMPUTE_KERNELS",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "PlanFile",
    "build_constraints",
    "build_plan",
    "build_topology",
    "explicit_placements",
    "load_plan_file",
    "placement_generator",
    "resolve_device",
    "save_plan_file",
    "sharding_values",
]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "recap_embed.plan"
PLAN_VERSION = 1

#: Compute kernels that run without CUDA.
CPU_COMPUTE_KERNELS = frozenset({ComputeKernel.fused, ComputeKernel.dense})

_GB = 1024**3


# --------------------------------------------------------------------------- config values


def sharding_values(sharding_cfg: Any) -> Tuple[str, ShardingConfig]:
    """``(config path, typed ShardingConfig)`` of a sharding node (DictConfig, dataclass, dict or
    None for the defaults); per-table entries become `TableShardingConfig` / `TablePlacement`.

    Raises ConfigValidationError naming the path of a wrong key or type.
    """
    if sharding_cfg is None:
        return "sharding", ShardingConfig()
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
    doc["tables"] = {key: _placement_dict(p) for key, p in placements.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def load_plan_file(path: Union[str, os.PathLike], *, config_path: str = "sharding.plan_file") -> PlanFile:
    """Read and check a plan file; errors name the file and the offending entry."""
    where = f"{config_path} ({str(path)!r})"
    try:
        doc = json.loads(Path(os.path.expanduser(str(path))).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found; write one with recap-embed-plan or save_plan_file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
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
) -> Dict[str, Any]:
    """torchrec ``ParameterConstraints`` per table name from the global and per-table settings.

    A table placed explicitly is pinned to its sharding type and kernel (so the planner's memory
    accounting sees it roughly where it will be). Raises ConfigValidationError when a table's
    allowed sharding types and kernels leave no combination the device can run.
    """
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import CacheParams

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


# --------------------------------------------------------------------------- the plan


def _storage_reservation(model: nn.Module, percentage: float = 0.15) -> Any:
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


def _other_shardable_modules(model: nn.Module, ours: set) -> List[str]:
    from torchrec.distributed.sharding_plan import get_module_to_default_sharders

    types = tuple(get_module_to_default_sharders())
    return [path for path, m in model.named_modules() if isinstance(m, types) and path not in ours]


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
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, get_default_sharders
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingPlan

    from recap_embed.optim.fused import large_embeddings

    prefix, values = sharding_values(sharding_cfg)
    local_size = local_world_size or world_size
    modules = large_embeddings(model)
    specs = [s for _, le in modules for s in le.specs]
    if explicit is None:
        explicit = explicit_placements(values, prefix, specs, world_size=world_size, device_type=device_type, local_size=local_size)
    ebc_paths = {(f"{path}." if path else "") + "ebc": le for path, le in modules}
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
    constraints = build_constraints(values, prefix, specs, device_type, explicit)
    planner = EmbeddingShardingPlanner(
        topology=build_topology(values, world_size=world_size, device_type=device_type, local_world_size=local_size),
        batch_size=int(values.batch_size),
        constraints=constraints,
        storage_reservation=_storage_reservation(model),
        debug=False,
    )
    sharders = get_default_sharders()
    if pg is not None and world_size > 1:
        plan = planner.collective_plan(model, sharders, pg)
    else:
        plan = planner.plan(model, sharders)
    for path, le in ebc_paths.items():
        params = sharder.shardable_parameters(le.ebc)
        for s in le.specs:
            if s.name in explicit:
                gen = placement_generator(explicit[s.name], local_size)
                plan.plan[path][s.name] = gen(params[s.name], local_size, world_size, device_type, sharder)
    return plan
