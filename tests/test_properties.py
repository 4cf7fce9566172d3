"""Properties over random configs (hypothesis).

1. A random valid config, written as a user's presets (embeddings, small_embeddings, stratifiers
   groups), survives compose -> validate -> `to_tml` (tml's recap format, or its common format when
   tables have their own optimizer or data type) -> `recap-embed-from-tml` (its `main`, writing
   presets into a temporary conf dir) -> compose: the table specs and the small-table and strata
   sections are unchanged. (tests/test_tml.py checks the other direction, tml -> ours -> tml.)
2. A random invalid mutation of a random valid config, applied at a random table or key as a
   command-line override, is always rejected, by compose or by `validate`, with a message naming
   the mutated key's full path.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from recap_embed.tml.cli import main as from_tml_main
from recap_embed.config import ConfigValidationError, table_specs, validate
from recap_embed.tml import to_tml

GROUPS = ("embeddings", "small_embeddings", "stratifiers")
RESERVED = {"null", "true", "false", "yes", "no", "on", "off", "nan", "inf", "name"}

_keys = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(lambda k: k not in RESERVED)
_rates = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, allow_infinity=False)
_paths = st.from_regex(r"(/|gs://)[a-z0-9_]{1,10}(/[a-z0-9_]{1,8}){0,2}", fullmatch=True)


@st.composite
def schedules(draw: st.DrawFn, kind: Optional[str] = None) -> Tuple[str, Any]:
    """(kind, body) of one of tml's four learning-rate schedules (`kind`: that one)."""
    kind = kind or draw(st.sampled_from(["constant", "linear_ramp_to_constant", "linear_ramp_to_cosine", "piecewise_constant"]))
    if kind == "constant":
        return kind, draw(_rates)
    if kind == "linear_ramp_to_constant":
        return kind, {"learning_rate": draw(_rates), "num_ramp_steps": draw(st.integers(1, 10**5))}
    if kind == "linear_ramp_to_cosine":
        ramp = draw(st.integers(1, 10**4))
        return kind, {"learning_rate": draw(_rates), "final_learning_rate": draw(st.one_of(st.just(0.0), _rates)),
                      "num_ramp_steps": ramp, "final_num_steps": ramp + draw(st.integers(1, 10**4))}
    bounds = sorted(draw(st.sets(st.integers(0, 10**6), max_size=3)))
    return kind, {"learning_rate_boundaries": bounds, "learning_rate_values": draw(st.lists(_rates, min_size=len(bounds) + 1, max_size=len(bounds) + 1))}


@st.composite
def table_optimizers(draw: st.DrawFn) -> Dict[str, Any]:
    """A per-table override tml can express (sgd/adam/adagrad, no weight decay)."""
    out: Dict[str, Any] = {}
    algorithm = draw(st.sampled_from([None, "sgd", "adam", "adagrad"]))
    if algorithm is not None:
        out["algorithm"] = algorithm
    if draw(st.booleans()):
        out["init_learning_rate"] = draw(_rates)
    if algorithm in ("adam", "adagrad") and draw(st.booleans()):
        out["eps"] = draw(st.floats(0.0, 1e-3))
    if algorithm == "adam" and draw(st.booleans()):
        out["beta1"], out["beta2"] = draw(st.floats(0.5, 0.99)), draw(st.floats(0.9, 0.9999))
    if draw(st.booleans()):
        kind, body = draw(schedules())
        out["learning_rate"] = {kind: body}
    return out


