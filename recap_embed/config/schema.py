"""Structured configs: what the embedding tables are, never how they are built.

Plain dataclasses and enums, no behaviour and no torch, so that composing a config and
printing it (``--cfg job``, ``--help``) stays fast. The field names follow the embedding
configs of the tml heavy ranker (``projects/home/recap/embedding``); additions are marked.

Enums are assigned by member name in YAML and on the command line, so the member names are
the words users type (``data_type=fp16``, ``algorithm=rowwise_adagrad``).

(No ``from __future__ import annotations`` here: OmegaConf would re-evaluate every string
annotation each time it builds a node, which is most of the cost of composing big configs.)
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from omegaconf import MISSING

#: Where the embeddings node lives in every app that uses the groups (package headers are absolute).
EMBEDDINGS_KEY = "embeddings"

# Inherited settings. A table's field that it does not set is an interpolation of the collection's
# field, so reading the table gives the effective value (`--cfg job --resolve` shows it) while one
# key (`embeddings.embedding_dim=8`) still changes every table that sets none. The paths are
# relative to the field: `.` is the node holding it, each further dot one level up.
#: A table's `embedding_dim` default: the collection's (`embeddings.embedding_dim`).
INHERIT_EMBEDDING_DIM = "${...embedding_dim}"


def _inherit_optimizer(name: str) -> str:
    """A table optimizer field's default: the same field of the collection's optimizer."""
    return "${...." + f"optimizer.{name}" + "}"


class DataType(Enum):
    """Storage type of a table's weights."""

    fp32 = "fp32"  # 4 bytes per element
    fp16 = "fp16"  # 2 bytes per element; fused kernels accumulate in fp32
    bf16 = "bf16"  # 2 bytes per element; CUDA only (FBGEMM's CPU kernels have no bf16 forward)


class PoolingMode(Enum):
    """How the embeddings of one bag of ids are combined."""

    sum = "sum"
    mean = "mean"


class OptimizerAlgorithm(Enum):
    """Fused (FBGEMM) optimizer that updates a table inside backward."""

    sgd = "sgd"  # CPU and GPU
    adagrad = "adagrad"  # CPU and GPU; one state float per element
    rowwise_adagrad = "rowwise_adagrad"  # CPU and GPU; one state float per row
    adam = "adam"  # GPU only; two state floats per element
    partial_rowwise_adam = "partial_rowwise_adam"  # GPU only; one per element + one per row
    lamb = "lamb"  # GPU only; two state floats per element


#: Algorithms FBGEMM can fuse on CPU; the rest need CUDA.
CPU_ALGORITHMS = frozenset(
    {OptimizerAlgorithm.sgd, OptimizerAlgorithm.adagrad, OptimizerAlgorithm.rowwise_adagrad}
)


class OovPolicy(Enum):
    """What a vocabulary does with an id it does not contain."""

    error = "error"  # raise, naming the table and the id
    default_row = "default_row"  # map every unknown id to one reserved row after the vocab rows
    hash = "hash"  # hash unknown ids into `oov_buckets` extra rows after the vocab rows


class ShardingType(Enum):
    """torchrec sharding types (values are torchrec's ShardingType values)."""

    data_parallel = "data_parallel"
    table_wise = "table_wise"
    column_wise = "column_wise"
    table_column_wise = "table_column_wise"
    row_wise = "row_wise"  # CUDA only (gloo lacks reduce_scatter)
    table_row_wise = "table_row_wise"  # CUDA only
    grid_shard = "grid_shard"  # CUDA only


#: Sharding types gloo (CPU) can run.
CPU_SHARDING_TYPES = frozenset(
    {
        ShardingType.data_parallel,
        ShardingType.table_wise,
        ShardingType.column_wise,
        ShardingType.table_column_wise,
    }
)


class ComputeKernel(Enum):
    """torchrec embedding compute kernels (values are torchrec's EmbeddingComputeKernel values)."""

    dense = "dense"  # plain tensor, updated by the dense optimizer path
    fused = "fused"  # FBGEMM table-batched kernel with the optimizer fused into backward
    fused_uvm = "fused_uvm"  # weights in host memory mapped into the GPU (CUDA only)
    fused_uvm_caching = "fused_uvm_caching"  # GPU cache over host memory (CUDA only)


# --------------------------------------------------------------------------- learning rate


@dataclass
class LinearRampToConstant:
    """Ramp linearly from 0 to `learning_rate` over `num_ramp_steps`, then stay there."""

    learning_rate: float = MISSING
    num_ramp_steps: int = MISSING  # steps to ramp up from zero


@dataclass
class LinearRampToCosine:
    """Ramp linearly from 0 to `learning_rate`, then cosine-decay to `final_learning_rate`."""

    learning_rate: float = MISSING  # peak, reached after the ramp
    final_learning_rate: float = MISSING  # reached at `final_num_steps` and kept after
    num_ramp_steps: int = MISSING  # steps to ramp up from zero
    final_num_steps: int = MISSING  # step at which the decay ends


