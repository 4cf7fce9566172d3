"""Migration from tml (the-algorithm-ml) embedding configs to Hydra presets, and back.

tml has two embedding-config formats, told apart here by their content:

- the **recap** format (``projects/home/recap/embedding/config.py``, the heavy ranker's
  ``model.large_embeddings``): one collection ``optimizer`` (``init_learning_rate`` and a
  ``learning_rate`` schedule; FBGEMM exact SGD implied) and tables with ``name``,
  ``num_embeddings``, ``embedding_dim``, ``pretrained``, ``vocab``;
- the **common** format (``common/modules/embedding/config.py``, TwHIN's ``model.embeddings``): no
  collection optimizer; every table has its own ``optimizer`` (tml's ``OptimizerConfig``: one of
  ``sgd``/``adam``/``adagrad`` and a ``learning_rate``) and a ``data_type``. TwHIN's model
  (``projects/twhin/models/config.py``) adds that all tables share one dim and data type, and
  that every relation's ``lhs``/``rhs`` names a table.

tml validates its YAML with pydantic models that forbid extra keys and enforce one-of groups.
The same rules, per format, are applied while converting, so a typo fails with the dotted path
of the offending key instead of surfacing later as a silently ignored field. `to_tml` is the
inverse (in the recap format when it can express the config, else the common one), so a
conversion can be checked by a round trip.

tml expands ``$VAR``/``${VAR}`` from the environment when it loads a file; string values that
use it (vocab and snapshot paths) become ``${oc.env:VAR}`` so Hydra expands them at compose
time instead of failing on an unknown interpolation.
"""

from __future__ import annotations

import copy
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recap_embed.files import atomic_write_text

from .errors import ConfigError
from .schema import (
    EMBEDDINGS_KEY,
    EmbeddingBagConfig,
    EmbeddingOptimizerConfig,
    INHERITED_OPTIMIZER_FIELDS,
    LargeEmbeddingsConfig,
    LearningRate,
    OovPolicy,
    PoolingMode,
    SmallEmbeddingBagConfig,
    SmallEmbeddingsConfig,
    StratifierConfig,
    StratifiersConfig,
    TableOptimizerConfig,
)
from .resolve import to_container
from .store import OPTIMIZERS, SCHEDULES

SMALL_KEY = "small_embeddings"
STRATIFIERS_KEY = "stratifiers"

#: The two formats `to_tml` writes and `from_tml` reads (see the module docstring).
RECAP_FORMAT = "recap"
COMMON_FORMAT = "common"
#: Where each format's tables sit in a tml model.
_MODEL_KEYS = {RECAP_FORMAT: "large_embeddings", COMMON_FORMAT: "embeddings"}
_SOURCES = {
    RECAP_FORMAT: "tml's recap format (projects/home/recap/embedding/config.py)",
    COMMON_FORMAT: "tml's common format (common/modules/embedding/config.py)",
}

# Allowed keys of each tml model, in tml's declaration order (shown in error messages).
_LARGE_KEYS = ("tables", "optimizer", "tables_to_log")  # recap format
_TABLE_KEYS = ("name", "num_embeddings", "embedding_dim", "pretrained", "vocab")  # recap format
_COMMON_LARGE_KEYS = ("tables", "tables_to_log")
_COMMON_TABLE_KEYS = ("name", "num_embeddings", "embedding_dim", "pretrained", "vocab", "optimizer", "data_type")
_TML_DATA_TYPES = ("fp32", "fp16")  # tml's DataType
_SNAPSHOT_KEYS = ("emb_name", "embedding_snapshot_uri")
_COLLECTION_OPTIMIZER_KEYS = ("learning_rate", "init_learning_rate")
_OPTIMIZER_KEYS = ("learning_rate", "adam", "sgd", "adagrad")
_ALGORITHMS = ("adam", "sgd", "adagrad")
_ALGORITHM_KEYS = {"sgd": ("lr", "momentum"), "adam": ("lr", "betas", "eps"), "adagrad": ("lr", "eps")}
_SCHEDULES = ("constant", "linear_ramp_to_cosine", "linear_ramp_to_constant", "piecewise_constant")
_SMALL_KEYS = ("tables",)
_SMALL_TABLE_KEYS = ("name", "num_embeddings", "embedding_dim", "index")
_STRATIFIER_KEYS = ("name", "index", "value")

#: tml's defaults for the optional optimizer fields (AdamConfig, AdagradConfig, SgdConfig).
TML_ADAM_BETAS = (0.9, 0.999)
TML_ADAM_EPS = 1e-7
TML_ADAGRAD_EPS = 0.0

#: Each section's keyed collection and its item type. Composed configs may hold the items as
#: open mappings, so they are typed here item by item.
_ITEMS: Dict[type, Tuple[str, type]] = {
    LargeEmbeddingsConfig: ("tables", EmbeddingBagConfig),
    SmallEmbeddingsConfig: ("tables", SmallEmbeddingBagConfig),
    StratifiersConfig: ("strata", StratifierConfig),
}

#: A preset name must be a plain Hydra option name (no dots, slashes or override syntax).
_PRESET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")


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


# --------------------------------------------------------------------------- tml -> ours


