"""Run the planner for `recap-embed-plan`: validate, build on meta, plan for the topology, read
torchrec's per-shard estimates into the report's rows."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch  # noqa: F401  (loaded before torchrec)
import torchrec  # noqa: F401  (loads fbgemm_gpu, which logs each library at INFO: the app quiets that)
from omegaconf import DictConfig, OmegaConf

from recap_embed.config import (
    ComputeKernel,
    ConfigError,
    ConfigValidationError,
    OptimizerAlgorithm,
    ShardingType,
    TablePlacement,
    TableSpec,
    validate,
)
from recap_embed.config.resolve import parse_section, resolve_device_type
from recap_embed.distributed.planner import (
    PlannerSetup,
    apply_explicit_placements,
    element_bytes,
    explicit_placements,
    make_planner,
    optimizer_state_bytes,
    sharding_values,
    table_bytes,
)

from recap_embed.modules.large import LargeEmbeddings
from recap_embed.optim.fused import apply_fused_optimizers

from .config import DEFAULT_LOCAL_WORLD_SIZE, TopologyConfig
from .summary import TableRow, RankRow, PlanReport
from .fit import PlanDoesNotFitError, check_lower_bound, no_plan_message


log = logging.getLogger("recap_embed.plan")


def plan_report(cfg: Any) -> PlanReport:
    """Plan the tables of ``cfg.embeddings`` under ``cfg.sharding`` for ``cfg.topology``.

    `cfg`: the app's root config (DictConfig from Hydra or compose, a dict, or a `PlanAppConfig`);
    ``topology`` may be missing (defaults). Raises ConfigValidationError naming config paths for a
    bad value, PlanDoesNotFitError when the tables do not fit.
    """
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import get_default_sharders

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
    check_lower_bound(specs, setup, topo)

    start = time.perf_counter()
    try:
        plan = setup.planner.plan(model, get_default_sharders())
    except PlannerError as e:
        raise PlanDoesNotFitError(no_plan_message(specs, setup, topo, e, capture)) from None
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
            state_bytes=0, shards=0,
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