@dataclass
class PiecewiseConstant:
    """`learning_rate_values[i]` while step is in [boundaries[i-1], boundaries[i])."""

    learning_rate_boundaries: List[int] = MISSING  # strictly increasing steps
    learning_rate_values: List[float] = MISSING  # one more than the boundaries


@dataclass
class LearningRate:
    """A learning-rate schedule: at most one field is set (the tml one-of).

    All fields unset means "no schedule": the optimizer keeps `init_learning_rate`.
    Choose a schedule with the config group ``embeddings/lr``.
    """

    constant: Optional[float] = None
    linear_ramp_to_constant: Optional[LinearRampToConstant] = None
    linear_ramp_to_cosine: Optional[LinearRampToCosine] = None
    piecewise_constant: Optional[PiecewiseConstant] = None


SCHEDULE_NAMES = ("constant", "linear_ramp_to_constant", "linear_ramp_to_cosine", "piecewise_constant")


# --------------------------------------------------------------------------- optimizers


@dataclass
class EmbeddingOptimizerConfig:
    """The fused optimizer of a table collection and its learning-rate schedule."""

    algorithm: OptimizerAlgorithm = OptimizerAlgorithm.sgd
    init_learning_rate: float = 0.01  # learning rate before the schedule's first step
    learning_rate: LearningRate = field(default_factory=LearningRate)  # schedule (none: constant)
    eps: float = 1.0e-8  # adagrad, rowwise_adagrad, adam, partial_rowwise_adam, lamb
    beta1: float = 0.9  # adam, partial_rowwise_adam, lamb
    beta2: float = 0.999  # adam, partial_rowwise_adam, lamb
    weight_decay: float = 0.0  # L2 penalty (every algorithm but sgd)


@dataclass
class TableOptimizerConfig:
    """A table's optimizer: each field it does not set is the collection optimizer's field.

    (Addition to tml.) The defaults are interpolations of ``embeddings.optimizer``, so reading
    ``embeddings.tables.user.optimizer.algorithm`` gives the effective algorithm. The schedule is
    the exception: null means the collection's schedule, and a schedule set here replaces the
    collection's as a whole (choose one with ``+embeddings/lr@embeddings.tables.<t>.optimizer.learning_rate=...``).
    """

    algorithm: OptimizerAlgorithm = _inherit_optimizer("algorithm")  # type: ignore[assignment]
    init_learning_rate: float = _inherit_optimizer("init_learning_rate")  # type: ignore[assignment]
    learning_rate: Optional[LearningRate] = None  # null: the collection's schedule
    eps: float = _inherit_optimizer("eps")  # type: ignore[assignment]
    beta1: float = _inherit_optimizer("beta1")  # type: ignore[assignment]
    beta2: float = _inherit_optimizer("beta2")  # type: ignore[assignment]
    weight_decay: float = _inherit_optimizer("weight_decay")  # type: ignore[assignment]


#: Fields of `TableOptimizerConfig` inherited by interpolation (all but the schedule).
INHERITED_OPTIMIZER_FIELDS = ("algorithm", "init_learning_rate", "eps", "beta1", "beta2", "weight_decay")


# --------------------------------------------------------------------------- large tables


@dataclass
class EmbeddingSnapshot:
    """A pretrained table: where its weights come from (no URI: no warm start)."""

    emb_name: Optional[str] = None  # name of the table inside the snapshot; null: the table's name
    embedding_snapshot_uri: Optional[str] = None  # path or URI (fs, s3://, gs://) of a torchsnapshot
    allow_partial_rows: bool = False  # (addition) copy the first min(rows) rows if sizes differ