@st.composite
def configs(draw: st.DrawFn, require: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """The presets of a random valid config: {group: preset dict} (tml-expressible values);
    the sections in `require` are always present."""
    keys = draw(st.lists(_keys, min_size=1, max_size=4, unique=True))
    tables: Dict[str, Any] = {}
    names = []
    for key in keys:
        t: Dict[str, Any] = {"num_embeddings": draw(st.integers(1, 10**7))}
        if draw(st.booleans()):
            t["name"] = f"{key}_t"
        names.append(t.get("name", key))
        if draw(st.booleans()):
            t["embedding_dim"] = 4 * draw(st.integers(1, 32))
        if draw(st.booleans()):
            t["data_type"] = draw(st.sampled_from(["fp32", "fp16"]))
        if draw(st.booleans()):
            t["vocab"] = draw(_paths)
        if draw(st.booleans()):
            t["pretrained"] = {"embedding_snapshot_uri": draw(_paths)}
            if draw(st.booleans()):
                t["pretrained"]["emb_name"] = draw(_keys)
        if draw(st.booleans()):
            t["optimizer"] = draw(table_optimizers())
        tables[key] = t
    assume(len(set(names)) == len(names) and not set(names) & (set(keys) - set(names)))
    defaults: List[Any] = ["base"]
    if draw(st.booleans()):
        defaults.append({"optimizer": "sgd"})
    lr_group = draw(st.sampled_from([None, "constant", "linear_ramp_to_constant", "linear_ramp_to_cosine", "piecewise_constant"]))
    optimizer: Dict[str, Any] = {"init_learning_rate": draw(_rates)}
    if lr_group is not None:
        defaults.append({"lr": lr_group})
        if draw(st.booleans()):  # the group's values (interpolations of init_learning_rate) or drawn ones
            kind, body = draw(schedules(lr_group))
            optimizer["learning_rate"] = {kind: body}
    defaults.append("_self_")
    emb = {"defaults": defaults, "embedding_dim": 4 * draw(st.integers(1, 16)), "optimizer": optimizer, "tables": tables}
    if draw(st.booleans()):
        emb["tables_to_log"] = draw(st.lists(st.sampled_from(names), unique=True))
    out: Dict[str, Any] = {"embeddings": emb, "lr_group": lr_group}
    if "small_embeddings" in require or draw(st.booleans()):
        out["small_embeddings"] = {"defaults": ["base", "_self_"], "tables": {
            k: {"num_embeddings": draw(st.integers(1, 1000)), "embedding_dim": draw(st.integers(1, 64)), "index": draw(st.integers(0, 9))}
            for k in draw(st.lists(_keys, min_size=1, max_size=3, unique=True))
        }}
    if "stratifiers" in require or draw(st.booleans()):
        out["stratifiers"] = {"defaults": ["base", "_self_"], "strata": {
            k: {"index": draw(st.integers(0, 9)), "value": draw(st.integers(-5, 50))}
            for k in draw(st.lists(_keys, min_size=1, max_size=3, unique=True))
        }}
    return out


def write_conf(conf: Path, presets: Dict[str, Any], name: str = "mine") -> List[str]:
    groups = [g for g in GROUPS if g in presets]
    for g in groups:
        (conf / g).mkdir(parents=True, exist_ok=True)
        (conf / g / f"{name}.yaml").write_text(yaml.safe_dump(presets[g], sort_keys=False))
    return groups


def compose_groups(conf: Path, groups: List[str], name: str, overrides: Optional[List[str]] = None):
    (conf / "app.yaml").write_text(yaml.safe_dump({"defaults": [{g: name} for g in groups] + ["_self_"]}))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            return compose(config_name="app", overrides=overrides or [])
    finally:
        GlobalHydra.instance().clear()


def comparable_specs(cfg: Any) -> Dict[str, Any]:
    """Table specs by table name, without the key and config path (conversion keys tables by name)."""
    return {s.name: dataclasses.replace(s, key="", path="") for s in table_specs(cfg.embeddings)}


def items(cfg: Any, group: str) -> Optional[List[Tuple[Any, ...]]]:
    """A small-table or strata section as (name, fields...) in order; None when absent."""
    if group not in cfg:
        return None
    collection, fields = ("tables", ("num_embeddings", "embedding_dim", "index")) if group == "small_embeddings" else ("strata", ("index", "value"))
    return [(v.get("name") or k, *(v[f] for f in fields)) for k, v in cfg[group][collection].items()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(presets=configs())
def test_valid_configs_survive_the_tml_round_trip(presets: Dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        groups = write_conf(root / "conf", presets)
        cfg = compose_groups(root / "conf", groups, "mine")
        validate(cfg, device="cuda")  # adam overrides are CUDA-only; everything else holds anywhere
        tml = to_tml(cfg)  # recap format when it can say it, else the common format (per-table optimizers)
        event(f"tml format: {'common' if 'embeddings' in tml else 'recap'}")
        (root / "model.yaml").write_text(yaml.safe_dump(tml, sort_keys=False))
        assert from_tml_main([str(root / "model.yaml"), "--out", str(root / "out"), "--name", "rt"]) == 0
        back = compose_groups(root / "out", groups, "rt")
        validate(back, device="cuda")
    assert comparable_specs(back) == comparable_specs(cfg)
    for group in ("small_embeddings", "stratifiers"):
        assert items(back, group) == items(cfg, group)


# --------------------------------------------------------------------------- invalid mutations


@st.composite
def mutations(draw: st.DrawFn, presets: Dict[str, Any], name: str) -> Tuple[List[str], str]:
    """(overrides, full path of the mutated key) of the invalid change `name` at a random place."""
    tables = list(presets["embeddings"]["tables"])
    key = draw(st.sampled_from(tables))
    t = f"embeddings.tables.{key}"
    bogus = draw(st.sampled_from(["colour", "num_embedings", "dim", "embeddingdim"]))
    choices = {
        "negative_rows": ([f"{t}.num_embeddings={-draw(st.integers(1, 10**6))}"], f"{t}.num_embeddings"),
        "dim_not_multiple_of_4": ([f"{t}.embedding_dim={4 * draw(st.integers(0, 30)) + draw(st.integers(1, 3))}"], f"{t}.embedding_dim"),
        "collection_dim": ([f"embeddings.embedding_dim={4 * draw(st.integers(0, 30)) + draw(st.integers(1, 3))}"], "embeddings.embedding_dim"),
        "unknown_table_key": ([f"{t}.{bogus}=1"], f"{t}.{bogus}"),
        "unknown_collection_key": ([f"embeddings.{bogus}=1"], f"embeddings.{bogus}"),
        "bad_data_type": ([f"{t}.data_type={draw(st.sampled_from(['int8', 'FP16', 'float', 'BF16']))}"], f"{t}.data_type"),
        "bad_pooling": ([f"{t}.pooling={draw(st.sampled_from(['max', 'SUM', 'avg']))}"], f"{t}.pooling"),
        "bad_algorithm": ([f"embeddings.optimizer.algorithm={draw(st.sampled_from(['adamw', 'SGD', 'momentum']))}"], "embeddings.optimizer.algorithm"),
        "rows_not_a_number": ([f"{t}.num_embeddings={draw(st.sampled_from(['many', '1e3x', 'abc']))}"], f"{t}.num_embeddings"),
        "negative_table_lr": ([f"{t}.optimizer.init_learning_rate=-{draw(_rates)}"], f"{t}.optimizer.init_learning_rate"),
        "table_beta_out_of_range": ([f"{t}.optimizer.beta1={draw(st.sampled_from([1.0, 1.5, -0.25]))}"], f"{t}.optimizer.beta1"),
    }
    lo, hi = sorted(draw(st.sets(st.integers(0, 10**5), min_size=2, max_size=2)))
    bounds = draw(st.sampled_from([[hi, lo], [lo, lo], [-hi - 1, lo]]))
    group = "embeddings/lr=piecewise_constant" if presets["lr_group"] else "+embeddings/lr=piecewise_constant"
    p = "embeddings.optimizer.learning_rate.piecewise_constant.learning_rate_boundaries"
    choices["boundaries_out_of_order"] = ([group, f"{p}=[{bounds[0]},{bounds[1]}]"], p)
    tp = f"{t}.optimizer.learning_rate.piecewise_constant"
    choices["table_boundaries_out_of_order"] = (
        [f"+embeddings/lr@{t}.optimizer.learning_rate=piecewise_constant", f"{tp}.learning_rate_boundaries=[{bounds[0]},{bounds[1]}]"],
        f"{tp}.learning_rate_boundaries",
    )
    for section, collection in (("small_embeddings", "tables"), ("stratifiers", "strata")):
        if section in presets:
            k = draw(st.sampled_from(list(presets[section][collection])))
            choices[f"{section}_negative_index"] = ([f"{section}.{collection}.{k}.index={-draw(st.integers(1, 9))}"], f"{section}.{collection}.{k}.index")
            choices[f"{section}_unknown_key"] = ([f"{section}.{collection}.{k}.{bogus}=1"], f"{section}.{collection}.{k}.{bogus}")
    if "small_embeddings" in presets:
        k = draw(st.sampled_from(list(presets["small_embeddings"]["tables"])))
        choices["small_dim_zero"] = ([f"small_embeddings.tables.{k}.embedding_dim=0"], f"small_embeddings.tables.{k}.embedding_dim")
    return choices[name]


MUTATIONS = [
    "negative_rows", "dim_not_multiple_of_4", "collection_dim", "unknown_table_key", "unknown_collection_key",
    "bad_data_type", "bad_pooling", "bad_algorithm", "rows_not_a_number", "negative_table_lr",
    "table_beta_out_of_range", "boundaries_out_of_order", "table_boundaries_out_of_order",
    "small_embeddings_negative_index", "small_embeddings_unknown_key", "small_dim_zero",
    "stratifiers_negative_index", "stratifiers_unknown_key",
]


@pytest.mark.parametrize("mutation", MUTATIONS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_invalid_mutations_are_rejected_naming_the_path(mutation: str, data: st.DataObject) -> None:
    require = tuple(s for s in ("small_embeddings", "stratifiers") if mutation.startswith(s) or (s == "small_embeddings" and mutation == "small_dim_zero"))
    presets = data.draw(configs(require), label="config")
    overrides, path = data.draw(mutations(presets, mutation), label="mutation")
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "conf"
        groups = write_conf(conf, presets)
        validate(compose_groups(conf, groups, "mine"), device="cuda")  # valid before the mutation
        try:
            cfg = compose_groups(conf, groups, "mine", overrides)
        except HydraException as e:  # typed fields: OmegaConf refuses the value while composing
            cause = e.__cause__
            assert getattr(cause, "full_key", None) == path or path in f"{e}\n{cause}", (path, str(e), str(cause))
            event("rejected by compose")
            return
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, device="cuda")
    assert path in dict(err.value.problems), (path, str(err.value))
    assert f"{path}: " in str(err.value)
    event("rejected by validate")
