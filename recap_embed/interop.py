"""TorchRec table configs in and out: `from_torchrec` and `to_torchrec`.

A TorchRec user already holds a list of ``torchrec.EmbeddingBagConfig``. `from_torchrec` turns
it into an ``embeddings`` node (this library's `LargeEmbeddingsConfig`) that validates, can be
written as a preset (``OmegaConf.to_yaml``) and instantiates; `to_torchrec` turns an embeddings
config back into torchrec's configs, the same ones the built module's EBC reports through
``embedding_bag_configs()``.

Both directions are lossless for every field with a meaning here: name, num_embeddings,
embedding_dim, feature_names (several per table), pooling (SUM, MEAN), data_type (FP32, FP16,
BF16), weight_init_min/max, num_embeddings_post_pruning, need_pos. A torchrec field with no
equivalent (a custom ``init_fn`` callable, ``input_dim``, ``total_num_buckets``, virtual
tables, ...) set to anything but its default is refused by name, never dropped.

``init_fn`` is accepted when it is torchrec's own default, the uniform initialisation over
[weight_init_min, weight_init_max] that ``__post_init__`` fills in: the sharded kernels
initialise from those two fields and ignore ``init_fn``, so a custom callable could not be
honoured anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchrec import EmbeddingBagConfig as TorchrecTableConfig
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, PoolingType
from torchrec.modules.embedding_configs import DataType as TorchrecDataType

from recap_embed.config import EMBEDDINGS_KEY, ConfigError, ConfigValidationError, LargeEmbeddingsConfig, table_specs, validate
from recap_embed.config.convert import Problems
from recap_embed.config.resolve import config_prefix, parse_section

from recap_embed.modules.large import DATA_TYPES, POOLING_TYPES, resolve_rows, torchrec_config

__all__ = ["TorchrecConversionError", "from_torchrec", "to_torchrec"]

#: torchrec's enums to our member names (the words a config holds).
_DATA_TYPE_NAMES = {tr: ours.name for ours, tr in DATA_TYPES.items()}
_POOLING_NAMES = {tr: ours.name for ours, tr in POOLING_TYPES.items()}

#: torchrec fields carried one to one into a table of ours (besides name, handled as the key).
_CARRIED = ("num_embeddings", "embedding_dim", "feature_names", "weight_init_min", "weight_init_max",
            "num_embeddings_post_pruning", "need_pos")
#: Fields converted with their own rules.
_CONVERTED = ("name", "data_type", "pooling", "init_fn")

#: Values a table of ours has when a field is not set (left out of the converted tables).
_OUR_DEFAULTS = {"need_pos": False, "data_type": "fp32", "pooling": "sum"}

#: Fields of the embeddings node a caller may pass to `from_torchrec` besides the tables.
_COLLECTION_FIELDS = ("optimizer", "tables_to_log", "embedding_dim", "is_weighted")


class TorchrecConversionError(ConfigError):
    """A torchrec config that has no equivalent here; `path` names the config and field."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


# --------------------------------------------------------------------------- torchrec -> ours


def from_torchrec(configs: Iterable[Any], **collection_fields: Any) -> DictConfig:
    """An ``embeddings`` node holding `configs` (torchrec ``EmbeddingBagConfig``s, or their
    ``dataclasses.asdict``), keyed by table name, validated (device-independent rules).

    `collection_fields` sets the other fields of the node: ``optimizer`` (the tables' fused
    optimizer, e.g. ``{"algorithm": "rowwise_adagrad", "init_learning_rate": 0.05}``),
    ``tables_to_log``, ``embedding_dim`` (default: the tables' dim when they share one) and
    ``is_weighted`` (torchrec keeps it on the EBC, not on a table).

    Raises TorchrecConversionError naming ``configs[i]`` and the field for anything without an
    equivalent, and ConfigValidationError (with config paths) for values our rules refuse, e.g. a
    dim the fused kernels cannot run.
    """
    unknown = sorted(set(collection_fields) - set(_COLLECTION_FIELDS))
    if unknown:
        raise TorchrecConversionError(
            "from_torchrec", f"unknown collection field(s) {', '.join(unknown)}; allowed: {', '.join(_COLLECTION_FIELDS)}"
        )
    tables: Dict[str, Dict[str, Any]] = {}
    where: Dict[str, str] = {}
    for i, config in enumerate(configs):
        path = f"configs[{i}]"
        name, table = _table(config, path)
        if name in tables:
            raise TorchrecConversionError(f"{path}.name", f"{name!r} is also the name of {where[name]}; table names must be unique")
        tables[name], where[name] = table, path
    values: Dict[str, Any] = {"tables": tables}
    dims = {t["embedding_dim"] for t in tables.values()}
    if "embedding_dim" not in collection_fields and len(dims) == 1:
        values["embedding_dim"] = dims.pop()  # tables added later get the same dim
    values.update({k: _plain(v) for k, v in collection_fields.items()})
    node = OmegaConf.merge(OmegaConf.structured(LargeEmbeddingsConfig), values)
    validate(node, device="meta", path=EMBEDDINGS_KEY)
    return node  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return OmegaConf.structured(value)
    return value


