"""What the planner may choose: explicit placements (checked, then turned into torchrec's
parameter sharding), per-table constraints and the topology it plans against."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

from recap_embed.config import (
    CPU_COMPUTE_KERNELS,
    CPU_SHARDING_TYPES,
    ComputeKernel,
    ConfigValidationError,
    OptimizerAlgorithm,
    ShardingConfig,
    ShardingType,
    TablePlacement,
    TableSpec,
)
from recap_embed.distributed.plan_file import load_plan_file
from recap_embed.modules.tables import large_embeddings
from recap_embed.optim.fused import DENSE_OPTIMIZER_CLASSES


_GB = 1024**3

logger = logging.getLogger("recap_embed.distributed.planner")  # the planner's log, as before the split


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


def ebc_module_paths(model: nn.Module) -> Dict[str, Any]:
    """``{module path of the EBC: LargeEmbeddings}`` as keys of a torchrec ShardingPlan."""
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
    for path, le in ebc_module_paths(model).items():
        params = sharder.shardable_parameters(le.ebc)
        for s in le.specs:
            if s.name in explicit:
                gen = placement_generator(explicit[s.name], local_size)
                plan.plan[path][s.name] = gen(params[s.name], local_size, world_size, device_type, sharder)
    return plan
