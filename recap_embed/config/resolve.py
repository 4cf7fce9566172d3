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
    INHERIT_EMBEDDING_DIM,
    INHERITED_OPTIMIZER_FIELDS,
    DataType,
    EmbeddingOptimizerConfig,
    EmbeddingSnapshot,
    LargeEmbeddingsConfig,
    OovPolicy,
    PoolingMode,
    ShardingConfig,
    SmallEmbeddingsConfig,
    StratifiersConfig,
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


@dataclass(frozen=True)
class EmbeddingsSpec:
    """A parsed embeddings section: complete table specs and the collection's own settings."""

    tables: Tuple[TableSpec, ...]
    optimizer: EmbeddingOptimizerConfig
    tables_to_log: Tuple[str, ...]  # table names
    embedding_dim: int
    is_weighted: bool
    path: str  # where the section lives, e.g. "embeddings"


@dataclass(frozen=True)
class SmallTableSpec:
    """One small table with its name resolved; `path` is its config path for messages."""

    key: str
    name: str
    num_embeddings: int
    embedding_dim: int
    index: int
    path: str


@dataclass(frozen=True)
class StratumSpec:
    """One stratum with its name resolved; `path` is its config path for messages."""

    key: str
    name: str
    index: int
    value: int
    path: str


@dataclass(frozen=True)
class ParsedConfig:
    """What `validate` returns: every section of a config, typed and checked, parsed once.

    A section the config does not hold is None. Builders take these instead of config nodes
    (`LargeEmbeddings.from_config(parsed)`, `SmallEmbeddings.from_config(parsed)`,
    `Stratifiers.from_config(parsed)`, `shard(model, parsed)`), so no rule is checked twice.
    """

    embeddings: Optional[EmbeddingsSpec] = None
    small_embeddings: Optional[Tuple[SmallTableSpec, ...]] = None
    small_embeddings_path: str = "small_embeddings"
    stratifiers: Optional[Tuple[StratumSpec, ...]] = None
    stratifiers_path: str = "stratifiers"
    sharding: Optional[ShardingConfig] = None
    sharding_path: str = "sharding"
    device_type: str = "cpu"  # the device the rules were checked for: cpu, cuda or meta


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
        raw = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
        if not isinstance(raw, dict):  # the node itself is an interpolation
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
        return _resolve_raw(cfg, raw)  # type: ignore[no-any-return]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        first = (str(getattr(e, "msg", "") or e).strip().splitlines() or [type(e).__name__])[0]
        error = ConfigError(f"{key}: cannot be resolved: {first}")
        error.path = str(key)  # type: ignore[attr-defined]
        raise error from None


#: Interpolations left for `fill_inherited`: a table's inherited fields, by field name. OmegaConf
#: parses each interpolation it resolves (~0.15 ms), 7 per table: most of the cost of reading a
#: large typed config. Filling them from the collection's resolved values is the same result.
_INHERIT_BY_FIELD = {
    "embedding_dim": INHERIT_EMBEDDING_DIM,
    **{name: getattr(TableOptimizerConfig, name) for name in INHERITED_OPTIMIZER_FIELDS},
}