def _table(config: Any, path: str) -> "tuple[str, Dict[str, Any]]":
    fields = _fields_of(config, path)
    name = fields.get("name", "")
    if not isinstance(name, str) or not name:
        raise TorchrecConversionError(f"{path}.name", f"{name!r} is not a table name; give every table a non-empty name")
    path = f"{path} ({name!r})"
    _refuse_unconvertible(fields, path)
    out: Dict[str, Any] = {}
    for key in _CARRIED:
        if key in fields:
            out[key] = fields[key]
    if "num_embeddings" not in fields or "embedding_dim" not in fields:
        missing = [k for k in ("num_embeddings", "embedding_dim") if k not in fields]
        raise TorchrecConversionError(f"{path}.{missing[0]}", "is missing (torchrec requires it)")
    features = list(out.get("feature_names") or [])
    if not features:
        raise TorchrecConversionError(
            f"{path}.feature_names",
            "is empty: torchrec's EmbeddingBagCollection then reads no feature for the table, while its sharded "
            "version reads one named like the table; set feature_names to say which",
        )
    out["feature_names"] = [str(f) for f in features]
    out["data_type"] = _data_type(fields.get("data_type", TorchrecDataType.FP32), f"{path}.data_type")
    out["pooling"] = _pooling(fields.get("pooling", PoolingType.SUM), f"{path}.pooling")
    _check_init_fn(fields, path)
    # What equals our defaults is left out, so the preset reads like one written by hand.
    return name, {k: v for k, v in out.items() if v is not None and _OUR_DEFAULTS.get(k, object()) != v}


def _fields_of(config: Any, path: str) -> Dict[str, Any]:
    """The fields of a torchrec table config (dataclass or its asdict)."""
    if isinstance(config, BaseEmbeddingConfig) and not isinstance(config, TorchrecTableConfig):
        raise TorchrecConversionError(
            path,
            f"is a {type(config).__name__}; LargeEmbeddings is an EmbeddingBagCollection (pooled lookups) "
            f"and takes torchrec.EmbeddingBagConfig",
        )
    defaults = {f.name: f for f in dataclasses.fields(TorchrecTableConfig)}
    if isinstance(config, TorchrecTableConfig):
        values = {name: getattr(config, name) for name in defaults}
    elif isinstance(config, (Mapping, DictConfig)):
        values = dict(config.items())
        for key in values:
            if key not in defaults:
                raise TorchrecConversionError(f"{path}.{key}", f"is not a field of torchrec's EmbeddingBagConfig; fields: {', '.join(defaults)}")
    else:
        raise TorchrecConversionError(path, f"expected a torchrec.EmbeddingBagConfig or a mapping of its fields, got {type(config).__name__}")
    return values


