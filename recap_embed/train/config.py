"""Structured configs of the training app's own sections: data, dense model, training loop.

No torch here: `recap-embed-train --help` and `--cfg job` compose these without it.
The embedding sections (`embeddings`, `small_embeddings`, `stratifiers`, `sharding`) come
from recap_embed's config groups, exactly as in any other app.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class DataSource(Enum):
    synthetic = "synthetic"  # a click log with planted structure, generated on first use
    parquet = "parquet"  # your own parquet files (`train_path`, `eval_path`)


def _if_synthetic(source, value):
    """`${recap_embed_if_synthetic:${data.source},value}`: `value` for the synthetic source, else null.

    The app's tables read the synthetic log's generated vocabs; with your own data a table
    without a vocab gets one built from the training split instead.
    """
    name = getattr(source, "name", source)
    return value if str(name) == DataSource.synthetic.name else None


OmegaConf.register_new_resolver("recap_embed_if_synthetic", _if_synthetic, replace=True)


@dataclass
class SyntheticConfig:
    """The planted structure of the built-in click log (deterministic per `seed`)."""

    num_users: int = 5_000
    num_items: int = 1_000
    num_factors: int = 4  # dim of the hidden user/item factors behind clicks
    num_train: int = 500_000  # examples
    num_eval: int = 50_000
    num_countries: int = 32  # discrete column 0
    num_devices: int = 4  # discrete column 1
    num_hours: int = 24  # discrete column 2
    signal: float = 1.5  # strength of the user-item affinity in the click logit
    bias: float = 0.8  # spread of the per-user and per-item click propensities
    unknown_rate: float = 0.01  # share of eval ids absent from the vocab (exercises OOV)


@dataclass
class DeriveConfig:
    """What the app derives from the discrete columns of the training split (recap_embed.train.derive)."""

    # Fill an empty `small_embeddings` section with one table per discrete column.
    small_embeddings: bool = True
    # Fill an empty `stratifiers` section with strata of the most frequent values of each column.
    stratifiers: bool = True
    # Dim of a derived table with R rows: min(max_dim, max(1, round(1.6 * R ** 0.56))).
    max_dim: int = 16
    # Strata per column: its most frequent training values (all of them when it has fewer).
    strata_per_column: int = 4


@dataclass
class DataConfig:
    """Where examples come from and which columns mean what.

    Every split has the id columns (integer raw ids, mapped to rows by each table's vocab), the
    label column (0/1) and the discrete columns (integers, strings, booleans or categoricals; each
    value becomes a code, saved in the run dir as discrete_codes.json). The synthetic log's
    discrete columns are country, device and hour.
    """

    source: DataSource = DataSource.synthetic
    dir: str = MISSING  # where synthetic data and its vocabs are generated (or reused)
    seed: int = 0  # synthetic data, and which training rows are held out for validation
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_path: Optional[str] = None  # parquet file or directory (source=parquet)
    eval_path: Optional[str] = None  # parquet file or directory (source=parquet); reported, never tuned on
    discrete_columns: List[str] = field(default_factory=lambda: ["country", "device", "hour"])
    user_column: str = "user_id"  # raw ids of the `user` feature
    item_column: str = "item_id"  # raw ids of the `item` feature
    label_column: str = "click"  # 0/1 (integer, boolean, or float 0.0/1.0)
    # Share of the training rows held out (seeded by `seed`) to evaluate on every
    # `train.eval_every` steps, for early stopping and keep-best; 0: no validation split.
    validation_fraction: float = 0.1
    derive: DeriveConfig = field(default_factory=DeriveConfig)


@dataclass
class DenseModelConfig:
    """The MLP over pooled large embeddings, small embeddings and the user-item product."""

    hidden: List[int] = field(default_factory=lambda: [64, 32])
    interaction: bool = True  # add the elementwise user*item product (needs equal dims)


@dataclass
class DenseOptimizerConfig:
    """Optimizer of the dense parameters (MLP and small embeddings)."""

    name: str = "adam"  # adam | adagrad | sgd (torch.optim)
    lr: float = 0.01
    weight_decay: float = 0.0


class ValidationMetric(Enum):
    """What early stopping and keep-best watch on the validation split."""

    auroc = "auroc"  # higher is better
    loss = "loss"  # lower is better


@dataclass
class EarlyStoppingConfig:
    """Stop when the validation metric has not improved for `patience` evaluations."""

    metric: ValidationMetric = ValidationMetric.auroc
    patience: Optional[int] = 5  # evaluations without improvement before training stops; null: never
    min_delta: float = 0.0  # a smaller improvement does not count as one


@dataclass
class TrainingConfig:
    batch_size: int = 1024  # global: split across ranks
    epochs: int = 5  # an upper bound: early stopping ends sooner once validation stops improving
    max_steps: Optional[int] = None  # stop early (after this many steps)
    eval_every: int = 100  # steps between validation evaluations (the curve in metrics.json)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Keep the checkpoint of the best validation evaluation (checkpoints/best/) and report the
    # eval metrics of that model beside those of the last step.
    keep_best: bool = True
    # torch threads per rank (intra-op). One, like torchrun's OMP_NUM_THREADS default: ranks do
    # not fight over cores, and this model's small kernels lose more to thread hand-offs than
    # they gain (see README, "Threads"). null: torch's default (all cores).
    threads: Optional[int] = 1
    log_every: int = 250  # steps between table statistics
    checkpoint: bool = True  # save torchsnapshot checkpoints (periodic and final)
    checkpoint_every: int = 1000  # steps between checkpoints (0: the final one only)
    keep_checkpoints: int = 2  # newest checkpoints kept in the run dir (older ones are removed)
    resume: bool = True  # a rerun into the same run dir continues from its latest checkpoint; false: start afresh
    checkpoint_async: bool = False
    progress: bool = True  # progress bar on rank 0
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    seed: int = 0


@dataclass
class TrainAppConfig:
    """Root of `recap-embed-train`; the embedding sections come from their groups."""

    data: DataConfig = field(default_factory=DataConfig)
    model: DenseModelConfig = field(default_factory=DenseModelConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    embeddings: Any = MISSING
    small_embeddings: Any = MISSING
    stratifiers: Any = MISSING
    sharding: Any = MISSING
    # Module prefixes (e.g. `my_project.`) whose callables `_target_`s may name, on top of
    # recap_embed, torchrec, torch.nn, torch.optim and torchmetrics (recap_embed.check_targets).
    allowed_targets: List[str] = field(default_factory=list)


ConfigStore.instance().store(name="recap_embed_train_schema", node=TrainAppConfig, provider="recap_embed")