def from_tml(node: Mapping[str, Any], path: str = "") -> TmlConversion:
    """Convert a tml model node: its `large_embeddings` (recap format) or `embeddings` (common
    format, TwHIN's), `small_embeddings` and `stratifiers`.

    `node` may also be a LargeEmbeddingsConfig of either format itself (it has `tables`, and an
    `optimizer` or a list of tables with `num_embeddings`), or a SmallEmbeddingsConfig (tables
    with `index`). `path` is where `node` sits in its file, so errors name the full dotted path.
    """
    node = _mapping(node, path)
    if _looks_like_small(node):
        return TmlConversion(small_embeddings=_small(node, path), origin={SMALL_KEY: path or "<root>"})
    if _looks_like_large(node):
        fmt, emb = _large_any(node, path)
        return TmlConversion(embeddings=emb, origin={EMBEDDINGS_KEY: path or "<root>"}, format=fmt)
    conversion = TmlConversion()
    present = [k for k in _MODEL_KEYS.values() if node.get(k) is not None]
    if len(present) > 1:
        raise TmlConversionError(
            path,
            f"has both {' and '.join(present)}; a tml model has one embeddings section (large_embeddings in the "
            "recap format, embeddings in the common format): point the key at the one to convert",
        )
    for tml_key in present:
        where = _join(path, tml_key)
        conversion.format, conversion.embeddings = _large_any(_mapping(node[tml_key], where), where)
        conversion.origin[EMBEDDINGS_KEY] = where
        if tml_key == _MODEL_KEYS[COMMON_FORMAT] and _is_twhin_model(node):
            _check_twhin(node, path)
    for tml_key, ours, convert in (
        ("small_embeddings", SMALL_KEY, _small),
        ("stratifiers", STRATIFIERS_KEY, _stratifiers),
    ):
        value = node.get(tml_key)
        if value is not None:  # tml dumps unset sections as null
            setattr(conversion, ours, convert(value, _join(path, tml_key)))
            conversion.origin[ours] = _join(path, tml_key)
    if not conversion.origin:
        raise TmlConversionError(
            path,
            "nothing to convert: no non-null large_embeddings (recap format), embeddings (common format), "
            f"small_embeddings or stratifiers here (keys: {', '.join(map(str, node)) or 'none'}); point the key "
            "at the node that holds them",
        )
    converted = set(_MODEL_KEYS.values()) | {SMALL_KEY, STRATIFIERS_KEY}
    conversion.skipped = [_join(path, k) for k, v in node.items() if k not in converted and v is not None]
    return conversion


def _looks_like_large(node: Mapping[str, Any]) -> bool:
    if "tables" not in node:
        return False
    if "optimizer" in node:
        return True
    tables = node["tables"]
    return _is_table_list(tables) and not all("index" in t for t in tables)


def _looks_like_small(node: Mapping[str, Any]) -> bool:
    tables = node.get("tables")
    return "optimizer" not in node and _is_table_list(tables) and all("index" in t for t in tables)


def _is_table_list(tables: Any) -> bool:
    return (
        isinstance(tables, (list, ListConfig))
        and len(tables) > 0
        and all(isinstance(t, (Mapping, DictConfig)) and "num_embeddings" in t for t in tables)
    )


def tml_format(node: Mapping[str, Any], path: str = "") -> str:
    """Which of tml's formats a LargeEmbeddingsConfig node is in, from its content: a collection
    `optimizer` is the recap format; tables that carry `optimizer` or `data_type` are the common
    format; neither is refused, saying what each format needs."""
    if node.get("optimizer") is not None:
        return RECAP_FORMAT
    tables = node.get("tables")
    if isinstance(tables, (list, ListConfig)) and any(
        isinstance(t, (Mapping, DictConfig)) and (t.get("optimizer") is not None or t.get("data_type") is not None)
        for t in tables
    ):
        return COMMON_FORMAT
    raise TmlConversionError(
        _join(path, "optimizer"),
        "is missing, and no table has an optimizer or data_type: in the recap format (projects/home/recap/embedding) "
        "the collection needs `optimizer` (init_learning_rate, learning_rate); in the common format "
        "(common/modules/embedding, TwHIN's) every table needs `optimizer` and `data_type`",
    )


def _large_any(node: Mapping[str, Any], path: str) -> Tuple[str, Dict[str, Any]]:
    fmt = tml_format(node, path)
    return fmt, (_large(node, path) if fmt == RECAP_FORMAT else _large_common(node, path))


def _large(value: Any, path: str) -> Dict[str, Any]:
    """The recap format: one collection optimizer (FBGEMM exact SGD), tables without their own."""
    node = _fields(value, path, _LARGE_KEYS, required=("tables", "optimizer"))
    tables = _named_list(node["tables"], _join(path, "tables"), _large_table, "table")
    out: Dict[str, Any] = {}
    dims = {t["embedding_dim"] for t in tables.values()}
    if len(dims) == 1:
        # Tables added to the preset later (`embeddings/tables=[...]`) then get the same dim;
        # the converted tables keep theirs explicitly, whatever the collection default becomes.
        out["embedding_dim"] = dims.pop()
    out["optimizer"] = _collection_optimizer(node["optimizer"], _join(path, "optimizer"))
    out["tables"] = tables
    if "tables_to_log" in node:
        out["tables_to_log"] = _table_refs(node["tables_to_log"], _join(path, "tables_to_log"), tables)
    _check_fits(LargeEmbeddingsConfig, out, path)
    return out


def _large_common(value: Any, path: str) -> Dict[str, Any]:
    """The common format: each table its own optimizer and data type, no collection optimizer.

    The tables' optimizers become full table overrides; the collection keeps the `sgd` option
    (it only applies to tables added to the preset later).
    """
    node = _fields(value, path, _COMMON_LARGE_KEYS, required=("tables",))
    tables = _named_list(node["tables"], _join(path, "tables"), _common_table, "table")
    out: Dict[str, Any] = {}
    dims = {t["embedding_dim"] for t in tables.values()}
    if len(dims) == 1:
        out["embedding_dim"] = dims.pop()
    out["optimizer"] = {"algorithm": "sgd"}
    out["tables"] = tables
    if "tables_to_log" in node:
        out["tables_to_log"] = _table_refs(node["tables_to_log"], _join(path, "tables_to_log"), tables)
    _check_fits(LargeEmbeddingsConfig, out, path)
    return out