def _refuse_unconvertible(values: Mapping[str, Any], path: str) -> None:
    """Any field with no equivalent here must be at torchrec's default: refused by name, never dropped."""
    defaults = {f.name: f for f in dataclasses.fields(TorchrecTableConfig)}
    for key, value in values.items():
        if key in _CARRIED or key in _CONVERTED:
            continue
        f = defaults[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if value != default:
            raise TorchrecConversionError(
                f"{path}.{key}",
                f"is {value!r}; recap_embed has no equivalent for {key} (only its default, {default!r}, converts)",
            )


def _data_type(value: Any, path: str) -> str:
    member = _member(TorchrecDataType, value)
    if member in _DATA_TYPE_NAMES:
        return _DATA_TYPE_NAMES[member]
    allowed = ", ".join(m.name for m in _DATA_TYPE_NAMES)
    raise TorchrecConversionError(
        path, f"{getattr(member, 'name', value)!s} has no equivalent (torchrec's quantized types are for inference modules); allowed: {allowed}"
    )


def _pooling(value: Any, path: str) -> str:
    member = _member(PoolingType, value)
    if member in _POOLING_NAMES:
        return _POOLING_NAMES[member]
    if member is PoolingType.NONE:
        raise TorchrecConversionError(
            path,
            "NONE (unpooled sequences) has no equivalent: LargeEmbeddings is an EmbeddingBagCollection, whose outputs "
            "are pooled per bag; allowed: SUM, MEAN (unpooled lookups belong in torchrec's EmbeddingCollection)",
        )
    raise TorchrecConversionError(path, f"{value!r} is not a pooling type; allowed: SUM, MEAN")


def _member(enum: Any, value: Any) -> Any:
    """An enum member from a member, its name ('FP16') or its value ('fp16'); else the value."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        for m in enum:
            if value in (m.name, m.value):
                return m
    return value


def _check_init_fn(fields: Mapping[str, Any], path: str) -> None:
    """Only torchrec's default uniform init over [weight_init_min, weight_init_max] converts."""
    init_fn = fields.get("init_fn")
    if init_fn is None or _is_default_init(init_fn, fields):
        return
    if _is_uniform(init_fn) and isinstance(fields.get("num_embeddings"), int) and fields["num_embeddings"] > 0:
        low, high = _init_range(fields)
        raise TorchrecConversionError(
            f"{path}.init_fn",
            f"is uniform over [{init_fn.keywords.get('a')}, {init_fn.keywords.get('b')}] but weight_init_min/max give "
            f"[{low}, {high}] (changed after the config was made?); torchrec's sharded kernels initialise from "
            f"weight_init_min/max, so set those to the range you mean",
        )
    raise TorchrecConversionError(
        f"{path}.init_fn",
        f"is {init_fn!r}, a custom callable, which has no equivalent (a config cannot hold code, and torchrec's "
        f"sharded kernels initialise from weight_init_min/weight_init_max, not init_fn); set weight_init_min and "
        f"weight_init_max for a uniform range",
    )


def _is_uniform(init_fn: Any) -> bool:
    return (isinstance(init_fn, functools.partial) and init_fn.func is torch.nn.init.uniform_ and not init_fn.args
            and set(init_fn.keywords) == {"a", "b"})


def _init_range(fields: Mapping[str, Any]) -> "tuple[float, float]":
    """[weight_init_min, weight_init_max] with torchrec's defaults (+-sqrt(1/rows)) for unset ends."""
    rows = fields["num_embeddings"]
    low, high = fields.get("weight_init_min"), fields.get("weight_init_max")
    return (-math.sqrt(1 / rows) if low is None else low, math.sqrt(1 / rows) if high is None else high)


def _is_default_init(init_fn: Any, fields: Mapping[str, Any]) -> bool:
    """torchrec's own init_fn: uniform over the config's range, as `__post_init__` makes it."""
    rows = fields.get("num_embeddings")
    if not _is_uniform(init_fn) or not isinstance(rows, int) or rows <= 0:
        return False
    low, high = _init_range(fields)
    return init_fn.keywords == {"a": low, "b": high}


# --------------------------------------------------------------------------- ours -> torchrec


def to_torchrec(
    embeddings_cfg: Any, *, num_embeddings_override: Optional[Mapping[str, int]] = None
) -> List[TorchrecTableConfig]:
    """torchrec ``EmbeddingBagConfig``s of an embeddings config, in table order.

    `embeddings_cfg` is the ``embeddings`` node (DictConfig, `LargeEmbeddingsConfig` or dict). It is
    validated first (device-independent rules). A table whose ``num_embeddings`` is null gets its
    rows from `num_embeddings_override` (by key or name) or else from its vocab, as when the module
    is built. These are the configs `LargeEmbeddings` gives its EmbeddingBagCollection.
    """
    prefix = config_prefix(embeddings_cfg, EMBEDDINGS_KEY)
    problems: Problems = []
    parsed = parse_section(embeddings_cfg, LargeEmbeddingsConfig, prefix, problems)
    if problems or parsed is None:
        raise ConfigValidationError(problems)
    validate(parsed, device="meta", path=prefix)
    vocabs: Dict[str, Any] = {}
    specs = [resolve_rows(s, num_embeddings_override or {}, vocabs) for s in table_specs(parsed, prefix=prefix)]
    return [torchrec_config(s) for s in specs]
