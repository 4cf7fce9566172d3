"""Structured configs of `recap-embed-plan`: the target cluster (`topology`) and the app's root.

No torch here: `recap-embed-plan --help` and `--cfg job` compose these without it. The
embedding sections (`embeddings`, `sharding`) come from recap_embed's config groups, exactly as
in the training app, so one config plans and trains.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

#: Ranks per host when `local_world_size` is null (an 8-GPU host).
DEFAULT_LOCAL_WORLD_SIZE = 8


class ComputeDevice(Enum):
    """What each rank computes on (torchrec's compute device)."""

    cuda = "cuda"  # one GPU per rank: tables in HBM (or host memory through UVM)
    cpu = "cpu"  # CPU ranks (gloo): tables in host memory


@dataclass
class TopologyConfig:
    """The cluster the plan is for. Sizes are GB of 2**30 bytes, per rank, as in torchrec.

    These replace ``sharding.batch_size``, ``sharding.hbm_cap_gb`` and ``sharding.ddr_cap_gb`` (which
    describe the machine the training app runs on) when planning. Defaults: 8-GPU hosts of 80 GB GPUs.
    """

    world_size: int = 8  # ranks in the job
    local_world_size: Optional[int] = None  # ranks per host; null: min(world_size, 8)
    compute_device: ComputeDevice = ComputeDevice.cuda  # cuda | cpu
    hbm_cap_gb: float = 80.0  # GPU memory per rank (cuda only); the planner keeps 15% free
    ddr_cap_gb: float = 128.0  # host memory per rank (torchrec's default)
    batch_size: int = 512  # examples per rank and step, for the planner's cost estimates
    pooling_factor: float = 1.0  # mean ids per example of tables without sharding.tables.<t>.pooling_factor


@dataclass
class PlanAppConfig:
    """Root of `recap-embed-plan`; the embedding sections come from their groups."""

    topology: TopologyConfig = field(default_factory=TopologyConfig)
    max_rows: int = 40  # table and rank rows printed on the console (plan.txt holds them all); 0: all
    timeout_s: float = 300.0  # planning that takes longer stops with exit status 2 (every input ends)
    embeddings: Any = MISSING
    sharding: Any = MISSING


ConfigStore.instance().store(name="recap_embed_plan_schema", node=PlanAppConfig, provider="recap_embed")
