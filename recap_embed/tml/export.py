"""ours -> tml: write a composed config back in tml's recap or common format (`to_tml`)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recap_embed.config.resolve import to_container
from recap_embed.config.schema import (
    EMBEDDINGS_KEY,
    INHERITED_OPTIMIZER_FIELDS,
    LargeEmbeddingsConfig,
    OovPolicy,
    PoolingMode,
    SmallEmbeddingsConfig,
    StratifiersConfig,
    TableOptimizerConfig,
)
from recap_embed.tml.formats import (
    SMALL_KEY,
    STRATIFIERS_KEY,
    RECAP_FORMAT,
    COMMON_FORMAT,
    MODEL_KEYS,
    TML_DATA_TYPES,
    ALGORITHMS,
    ITEMS,
    TmlConversionError,
    TmlConversion,
)
from recap_embed.tml.checks import join_path


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
            out[MODEL_KEYS[RECAP_FORMAT]] = _large_to_tml(emb, EMBEDDINGS_KEY)
        else:
            out[MODEL_KEYS[COMMON_FORMAT]] = _common_to_tml(emb, EMBEDDINGS_KEY)
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
    collection, item_type = ITEMS[schema]
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
    return key if key == path or key.startswith(path + ".") else join_path(path, key) if key else path


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
        if t["data_type"] not in TML_DATA_TYPES:
            raise TmlConversionError(f"{tpath}.data_type", f"is {t['data_type']}; tml's data types are {', '.join(TML_DATA_TYPES)}")
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
    if algorithm not in ALGORITHMS:
        raise TmlConversionError(where("algorithm"), f"is {algorithm}; tml has only {', '.join(ALGORITHMS)}")
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
