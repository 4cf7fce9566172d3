"""`shard`: one call from a model holding `LargeEmbeddings` (tables on meta) to a model ready to train.

What `shard` does, in order:

1. checks the sharding config and the tables against the target device (sharding types, kernels
   and optimizers the device cannot run, explicit placements and plan files) and raises a
   ConfigValidationError naming config paths, *before any collective call*;
2. finds the process group: `pg`, else the default group when torch.distributed is initialised,
   else (a single process) a private one-rank default group, see below;
3. attaches each table's fused optimizer (`recap_embed.optim.apply_fused_optimizers`);
4. plans (explicit placements, plan file, torchrec planner) and wraps the model in torchrec's
   ``DistributedModelParallel``, which allocates each rank's shards (never the whole table) and
   initialises them, and wraps the remaining dense modules in DDP (``init_data_parallel``).

Single process. Fused FBGEMM kernels and ``dmp.fused_optimizer`` exist only in a sharded module,
and torchrec's sharded modules need a default process group (ShardedTensor and the DeviceMesh
look it up; ``ShardingEnv.from_local`` fails for training). So when torch.distributed is not
initialised and ``WORLD_SIZE`` is unset or 1, `shard` initialises a one-rank default group:
backend gloo (nccl for a CUDA device), rendezvous through an in-memory ``HashStore``, so no port,
file or environment variable is used and nothing can clash with another job. Side effect:
``torch.distributed.is_initialized()`` is True afterwards; an app that wants its own group must
initialise it before calling `shard` (which then uses it). Collectives over one rank are local
copies, so the cost is negligible.

Training semantics (checked against plain torch on whole tables, 2 ranks): table_wise,
column_wise, table_column_wise and data_parallel tables get the same updates as an unsharded
table trained on the mean of the ranks' losses (torchrec divides embedding gradients by the world
size, DDP averages). One exception: row-wise optimizer state (rowwise_adagrad,
partial_rowwise_adam) on column shards is kept per row *of each shard*; `shard` logs a warning
for such tables.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv

from recap_embed.config import (
    CPU_SHARDING_TYPES,
    ComputeKernel,
    ConfigValidationError,
    OptimizerAlgorithm,
    ParsedConfig,
    ShardingType,
    TablePlacement,
    check_device,
)
from recap_embed.modules.tables import large_embeddings
from recap_embed.optim.fused import apply_fused_optimizers
from recap_embed.optim.weight_decay import check_fused_weight_decay

from .collectives import agree, env_world_size, one_rank_group, rank_and_world
from .memory import MemoryDoesNotFit, check_local_memory
from .planner import build_plan, explicit_placements, resolve_device, sharding_values
from .single_rank import install_single_rank_path

__all__ = ["describe_plan", "format_plan", "plan_placements", "shard"]

logger = logging.getLogger(__name__)


def shard(
    module: nn.Module,
    sharding_cfg: Any = None,
    *,
    device: Optional[Any] = None,
    pg: Optional[Any] = None,
    init_data_parallel: bool = True,
    single_rank_fast_path: bool = True,
) -> nn.Module:
    """Place the tables of every `LargeEmbeddings` in `module` and return a trainable model.

    Args:
        module: a `LargeEmbeddings`, or a model containing one or more (unsharded, on meta).
        sharding_cfg: the ``sharding`` node (`ShardingConfig` as DictConfig, dataclass or dict), or
            a `ParsedConfig` holding it (``validate(cfg)``: not parsed again); None: defaults
            (device auto, the planner chooses everything).
        device: overrides ``sharding.device`` (a torch.device or a string such as "cpu").
        pg: process group to shard over; default: the default group (created for one process).
        init_data_parallel: wrap the other modules in DDP now (False: call
            ``model.init_data_parallel()`` after a first forward materialised lazy modules).
        single_rank_fast_path: with one rank, call the tables' kernels directly instead of
            torchrec's distributed forward, and skip DDP (`recap_embed.distributed.single_rank`;
            same results, same state). False: torchrec's path, as with several ranks.

    Returns:
        torchrec ``DistributedModelParallel``: call it like `module`; ``.fused_optimizer`` holds
        the fused tables' optimizers (see `recap_embed.optim.combined_optimizer`), ``.plan`` the plan.
    """
    prefix, values = sharding_values(sharding_cfg)
    dev = resolve_device(device if device is not None else values.device, path=f"{prefix}.device")
    modules = large_embeddings(module)
    if not modules:
        raise TypeError(f"{type(module).__name__} holds no LargeEmbeddings: nothing to shard")
    specs = [s for _, le in modules for s in le.specs]

    # 1. Every check that can fail, before the first collective.
    world_size = pg.size() if pg is not None else (dist.get_world_size() if dist.is_initialized() else env_world_size())
    local_size = get_local_size(world_size) if world_size > 1 else 1
    _check(values, prefix, modules, dev.type)
    explicit = explicit_placements(values, prefix, specs, world_size=world_size, device_type=dev.type, local_size=local_size)

    # 2. Process group.
    pg = one_rank_group(pg, dev.type)

    # 3. Optimizers, 4. plan and shard.
    apply_fused_optimizers(module)
    plan = build_plan(
        module, sharding_cfg, world_size=world_size, device_type=dev.type,
        local_world_size=local_size, pg=pg, explicit=explicit,
    )
    _check_plan(plan, prefix, dev.type)
    _check_weight_decay(plan, modules, dev.type)
    _check_memory(plan, modules, dev, world_size, local_size, pg)
    _warn_rowwise_state_on_column_shards(plan, modules)
    one_rank = single_rank_fast_path and pg.size() == 1
    model = DistributedModelParallel(
        module,
        env=ShardingEnv.from_process_group(pg),
        device=dev,
        plan=plan,
        sharders=get_default_sharders(),
        init_data_parallel=init_data_parallel and not one_rank,  # DDP over one rank is an identity
    )
    if one_rank:
        install_single_rank_path(model)
    if (pg.rank() if hasattr(pg, "rank") else 0) == 0:
        logger.info("embedding placement:\n%s", format_plan(describe_plan(model)))
    return model


def _check(values: Any, prefix: str, modules: List[Tuple[str, Any]], device_type: str) -> None:
    """The config rules that depend on the target device (`check_device`, one place for them),
    and the table keys the sharding section names, against the tables of the model."""
    problems: List[Tuple[str, str]] = []
    checks = [ParsedConfig(embeddings=le.parsed, device_type="meta") for _, le in modules]
    checks.append(ParsedConfig(sharding=values, sharding_path=prefix, device_type="meta"))
    for parsed in checks:
        try:
            check_device(parsed, device_type)
        except ConfigValidationError as e:
            problems.extend(p for p in e.problems if p not in problems)
    keys = sorted(s.key for _, le in modules for s in le.specs)
    for key in values.tables:
        if key not in keys:
            problems.append((f"{prefix}.tables.{key}", f"constrains {key!r}, which is not a table; tables: {keys}"))
    problems.extend(_training_flags([s for _, le in modules for s in le.specs]))
    if problems:
        raise ConfigValidationError(problems)


def _training_flags(specs: List[Any]) -> List[Tuple[str, str]]:
    """torchrec table fields a config may carry (recap_embed.interop) that training here cannot honour."""
    problems = []
    for s in specs:
        pruned = s.num_embeddings_post_pruning
        if pruned is not None and pruned != s.num_embeddings:
            problems.append((f"{s.path}.num_embeddings_post_pruning", (
                f"is {pruned}, not the table's {s.num_embeddings} rows: torchrec's sharders would allocate {pruned} "
                f"rows (the field describes a table after pruning, for inference); set it to null to train"
            )))
        if s.need_pos:
            problems.append((f"{s.path}.need_pos", (
                "is true, which marks a table fed by a position-weighted feature processor (torchrec's "
                "FeatureProcessedEmbeddingBagCollection); LargeEmbeddings has none, so it would do nothing, except "
                "under row-wise sharding of weighted inputs, where torchrec replaces the per-id weights by positions; "
                "set it to false to train"
            )))
    return problems


def _check_plan(plan: Any, prefix: str, device_type: str) -> None:
    if device_type == "cuda":
        return
    cpu = {t.value for t in CPU_SHARDING_TYPES}
    bad = [(f"{prefix}", f"the plan puts table {name!r} ({path}) on {ps.sharding_type}, which needs CUDA")
           for path, module_plan in plan.plan.items() for name, ps in module_plan.items() if ps.sharding_type not in cpu]
    if bad:
        raise ConfigValidationError(bad)


def _check_weight_decay(plan: Any, modules: List[Tuple[str, Any]], device_type: str) -> None:
    """Fused tables whose weight decay the kernel would ignore are refused (every rank has the same
    plan, so every rank raises alike)."""
    fused = []
    for path, le in modules:
        module_plan = plan.plan.get((f"{path}." if path else "") + "ebc", {})
        fused += [s for s in le.specs if s.name in module_plan and module_plan[s.name].compute_kernel != ComputeKernel.dense.value]
    check_fused_weight_decay(fused, device_type)


def _check_memory(plan: Any, modules: List[Tuple[str, Any]], device: torch.device, world_size: int, local_size: int, pg: Any) -> None:
    """The shards fit this host's RAM (CPU) or each rank's GPU, before DMP allocates them; every
    rank raises (an agreement) so none is left waiting in DMP's collectives."""
    specs = {f"{(path + '.') if path else ''}ebc/{s.name}": (s.path, s) for path, le in modules for s in le.specs}
    rank, _ = rank_and_world(pg)
    error = None
    try:
        check_local_memory(plan, specs, device=device, world_size=world_size, local_size=local_size, rank=rank)
    except MemoryDoesNotFit as e:
        error = e
    agree(error, pg, enabled=world_size > 1, other_failed=MemoryDoesNotFit)


