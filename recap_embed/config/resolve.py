"""From a composed config to complete per-table specs: defaults filled, overrides merged.

The config a user writes is partial on purpose (a table without a dim takes the collection's,
a table's optimizer override names only what differs). Builders, the planner and the
validator all need the complete picture; it is computed here, once, without torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .convert import Problems, from_mapping
from .errors import ConfigError, ConfigValidationError
from .schema import (
    DataType,
    EmbeddingOptimizerConfig,
    EmbeddingSnapshot,
    LargeEmbeddingsConfig,
    OovPolicy,
    PoolingMode,
    TableOptimizerConfig,
)

T = TypeVar("T")


@dataclass(frozen=True)
class TableSpec:
    """One large table with every default applied; `path` is its config path for messages."""

    key: str
    name: str
    num_embeddings: Optional[int]  # None: derived from the vocab when the table is built
    embedding_dim: int
    feature_names: Tuple[str, ...]
    data_type: DataType
    pooling: PoolingMode
    optimizer: EmbeddingOptimizerConfig
    pretrained: Optional[EmbeddingSnapshot]  # None: no warm start
    vocab: Optional[str]
    oov_policy: OovPolicy
    oov_buckets: int
    path: str
    weight_init_min: Optional[float] = None  # None: torchrec's -sqrt(1/rows)
    weight_init_max: Optional[float] = None  # None: torchrec's sqrt(1/rows)
    num_embeddings_post_pruning: Optional[int] = None
    need_pos: bool = False


def to_container(cfg: Any) -> Dict[str, Any]:
    """A plain dict of `cfg` with interpolations resolved and enums kept as members.

    Accepts a DictConfig (typed or not), a dataclass instance or a dict (whose values may be
    DictConfigs, as `hydra.utils.instantiate` passes them). Plain values are taken as they are,
    without building OmegaConf nodes (the slow part for thousands of tables); `from_mapping`
    types them. Missing values stay as the string '???' for the validator to report.
    """
    if not isinstance(cfg, DictConfig):
        return _plain(cfg)  # type: ignore[no-any-return]
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        first = (str(getattr(e, "msg", "") or e).strip().splitlines() or [type(e).__name__])[0]
        error = ConfigError(f"{key}: cannot be resolved: {first}")
        error.path = str(key)  # type: ignore[attr-defined]
        raise error from None


def _plain(value: Any) -> Any:
    """Dicts, lists and dataclasses as plain containers; OmegaConf nodes resolved."""
    if isinstance(value, (DictConfig, ListConfig)):
        return to_container(value) if isinstance(value, DictConfig) else OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def config_prefix(cfg: Any, default: str) -> str:
    """The full key of a node inside its root config (e.g. 'embeddings'), else `default`."""
    if isinstance(cfg, DictConfig) and cfg._get_parent() is not None:
        key = cfg._get_full_key(None)
        if key:
            return str(key)
    return default


def effective_optimizer(
    collection: EmbeddingOptimizerConfig, override: Optional[TableOptimizerConfig]
) -> EmbeddingOptimizerConfig:
    """The collection optimizer with a table's set fields on top (a set schedule replaces all)."""
    if override is None:
        return collection
    changes = {f.name: getattr(override, f.name) for f in fields(TableOptimizerConfig)}
    changes = {k: v for k, v in changes.items() if v is not None}
    return replace(collection, **changes) if changes else collection


def parse_section(cfg: Any, schema: Type[T], prefix: str, problems: Problems) -> Optional[T]:
    """`cfg` as an instance of the section dataclass `schema`, keyed collections typed too.

    Unknown keys, wrong types and bad enum names are added to `problems` with their full
    path (the keyed collections are open mappings at compose time, see `schema.keyed`).
    """
    try:
        values = to_container(cfg)
    except ConfigError as e:
        path = getattr(e, "path", None)
        problems.append((path, str(e)[len(path) + 2 :]) if path and path != "?" else (prefix, str(e)))
        return None
    return from_mapping(schema, values, prefix, problems)


def table_specs(embeddings: Any, prefix: Optional[str] = None) -> List[TableSpec]:
    """Complete specs of every table of an embeddings config, in config order.

    Raises ConfigValidationError naming the path when a field has the wrong key or type;
    the semantic rules live in `validate`, which builders call first.
    """
    prefix = prefix or config_prefix(embeddings, "embeddings")
    problems: Problems = []
    collection = parse_section(embeddings, LargeEmbeddingsConfig, prefix, problems)
    if problems or collection is None:
        raise ConfigValidationError(problems)
    specs = []
    for key, table in collection.tables.items():
        name = table.name or key
        pretrained = table.pretrained
        if pretrained is not None and not pretrained.emb_name:
            pretrained = replace(pretrained, emb_name=name)
        specs.append(
            TableSpec(
                key=key,
                name=name,
                num_embeddings=table.num_embeddings,
                embedding_dim=table.embedding_dim if table.embedding_dim is not None else collection.embedding_dim,
                feature_names=tuple(table.feature_names) or (name,),
                data_type=table.data_type,
                pooling=table.pooling,
                optimizer=effective_optimizer(collection.optimizer, table.optimizer),
                pretrained=pretrained,
                vocab=table.vocab,
                oov_policy=table.oov_policy,
                oov_buckets=table.oov_buckets,
                path=f"{prefix}.tables.{key}",
                weight_init_min=table.weight_init_min,
                weight_init_max=table.weight_init_max,
                num_embeddings_post_pruning=table.num_embeddings_post_pruning,
                need_pos=table.need_pos,
            )
        )
    return specs


def resolve_device_type(device: str) -> str:
    """'cpu' or 'cuda' for a device string, without importing torch.

    `auto` means CUDA when a GPU is visible: asked of torch if it is already imported,
    otherwise read from the NVIDIA device nodes and CUDA_VISIBLE_DEVICES.
    """
    device = str(device).strip().lower()
    if device == "auto":
        if "torch" in sys.modules:
            return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return "cpu"
        return "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"
    return device.split(":", 1)[0]