def _resolve_raw(node: Any, raw: Any) -> Any:
    """`raw` (an unresolved container of `node`) with its interpolations resolved through `node`."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            if isinstance(value, str):
                if "${" in value and _INHERIT_BY_FIELD.get(key) != value:
                    raw[key] = _resolved(node, key)
            elif isinstance(value, (dict, list)) and _has_interpolation(value):
                raw[key] = _resolve_raw(node._get_node(key), value)
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            if isinstance(value, str):
                if "${" in value:
                    raw[i] = _resolved(node, i)
            elif isinstance(value, (dict, list)) and _has_interpolation(value):
                raw[i] = _resolve_raw(node._get_node(i), value)
    return raw


def _resolved(node: Any, key: Any) -> Any:
    value = node[key]
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    return value


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


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


def effective_optimizer(collection: EmbeddingOptimizerConfig, table: Optional[TableOptimizerConfig]) -> EmbeddingOptimizerConfig:
    """A table's complete optimizer: its own fields, and the collection's schedule unless it sets one.

    `table` has every inherited field filled (interpolations resolved, see `fill_inherited`).
    """
    if table is None:
        return collection
    values = {name: getattr(table, name) for name in INHERITED_OPTIMIZER_FIELDS}
    values["learning_rate"] = table.learning_rate if table.learning_rate is not None else collection.learning_rate
    return EmbeddingOptimizerConfig(**values)


def fill_inherited(values: Dict[str, Any]) -> Dict[str, Any]:
    """Plain embeddings values with each table's inherited fields set from the collection.

    A composed config has them already (its interpolations are resolved by `to_container`);
    values built in Python (dicts, or dataclasses whose defaults are the interpolation strings)
    get them here, without building OmegaConf nodes.
    """
    tables = values.get("tables")
    if not isinstance(tables, dict):
        return values
    dim = values.get("embedding_dim", LargeEmbeddingsConfig.embedding_dim)
    collection = values.get("optimizer")
    if collection is None or isinstance(collection, dict):  # unset fields: the schema's defaults
        collection = {**_plain(EmbeddingOptimizerConfig()), **(collection or {})}
    filled = {}
    for key, table in tables.items():
        if isinstance(table, dict):
            table = dict(table)
            if table.get("embedding_dim", INHERIT_EMBEDDING_DIM) == INHERIT_EMBEDDING_DIM:
                table["embedding_dim"] = dim
            own = table.get("optimizer")
            if own is None or isinstance(own, dict):
                own = dict(own or {})
                if isinstance(collection, dict):
                    for name in INHERITED_OPTIMIZER_FIELDS:
                        if own.get(name, _UNSET) in (_UNSET, _INHERIT_MARKERS[name]) and name in collection:
                            own[name] = collection[name]
                table["optimizer"] = own
        filled[key] = table
    return {**values, "tables": filled}


_UNSET = object()
_INHERIT_MARKERS = {name: getattr(TableOptimizerConfig, name) for name in INHERITED_OPTIMIZER_FIELDS}


def parse_section(cfg: Any, schema: Type[T], prefix: str, problems: Problems) -> Optional[T]:
    """`cfg` as an instance of the section dataclass `schema`, keyed collections typed too.

    Unknown keys, wrong types and bad enum names are added to `problems` with their full path
    (a composed config has already refused them at compose time; dicts built in Python have not).
    """
    try:
        values = to_container(cfg)
    except ConfigError as e:
        path = getattr(e, "path", None)
        problems.append((path, str(e)[len(path) + 2 :]) if path and path != "?" else (prefix, str(e)))
        return None
    if schema is LargeEmbeddingsConfig:
        values = fill_inherited(values)
    return from_mapping(schema, values, prefix, problems)


def embeddings_spec(collection: LargeEmbeddingsConfig, prefix: str) -> EmbeddingsSpec:
    """The typed collection as complete per-table specs (names, features, optimizers resolved)."""
    specs = []
    for key, table in collection.tables.items():
        name = table.name or key
        pretrained: Optional[EmbeddingSnapshot] = table.pretrained
        if pretrained is not None and pretrained.embedding_snapshot_uri is None:
            pretrained = None
        elif pretrained is not None and not pretrained.emb_name:
            pretrained = replace(pretrained, emb_name=name)
        specs.append(
            TableSpec(
                key=key,
                name=name,
                num_embeddings=table.num_embeddings,
                embedding_dim=table.embedding_dim,
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
    names = {s.key: s.name for s in specs}
    return EmbeddingsSpec(
        tables=tuple(specs),
        optimizer=collection.optimizer,
        tables_to_log=tuple(names.get(t, t) for t in collection.tables_to_log),
        embedding_dim=collection.embedding_dim,
        is_weighted=collection.is_weighted,
        path=prefix,
    )


def table_specs(embeddings: Any, prefix: Optional[str] = None) -> List[TableSpec]:
    """Complete specs of every table of an embeddings config, in config order.

    `embeddings` is a config node, dataclass or dict, or an already parsed `EmbeddingsSpec`
    (returned as is). Raises ConfigValidationError naming the path of a wrong key or type; the
    semantic rules live in `validate`, whose result carries these specs too.
    """
    if isinstance(embeddings, EmbeddingsSpec):
        return list(embeddings.tables)
    prefix = prefix or config_prefix(embeddings, "embeddings")
    problems: Problems = []
    collection = parse_section(embeddings, LargeEmbeddingsConfig, prefix, problems)
    if problems or collection is None:
        raise ConfigValidationError(problems)
    return list(embeddings_spec(collection, prefix).tables)


def small_table_specs(small: SmallEmbeddingsConfig, prefix: str) -> Tuple[SmallTableSpec, ...]:
    return tuple(
        SmallTableSpec(key, t.name or key, t.num_embeddings, t.embedding_dim, t.index, f"{prefix}.tables.{key}")
        for key, t in small.tables.items()
    )


def stratum_specs(strata: StratifiersConfig, prefix: str) -> Tuple[StratumSpec, ...]:
    return tuple(
        StratumSpec(key, s.name or key, s.index, s.value, f"{prefix}.strata.{key}") for key, s in strata.strata.items()
    )


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
