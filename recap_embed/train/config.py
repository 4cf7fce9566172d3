"""Structured configs of the training app's own sections: data, dense model, training loop.

No torch here: `recap-embed-train --help` and `--cfg job` compose these without it.
The embedding sections (`embeddings`, `small_embeddings`, `stratifiers`, `sharding`) come
from recap_embed's config groups, exactly as in any other app.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class DataSource(Enum):
    synthetic = "synthetic"  # a click log with planted structure, generated on first use
    parquet = "parquet"  # your own parquet files with the same columns


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
class DataConfig:
    """Where examples come from. Columns: user_id, item_id (int64 raw ids), country, device,
    hour (small ints: the discrete features, in that column order) and click (0/1)."""

    source: DataSource = DataSource.synthetic
    dir: str = MISSING  # where synthetic data and its vocabs are generated (or reused)
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_path: Optional[str] = None  # parquet file or directory (source=parquet)
    eval_path: Optional[str] = None  # parquet file or directory (source=parquet)
    discrete_columns: List[str] = field(default_factory=lambda: ["country", "device", "hour"])


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


@dataclass
class TrainingConfig:
    batch_size: int = 1024  # global: split across ranks
    epochs: int = 3
    max_steps: Optional[int] = None  # stop early (after this many steps)
    eval_every: int = 100  # steps between evaluations (the AUC curve in metrics.json)
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
    # recap_embed, torchrec, torch.nn, torch.optim and torchmetrics (recap_embed.instantiate).
    allowed_targets: List[str] = field(default_factory=list)


ConfigStore.instance().store(name="recap_embed_train_schema", node=TrainAppConfig, provider="recap_embed")
