"""Semantic rules of the configs, checked in one place before anything is built.

Types are checked by OmegaConf when a config is composed; what types cannot say (a dim the
fused kernels reject, a schedule whose steps run backwards, an optimizer the device cannot
fuse) is checked here. Every problem names its full config path, the bad value and what is
allowed, and all problems are reported at once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, ConfigValidationError
from .resolve import config_prefix, effective_optimizer, parse_embeddings, resolve_device_type, to_container
from .schema import (
    CPU_ALGORITHMS,
    CPU_SHARDING_TYPES,
    EMBEDDINGS_KEY,
    SCHEDULE_NAMES,
    EmbeddingOptimizerConfig,
    LargeEmbeddingsConfig,
    LearningRate,
    OovPolicy,
    ShardingConfig,
    ShardingType,
    SmallEmbeddingsConfig,
    StratifiersConfig,
)

MISSING_VALUE = "???"

#: Sections a root config may hold, with their schema.
SECTIONS = {
    EMBEDDINGS_KEY: LargeEmbeddingsConfig,
    "small_embeddings": SmallEmbeddingsConfig,
    "stratifiers": StratifiersConfig,
    "sharding": ShardingConfig,
}


class _Problems:
    def __init__(self) -> None:
        self.items: List[Tuple[str, str]] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append((path, msg))

    def extend(self, items: Iterable[Tuple[str, str]]) -> None:
        self.items.extend(items)


def validate(
    cfg: Any,
    *,
    device: Optional[str] = None,
    num_discrete_features: Optional[int] = None,
) -> None:
    """Check every semantic rule; raise ConfigValidationError listing all problems.

    `cfg` is an app's root config (any of `embeddings`, `small_embeddings`, `stratifiers`,
    `sharding`) or one of those sections alone, as a DictConfig or dataclass. `device` is the
    target device (default: `sharding.device`, else `auto`); `num_discrete_features` is the
    width of the data's discrete-feature tensor, when known.
    """
    problems = _Problems()
    sections = _sections(cfg)
    sharding = sections.get("sharding", (None, None))[1]
    device_type = resolve_device_type(device or (sharding or {}).get("device") or "auto")
    table_keys: Optional[set] = None
    for section, (path, values) in sections.items():
        if section == EMBEDDINGS_KEY:
            table_keys = _check_embeddings(values, path, device_type, problems)
        elif section == "small_embeddings":
            _check_small(values, path, num_discrete_features, problems)
        elif section == "stratifiers":
            _check_strata(values, path, num_discrete_features, problems)
    if "sharding" in sections:
        path, values = sections["sharding"]
        _check_sharding(values, path, device_type, table_keys, problems)
    if problems.items:
        raise ConfigValidationError(problems.items)


def _sections(cfg: Any) -> Dict[str, Tuple[str, Any]]:
    """{section: (config path, values)} for a root config or a single section.

    Values are plain dicts, except the embeddings node, which `parse_embeddings` reads itself.
    """
    if not isinstance(cfg, (DictConfig, Mapping)):
        cfg = OmegaConf.structured(cfg)

    def values(section: str, node: Any) -> Any:
        return node if section == EMBEDDINGS_KEY else to_container(node, SECTIONS[section])

    typ = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else dict
    for section, schema in SECTIONS.items():
        if typ is schema:
            return {section: (config_prefix(cfg, section), values(section, cfg))}
    found = {}
    for section in SECTIONS:
        if section in cfg and cfg[section] is not None:
            node = cfg[section]
            found[section] = (config_prefix(node, section), values(section, node))
    if not found:
        # A bare mapping that is one section: recognise it by its keys.
        keys = set(cfg)
        for section, schema in SECTIONS.items():
            if keys and keys <= set(schema.__dataclass_fields__):
                return {section: (section, values(section, cfg))}
        raise ConfigError(
            f"nothing to validate: expected a root config with any of {sorted(SECTIONS)} "
            f"or one of those sections, got keys {sorted(keys)}"
        )
    return found


def _is_missing(value: Any) -> bool:
    return value == MISSING_VALUE


def _check_positive_int(value: Any, path: str, what: str, problems: _Problems) -> bool:
    if _is_missing(value):
        problems.add(path, f"missing; set {what} (a positive integer)")
        return False
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.add(path, f"{value!r} is not allowed; {what} must be a positive integer")
        return False
    return True


def _check_embeddings(emb: Any, prefix: str, device_type: str, problems: _Problems) -> set:
    """Check the large tables; returns the table keys for the sharding checks."""
    parse_problems: List[Tuple[str, str]] = []
    values, collection_opt, tables = parse_embeddings(emb, prefix, parse_problems)
    problems.extend(parse_problems)
    raw_tables = values.get("tables") or {}
    _check_dim(values.get("embedding_dim"), f"{prefix}.embedding_dim", problems)
    if collection_opt is not None:
        _check_optimizer(collection_opt, f"{prefix}.optimizer", device_type, problems)

    names: Dict[str, List[str]] = defaultdict(list)
    features: Dict[str, List[str]] = defaultdict(list)
    for key, table in tables.items():
        path = f"{prefix}.tables.{key}"
        name = table.name or key
        names[name].append(key)
        for feature in table.feature_names or [name]:
            features[feature].append(key)
        if table.num_embeddings is None:
            if not table.vocab:
                problems.add(
                    f"{path}.num_embeddings",
                    "is not set, which derives the rows from `vocab`, but the table has no vocab; "
                    "set num_embeddings (a positive integer) or vocab",
                )
        else:
            _check_positive_int(table.num_embeddings, f"{path}.num_embeddings", "num_embeddings", problems)
        if table.embedding_dim is not None:
            _check_dim(table.embedding_dim, f"{path}.embedding_dim", problems)
        pre = table.pretrained
        if pre is not None:
            if not pre.embedding_snapshot_uri.strip():
                problems.add(f"{path}.pretrained.embedding_snapshot_uri", "is empty; set the path or URI of a torchsnapshot (or remove `pretrained` for no warm start)")
            if pre.emb_name is not None and not pre.emb_name.strip():
                problems.add(f"{path}.pretrained.emb_name", "is empty; set the table's name inside the snapshot (null: the table's own name)")
        if table.vocab is not None and not table.vocab.strip():
            problems.add(f"{path}.vocab", "is empty; set a directory of parquet files, or null for raw row ids")
        if table.oov_buckets < 0:
            problems.add(f"{path}.oov_buckets", f"{table.oov_buckets!r} is not allowed; use a non-negative integer")
        elif table.oov_policy == OovPolicy.hash and table.oov_buckets == 0:
            problems.add(f"{path}.oov_buckets", "is 0 but oov_policy is hash; set oov_buckets > 0 (extra rows unknown ids hash into)")
        override = table.optimizer
        if override is not None and collection_opt is not None:
            if override.learning_rate is not None:
                _check_schedule(override.learning_rate, f"{path}.optimizer.learning_rate", problems)
            # Report only what the table itself sets; inherited values are reported once, above.
            own = _Problems()
            _check_optimizer(effective_optimizer(collection_opt, override), f"{path}.optimizer", device_type, own, schedule=False)
            for bad_path, msg in own.items:
                if getattr(override, bad_path.rsplit(".", 1)[-1], None) is not None:
                    problems.add(bad_path, msg)

    for name, keys in names.items():
        if len(keys) > 1:
            problems.add(f"{prefix}.tables", f"table name {name!r} is used by {len(keys)} tables ({', '.join(keys)}); table names must be unique")
    for feature, keys in features.items():
        if len(keys) > 1:
            problems.add(f"{prefix}.tables", f"feature {feature!r} is read by {len(keys)} tables ({', '.join(keys)}); each feature feeds one table")
    for i, logged in enumerate(values.get("tables_to_log") or []):
        if logged not in raw_tables and logged not in names:
            problems.add(f"{prefix}.tables_to_log[{i}]", f"{logged!r} is not a table; allowed: {', '.join(sorted(raw_tables)) or 'none (no tables)'}")
    return set(raw_tables)


def _check_dim(dim: Any, path: str, problems: _Problems) -> None:
    if not _check_positive_int(dim, path, "embedding_dim", problems):
        return
    if dim % 4:
        problems.add(path, f"{dim} is not a multiple of 4; allowed: positive multiples of 4 (FBGEMM fused kernels need embedding_dim % 4 == 0)")


def _check_optimizer(
    opt: EmbeddingOptimizerConfig, path: str, device_type: str, problems: _Problems, schedule: bool = True
) -> None:
    lr = opt.init_learning_rate
    if _is_missing(lr) or not isinstance(lr, (int, float)) or lr < 0:
        problems.add(f"{path}.init_learning_rate", f"{lr!r} is not allowed; use a learning rate >= 0")
    for hp in ("eps", "weight_decay"):
        value = getattr(opt, hp)
        if isinstance(value, (int, float)) and value < 0:
            problems.add(f"{path}.{hp}", f"{value!r} is not allowed; use a value >= 0")
    for hp in ("beta1", "beta2"):
        value = getattr(opt, hp)
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            problems.add(f"{path}.{hp}", f"{value!r} is not allowed; use a value in [0, 1)")
    if device_type == "cpu" and opt.algorithm not in CPU_ALGORITHMS:
        allowed = ", ".join(sorted(a.name for a in CPU_ALGORITHMS))
        problems.add(
            f"{path}.algorithm",
            f"{opt.algorithm.name} cannot be fused on CPU; allowed on CPU: {allowed} "
            f"(adam, partial_rowwise_adam and lamb need CUDA)",
        )
    if schedule:
        _check_schedule(opt.learning_rate, f"{path}.learning_rate", problems)


def _check_schedule(lr: LearningRate, path: str, problems: _Problems) -> None:
    chosen = [name for name in SCHEDULE_NAMES if getattr(lr, name) is not None]
    if len(chosen) > 1:
        problems.add(path, f"sets {len(chosen)} schedules ({', '.join(chosen)}); choose one (set the others to null, or use the embeddings/lr group)")
    if lr.constant is not None:
        _check_rate(lr.constant, f"{path}.constant", problems)
    if lr.linear_ramp_to_constant is not None:
        s, p = lr.linear_ramp_to_constant, f"{path}.linear_ramp_to_constant"
        _check_rate(s.learning_rate, f"{p}.learning_rate", problems)
        _check_positive_int(s.num_ramp_steps, f"{p}.num_ramp_steps", "num_ramp_steps", problems)
    if lr.linear_ramp_to_cosine is not None:
        s, p = lr.linear_ramp_to_cosine, f"{path}.linear_ramp_to_cosine"
        _check_rate(s.learning_rate, f"{p}.learning_rate", problems)
        _check_rate(s.final_learning_rate, f"{p}.final_learning_rate", problems)
        ok = _check_positive_int(s.num_ramp_steps, f"{p}.num_ramp_steps", "num_ramp_steps", problems)
        ok &= _check_positive_int(s.final_num_steps, f"{p}.final_num_steps", "final_num_steps", problems)
        if ok and s.num_ramp_steps >= s.final_num_steps:
            problems.add(f"{p}.num_ramp_steps", f"{s.num_ramp_steps} is not below final_num_steps ({s.final_num_steps}); the ramp must end before the decay does")
    if lr.piecewise_constant is not None:
        s, p = lr.piecewise_constant, f"{path}.piecewise_constant"
        bounds, values = s.learning_rate_boundaries, s.learning_rate_values
        if _is_missing(bounds) or _is_missing(values):
            problems.add(p, "needs learning_rate_boundaries and learning_rate_values")
            return
        if any(b >= a for b, a in zip(bounds, bounds[1:])) or any(b < 0 for b in bounds):
            problems.add(f"{p}.learning_rate_boundaries", f"{list(bounds)} is not allowed; boundaries must be non-negative steps in strictly increasing order")
        if len(values) != len(bounds) + 1:
            problems.add(f"{p}.learning_rate_values", f"has {len(values)} values for {len(bounds)} boundaries; give exactly {len(bounds) + 1} (one more than the boundaries)")
        for i, v in enumerate(values):
            _check_rate(v, f"{p}.learning_rate_values[{i}]", problems)


def _check_rate(value: Any, path: str, problems: _Problems) -> None:
    if _is_missing(value) or not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        problems.add(path, f"{value!r} is not allowed; use a learning rate >= 0")


def _check_indices(
    items: Dict[str, Any], prefix: str, width: Optional[int], what: str, problems: _Problems
) -> None:
    names: Dict[str, List[str]] = defaultdict(list)
    for key, item in items.items():
        path = f"{prefix}.{key}"
        names[item.get("name") or key].append(key)
        index = item.get("index")
        if _is_missing(index):
            problems.add(f"{path}.index", "missing; set the column of the discrete-feature tensor")
        elif not isinstance(index, int) or index < 0:
            problems.add(f"{path}.index", f"{index!r} is not allowed; use a column index >= 0")
        elif width is not None and index >= width:
            problems.add(f"{path}.index", f"{index} is beyond the data's {width} discrete features; allowed: 0..{width - 1}")
    for name, keys in names.items():
        if len(keys) > 1:
            problems.add(prefix, f"{what} name {name!r} is used {len(keys)} times ({', '.join(keys)}); names must be unique")


def _check_small(small: Dict[str, Any], prefix: str, width: Optional[int], problems: _Problems) -> None:
    tables = small.get("tables") or {}
    _check_indices(tables, f"{prefix}.tables", width, "small table", problems)
    for key, table in tables.items():
        path = f"{prefix}.tables.{key}"
        _check_positive_int(table.get("num_embeddings"), f"{path}.num_embeddings", "num_embeddings", problems)
        _check_positive_int(table.get("embedding_dim"), f"{path}.embedding_dim", "embedding_dim", problems)


def _check_strata(strata: Dict[str, Any], prefix: str, width: Optional[int], problems: _Problems) -> None:
    items = strata.get("strata") or {}
    _check_indices(items, f"{prefix}.strata", width, "stratifier", problems)
    for key, item in items.items():
        if _is_missing(item.get("value")):
            problems.add(f"{prefix}.strata.{key}.value", "missing; set the discrete value that selects the stratum")


def _check_sharding(
    sharding: Dict[str, Any], prefix: str, device_type: str, table_keys: Optional[set], problems: _Problems
) -> None:
    device = str(sharding.get("device", "auto"))
    if device_type not in ("cpu", "cuda", "meta"):
        problems.add(f"{prefix}.device", f"{device!r} is not a device; allowed: auto, cpu, cuda, cuda:N")
    _check_positive_int(sharding.get("batch_size"), f"{prefix}.batch_size", "batch_size", problems)
    for cap in ("hbm_cap_gb", "ddr_cap_gb"):
        value = sharding.get(cap)
        if value is not None and value <= 0:
            problems.add(f"{prefix}.{cap}", f"{value!r} is not allowed; use a positive size in GB, or null for the device's")

    def check_types(types: Iterable[ShardingType], path: str) -> None:
        if device_type != "cuda":
            for i, t in enumerate(types):
                if t not in CPU_SHARDING_TYPES:
                    allowed = ", ".join(sorted(s.name for s in CPU_SHARDING_TYPES))
                    problems.add(f"{path}[{i}]" if path.endswith("types") else path, f"{t.name} needs CUDA (gloo on CPU lacks reduce_scatter); allowed on CPU: {allowed}")

    check_types(sharding.get("sharding_types") or [], f"{prefix}.sharding_types")
    for key, constraint in (sharding.get("tables") or {}).items():
        path = f"{prefix}.tables.{key}"
        if table_keys is not None and key not in table_keys:
            problems.add(path, f"constrains {key!r}, which is not a table; tables: {sorted(table_keys)}")
        check_types(constraint.get("sharding_types") or [], f"{path}.sharding_types")
        factor = constraint.get("cache_load_factor")
        if factor is not None and not 0 < factor <= 1:
            problems.add(f"{path}.cache_load_factor", f"{factor!r} is not allowed; use a share of rows in (0, 1]")
    for key, placement in (sharding.get("plan") or {}).items():
        path = f"{prefix}.plan.{key}"
        if table_keys is not None and key not in table_keys:
            problems.add(path, f"places {key!r}, which is not a table; tables: {sorted(table_keys)}")
        stype = placement.get("sharding_type")
        if isinstance(stype, ShardingType):
            check_types([stype], f"{path}.sharding_type")