_ROWWISE_STATE = (OptimizerAlgorithm.rowwise_adagrad, OptimizerAlgorithm.partial_rowwise_adam)


def _warn_rowwise_state_on_column_shards(plan: Any, modules: List[Tuple[str, Any]]) -> None:
    """Row-wise optimizer state is kept per row of each column shard (seen with torchrec 1.8):
    such a table does not train like the unsharded one. Legal, but worth knowing."""
    for path, le in modules:
        module_plan = plan.plan.get((f"{path}." if path else "") + "ebc", {})
        for spec in le.specs:
            ps = module_plan.get(spec.name)
            shards = len(ps.sharding_spec.shards) if ps is not None and ps.sharding_spec is not None else 1
            if ps is not None and shards > 1 and ps.sharding_type in ("column_wise", "table_column_wise") \
                    and OptimizerAlgorithm(spec.optimizer.algorithm) in _ROWWISE_STATE:
                logger.warning(
                    "%s: %s on %d column shards keeps one %s accumulator per row of each shard, not per "
                    "whole row; training differs from the unsharded table. Constrain it to table_wise "
                    "(sharding.tables.%s.sharding_types=[table_wise]) for whole-row state.",
                    spec.path, ps.sharding_type, shards, spec.optimizer.algorithm.name, spec.key,
                )