def _is_twhin_model(node: Mapping[str, Any]) -> bool:
    """TwHIN's TwhinModelConfig: `embeddings` beside `relations` and `translation_optimizer`."""
    return "relations" in node or "translation_optimizer" in node


def _check_twhin(model: Mapping[str, Any], path: str) -> None:
    """TwHIN's own rules (projects/twhin/models/config.py): one dim and one data type for every
    table (TwhinEmbeddingsConfig), and relations naming tables (TwhinModelConfig)."""
    tables_path = _join(_join(path, "embeddings"), "tables")
    tables = _list(model["embeddings"]["tables"], tables_path)
    first = tables[0]
    for i, table in enumerate(tables[1:], start=1):
        for key, what in (("embedding_dim", "embedding_dim"), ("data_type", "data type")):
            if table.get(key) != first.get(key):
                raise TmlConversionError(
                    _join(_index(tables_path, i), key),
                    f"is {table.get(key)!r} but {_index(tables_path, 0)} has {first.get(key)!r}; TwHIN "
                    f"(projects/twhin/models/config.py) requires every table to have the same {what}",
                )
    names = [str(t["name"]) for t in tables]
    relations_path = _join(path, "relations")
    for i, relation in enumerate(_list(model.get("relations") or [], relations_path)):
        rpath = _index(relations_path, i)
        relation = _mapping(relation, rpath)
        for side in ("lhs", "rhs"):
            if side not in relation:
                raise TmlConversionError(_join(rpath, side), "is missing (TwHIN requires it)")
            if str(relation[side]) not in names:
                raise TmlConversionError(
                    _join(rpath, side),
                    f"{relation[side]!r} is not a table; TwHIN requires each relation's {side} to name one of: {', '.join(names)}",
                )


