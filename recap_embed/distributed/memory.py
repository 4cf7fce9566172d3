"""Before the shards are allocated: does this host (CPU) or this rank's GPU hold them?

torchrec's planner plans against the capacities it is given (``sharding.hbm_cap_gb``,
``ddr_cap_gb``, or its defaults), not against the machine that will run the job, so a plan can
"fit" and then try to allocate more memory than exists (the process is killed, or the machine
swaps). `check_local_memory` sums the weights and optimizer state of the shards the plan puts on
each rank and compares them with what the machine has right now: on CPU the ranks of this host
share its available RAM; on CUDA each rank's shards must fit its device's free memory. A refusal
names the numbers, the largest tables and what to try.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from recap_embed.config import ConfigError, OptimizerAlgorithm, ShardingType, TableSpec
from recap_embed.units import format_bytes

from .table_size import element_bytes, optimizer_state_bytes

__all__ = ["MemoryDoesNotFit", "USABLE_SHARE", "available_bytes", "check_local_memory", "rank_shard_bytes"]

#: Share of the available memory the shards may take (the rest: activations, buffers, the data).
USABLE_SHARE = 0.9


class MemoryDoesNotFit(ConfigError):
    """The shards this host or device would hold exceed the memory it has."""


def rank_shard_bytes(plan: Any, specs: Dict[str, Tuple[str, TableSpec]], world_size: int) -> Dict[int, Dict[str, Tuple[int, int]]]:
    """``{rank: {table: (weight bytes, optimizer state bytes)}}`` of a torchrec ShardingPlan.

    `specs` maps module-plan paths + table names (``"<ebc path>/<table>"``) to ``(path, spec)``.
    Data-parallel tables count whole on every rank.
    """
    out: Dict[int, Dict[str, Tuple[int, int]]] = {r: {} for r in range(world_size)}
    for ebc_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            entry = specs.get(f"{ebc_path}/{name}")
            if entry is None:
                continue
            _, spec = entry
            algorithm = OptimizerAlgorithm(spec.optimizer.algorithm)
            per = element_bytes(spec.data_type)
            if ps.sharding_type == ShardingType.data_parallel.value or ps.sharding_spec is None:
                rows, cols = int(spec.num_embeddings), int(spec.embedding_dim)
                for r in (ps.ranks or range(world_size)):
                    w, o = out[r].get(name, (0, 0))
                    out[r][name] = (w + rows * cols * per, o + optimizer_state_bytes(algorithm, rows, cols))
                continue
            for shard in ps.sharding_spec.shards:
                rows, cols = int(shard.shard_sizes[0]), int(shard.shard_sizes[1])
                r = int(shard.placement.rank())
                w, o = out[r].get(name, (0, 0))
                out[r][name] = (w + rows * cols * per, o + optimizer_state_bytes(algorithm, rows, cols))
    return out


def available_bytes(device: torch.device) -> int:
    """Free memory of this rank's GPU, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - /proc/meminfo on Linux
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 1 << 62  # pragma: no cover - unknown: do not refuse


def check_local_memory(
    plan: Any,
    specs: Dict[str, Tuple[str, TableSpec]],
    *,
    device: torch.device,
    world_size: int,
    local_size: int,
    rank: int,
    available: Optional[int] = None,
) -> None:
    """Refuse (MemoryDoesNotFit, on every rank alike for CPU) when the local shards do not fit.

    CPU: the ranks of this host (``rank // local_size``) together against the host's available RAM.
    CUDA: this rank's shards against its device's free memory.
    """
    per_rank = rank_shard_bytes(plan, specs, world_size)
    if device.type == "cuda":
        ranks = [rank]
        where = f"rank {rank}'s GPU ({device})"
    else:
        node = rank // max(local_size, 1)
        ranks = [r for r in range(node * local_size, min((node + 1) * local_size, world_size))]
        where = f"this host ({len(ranks)} rank{'s' if len(ranks) != 1 else ''} on CPU)"
    weights = sum(w for r in ranks for w, _ in per_rank[r].values())
    state = sum(o for r in ranks for _, o in per_rank[r].values())
    have = available_bytes(device) if available is None else int(available)
    if weights + state <= USABLE_SHARE * have:
        return
    by_table: Dict[str, int] = {}
    for r in ranks:
        for name, (w, o) in per_rank[r].items():
            by_table[name] = by_table.get(name, 0) + w + o
    paths = {key.split("/")[-1]: path for key, (path, _) in specs.items()}
    largest = sorted(by_table.items(), key=lambda kv: -kv[1])[:3]
    named = ", ".join(f"{paths.get(n, n)} {format_bytes(b)}" for n, b in largest)
    top = paths.get(largest[0][0], "embeddings.tables.<name>") if largest else "embeddings.tables.<name>"
    raise MemoryDoesNotFit(
        f"embeddings: the tables need {format_bytes(weights + state)} on {where} (weights {format_bytes(weights)} + "
        f"optimizer state {format_bytes(state)}), but it has {format_bytes(have)} available (at most "
        f"{USABLE_SHARE:.0%} may go to the tables); largest: {named}; try: fewer rows ({top}.num_embeddings), fp16 "
        f"weights ({top}.data_type=fp16), a smaller embedding_dim, more hosts or GPUs (recap-embed-plan shows the "
        f"memory per rank)"
    )