# --------------------------------------------------------------------------- readable plan


def describe_plan(model: nn.Module) -> List[Dict[str, Any]]:
    """One row per table of a sharded model, for logs and run records.

    Keys: ``table`` (name), ``key`` (config key), ``module`` (path of the LargeEmbeddings),
    ``sharding_type``, ``compute_kernel``, ``ranks`` (holding a shard, in shard order), ``rows``,
    ``dim``, ``data_type``, ``shards`` (``[rows, cols, rank]`` per shard).
    """
    out: List[Dict[str, Any]] = []
    for path, le in large_embeddings(model):
        plan = getattr(le.ebc, "module_sharding_plan", None)
        if plan is None:
            raise TypeError(f"{path or type(le).__name__}: not sharded; call recap_embed.distributed.shard first")
        for spec in le.specs:
            ps = plan[spec.name]
            shards = []
            if ps.sharding_spec is not None:
                shards = [[int(m.shard_sizes[0]), int(m.shard_sizes[1]), int(m.placement.rank())]
                          for m in ps.sharding_spec.shards]
            out.append(
                {
                    "table": spec.name,
                    "key": spec.key,
                    "module": path,
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": list(ps.ranks or []),
                    "rows": int(spec.num_embeddings),
                    "dim": int(spec.embedding_dim),
                    "data_type": spec.data_type.name,
                    "shards": shards,
                }
            )
    return out


def format_plan(rows: List[Dict[str, Any]]) -> str:
    """`describe_plan` rows as an aligned text table."""
    cols = ["table", "sharding_type", "compute_kernel", "ranks", "rows", "dim", "data_type"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plan_placements(model: nn.Module) -> Dict[str, TablePlacement]:
    """The placement of every table of a sharded model, keyed by table key: what
    `recap_embed.distributed.save_plan_file` writes, so a run can be repeated exactly."""
    return {
        r["key"]: TablePlacement(
            sharding_type=ShardingType(r["sharding_type"]),
            compute_kernel=ComputeKernel(r["compute_kernel"]),
            ranks=[] if r["sharding_type"] == ShardingType.data_parallel.value else list(r["ranks"]),
        )
        for r in describe_plan(model)
    }