def _common_table(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = _fields(value, path, _COMMON_TABLE_KEYS, required=("name", "num_embeddings", "embedding_dim", "optimizer", "data_type"))
    name, out = _table_basics(node, path)
    data_type = node["data_type"]
    if data_type not in _TML_DATA_TYPES:
        raise TmlConversionError(_join(path, "data_type"), f"{data_type!r} is not allowed; allowed: {', '.join(_TML_DATA_TYPES)}")
    out["data_type"] = str(data_type)
    out["optimizer"] = _table_optimizer(node["optimizer"], _join(path, "optimizer"))
    return name, out


def _large_table(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = _mapping(value, path)
    for key in ("optimizer", "data_type"):
        if key in node:
            raise TmlConversionError(
                _join(path, key),
                f"unknown key in {_SOURCES[RECAP_FORMAT]}, whose collection optimizer serves every table; allowed here: "
                f"{', '.join(_TABLE_KEYS)} (a table's own optimizer and data_type belong to {_SOURCES[COMMON_FORMAT]}, "
                "which has no collection optimizer)",
            )
    node = _fields(node, path, _TABLE_KEYS, required=("name", "num_embeddings", "embedding_dim"))
    return _table_basics(node, path)


def _table_basics(node: Mapping[str, Any], path: str) -> Tuple[str, Dict[str, Any]]:
    """The fields both formats' tables share: name, rows, dim, pretrained, vocab."""
    name = _name(node["name"], _join(path, "name"))
    out: Dict[str, Any] = {
        "num_embeddings": _int(node["num_embeddings"], _join(path, "num_embeddings"), minimum=1),
        "embedding_dim": _int(node["embedding_dim"], _join(path, "embedding_dim"), minimum=1),
    }
    if "pretrained" in node:
        sub = _join(path, "pretrained")
        snap = _fields(node["pretrained"], sub, _SNAPSHOT_KEYS, required=_SNAPSHOT_KEYS)
        out["pretrained"] = {k: _env(_str(snap[k], _join(sub, k))) for k in _SNAPSHOT_KEYS}
    if "vocab" in node:
        out["vocab"] = _env(_str(node["vocab"], _join(path, "vocab")))
    return name, out


def _collection_optimizer(value: Any, path: str) -> Dict[str, Any]:
    """tml's EmbeddingOptimizerConfig has no algorithm: FBGEMM exact SGD was implied."""
    node = _fields(value, path, _COLLECTION_OPTIMIZER_KEYS, required=("init_learning_rate",))
    out: Dict[str, Any] = {
        "algorithm": "sgd",
        "init_learning_rate": _float(node["init_learning_rate"], _join(path, "init_learning_rate")),
    }
    if "learning_rate" in node:
        out["learning_rate"] = _schedule(node["learning_rate"], _join(path, "learning_rate"))
    return out


def _table_optimizer(value: Any, path: str) -> Dict[str, Any]:
    """A tml OptimizerConfig (one of sgd/adam/adagrad) as a full TableOptimizerConfig override.

    Hyper-parameters tml leaves at its defaults are written out: ours differ (eps 1e-8).
    """
    node = _fields(value, path, _OPTIMIZER_KEYS)
    algorithm, body = _one_of(node, path, _ALGORITHMS, "optimizer")
    sub = _join(path, algorithm)
    params = _fields(body, sub, _ALGORITHM_KEYS[algorithm], required=("lr",))
    out: Dict[str, Any] = {"algorithm": algorithm, "init_learning_rate": _float(params["lr"], _join(sub, "lr"))}
    if "learning_rate" in node:
        out["learning_rate"] = _schedule(node["learning_rate"], _join(path, "learning_rate"))
    if algorithm == "sgd":
        momentum = _float(params.get("momentum", 0.0), _join(sub, "momentum"))
        if momentum != 0.0:
            raise TmlConversionError(
                _join(sub, "momentum"),
                f"is {momentum!r}; FBGEMM's fused SGD has no momentum, so it cannot be converted "
                "(set momentum to 0, or use adam or adagrad)",
            )
    elif algorithm == "adam":
        betas = params.get("betas", list(TML_ADAM_BETAS))
        bpath = _join(sub, "betas")
        if not isinstance(betas, (list, tuple, ListConfig)) or len(betas) != 2:
            raise TmlConversionError(bpath, f"expected a list of two floats [beta1, beta2], got {betas!r}")
        out["eps"] = _float(params.get("eps", TML_ADAM_EPS), _join(sub, "eps"))
        out["beta1"] = _float(betas[0], _index(bpath, 0))
        out["beta2"] = _float(betas[1], _index(bpath, 1))
    else:
        out["eps"] = _float(params.get("eps", TML_ADAGRAD_EPS), _join(sub, "eps"))
    return out


def _schedule(value: Any, path: str) -> Dict[str, Any]:
    """tml's LearningRate one-of; ours has the same shape, so only values are checked."""
    node = _fields(value, path, _SCHEDULES)
    name, body = _one_of(node, path, _SCHEDULES, "learning-rate schedule")
    sub = _join(path, name)
    if name == "constant":
        return {name: _float(body, sub)}
    if name == "linear_ramp_to_constant":
        b = _fields(body, sub, ("learning_rate", "num_ramp_steps"), required=("learning_rate", "num_ramp_steps"))
        return {
            name: {
                "learning_rate": _float(b["learning_rate"], _join(sub, "learning_rate")),
                "num_ramp_steps": _int(b["num_ramp_steps"], _join(sub, "num_ramp_steps"), minimum=1),
            }
        }
    if name == "linear_ramp_to_cosine":
        keys = ("learning_rate", "final_learning_rate", "num_ramp_steps", "final_num_steps")
        b = _fields(body, sub, keys, required=keys)
        return {
            name: {
                "learning_rate": _float(b["learning_rate"], _join(sub, "learning_rate")),
                "final_learning_rate": _float(b["final_learning_rate"], _join(sub, "final_learning_rate")),
                "num_ramp_steps": _int(b["num_ramp_steps"], _join(sub, "num_ramp_steps"), minimum=1),
                "final_num_steps": _int(b["final_num_steps"], _join(sub, "final_num_steps"), minimum=1),
            }
        }
    keys = ("learning_rate_boundaries", "learning_rate_values")
    b = _fields(body, sub, keys, required=keys)
    bounds = [_int(v, _index(_join(sub, keys[0]), i)) for i, v in enumerate(_list(b[keys[0]], _join(sub, keys[0])))]
    values = [_float(v, _index(_join(sub, keys[1]), i)) for i, v in enumerate(_list(b[keys[1]], _join(sub, keys[1])))]
    if len(values) != len(bounds) + 1:
        raise TmlConversionError(
            _join(sub, keys[1]),
            f"has {len(values)} values for {len(bounds)} boundaries; a piecewise schedule needs one more value than boundaries",
        )
    return {name: {keys[0]: bounds, keys[1]: values}}


def _small(value: Any, path: str) -> Dict[str, Any]:
    node = _fields(value, path, _SMALL_KEYS, required=("tables",))
    out = {"tables": _named_list(node["tables"], _join(path, "tables"), _small_table, "table")}
    _check_fits(SmallEmbeddingsConfig, out, path)
    return out


def _small_table(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = _fields(value, path, _SMALL_TABLE_KEYS, required=_SMALL_TABLE_KEYS)
    return _name(node["name"], _join(path, "name")), {
        "num_embeddings": _int(node["num_embeddings"], _join(path, "num_embeddings"), minimum=1),
        "embedding_dim": _int(node["embedding_dim"], _join(path, "embedding_dim"), minimum=1),
        "index": _int(node["index"], _join(path, "index"), minimum=0),
    }


def _stratifiers(value: Any, path: str) -> Dict[str, Any]:
    out = {"strata": _named_list(value, path, _stratifier, "stratifier")}
    _check_fits(StratifiersConfig, out, path)
    return out


def _stratifier(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = _fields(value, path, _STRATIFIER_KEYS, required=_STRATIFIER_KEYS)
    return _name(node["name"], _join(path, "name")), {
        "index": _int(node["index"], _join(path, "index"), minimum=0),
        "value": _int(node["value"], _join(path, "value")),
    }


def _check_fits(schema: Type[Any], data: Dict[str, Any], path: str) -> None:
    """The output must merge into our schema, each item into its item type too (the collections
    may be open mappings); interpolations (oc.env) are left unresolved."""
    collection, item_type = _ITEMS[schema]
    checks = [(schema, data, path)]
    checks += [(item_type, v, _join(path, f"{collection}[{k!r}]")) for k, v in data[collection].items()]
    for cls, values, where in checks:
        try:
            OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(cls), values), throw_on_missing=True)
        except OmegaConfBaseException as e:  # a bug in this module rather than in the input
            message = " ".join(str(e).split())
            raise TmlConversionError(where, f"converted values do not fit {cls.__name__}: {message}") from None


# --------------------------------------------------------------------------- checking helpers


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, Mapping):
        raise TmlConversionError(path, f"expected a mapping, got {_describe(value)}")
    return value


def _list(value: Any, path: str) -> List[Any]:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, (list, tuple)):
        raise TmlConversionError(path, f"expected a list, got {_describe(value)}")
    return list(value)