@dataclass
class EmbeddingBagConfig:
    """One embedding table of the EmbeddingBagCollection, keyed by its name in `tables`.

    In a composed config each table is a typed node of this class: a misspelt field, a wrong
    type or a bad enum name fails at compose time with its full key. `embedding_dim` and the
    optimizer's fields default to the collection's (see `INHERIT_EMBEDDING_DIM`).
    """

    name: Optional[str] = None  # defaults to the table's key in `tables`
    num_embeddings: Optional[int] = None  # rows; null derives them from `vocab`
    embedding_dim: int = INHERIT_EMBEDDING_DIM  # type: ignore[assignment]  # default: the collection's
    # Warm start from a torchsnapshot. Always a node (its URI null: none), so that
    # `embeddings.tables.user.pretrained.embedding_snapshot_uri=...` works from the command line.
    pretrained: EmbeddingSnapshot = field(default_factory=EmbeddingSnapshot)
    vocab: Optional[str] = None  # directory of parquet files: columns `id` (raw) and `row`
    oov_policy: OovPolicy = OovPolicy.error  # (addition) ids missing from `vocab`
    oov_buckets: int = 0  # (addition) extra rows for oov_policy=hash
    data_type: DataType = DataType.fp32
    pooling: PoolingMode = PoolingMode.sum
    optimizer: TableOptimizerConfig = field(default_factory=TableOptimizerConfig)  # default: the collection's
    feature_names: List[str] = field(default_factory=list)  # empty: [name]
    # (torchrec's EmbeddingBagConfig fields, carried both ways by recap_embed.interop)
    weight_init_min: Optional[float] = None  # low end of the uniform initial weights; null: -sqrt(1/rows)
    weight_init_max: Optional[float] = None  # high end of the uniform initial weights; null: sqrt(1/rows)
    num_embeddings_post_pruning: Optional[int] = None  # rows left after pruning, for inference; null: none
    need_pos: bool = False  # position-weighted table (a torchrec feature processor's flag)


@dataclass
class LargeEmbeddingsConfig:
    """Tables gathered into one torchrec EmbeddingBagCollection, trained by fused optimizers."""

    _target_: str = "recap_embed.modules.LargeEmbeddings"
    # The tables hold no `_target_`s: skip Hydra's recursive walk over them (0.4 s at 3,000 tables).
    _recursive_: bool = False
    tables: Dict[str, EmbeddingBagConfig] = field(default_factory=dict)
    optimizer: EmbeddingOptimizerConfig = field(default_factory=EmbeddingOptimizerConfig)
    tables_to_log: List[str] = field(default_factory=list)  # tables whose statistics are logged
    embedding_dim: int = 16  # (addition) dim of every table that sets none
    is_weighted: bool = False  # (addition) inputs carry one weight per id


# --------------------------------------------------------------------------- small tables, strata


@dataclass
class SmallEmbeddingBagConfig:
    """A small table inside the model, looked up by column `index` of the discrete features."""

    name: Optional[str] = None  # defaults to the table's key in `tables`
    num_embeddings: int = MISSING
    embedding_dim: int = MISSING
    index: int = MISSING  # column of the discrete-feature tensor


@dataclass
class SmallEmbeddingsConfig:
    """Small tables trained by the model's dense optimizer."""

    _target_: str = "recap_embed.modules.SmallEmbeddings"
    tables: Dict[str, SmallEmbeddingBagConfig] = field(default_factory=dict)


@dataclass
class StratifierConfig:
    """Rows whose discrete feature in column `index` equals `value` form one stratum."""

    name: Optional[str] = None  # defaults to the stratum's key in `strata`
    index: int = MISSING
    value: int = MISSING


@dataclass
class StratifiersConfig:
    """(Addition) The strata metrics are also reported for, keyed by name."""

    _target_: str = "recap_embed.modules.Stratifiers"
    strata: Dict[str, StratifierConfig] = field(default_factory=dict)


# --------------------------------------------------------------------------- placement


@dataclass
class TableShardingConfig:
    """What the planner may choose for one table (empty lists: anything the device supports)."""

    sharding_types: List[ShardingType] = field(default_factory=list)
    compute_kernels: List[ComputeKernel] = field(default_factory=list)
    cache_load_factor: Optional[float] = None  # share of rows cached in HBM (fused_uvm_caching)
    pooling_factor: Optional[float] = None  # mean ids per example, for the planner's estimates


@dataclass
class TablePlacement:
    """An explicit placement of one table, as written in a plan file."""

    sharding_type: ShardingType = MISSING
    compute_kernel: ComputeKernel = MISSING
    ranks: List[int] = field(default_factory=list)  # ranks holding a shard, in shard order


@dataclass
class ShardingConfig:
    """Where the tables live: device, planner inputs, constraints, or an explicit plan."""

    device: str = "auto"  # auto (cuda:LOCAL_RANK if CUDA, else cpu) | cpu | cuda | cuda:N
    sharding_types: List[ShardingType] = field(default_factory=list)  # allowed for every table
    compute_kernels: List[ComputeKernel] = field(default_factory=list)  # allowed for every table
    batch_size: int = 512  # examples per rank and step, for the planner's estimates
    hbm_cap_gb: Optional[float] = None  # GPU memory per rank the planner may use
    ddr_cap_gb: Optional[float] = None  # host memory per rank the planner may use
    tables: Dict[str, TableShardingConfig] = field(default_factory=dict)  # per-table constraints
    plan: Dict[str, TablePlacement] = field(default_factory=dict)  # explicit placements
    plan_file: Optional[str] = None  # plan.json written by recap-embed-plan


#: Compute kernels a CPU can run.
CPU_COMPUTE_KERNELS = frozenset({ComputeKernel.fused, ComputeKernel.dense})
