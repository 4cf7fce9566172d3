"""What tml's two embedding formats allow: their keys and defaults, the result and error types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from recap_embed.config.errors import ConfigError
from recap_embed.config.schema import (
    EmbeddingBagConfig,
    LargeEmbeddingsConfig,
    SmallEmbeddingBagConfig,
    SmallEmbeddingsConfig,
    StratifierConfig,
    StratifiersConfig,
)


SMALL_KEY = "small_embeddings"
STRATIFIERS_KEY = "stratifiers"

#: The two formats `to_tml` writes and `from_tml` reads (see the module docstring).
RECAP_FORMAT = "recap"
COMMON_FORMAT = "common"
#: Where each format's tables sit in a tml model.
MODEL_KEYS = {RECAP_FORMAT: "large_embeddings", COMMON_FORMAT: "embeddings"}
SOURCES = {
    RECAP_FORMAT: "tml's recap format (projects/home/recap/embedding/config.py)",
    COMMON_FORMAT: "tml's common format (common/modules/embedding/config.py)",
}

# Allowed keys of each tml model, in tml's declaration order (shown in error messages).
LARGE_KEYS = ("tables", "optimizer", "tables_to_log")  # recap format
TABLE_KEYS = ("name", "num_embeddings", "embedding_dim", "pretrained", "vocab")  # recap format
COMMON_LARGE_KEYS = ("tables", "tables_to_log")
COMMON_TABLE_KEYS = ("name", "num_embeddings", "embedding_dim", "pretrained", "vocab", "optimizer", "data_type")
TML_DATA_TYPES = ("fp32", "fp16")  # tml's DataType
SNAPSHOT_KEYS = ("emb_name", "embedding_snapshot_uri")
COLLECTION_OPTIMIZER_KEYS = ("learning_rate", "init_learning_rate")
OPTIMIZER_KEYS = ("learning_rate", "adam", "sgd", "adagrad")
ALGORITHMS = ("adam", "sgd", "adagrad")
ALGORITHM_KEYS = {"sgd": ("lr", "momentum"), "adam": ("lr", "betas", "eps"), "adagrad": ("lr", "eps")}
TML_SCHEDULES = ("constant", "linear_ramp_to_cosine", "linear_ramp_to_constant", "piecewise_constant")
SMALL_KEYS = ("tables",)
SMALL_TABLE_KEYS = ("name", "num_embeddings", "embedding_dim", "index")
STRATIFIER_KEYS = ("name", "index", "value")

#: tml's defaults for the optional optimizer fields (AdamConfig, AdagradConfig, SgdConfig).
TML_ADAM_BETAS = (0.9, 0.999)
TML_ADAM_EPS = 1e-7
TML_ADAGRAD_EPS = 0.0

#: Each section's keyed collection and its item type. Composed configs may hold the items as
#: open mappings, so they are typed here item by item.
ITEMS: Dict[type, Tuple[str, type]] = {
    LargeEmbeddingsConfig: ("tables", EmbeddingBagConfig),
    SmallEmbeddingsConfig: ("tables", SmallEmbeddingBagConfig),
    StratifiersConfig: ("strata", StratifierConfig),
}


class TmlConversionError(ConfigError):
    """A tml config that cannot be converted; `path` is the dotted path of the culprit."""

    def __init__(self, path: str, message: str):
        self.path = path or "<root>"
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass
class TmlConversion:
    """The converted sections as plain dicts in this library's schema shape (None: absent).

    `origin` maps each present section (`embeddings`, `small_embeddings`, `stratifiers`) to
    the dotted path it came from in the tml file, for the presets' header comments.
    """

    embeddings: Optional[Dict[str, Any]] = None
    small_embeddings: Optional[Dict[str, Any]] = None
    stratifiers: Optional[Dict[str, Any]] = None
    origin: Dict[str, str] = field(default_factory=dict)
    #: Which tml format the embeddings came in (`RECAP_FORMAT` or `COMMON_FORMAT`; None: none).
    format: Optional[str] = None
    #: Dotted paths of the set keys beside the sections that are not embedding config (TwHIN's
    #: `relations`, `translation_optimizer`, ...): not converted, listed so nothing goes unnoticed.
    skipped: List[str] = field(default_factory=list)
