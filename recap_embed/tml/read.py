"""tml -> ours: read a tml embeddings node (either format) into this library's section dicts."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Type

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recap_embed.config.schema import (
    EMBEDDINGS_KEY,
    LargeEmbeddingsConfig,
    SmallEmbeddingsConfig,
    StratifiersConfig,
)
from recap_embed.tml.formats import (
    SMALL_KEY,
    STRATIFIERS_KEY,
    RECAP_FORMAT,
    COMMON_FORMAT,
    MODEL_KEYS,
    SOURCES,
    LARGE_KEYS,
    TABLE_KEYS,
    COMMON_LARGE_KEYS,
    COMMON_TABLE_KEYS,
    TML_DATA_TYPES,
    SNAPSHOT_KEYS,
    COLLECTION_OPTIMIZER_KEYS,
    OPTIMIZER_KEYS,
    ALGORITHMS,
    ALGORITHM_KEYS,
    TML_SCHEDULES,
    SMALL_KEYS,
    SMALL_TABLE_KEYS,
    STRATIFIER_KEYS,
    TML_ADAM_BETAS,
    TML_ADAM_EPS,
    TML_ADAGRAD_EPS,
    ITEMS,
    TmlConversionError,
    TmlConversion,
)
from recap_embed.tml.checks import (
    join_path,
    index_path,
    as_mapping,
    as_list,
    model_fields,
    one_of,
    named_list,
    table_refs,
    as_name,
    as_str,
    as_float,
    as_int,
    env_interpolation,
)


def from_tml(node: Mapping[str, Any], path: str = "") -> TmlConversion:
    """Convert a tml model node: its `large_embeddings` (recap format) or `embeddings` (common
    format, TwHIN's), `small_embeddings` and `stratifiers`.

    `node` may also be a LargeEmbeddingsConfig of either format itself (it has `tables`, and an
    `optimizer` or a list of tables with `num_embeddings`), or a SmallEmbeddingsConfig (tables
    with `index`). `path` is where `node` sits in its file, so errors name the full dotted path.
    """
    node = as_mapping(node, path)
    if _looks_like_small(node):
        return TmlConversion(small_embeddings=_small(node, path), origin={SMALL_KEY: path or "<root>"})
    if _looks_like_large(node):
        fmt, emb = _large_any(node, path)
        return TmlConversion(embeddings=emb, origin={EMBEDDINGS_KEY: path or "<root>"}, format=fmt)
    conversion = TmlConversion()
    present = [k for k in MODEL_KEYS.values() if node.get(k) is not None]
    if len(present) > 1:
        raise TmlConversionError(
            path,
            f"has both {' and '.join(present)}; a tml model has one embeddings section (large_embeddings in the "
            "recap format, embeddings in the common format): point the key at the one to convert",
        )
    for tml_key in present:
        where = join_path(path, tml_key)
        conversion.format, conversion.embeddings = _large_any(as_mapping(node[tml_key], where), where)
        conversion.origin[EMBEDDINGS_KEY] = where
        if tml_key == MODEL_KEYS[COMMON_FORMAT] and _is_twhin_model(node):
            _check_twhin(node, path)
    for tml_key, ours, convert in (
        ("small_embeddings", SMALL_KEY, _small),
        ("stratifiers", STRATIFIERS_KEY, _stratifiers),
    ):
        value = node.get(tml_key)
        if value is not None:  # tml dumps unset sections as null
            setattr(conversion, ours, convert(value, join_path(path, tml_key)))
            conversion.origin[ours] = join_path(path, tml_key)
    if not conversion.origin:
        raise TmlConversionError(
            path,
            "nothing to convert: no non-null large_embeddings (recap format), embeddings (common format), "
            f"small_embeddings or stratifiers here (keys: {', '.join(map(str, node)) or 'none'}); point the key "
            "at the node that holds them",
        )
    converted = set(MODEL_KEYS.values()) | {SMALL_KEY, STRATIFIERS_KEY}
    conversion.skipped = [join_path(path, k) for k, v in node.items() if k not in converted and v is not None]
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
        join_path(path, "optimizer"),
        "is missing, and no table has an optimizer or data_type: in the recap format (projects/home/recap/embedding) "
        "the collection needs `optimizer` (init_learning_rate, learning_rate); in the common format "
        "(common/modules/embedding, TwHIN's) every table needs `optimizer` and `data_type`",
    )


def _large_any(node: Mapping[str, Any], path: str) -> Tuple[str, Dict[str, Any]]:
    fmt = tml_format(node, path)
    return fmt, (_large(node, path) if fmt == RECAP_FORMAT else _large_common(node, path))


def _large(value: Any, path: str) -> Dict[str, Any]:
    """The recap format: one collection optimizer (FBGEMM exact SGD), tables without their own."""
    node = model_fields(value, path, LARGE_KEYS, required=("tables", "optimizer"))
    tables = named_list(node["tables"], join_path(path, "tables"), _large_table, "table")
    out: Dict[str, Any] = {}
    dims = {t["embedding_dim"] for t in tables.values()}
    if len(dims) == 1:
        # Tables added to the preset later (`embeddings/tables=[...]`) then get the same dim;
        # the converted tables keep theirs explicitly, whatever the collection default becomes.
        out["embedding_dim"] = dims.pop()
    out["optimizer"] = _collection_optimizer(node["optimizer"], join_path(path, "optimizer"))
    out["tables"] = tables
    if "tables_to_log" in node:
        out["tables_to_log"] = table_refs(node["tables_to_log"], join_path(path, "tables_to_log"), tables)
    _check_fits(LargeEmbeddingsConfig, out, path)
    return out


def _large_common(value: Any, path: str) -> Dict[str, Any]:
    """The common format: each table its own optimizer and data type, no collection optimizer.

    The tables' optimizers become full table overrides; the collection keeps the `sgd` option
    (it only applies to tables added to the preset later).
    """
    node = model_fields(value, path, COMMON_LARGE_KEYS, required=("tables",))
    tables = named_list(node["tables"], join_path(path, "tables"), _common_table, "table")
    out: Dict[str, Any] = {}
    dims = {t["embedding_dim"] for t in tables.values()}
    if len(dims) == 1:
        out["embedding_dim"] = dims.pop()
    out["optimizer"] = {"algorithm": "sgd"}
    out["tables"] = tables
    if "tables_to_log" in node:
        out["tables_to_log"] = table_refs(node["tables_to_log"], join_path(path, "tables_to_log"), tables)
    _check_fits(LargeEmbeddingsConfig, out, path)
    return out


def _is_twhin_model(node: Mapping[str, Any]) -> bool:
    """TwHIN's TwhinModelConfig: `embeddings` beside `relations` and `translation_optimizer`."""
    return "relations" in node or "translation_optimizer" in node


def _check_twhin(model: Mapping[str, Any], path: str) -> None:
    """TwHIN's own rules (projects/twhin/models/config.py): one dim and one data type for every
    table (TwhinEmbeddingsConfig), and relations naming tables (TwhinModelConfig)."""
    tables_path = join_path(join_path(path, "embeddings"), "tables")
    tables = as_list(model["embeddings"]["tables"], tables_path)
    first = tables[0]
    for i, table in enumerate(tables[1:], start=1):
        for key, what in (("embedding_dim", "embedding_dim"), ("data_type", "data type")):
            if table.get(key) != first.get(key):
                raise TmlConversionError(
                    join_path(index_path(tables_path, i), key),
                    f"is {table.get(key)!r} but {index_path(tables_path, 0)} has {first.get(key)!r}; TwHIN "
                    f"(projects/twhin/models/config.py) requires every table to have the same {what}",
                )
    names = [str(t["name"]) for t in tables]
    relations_path = join_path(path, "relations")
    for i, relation in enumerate(as_list(model.get("relations") or [], relations_path)):
        rpath = index_path(relations_path, i)
        relation = as_mapping(relation, rpath)
        for side in ("lhs", "rhs"):
            if side not in relation:
                raise TmlConversionError(join_path(rpath, side), "is missing (TwHIN requires it)")
            if str(relation[side]) not in names:
                raise TmlConversionError(
                    join_path(rpath, side),
                    f"{relation[side]!r} is not a table; TwHIN requires each relation's {side} to name one of: {', '.join(names)}",
                )


def _common_table(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = model_fields(value, path, COMMON_TABLE_KEYS, required=("name", "num_embeddings", "embedding_dim", "optimizer", "data_type"))
    name, out = _table_basics(node, path)
    data_type = node["data_type"]
    if data_type not in TML_DATA_TYPES:
        raise TmlConversionError(join_path(path, "data_type"), f"{data_type!r} is not allowed; allowed: {', '.join(TML_DATA_TYPES)}")
    out["data_type"] = str(data_type)
    out["optimizer"] = _table_optimizer(node["optimizer"], join_path(path, "optimizer"))
    return name, out


def _large_table(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = as_mapping(value, path)
    for key in ("optimizer", "data_type"):
        if key in node:
            raise TmlConversionError(
                join_path(path, key),
                f"unknown key in {SOURCES[RECAP_FORMAT]}, whose collection optimizer serves every table; allowed here: "
                f"{', '.join(TABLE_KEYS)} (a table's own optimizer and data_type belong to {SOURCES[COMMON_FORMAT]}, "
                "which has no collection optimizer)",
            )
    node = model_fields(node, path, TABLE_KEYS, required=("name", "num_embeddings", "embedding_dim"))
    return _table_basics(node, path)


def _table_basics(node: Mapping[str, Any], path: str) -> Tuple[str, Dict[str, Any]]:
    """The fields both formats' tables share: name, rows, dim, pretrained, vocab."""
    name = as_name(node["name"], join_path(path, "name"))
    out: Dict[str, Any] = {
        "num_embeddings": as_int(node["num_embeddings"], join_path(path, "num_embeddings"), minimum=1),
        "embedding_dim": as_int(node["embedding_dim"], join_path(path, "embedding_dim"), minimum=1),
    }
    if "pretrained" in node:
        sub = join_path(path, "pretrained")
        snap = model_fields(node["pretrained"], sub, SNAPSHOT_KEYS, required=SNAPSHOT_KEYS)
        out["pretrained"] = {k: env_interpolation(as_str(snap[k], join_path(sub, k))) for k in SNAPSHOT_KEYS}
    if "vocab" in node:
        out["vocab"] = env_interpolation(as_str(node["vocab"], join_path(path, "vocab")))
    return name, out


def _collection_optimizer(value: Any, path: str) -> Dict[str, Any]:
    """tml's EmbeddingOptimizerConfig has no algorithm: FBGEMM exact SGD was implied."""
    node = model_fields(value, path, COLLECTION_OPTIMIZER_KEYS, required=("init_learning_rate",))
    out: Dict[str, Any] = {
        "algorithm": "sgd",
        "init_learning_rate": as_float(node["init_learning_rate"], join_path(path, "init_learning_rate")),
    }
    if "learning_rate" in node:
        out["learning_rate"] = _schedule(node["learning_rate"], join_path(path, "learning_rate"))
    return out


def _table_optimizer(value: Any, path: str) -> Dict[str, Any]:
    """A tml OptimizerConfig (one of sgd/adam/adagrad) as a full TableOptimizerConfig override.

    Hyper-parameters tml leaves at its defaults are written out: ours differ (eps 1e-8).
    """
    node = model_fields(value, path, OPTIMIZER_KEYS)
    algorithm, body = one_of(node, path, ALGORITHMS, "optimizer")
    sub = join_path(path, algorithm)
    params = model_fields(body, sub, ALGORITHM_KEYS[algorithm], required=("lr",))
    out: Dict[str, Any] = {"algorithm": algorithm, "init_learning_rate": as_float(params["lr"], join_path(sub, "lr"))}
    if "learning_rate" in node:
        out["learning_rate"] = _schedule(node["learning_rate"], join_path(path, "learning_rate"))
    if algorithm == "sgd":
        momentum = as_float(params.get("momentum", 0.0), join_path(sub, "momentum"))
        if momentum != 0.0:
            raise TmlConversionError(
                join_path(sub, "momentum"),
                f"is {momentum!r}; FBGEMM's fused SGD has no momentum, so it cannot be converted "
                "(set momentum to 0, or use adam or adagrad)",
            )
    elif algorithm == "adam":
        betas = params.get("betas", list(TML_ADAM_BETAS))
        bpath = join_path(sub, "betas")
        if not isinstance(betas, (list, tuple, ListConfig)) or len(betas) != 2:
            raise TmlConversionError(bpath, f"expected a list of two floats [beta1, beta2], got {betas!r}")
        out["eps"] = as_float(params.get("eps", TML_ADAM_EPS), join_path(sub, "eps"))
        out["beta1"] = as_float(betas[0], index_path(bpath, 0))
        out["beta2"] = as_float(betas[1], index_path(bpath, 1))
    else:
        out["eps"] = as_float(params.get("eps", TML_ADAGRAD_EPS), join_path(sub, "eps"))
    return out


def _schedule(value: Any, path: str) -> Dict[str, Any]:
    """tml's LearningRate one-of; ours has the same shape, so only values are checked."""
    node = model_fields(value, path, TML_SCHEDULES)
    name, body = one_of(node, path, TML_SCHEDULES, "learning-rate schedule")
    sub = join_path(path, name)
    if name == "constant":
        return {name: as_float(body, sub)}
    if name == "linear_ramp_to_constant":
        b = model_fields(body, sub, ("learning_rate", "num_ramp_steps"), required=("learning_rate", "num_ramp_steps"))
        return {
            name: {
                "learning_rate": as_float(b["learning_rate"], join_path(sub, "learning_rate")),
                "num_ramp_steps": as_int(b["num_ramp_steps"], join_path(sub, "num_ramp_steps"), minimum=1),
            }
        }
    if name == "linear_ramp_to_cosine":
        keys = ("learning_rate", "final_learning_rate", "num_ramp_steps", "final_num_steps")
        b = model_fields(body, sub, keys, required=keys)
        return {
            name: {
                "learning_rate": as_float(b["learning_rate"], join_path(sub, "learning_rate")),
                "final_learning_rate": as_float(b["final_learning_rate"], join_path(sub, "final_learning_rate")),
                "num_ramp_steps": as_int(b["num_ramp_steps"], join_path(sub, "num_ramp_steps"), minimum=1),
                "final_num_steps": as_int(b["final_num_steps"], join_path(sub, "final_num_steps"), minimum=1),
            }
        }
    keys = ("learning_rate_boundaries", "learning_rate_values")
    b = model_fields(body, sub, keys, required=keys)
    bounds = [as_int(v, index_path(join_path(sub, keys[0]), i)) for i, v in enumerate(as_list(b[keys[0]], join_path(sub, keys[0])))]
    values = [as_float(v, index_path(join_path(sub, keys[1]), i)) for i, v in enumerate(as_list(b[keys[1]], join_path(sub, keys[1])))]
    if len(values) != len(bounds) + 1:
        raise TmlConversionError(
            join_path(sub, keys[1]),
            f"has {len(values)} values for {len(bounds)} boundaries; a piecewise schedule needs one more value than boundaries",
        )
    return {name: {keys[0]: bounds, keys[1]: values}}


def _small(value: Any, path: str) -> Dict[str, Any]:
    node = model_fields(value, path, SMALL_KEYS, required=("tables",))
    out = {"tables": named_list(node["tables"], join_path(path, "tables"), _small_table, "table")}
    _check_fits(SmallEmbeddingsConfig, out, path)
    return out


def _small_table(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = model_fields(value, path, SMALL_TABLE_KEYS, required=SMALL_TABLE_KEYS)
    return as_name(node["name"], join_path(path, "name")), {
        "num_embeddings": as_int(node["num_embeddings"], join_path(path, "num_embeddings"), minimum=1),
        "embedding_dim": as_int(node["embedding_dim"], join_path(path, "embedding_dim"), minimum=1),
        "index": as_int(node["index"], join_path(path, "index"), minimum=0),
    }


def _stratifiers(value: Any, path: str) -> Dict[str, Any]:
    out = {"strata": named_list(value, path, _stratifier, "stratifier")}
    _check_fits(StratifiersConfig, out, path)
    return out


def _stratifier(value: Any, path: str) -> Tuple[str, Dict[str, Any]]:
    node = model_fields(value, path, STRATIFIER_KEYS, required=STRATIFIER_KEYS)
    return as_name(node["name"], join_path(path, "name")), {
        "index": as_int(node["index"], join_path(path, "index"), minimum=0),
        "value": as_int(node["value"], join_path(path, "value")),
    }


def _check_fits(schema: Type[Any], data: Dict[str, Any], path: str) -> None:
    """The output must merge into our schema, each item into its item type too (the collections
    may be open mappings); interpolations (oc.env) are left unresolved."""
    collection, item_type = ITEMS[schema]
    checks = [(schema, data, path)]
    checks += [(item_type, v, join_path(path, f"{collection}[{k!r}]")) for k, v in data[collection].items()]
    for cls, values, where in checks:
        try:
            OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(cls), values), throw_on_missing=True)
        except OmegaConfBaseException as e:  # a bug in this module rather than in the input
            message = " ".join(str(e).split())
            raise TmlConversionError(where, f"converted values do not fit {cls.__name__}: {message}") from None