def _fields(value: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Dict[str, Any]:
    """The set fields of a tml model: unknown keys refused (extra=forbid), nulls dropped."""
    node = _mapping(value, path)
    for key in node:
        if key not in allowed:
            raise TmlConversionError(_join(path, key), f"unknown key; allowed here: {', '.join(allowed)}")
    present = {k: v for k, v in node.items() if v is not None}
    for key in required:
        if key not in present:
            raise TmlConversionError(_join(path, key), "is missing (tml requires it)")
    return present


def _one_of(node: Mapping[str, Any], path: str, names: Sequence[str], what: str) -> Tuple[str, Any]:
    """tml's one_of: exactly one of `names` set (non-null)."""
    chosen = [n for n in names if node.get(n) is not None]
    if len(chosen) != 1:
        found = f"found {' and '.join(chosen)}" if chosen else "found none"
        raise TmlConversionError(path, f"exactly one {what} of {', '.join(names)} must be set; {found}")
    return chosen[0], node[chosen[0]]


def _named_list(
    value: Any, path: str, convert: Callable[[Any, str], Tuple[str, Dict[str, Any]]], what: str
) -> Dict[str, Dict[str, Any]]:
    """A tml list of named items as our dict keyed by name (names must be unique)."""
    out: Dict[str, Dict[str, Any]] = {}
    first: Dict[str, int] = {}
    for i, item in enumerate(_list(value, path)):
        name, body = convert(item, _index(path, i))
        if name in out:
            raise TmlConversionError(
                _join(_index(path, i), "name"),
                f"duplicate {what} name {name!r} (also {_index(path, first[name])}); names must be unique",
            )
        out[name] = body
        first[name] = i
    return out


def _table_refs(value: Any, path: str, tables: Mapping[str, Any]) -> List[str]:
    refs = [_name(v, _index(path, i)) for i, v in enumerate(_list(value, path))]
    for i, ref in enumerate(refs):
        if ref not in tables:
            raise TmlConversionError(_index(path, i), f"{ref!r} is not a table; tables: {', '.join(tables) or 'none'}")
    return refs


def _name(value: Any, path: str) -> str:
    # pydantic (v1) coerces numbers to str; `$` would become an interpolation in our keys and lists.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TmlConversionError(path, f"expected a name (string), got {_describe(value)}")
    name = str(value)
    if not name or "$" in name:
        raise TmlConversionError(path, f"{name!r} is not a usable name (empty, or uses $ substitution)")
    return name


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise TmlConversionError(path, f"expected a string, got {_describe(value)}")
    return value


def _float(value: Any, path: str) -> float:
    # PyYAML reads `1e-7` (no dot) as a string; pydantic turned it into a float, and so do we.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TmlConversionError(path, f"expected a number, got {_describe(value)}")


def _int(value: Any, path: str, minimum: Optional[int] = None) -> int:
    result: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        result = int(value)
    if result is None:
        raise TmlConversionError(path, f"expected an integer, got {_describe(value)}")
    if minimum is not None and result < minimum:
        raise TmlConversionError(path, f"is {result}; must be >= {minimum}")
    return result


def _env(value: str) -> str:
    """tml's `$VAR`/`${VAR}` (string.Template, expanded at load) as `${oc.env:VAR}`."""

    def sub(m: "re.Match[str]") -> str:
        if m.group("escaped") is not None:
            return "\\$" if m.end() < len(value) and value[m.end()] == "{" else "$"
        var = m.group("named") or m.group("braced")
        if var is not None:
            return "${oc.env:" + var + "}"
        return m.group(0)  # an invalid placeholder stays literal, as with safe_substitute

    out = string.Template.pattern.sub(sub, value)
    # A literal `${` left over (not a tml variable) must not be read as an interpolation.
    return re.sub(r"(?<![\\])\$\{(?!oc\.env:)", r"\\${", out)


# --------------------------------------------------------------------------- writing presets


def render_presets(conversion: TmlConversion, name: str, source: Optional[str] = None) -> Dict[str, str]:
    """{relative path: YAML text} of the group options `write_presets` would write."""
    check_preset_name(name)
    out: Dict[str, str] = {}
    sections = (
        (EMBEDDINGS_KEY, conversion.embeddings, _embeddings_preset),
        (SMALL_KEY, conversion.small_embeddings, _plain_preset),
        (STRATIFIERS_KEY, conversion.stratifiers, _plain_preset),
    )
    for group, values, build in sections:
        if values is None:
            continue
        origin = conversion.origin.get(group)
        where = f"{source or 'a tml config'}" + (f" (key {origin})" if origin and origin != "<root>" else "")
        header = f"# Converted by recap-embed-from-tml from {where}.\n"
        if group == EMBEDDINGS_KEY and conversion.format is not None:
            header += f"# Source format: {_SOURCES[conversion.format]}.\n"
        defaults, body = build(copy.deepcopy(values))
        text = header + _dump({"defaults": defaults})
        if body:
            text += "\n" + _dump(body)
        out[f"{group}/{name}.yaml"] = text
    return out


def write_presets(
    conversion: TmlConversion,
    out_dir: "os.PathLike[str] | str",
    name: str,
    *,
    overwrite: bool = False,
    source: Optional[str] = None,
) -> List[Path]:
    """Write `out_dir/<group>/<name>.yaml` for each present section; return the paths.

    Refuses (FileExistsError, before writing anything) to replace an existing file unless
    `overwrite`; each file is written to a temporary file and renamed, so a reader never
    sees half a preset. `source` names the tml file in the header comment.
    """
    rendered = render_presets(conversion, name, source)
    targets = {Path(out_dir) / rel: text for rel, text in rendered.items()}
    if not overwrite:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise PresetExistsError(f"{', '.join(existing)} already {verb}; pass --overwrite (overwrite=True) to replace")
    for target, text in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    return list(targets)


class PresetExistsError(ConfigError, FileExistsError):
    """A preset to write exists already (and overwrite is off)."""


def check_preset_name(name: str) -> None:
    """Raise ConfigError (a ValueError) unless `name` can be a Hydra option name (and is not the schema's)."""
    if not isinstance(name, str) or not _PRESET_NAME.match(name) or name == "base":
        raise ConfigError(
            f"preset name {name!r} is not allowed: use letters, digits, _ and -, not starting with -, "
            "and not 'base' (the schema's option)"
        )


def default_preset_name(file: "os.PathLike[str] | str") -> str:
    """The file's stem made into an option name (dots and other characters become `_`)."""
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(file).stem).lstrip("-")
    return stem if stem and stem != "base" else f"{stem or 'tml'}_tml"


