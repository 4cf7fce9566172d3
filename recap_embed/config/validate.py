"""Semantic rules of the configs, checked in one place before anything is built.

Types of the collection-level fields are checked by OmegaConf when a config is composed;
keyed collections (tables, strata, per-table placement) are checked here field by field, and
so is what types cannot say (a dim the fused kernels reject, a schedule whose steps run
backwards, an optimizer the device cannot fuse). Every problem names its full config path,
the bad value and what is allowed, and all problems are reported at once.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from enum import Enum
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from .convert import Problems
from .errors import ConfigError, ConfigValidationError
from .resolve import (
    ParsedConfig,
    config_prefix,
    effective_optimizer,
    embeddings_spec,
    parse_section,
    resolve_device_type,
    small_table_specs,
    stratum_specs,
)
from .schema import (
    CPU_ALGORITHMS,
    CPU_COMPUTE_KERNELS,
    INHERITED_OPTIMIZER_FIELDS,
    CPU_SHARDING_TYPES,
    EMBEDDINGS_KEY,
    SCHEDULE_NAMES,
    DataType,
    EmbeddingBagConfig,
    EmbeddingOptimizerConfig,
    LargeEmbeddingsConfig,
    LearningRate,
    OptimizerAlgorithm,
    OovPolicy,
    ShardingConfig,
    ShardingType,
    SmallEmbeddingsConfig,
    StratifiersConfig,
)
from .store import SECTIONS



class ConfigWarning(UserWarning):
    """A setting that is valid but has no effect (e.g. a collection optimizer every table overrides)."""


def validate(
    cfg: Any,
    *,
    device: Optional[str] = None,
    num_discrete_features: Optional[int] = None,
    path: Optional[str] = None,
    section: Optional[str] = None,
) -> ParsedConfig:
    """Check every rule and return the typed result; raise ConfigValidationError listing all problems.

    `cfg` is an app's root config (any of `embeddings`, `small_embeddings`, `stratifiers`,
    `sharding`) or one of those sections alone, as a DictConfig, dict or dataclass. `device`
    is the target device (default: `sharding.device`, else `auto`); `num_discrete_features`
    is the width of the data's discrete-feature tensor, when known; `path` is where a single
    section lives in its app's config, for messages (default: found from the node, or the
    section's name); `section` names the section `cfg` is, when its keys could fit several
    (a bare ``{"tables": ...}``).

    The returned `ParsedConfig` is what the builders take, so a config is parsed once. Settings
    that have no effect are reported as `ConfigWarning`s.
    """
    problems: Problems = []
    sections = {
        name: (where, parse_section(node, SECTIONS[name], where, problems))
        for name, (where, node) in _sections(cfg, path, section).items()
    }
    sharding: Optional[ShardingConfig] = sections.get("sharding", ("", None))[1]
    device_type = resolve_device_type(device or (sharding.device if sharding else "auto"))
    parsed: Dict[str, Any] = {"device_type": device_type}
    table_keys: Optional[set] = None
    emb_path, embeddings = sections.get(EMBEDDINGS_KEY, ("", None))
    if embeddings is not None:
        table_keys = set(embeddings.tables)
        _check_embeddings(embeddings, emb_path, device_type, problems)
        parsed["embeddings"] = embeddings_spec(embeddings, emb_path)
    small_path, small = sections.get("small_embeddings", ("", None))
    if small is not None:
        _check_small(small, small_path, num_discrete_features, problems)
        parsed.update(small_embeddings=small_table_specs(small, small_path), small_embeddings_path=small_path)
    strata_path, strata = sections.get("stratifiers", ("", None))
    if strata is not None:
        _check_strata(strata, strata_path, num_discrete_features, problems)
        parsed.update(stratifiers=stratum_specs(strata, strata_path), stratifiers_path=strata_path)
    sharding_path, sharding = sections.get("sharding", ("", None))
    if sharding is not None:
        _check_sharding(sharding, sharding_path, device_type, table_keys, problems)
        parsed.update(sharding=sharding, sharding_path=sharding_path)
    if problems:
        raise ConfigValidationError(problems)
    if embeddings is not None:
        for message in shadowed_settings(embeddings, emb_path):
            warnings.warn(message, ConfigWarning, stacklevel=2)
    return ParsedConfig(**parsed)


def check_device(parsed: ParsedConfig, device_type: str) -> None:
    """The rules that depend on the device, for a config parsed for another one (e.g. meta).

    Raises ConfigValidationError; a no-op when `parsed` was checked for `device_type` already.
    """
    if parsed.device_type == device_type:
        return
    problems: Problems = []
    if parsed.embeddings is not None:
        _check_optimizer_device(parsed.embeddings.optimizer, f"{parsed.embeddings.path}.optimizer", device_type, problems)
        for spec in parsed.embeddings.tables:
            _check_data_type_device(spec.data_type, f"{spec.path}.data_type", device_type, problems)
            if spec.optimizer.algorithm != parsed.embeddings.optimizer.algorithm:
                _check_optimizer_device(spec.optimizer, f"{spec.path}.optimizer", device_type, problems)
    if parsed.sharding is not None:
        keys = {s.key for s in parsed.embeddings.tables} if parsed.embeddings is not None else None
        _check_sharding(parsed.sharding, parsed.sharding_path, device_type, keys, problems)
    if problems:
        raise ConfigValidationError(problems)


def shadowed_settings(emb: LargeEmbeddingsConfig, prefix: str) -> List[str]:
    """Messages for collection optimizer settings that no table uses, and table rates a schedule hides."""
    if not emb.tables:
        return []
    out = []
    collection = emb.optimizer
    keys = list(emb.tables)
    for name in INHERITED_OPTIMIZER_FIELDS:
        mine = getattr(collection, name)
        if all(getattr(t.optimizer, name) != mine for t in emb.tables.values()):
            out.append(
                f"{prefix}.optimizer.{name}={_show(mine)} has no effect: every table sets its own "
                f"({', '.join(f'{k}={_show(getattr(emb.tables[k].optimizer, name))}' for k in keys)})"
            )
    if _has_schedule(collection.learning_rate) and all(
        t.optimizer.learning_rate is not None and t.optimizer.learning_rate != collection.learning_rate for t in emb.tables.values()
    ):
        out.append(
            f"{prefix}.optimizer.learning_rate ({_schedule_name(collection.learning_rate)}) has no effect: every "
            f"table sets its own schedule ({', '.join(f'{k}: {_schedule_name(emb.tables[k].optimizer.learning_rate)}' for k in keys)})"
        )
    if _has_schedule(collection.learning_rate):
        hidden = [
            k for k, t in emb.tables.items()
            if t.optimizer.learning_rate is None and t.optimizer.init_learning_rate != collection.init_learning_rate
        ]
        if hidden:
            out.append(
                f"{prefix}.tables.{{{','.join(hidden)}}}.optimizer.init_learning_rate has no effect after the first "
                f"step: those tables follow the collection's schedule ({prefix}.optimizer.learning_rate, "
                f"{_schedule_name(collection.learning_rate)}); give them their own with "
                f"+embeddings/lr@{prefix}.tables.<table>.optimizer.learning_rate=constant"
            )
    return out


def _show(value: Any) -> str:
    return value.name if isinstance(value, Enum) else repr(value)


def _has_schedule(lr: Optional[LearningRate]) -> bool:
    return lr is not None and any(getattr(lr, n) is not None for n in SCHEDULE_NAMES)


def _schedule_name(lr: LearningRate) -> str:
    return next((n for n in SCHEDULE_NAMES if getattr(lr, n) is not None), "none")


def _sections(cfg: Any, path: Optional[str] = None, section: Optional[str] = None) -> Dict[str, Tuple[str, Any]]:
    """{section: (config path, node)} for a root config or a single section."""
    if section is not None:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        return {section: (path or config_prefix(cfg, section), cfg)}
    typ = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else type(cfg)
    for section, schema in SECTIONS.items():
        if typ is schema:
            return {section: (path or config_prefix(cfg, section), cfg)}
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise ConfigError(f"nothing to validate: {type(cfg).__name__} is not a config section or a root config")
    found = {
        section: (config_prefix(cfg[section], section), cfg[section])
        for section in SECTIONS
        if section in cfg and cfg[section] is not None
    }
    if found:
        return found
    # A bare mapping that is one section: recognise it by its keys, if only one section fits.
    keys = set(cfg)
    fits = [section for section, schema in SECTIONS.items() if keys and keys <= set(schema.__dataclass_fields__)]
    if len(fits) == 1:
        return {fits[0]: (path or fits[0], cfg)}
    if len(fits) > 1:
        raise ConfigError(
            f"cannot tell which section {sorted(keys)} is (it fits {', '.join(fits)}); "
            f"pass it by name, e.g. validate({{{fits[-1]!r}: section}}), or as a typed config"
        )
    raise ConfigError(
        f"nothing to validate: expected a root config with any of {sorted(SECTIONS)} "
        f"or one of those sections, got keys {sorted(keys)}"
    )


def _same(a: Any, b: Any) -> bool:
    """Equal, counting nan as equal to nan (a table inheriting a nan rate has the collection's value)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _positive_int(value: Any, path: str, what: str, problems: Problems) -> bool:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append((path, f"{value!r} is not allowed; {what} must be a positive integer"))
        return False
    return True


def _check_dim(dim: Any, path: str, problems: Problems) -> None:
    if _positive_int(dim, path, "embedding_dim", problems) and dim % 4:
        problems.append((path, f"{dim} is not a multiple of 4; allowed: positive multiples of 4 (FBGEMM fused kernels need embedding_dim % 4 == 0)"))


def _check_embeddings(emb: LargeEmbeddingsConfig, prefix: str, device_type: str, problems: Problems) -> None:
    _check_dim(emb.embedding_dim, f"{prefix}.embedding_dim", problems)
    _check_optimizer(emb.optimizer, f"{prefix}.optimizer", device_type, problems)
    names: Dict[str, List[str]] = defaultdict(list)
    features: Dict[str, List[str]] = defaultdict(list)
    for key, table in emb.tables.items():
        path = f"{prefix}.tables.{key}"
        name = table.name or key
        names[name].append(key)
        for feature in table.feature_names or [name]:
            features[feature].append(key)
        _check_torchrec_fields(table, path, device_type, problems)
        if table.num_embeddings is None:
            if not table.vocab:
                problems.append((f"{path}.num_embeddings", "is not set, which derives the rows from `vocab`, but the table has no vocab; set num_embeddings (a positive integer) or vocab"))
        else:
            _positive_int(table.num_embeddings, f"{path}.num_embeddings", "num_embeddings", problems)
        if table.embedding_dim is not None and not _same(table.embedding_dim, emb.embedding_dim):
            _check_dim(table.embedding_dim, f"{path}.embedding_dim", problems)  # an inherited dim: reported above
        pre = table.pretrained
        if pre is not None and pre.embedding_snapshot_uri is None:
            if pre.emb_name is not None or pre.allow_partial_rows:
                problems.append((f"{path}.pretrained.embedding_snapshot_uri", "is not set, so emb_name and allow_partial_rows have no effect; set the snapshot's path or URI, or leave pretrained unset"))
        elif pre is not None:
            if not pre.embedding_snapshot_uri.strip():
                problems.append((f"{path}.pretrained.embedding_snapshot_uri", "is empty; set the path or URI of a torchsnapshot (or remove `pretrained` for no warm start)"))
            if pre.emb_name is not None and not pre.emb_name.strip():
                problems.append((f"{path}.pretrained.emb_name", "is empty; set the table's name inside the snapshot (null: the table's own name)"))
        if table.vocab is not None and not table.vocab.strip():
            problems.append((f"{path}.vocab", "is empty; set a directory of parquet files, or null for raw row ids"))
        if table.oov_buckets < 0:
            problems.append((f"{path}.oov_buckets", f"{table.oov_buckets!r} is not allowed; use a non-negative integer"))
        elif table.oov_policy == OovPolicy.hash and table.oov_buckets == 0:
            problems.append((f"{path}.oov_buckets", "is 0 but oov_policy is hash; set oov_buckets > 0 (extra rows unknown ids hash into)"))
        own = table.optimizer
        if own.learning_rate is not None:
            _check_schedule(own.learning_rate, f"{path}.optimizer.learning_rate", problems)
        # Report only what the table sets itself; inherited values are reported once, above.
        mine: Problems = []
        _check_optimizer(effective_optimizer(emb.optimizer, own), f"{path}.optimizer", device_type, mine, schedule=False)
        problems.extend(
            p for p in mine
            if not _same(getattr(own, p[0].rsplit(".", 1)[-1], None), getattr(emb.optimizer, p[0].rsplit(".", 1)[-1], None))
        )
        inherited = effective_optimizer(emb.optimizer, own)
        if (own.algorithm != emb.optimizer.algorithm and inherited.algorithm == OptimizerAlgorithm.sgd
                and own.weight_decay == emb.optimizer.weight_decay and _finite(inherited.weight_decay) and inherited.weight_decay > 0):
            problems.append((f"{path}.optimizer.algorithm", f"sgd would ignore the weight_decay {inherited.weight_decay!r} it inherits from {prefix}.optimizer; set {path}.optimizer.weight_decay=0 or use adagrad or rowwise_adagrad"))
    for name, keys in names.items():
        if len(keys) > 1:
            problems.append((f"{prefix}.tables", f"table name {name!r} is used by {len(keys)} tables ({', '.join(keys)}); table names must be unique"))
    _check_shared_features(emb, prefix, features, problems)
    for i, logged in enumerate(emb.tables_to_log):
        if logged not in emb.tables and logged not in names:
            problems.append((f"{prefix}.tables_to_log[{i}]", f"{logged!r} is not a table; allowed: {', '.join(sorted(emb.tables)) or 'none (no tables)'}"))


def _check_torchrec_fields(table: EmbeddingBagConfig, path: str, device_type: str, problems: Problems) -> None:
    """Data type for the device, the initial weight range and the pruned rows (torchrec's fields)."""
    _check_data_type_device(table.data_type, f"{path}.data_type", device_type, problems)
    rows = table.num_embeddings if isinstance(table.num_embeddings, int) and table.num_embeddings > 0 else None
    bounds = {"weight_init_min": table.weight_init_min, "weight_init_max": table.weight_init_max}
    finite = True
    for field_name, value in bounds.items():
        if value is not None and not math.isfinite(value):
            problems.append((f"{path}.{field_name}", f"{value!r} is not allowed; use a finite number (null: torchrec's default, +-sqrt(1/rows))"))
            finite = False
    low, high = table.weight_init_min, table.weight_init_max
    if rows is not None:  # torchrec's defaults for an unset end
        low = -math.sqrt(1 / rows) if low is None else low
        high = math.sqrt(1 / rows) if high is None else high
    if finite and low is not None and high is not None and low > high:
        culprit = "weight_init_min" if table.weight_init_min is not None else "weight_init_max"
        problems.append((f"{path}.{culprit}", f"{bounds[culprit]!r} makes the initial range [{low:g}, {high:g}] empty; allowed: weight_init_min <= weight_init_max (an unset end is torchrec's +-sqrt(1/rows))"))
    pruned = table.num_embeddings_post_pruning
    if pruned is not None and _positive_int(pruned, f"{path}.num_embeddings_post_pruning", "num_embeddings_post_pruning", problems):
        if rows is not None and pruned > rows:
            problems.append((f"{path}.num_embeddings_post_pruning", f"{pruned} is more than the table's {rows} rows; allowed: 1..{rows} (null: no pruning)"))


def _check_data_type_device(data_type: DataType, path: str, device_type: str, problems: Problems) -> None:
    """The one rule for the data types a device can store."""
    if device_type == "cpu" and data_type == DataType.bf16:
        problems.append((path, "bf16 needs CUDA (FBGEMM's CPU kernels have no bf16 lookup); allowed on CPU: fp32, fp16"))


def _check_shared_features(emb: LargeEmbeddingsConfig, prefix: str, features: Dict[str, List[str]], problems: Problems) -> None:
    """A feature may feed several tables (torchrec names their outputs `feature@table`), but
    not one table twice, and all its tables must map raw ids to rows the same way: a batch
    carries one set of ids per feature, mapped once."""
    for feature, keys in features.items():
        for key in sorted(set(keys)):
            if keys.count(key) > 1:
                problems.append((f"{prefix}.tables.{key}.feature_names", f"lists {feature!r} {keys.count(key)} times; list each feature once per table"))
        readers = list(dict.fromkeys(keys))
        if len(readers) < 2:
            continue
        first = emb.tables[readers[0]]
        for key in readers[1:]:
            table = emb.tables[key]
            if (table.vocab, table.oov_policy, table.oov_buckets) != (first.vocab, first.oov_policy, first.oov_buckets):
                problems.append((
                    f"{prefix}.tables.{key}.vocab",
                    f"feature {feature!r} is also read by table {readers[0]!r}, with vocab {first.vocab!r} "
                    f"(oov_policy {first.oov_policy.name}, oov_buckets {first.oov_buckets}), but here vocab {table.vocab!r} "
                    f"(oov_policy {table.oov_policy.name}, oov_buckets {table.oov_buckets}); tables sharing a feature must map "
                    f"its ids the same way (one vocab, oov_policy and oov_buckets), or read features of their own",
                ))


def _check_optimizer(opt: EmbeddingOptimizerConfig, path: str, device_type: str, problems: Problems, schedule: bool = True) -> None:
    if not _finite(opt.init_learning_rate) or opt.init_learning_rate < 0:
        problems.append((f"{path}.init_learning_rate", f"{opt.init_learning_rate!r} is not allowed; use a finite learning rate >= 0"))
    for hp in ("eps", "weight_decay"):
        if not _finite(getattr(opt, hp)) or getattr(opt, hp) < 0:
            problems.append((f"{path}.{hp}", f"{getattr(opt, hp)!r} is not allowed; use a finite value >= 0"))
    if opt.algorithm == OptimizerAlgorithm.sgd and _finite(opt.weight_decay) and opt.weight_decay > 0:
        problems.append((f"{path}.weight_decay", f"{opt.weight_decay!r} has no effect with sgd (FBGEMM's fused SGD has no weight decay); set 0, or use adagrad or rowwise_adagrad"))
    for hp in ("beta1", "beta2"):
        if not _finite(getattr(opt, hp)) or not 0 <= getattr(opt, hp) < 1:
            problems.append((f"{path}.{hp}", f"{getattr(opt, hp)!r} is not allowed; use a value in [0, 1)"))
    _check_optimizer_device(opt, path, device_type, problems)
    if schedule:
        _check_schedule(opt.learning_rate, f"{path}.learning_rate", problems)


def _check_optimizer_device(opt: EmbeddingOptimizerConfig, path: str, device_type: str, problems: Problems) -> None:
    """The one rule for what a device can fuse."""
    if device_type == "cpu" and opt.algorithm not in CPU_ALGORITHMS:
        allowed = ", ".join(sorted(a.name for a in CPU_ALGORITHMS))
        problems.append((f"{path}.algorithm", f"{opt.algorithm.name} cannot be fused on CPU; allowed on CPU: {allowed} (adam, partial_rowwise_adam and lamb need CUDA)"))


def _check_schedule(lr: LearningRate, path: str, problems: Problems) -> None:
    chosen = [name for name in SCHEDULE_NAMES if getattr(lr, name) is not None]
    if len(chosen) > 1:
        problems.append((path, f"sets {len(chosen)} schedules ({', '.join(chosen)}); choose one (set the others to null, or use the embeddings/lr group)"))
    if lr.constant is not None:
        _check_rate(lr.constant, f"{path}.constant", problems)
    if lr.linear_ramp_to_constant is not None:
        s, p = lr.linear_ramp_to_constant, f"{path}.linear_ramp_to_constant"
        _check_rate(s.learning_rate, f"{p}.learning_rate", problems)
        _positive_int(s.num_ramp_steps, f"{p}.num_ramp_steps", "num_ramp_steps", problems)
    if lr.linear_ramp_to_cosine is not None:
        s, p = lr.linear_ramp_to_cosine, f"{path}.linear_ramp_to_cosine"
        _check_rate(s.learning_rate, f"{p}.learning_rate", problems)
        _check_rate(s.final_learning_rate, f"{p}.final_learning_rate", problems)
        ok = _positive_int(s.num_ramp_steps, f"{p}.num_ramp_steps", "num_ramp_steps", problems)
        ok &= _positive_int(s.final_num_steps, f"{p}.final_num_steps", "final_num_steps", problems)
        if ok and s.num_ramp_steps >= s.final_num_steps:
            problems.append((f"{p}.num_ramp_steps", f"{s.num_ramp_steps} is not below final_num_steps ({s.final_num_steps}); the ramp must end before the decay does"))
    if lr.piecewise_constant is not None:
        s, p = lr.piecewise_constant, f"{path}.piecewise_constant"
        bounds, values = list(s.learning_rate_boundaries), list(s.learning_rate_values)
        if any(b >= a for b, a in zip(bounds, bounds[1:])) or any(b < 0 for b in bounds):
            problems.append((f"{p}.learning_rate_boundaries", f"{bounds} is not allowed; boundaries must be non-negative steps in strictly increasing order"))
        if len(values) != len(bounds) + 1:
            problems.append((f"{p}.learning_rate_values", f"has {len(values)} values for {len(bounds)} boundaries; give exactly {len(bounds) + 1} (one more than the boundaries)"))
        for i, v in enumerate(values):
            _check_rate(v, f"{p}.learning_rate_values[{i}]", problems)


def _check_rate(value: float, path: str, problems: Problems) -> None:
    if not _finite(value) or value < 0:
        problems.append((path, f"{value!r} is not allowed; use a finite learning rate >= 0"))


def _finite(value: Any) -> bool:
    """A real number that is neither inf nor nan (a non-number is reported by the type checks)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def _check_indices(items: Mapping[str, Any], prefix: str, width: Optional[int], what: str, problems: Problems) -> None:
    names: Dict[str, List[str]] = defaultdict(list)
    for key, item in items.items():
        names[item.name or key].append(key)
        if what == "small table" and "." in (item.name or key):  # torch module names cannot hold dots
            problems.append((f"{prefix}.{key}" + (".name" if item.name else ""), f"{item.name or key!r} is not allowed; use a name without '.'"))
        path = f"{prefix}.{key}.index"
        if item.index < 0:
            problems.append((path, f"{item.index!r} is not allowed; use a column index >= 0"))
        elif width is not None and item.index >= width:
            problems.append((path, f"{item.index} is beyond the data's {width} discrete features; allowed: 0..{width - 1}"))
    for name, keys in names.items():
        if len(keys) > 1:
            problems.append((prefix, f"{what} name {name!r} is used {len(keys)} times ({', '.join(keys)}); names must be unique"))


def _check_small(small: SmallEmbeddingsConfig, prefix: str, width: Optional[int], problems: Problems) -> None:
    _check_indices(small.tables, f"{prefix}.tables", width, "small table", problems)
    for key, table in small.tables.items():
        path = f"{prefix}.tables.{key}"
        _positive_int(table.num_embeddings, f"{path}.num_embeddings", "num_embeddings", problems)
        _positive_int(table.embedding_dim, f"{path}.embedding_dim", "embedding_dim", problems)


def _check_strata(strata: StratifiersConfig, prefix: str, width: Optional[int], problems: Problems) -> None:
    _check_indices(strata.strata, f"{prefix}.strata", width, "stratifier", problems)


def _check_sharding(sharding: ShardingConfig, prefix: str, device_type: str, table_keys: Optional[set], problems: Problems) -> None:
    if device_type not in ("cpu", "cuda", "meta"):
        problems.append((f"{prefix}.device", f"{sharding.device!r} is not a device; allowed: auto, cpu, cuda, cuda:N"))
    _positive_int(sharding.batch_size, f"{prefix}.batch_size", "batch_size", problems)
    for cap in ("hbm_cap_gb", "ddr_cap_gb"):
        value = getattr(sharding, cap)
        if value is not None and value <= 0:
            problems.append((f"{prefix}.{cap}", f"{value!r} is not allowed; use a positive size in GB, or null for the device's"))

    def check_types(types: Iterable[ShardingType], path: str, indexed: bool = True) -> None:
        if device_type == "cuda":
            return
        allowed = ", ".join(sorted(s.name for s in CPU_SHARDING_TYPES))
        for i, t in enumerate(types):
            if t not in CPU_SHARDING_TYPES:
                where = f"{path}[{i}]" if indexed else path
                problems.append((where, f"{t.name} needs CUDA (gloo on CPU lacks reduce_scatter); allowed on CPU: {allowed}"))

    check_types(sharding.sharding_types, f"{prefix}.sharding_types")
    if device_type != "cuda":
        for i, k in enumerate(sharding.compute_kernels):
            if k not in CPU_COMPUTE_KERNELS:
                problems.append((f"{prefix}.compute_kernels[{i}]", f"{k.name} needs CUDA; allowed on CPU: dense, fused"))
    for key, constraint in sharding.tables.items():
        path = f"{prefix}.tables.{key}"
        if table_keys is not None and key not in table_keys:
            problems.append((path, f"constrains {key!r}, which is not a table; tables: {', '.join(sorted(table_keys))}"))
        check_types(constraint.sharding_types, f"{path}.sharding_types")
        factor = constraint.cache_load_factor
        if factor is not None and not 0 < factor <= 1:
            problems.append((f"{path}.cache_load_factor", f"{factor!r} is not allowed; use a share of rows in (0, 1]"))
    for key, placement in sharding.plan.items():
        path = f"{prefix}.plan.{key}"
        if table_keys is not None and key not in table_keys:
            problems.append((path, f"places {key!r}, which is not a table; tables: {', '.join(sorted(table_keys))}"))
        check_types([placement.sharding_type], f"{path}.sharding_type", indexed=False)