def _embeddings_preset(emb: Dict[str, Any]) -> Tuple[List[Any], Dict[str, Any]]:
    """Defaults list and body of an `embeddings` option.

    The collection's algorithm and schedule are chosen by the `optimizer` and `lr` options,
    not restated in the body: a body value would override a later `embeddings/optimizer=...`
    choice, and a second schedule set next to the `lr` option's would break the one-of. Only
    the schedule values that differ from the chosen `lr` option are written; no schedule is
    `lr: null` (still overridable without `+`).
    """
    opt = emb.get("optimizer") or {}
    algorithm = str(opt.pop("algorithm", "sgd"))
    if algorithm not in OPTIMIZERS:
        raise ValueError(f"{EMBEDDINGS_KEY}.optimizer.algorithm: {algorithm!r} has no embeddings/optimizer option")
    schedule = opt.pop("learning_rate", None) or {}
    chosen = [k for k, v in schedule.items() if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"{EMBEDDINGS_KEY}.optimizer.learning_rate: sets {', '.join(chosen)}; at most one schedule")
    lr_option = chosen[0] if chosen else None
    if lr_option is not None:
        init = opt.get("init_learning_rate", OPTIMIZERS[algorithm].init_learning_rate)
        differs = _schedule_overrides(lr_option, schedule[lr_option], init)
        if differs is not None:
            opt["learning_rate"] = {lr_option: differs}
    if opt:
        emb["optimizer"] = opt
    else:
        emb.pop("optimizer", None)
    defaults = ["base", {"optimizer": algorithm}, {"lr": lr_option}, "_self_", {"tables": []}]
    return defaults, emb


def _schedule_overrides(option: str, values: Any, init_learning_rate: float) -> Any:
    """What of `values` the `lr` option does not already give (None: nothing)."""
    cfg = OmegaConf.structured(EmbeddingOptimizerConfig(init_learning_rate=init_learning_rate))
    cfg.learning_rate = OmegaConf.merge(OmegaConf.structured(LearningRate), SCHEDULES[option])
    given = OmegaConf.to_container(cfg.learning_rate, resolve=True)[option]  # type: ignore[index]
    if not isinstance(values, Mapping):
        return None if values == given else values
    differs = {k: v for k, v in values.items() if not isinstance(given, Mapping) or given.get(k) != v}
    return differs or None


def _plain_preset(values: Dict[str, Any]) -> Tuple[List[Any], Dict[str, Any]]:
    return ["base", "_self_"], values


class _PresetDumper(yaml.SafeDumper):
    """Quotes every string OmegaConf's YAML loader reads as another type (it reads `1e3` as a float)."""


_PresetDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _dump(data: Dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_PresetDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------- ours -> tml


def to_tml(cfg: Any, format: Optional[str] = None) -> Dict[str, Any]:
    """Our config (a composed app config, its sections, or a TmlConversion) as tml's dicts.

    `format` is `RECAP_FORMAT` (`{large_embeddings: {tables, optimizer, tables_to_log}}`) or
    `COMMON_FORMAT` (`{embeddings: {tables, tables_to_log}}`, every table with its own optimizer
    and data type); None picks the recap format when it can express the config (fp32 tables, no
    table optimizers, an SGD collection) and the common format otherwise. `small_embeddings` and
    `stratifiers` are added when present (tml has them in the recap format only). Interpolations
    are resolved and tml's optional fields written out (momentum, betas, eps), so two conversions
    compare equal when they mean the same. Values tml cannot express (our additions, algorithms
    FBGEMM has but tml had not) raise TmlConversionError naming our config path.
    """
    if format not in (None, RECAP_FORMAT, COMMON_FORMAT):
        raise ValueError(f"format {format!r} is not one of tml's; allowed: {RECAP_FORMAT}, {COMMON_FORMAT} (None: pick)")
    if isinstance(cfg, TmlConversion):
        sections = {EMBEDDINGS_KEY: cfg.embeddings, SMALL_KEY: cfg.small_embeddings, STRATIFIERS_KEY: cfg.stratifiers}
    elif isinstance(cfg, (Mapping, DictConfig)):
        sections = {k: cfg.get(k) for k in (EMBEDDINGS_KEY, SMALL_KEY, STRATIFIERS_KEY)}
    else:
        raise TypeError(f"to_tml expects a config mapping or a TmlConversion, got {type(cfg).__name__}")
    out: Dict[str, Any] = {}
    if sections[EMBEDDINGS_KEY] is not None:
        emb = _plain(LargeEmbeddingsConfig, sections[EMBEDDINGS_KEY], EMBEDDINGS_KEY)
        fmt = format or (RECAP_FORMAT if _recap_can_express(emb) else COMMON_FORMAT)
        if fmt == RECAP_FORMAT:
            out[_MODEL_KEYS[RECAP_FORMAT]] = _large_to_tml(emb, EMBEDDINGS_KEY)
        else:
            out[_MODEL_KEYS[COMMON_FORMAT]] = _common_to_tml(emb, EMBEDDINGS_KEY)
    if sections[SMALL_KEY] is not None:
        small = _plain(SmallEmbeddingsConfig, sections[SMALL_KEY], SMALL_KEY)
        out["small_embeddings"] = {
            "tables": [
                {"name": t["name"] or key, **{k: t[k] for k in ("num_embeddings", "embedding_dim", "index")}}
                for key, t in small["tables"].items()
            ]
        }
    if sections[STRATIFIERS_KEY] is not None:
        strata = _plain(StratifiersConfig, sections[STRATIFIERS_KEY], STRATIFIERS_KEY)
        out["stratifiers"] = [
            {"name": t["name"] or key, "index": t["index"], "value": t["value"]} for key, t in strata["strata"].items()
        ]
    return out


def _recap_can_express(emb: Dict[str, Any]) -> bool:
    """fp32 tables without optimizer overrides under an SGD collection: tml's recap format."""
    if emb["optimizer"]["algorithm"] != "sgd":
        return False
    return all(t["data_type"] == "fp32" and not _has_override(t.get("optimizer")) for t in emb["tables"].values())


def _has_override(t: Optional[Mapping[str, Any]]) -> bool:
    t = t or {}
    return any(v is not None for k, v in t.items() if k != "learning_rate") or _chosen_schedule(t.get("learning_rate"))


def _chosen_schedule(schedule: Optional[Mapping[str, Any]]) -> bool:
    return any(v is not None for v in (schedule or {}).values())


def _plain(schema: Type[Any], node: Any, path: str) -> Dict[str, Any]:
    """`node` typed by `schema` (its items by their item type), resolved, enums as names."""
    collection, item_type = _ITEMS[schema]
    try:
        if isinstance(node, DictConfig):  # resolved within its root (inherited table fields left as they are)
            node = to_container(node)
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        out: Dict[str, Any] = OmegaConf.to_container(merged, resolve=False, enum_to_str=True, throw_on_missing=True)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise TmlConversionError(_omegaconf_path(e, path), f"cannot be resolved: {_first_line(e)}") from None
    items = {}
    for key, item in out[collection].items():
        where = f"{path}.{collection}.{key}"
        try:
            # Not resolved again: an item's interpolations were resolved with the section above.
            typed = OmegaConf.merge(OmegaConf.structured(item_type), item)
            items[key] = OmegaConf.to_container(typed, resolve=False, enum_to_str=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            raise TmlConversionError(_omegaconf_path(e, where), _first_line(e)) from None
    out[collection] = items
    if schema is LargeEmbeddingsConfig:  # what a table inherits is not its own: tml writes no override
        for item in items.values():
            own = item.get("optimizer") or {}
            for name in INHERITED_OPTIMIZER_FIELDS:
                if own.get(name) == getattr(TableOptimizerConfig, name):
                    own[name] = None
    return out


def _omegaconf_path(e: OmegaConfBaseException, path: str) -> str:
    key = str(getattr(e, "full_key", "") or "")
    return key if key == path or key.startswith(path + ".") else _join(path, key) if key else path


def _first_line(e: Exception) -> str:
    return " ".join(str(e).splitlines()[0].split()) if str(e) else type(e).__name__


def _large_to_tml(emb: Dict[str, Any], path: str) -> Dict[str, Any]:
    """tml's recap format: one SGD collection optimizer, fp32 tables without their own."""
    coll = emb["optimizer"]
    if coll["algorithm"] != "sgd":
        raise TmlConversionError(
            f"{path}.optimizer.algorithm",
            f"is {coll['algorithm']}; tml's recap format has an SGD collection optimizer only (the common format "
            "gives each table its own)",
        )
    if emb["is_weighted"]:
        raise TmlConversionError(f"{path}.is_weighted", "is true; tml has no weighted inputs")
    tables = []
    for key, raw in emb["tables"].items():
        tpath = f"{path}.tables.{key}"
        item, t = _table_to_tml(raw, key, emb, tpath)
        if t["data_type"] != "fp32":
            raise TmlConversionError(f"{tpath}.data_type", f"is {t['data_type']}; tml's recap format has fp32 tables only (the common format has data_type)")
        if _has_override(t["optimizer"]):
            raise TmlConversionError(f"{tpath}.optimizer", "is set; tml's recap format has no per-table optimizer (the common format has)")
        tables.append(item)
    collection: Dict[str, Any] = {"init_learning_rate": float(coll["init_learning_rate"])}
    schedule = _schedule_to_tml(coll["learning_rate"], f"{path}.optimizer.learning_rate")
    if schedule is not None:
        collection["learning_rate"] = schedule
    out: Dict[str, Any] = {"tables": tables, "optimizer": collection}
    if emb["tables_to_log"]:
        out["tables_to_log"] = list(emb["tables_to_log"])
    return out


def _common_to_tml(emb: Dict[str, Any], path: str) -> Dict[str, Any]:
    """tml's common format: each table with its data type and its effective optimizer."""
    if emb["is_weighted"]:
        raise TmlConversionError(f"{path}.is_weighted", "is true; tml has no weighted inputs")
    tables = []
    for key, raw in emb["tables"].items():
        tpath = f"{path}.tables.{key}"
        item, t = _table_to_tml(raw, key, emb, tpath)
        if t["data_type"] not in _TML_DATA_TYPES:
            raise TmlConversionError(f"{tpath}.data_type", f"is {t['data_type']}; tml's data types are {', '.join(_TML_DATA_TYPES)}")
        item["data_type"] = t["data_type"]
        item["optimizer"] = _effective_optimizer_to_tml(t["optimizer"] or {}, emb["optimizer"], path, tpath)
        tables.append(item)
    out: Dict[str, Any] = {"tables": tables}
    if emb["tables_to_log"]:
        out["tables_to_log"] = list(emb["tables_to_log"])
    return out


def _table_to_tml(raw: Mapping[str, Any], key: str, emb: Dict[str, Any], tpath: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The fields both formats' tables share, and the table's resolved values."""
    t = dict(raw)
    if not isinstance(t.get("embedding_dim"), int):  # null, or an older schema's interpolation
        t["embedding_dim"] = emb["embedding_dim"]
    name = t["name"] or key
    _refuse_additions(t, name, tpath)
    item: Dict[str, Any] = {"name": name, "num_embeddings": t["num_embeddings"], "embedding_dim": t["embedding_dim"]}
    snap = t["pretrained"] or {}
    if snap.get("embedding_snapshot_uri") is not None:
        item["pretrained"] = {"emb_name": snap["emb_name"] or name, "embedding_snapshot_uri": snap["embedding_snapshot_uri"]}
    if t["vocab"] is not None:
        item["vocab"] = t["vocab"]
    return item, t


def _refuse_additions(t: Dict[str, Any], name: str, path: str) -> None:
    """Our additions to tml's table have no tml field: only their neutral values convert."""
    checks = (
        ("num_embeddings", t["num_embeddings"] is not None, "null (rows from the vocab)"),
        ("oov_policy", t["oov_policy"] == OovPolicy.error.name, t["oov_policy"]),
        ("oov_buckets", t["oov_buckets"] == 0, t["oov_buckets"]),
        ("pooling", t["pooling"] == PoolingMode.sum.name, t["pooling"]),
        ("feature_names", list(t["feature_names"]) in ([], [name]), t["feature_names"]),
        ("pretrained.allow_partial_rows", not (t["pretrained"] or {}).get("allow_partial_rows"), True),
        ("weight_init_min", t.get("weight_init_min") is None, t.get("weight_init_min")),
        ("weight_init_max", t.get("weight_init_max") is None, t.get("weight_init_max")),
        ("num_embeddings_post_pruning", t.get("num_embeddings_post_pruning") is None, t.get("num_embeddings_post_pruning")),
        ("need_pos", not t.get("need_pos"), t.get("need_pos")),
    )
    for key, ok, value in checks:
        if not ok:
            raise TmlConversionError(f"{path}.{key}", f"is {value!r}; tml has no equivalent")


def _effective_optimizer_to_tml(t: Dict[str, Any], coll: Dict[str, Any], emb_path: str, path: str) -> Dict[str, Any]:
    """A table's effective optimizer (its override over the collection's) as tml's OptimizerConfig.

    Errors name where the value comes from: the table's override, or the collection's.
    """

    def pick(key: str) -> Any:
        return t[key] if t.get(key) is not None else coll[key]

    def where(key: str) -> str:
        return f"{path}.optimizer.{key}" if t.get(key) is not None else f"{emb_path}.optimizer.{key}"

    algorithm, lr = pick("algorithm"), float(pick("init_learning_rate"))
    if algorithm not in _ALGORITHMS:
        raise TmlConversionError(where("algorithm"), f"is {algorithm}; tml has only {', '.join(_ALGORITHMS)}")
    if algorithm != "sgd" and pick("weight_decay") != 0:
        raise TmlConversionError(where("weight_decay"), f"is {pick('weight_decay')!r}; tml's optimizers have no weight decay")
    if algorithm == "sgd":
        body: Dict[str, Any] = {"lr": lr, "momentum": 0.0}
    elif algorithm == "adam":
        body = {"lr": lr, "betas": [float(pick("beta1")), float(pick("beta2"))], "eps": float(pick("eps"))}
    else:
        body = {"lr": lr, "eps": float(pick("eps"))}
    out: Dict[str, Any] = {algorithm: body}
    # A table's own schedule replaces the collection's as a whole (effective_optimizer).
    own = _chosen_schedule(t.get("learning_rate"))
    schedule = _schedule_to_tml(t["learning_rate"] if own else coll["learning_rate"], where("learning_rate"))
    if schedule is not None:
        out["learning_rate"] = schedule
    return out


def _schedule_to_tml(schedule: Mapping[str, Any], path: str) -> Optional[Dict[str, Any]]:
    chosen = {k: v for k, v in schedule.items() if v is not None}
    if len(chosen) > 1:
        raise TmlConversionError(path, f"sets {', '.join(chosen)}; tml allows exactly one schedule")
    if not chosen:
        return None
    (name, value), = chosen.items()
    if name == "constant":
        return {name: float(value)}
    if name == "piecewise_constant":
        return {
            name: {
                "learning_rate_boundaries": [int(b) for b in value["learning_rate_boundaries"]],
                "learning_rate_values": [float(v) for v in value["learning_rate_values"]],
            }
        }
    return {name: {k: (int(v) if k.endswith("_steps") else float(v)) for k, v in value.items()}}
