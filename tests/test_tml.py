"""Migration from tml YAML: conversion rules, presets that compose, the CLI, and a round trip."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig

from launch import python_m, run
from recap_embed.tml.cli import main
from recap_embed.config import table_specs, validate
from recap_embed.config.store import register_configs
from recap_embed.tml import (
    COMMON_FORMAT,
    RECAP_FORMAT,
    TmlConversionError,
    from_tml,
    render_presets,
    to_tml,
    write_presets,
)

REPO = Path(__file__).resolve().parents[1]

# tml's recap format (projects/home/recap/embedding/config.py): one collection optimizer, tables
# without their own (the seed's TwHIN tables, as the heavy ranker would hold them).
RECAP_TML = """\
training:
  num_train_steps: 10
model:
  tasks: {}
  large_embeddings:
    tables:
      - name: user
        num_embeddings: 424241
        embedding_dim: 4
      - name: tweet
        num_embeddings: 72543
        embedding_dim: 4
    optimizer:
      init_learning_rate: 0.01
      learning_rate: {constant: 0.01}
    tables_to_log: [user]
  small_embeddings:
    tables:
      - {name: country, num_embeddings: 300, embedding_dim: 8, index: 3}
  stratifiers:
    - {name: country_us, index: 3, value: 1}
  position_debias_config: null
"""

# tml's common format as TwHIN uses it: the facts of projects/twhin/config/local.yaml (tables under
# model.embeddings, each with its own optimizer and data type, beside translation_optimizer and
# relations; YAML 1.1 digit separators as in the original).
TWHIN_TML = """\
runtime:
  enable_amp: false
training:
  save_dir: "/tmp/model"
  num_train_steps: 100000
  num_epochs: 5
model:
  translation_optimizer:
    sgd:
      lr: 0.05
    learning_rate:
      constant: 0.05
  embeddings:
    tables:
      - name: user
        num_embeddings: 424_241
        embedding_dim: 4
        data_type: fp32
        optimizer:
          sgd:
            lr: 0.01
          learning_rate:
            constant: 0.01
      - name: tweet
        num_embeddings: 72_543
        embedding_dim: 4
        data_type: fp32
        optimizer:
          sgd:
            lr: 0.005
          learning_rate:
            constant: 0.005
  relations:
    - name: fav
      lhs: user
      rhs: tweet
      operator: translation
    - name: reply
      lhs: user
      rhs: tweet
      operator: translation
train_data:
  data_root: "gs://bucket/edges/*"
  per_replica_batch_size: 500
"""


def recap_model() -> Dict[str, Any]:
    return yaml.safe_load(RECAP_TML)["model"]


def twhin_model() -> Dict[str, Any]:
    return yaml.safe_load(TWHIN_TML)["model"]


def compose_presets(conf_dir: Path, name: str, groups: List[str], overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose a primary config selecting `name` in each group, the way an app would."""
    register_configs()
    (conf_dir / "app.yaml").write_text(yaml.safe_dump({"defaults": [{g: name} for g in groups] + ["_self_"]}))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            return compose(config_name="app", overrides=overrides or [])
    finally:
        GlobalHydra.instance().clear()


# --------------------------------------------------------------------------- the recap format


def test_recap_presets_compose_to_the_tml_values(tmp_path: Path) -> None:
    conversion = from_tml(recap_model(), path="model")
    assert conversion.format == RECAP_FORMAT
    written = write_presets(conversion, tmp_path, "recap_tml", source="recap.yaml")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "embeddings/recap_tml.yaml",
        "small_embeddings/recap_tml.yaml",
        "stratifiers/recap_tml.yaml",
    ]
    for path in written:
        assert path.read_text().startswith("# Converted by recap-embed-from-tml from recap.yaml")
    assert "# Source format: tml's recap format" in (tmp_path / "embeddings" / "recap_tml.yaml").read_text()

    cfg = compose_presets(tmp_path, "recap_tml", ["embeddings", "small_embeddings", "stratifiers"])
    emb = cfg.embeddings
    assert list(emb.tables) == ["user", "tweet"]
    assert (emb.tables.user.num_embeddings, emb.tables.tweet.num_embeddings) == (424241, 72543)
    assert emb.tables.user.embedding_dim == emb.tables.tweet.embedding_dim == 4
    assert emb.tables.user.data_type.name == "fp32"
    assert emb.tables.user.optimizer.init_learning_rate == emb.optimizer.init_learning_rate  # the collection's
    assert _word(emb.optimizer.algorithm) == "sgd"
    assert emb.optimizer.init_learning_rate == 0.01 and emb.optimizer.learning_rate.constant == 0.01
    assert list(emb.tables_to_log) == ["user"]
    assert cfg.small_embeddings.tables.country.index == 3
    assert cfg.stratifiers.strata.country_us.value == 1
    validate(cfg, device="cpu", num_discrete_features=8)
    assert to_tml(cfg) == _normalise(recap_model())


def _word(value: Any) -> Any:
    """An enum's member name, or the value (tables may be open mappings holding plain strings)."""
    return getattr(value, "name", value)


def test_collection_schedule_picks_the_matching_lr_option(tmp_path: Path) -> None:
    """A schedule equal to the `lr` option is not restated, so `embeddings/lr=` still switches."""
    text = render_presets(from_tml(recap_model(), path="model"), "t")["embeddings/t.yaml"]
    doc = yaml.safe_load(text)
    assert doc["defaults"] == ["base", {"optimizer": "sgd"}, {"lr": "constant"}, "_self_", {"tables": []}]
    assert doc["optimizer"] == {"init_learning_rate": 0.01}  # constant 0.01 is the option's ${..init_learning_rate}
    assert "algorithm" not in doc["optimizer"]

    write_presets(from_tml(recap_model(), path="model"), tmp_path, "t")
    switched = compose_presets(tmp_path, "t", ["embeddings"], ["embeddings/lr=linear_ramp_to_cosine"])
    validate(switched, device="cpu")
    assert switched.embeddings.optimizer.learning_rate.constant is None


@pytest.mark.parametrize(
    "schedule, lr_option, inline",
    [
        (None, None, None),
        ({"constant": 0.02}, "constant", {"constant": 0.02}),
        (
            {"linear_ramp_to_constant": {"learning_rate": 0.01, "num_ramp_steps": 50}},
            "linear_ramp_to_constant",
            {"linear_ramp_to_constant": {"num_ramp_steps": 50}},
        ),
        (
            {"piecewise_constant": {"learning_rate_boundaries": [10], "learning_rate_values": [0.01, 0.001]}},
            "piecewise_constant",
            {"piecewise_constant": {"learning_rate_boundaries": [10], "learning_rate_values": [0.01, 0.001]}},
        ),
    ],
)
def test_collection_schedules_compose_to_exactly_one(tmp_path: Path, schedule: Any, lr_option: Any, inline: Any) -> None:
    model = recap_model()
    model["large_embeddings"]["optimizer"]["learning_rate"] = schedule
    conversion = from_tml(model, path="model")
    doc = yaml.safe_load(render_presets(conversion, "s")["embeddings/s.yaml"])
    assert {"lr": lr_option} in doc["defaults"]
    assert doc["optimizer"].get("learning_rate") == inline
    write_presets(conversion, tmp_path, "s")
    cfg = compose_presets(tmp_path, "s", ["embeddings"])
    validate(cfg, device="cpu")  # exactly one schedule (or none) after Hydra's merge
    assert to_tml(cfg)["large_embeddings"]["optimizer"] == _normalise(model)["large_embeddings"]["optimizer"]
    if lr_option is None:  # `lr: null` keeps the group selectable without `+`
        assert compose_presets(tmp_path, "s", ["embeddings"], ["embeddings/lr=constant"]).embeddings.optimizer.learning_rate.constant == 0.01


def test_a_bare_large_embeddings_node_converts() -> None:
    large = recap_model()["large_embeddings"]
    conversion = from_tml(large, path="model.large_embeddings")
    assert conversion.small_embeddings is None and conversion.stratifiers is None
    assert list(conversion.embeddings["tables"]) == ["user", "tweet"]
    assert conversion.origin == {"embeddings": "model.large_embeddings"} and conversion.format == RECAP_FORMAT


def test_environment_variables_become_oc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = recap_model()
    model["large_embeddings"]["tables"][0]["vocab"] = "${TML_DATA}/vocab/$TABLE"
    model["large_embeddings"]["tables"][0]["pretrained"] = {"emb_name": "user", "embedding_snapshot_uri": "gs://b/$${x}"}
    conversion = from_tml(model)
    user = conversion.embeddings["tables"]["user"]
    assert user["vocab"] == "${oc.env:TML_DATA}/vocab/${oc.env:TABLE}"
    write_presets(conversion, tmp_path, "env")
    monkeypatch.setenv("TML_DATA", "/data")
    monkeypatch.setenv("TABLE", "user")
    cfg = compose_presets(tmp_path, "env", ["embeddings"])
    assert cfg.embeddings.tables.user.vocab == "/data/vocab/user"
    assert cfg.embeddings.tables.user.pretrained.embedding_snapshot_uri == "gs://b/${x}"  # $$ is tml's escaped $


# --------------------------------------------------------------------------- the common format (TwHIN)


def test_twhin_model_converts_to_per_table_optimizers(tmp_path: Path) -> None:
    conversion = from_tml(twhin_model(), path="model")
    assert conversion.format == COMMON_FORMAT
    assert conversion.origin == {"embeddings": "model.embeddings"}
    assert conversion.skipped == ["model.translation_optimizer", "model.relations"]
    write_presets(conversion, tmp_path, "twhin_tml", source="local.yaml")
    text = (tmp_path / "embeddings" / "twhin_tml.yaml").read_text()
    assert "# Source format: tml's common format (common/modules/embedding/config.py)." in text
    cfg = compose_presets(tmp_path, "twhin_tml", ["embeddings"])
    emb = cfg.embeddings
    assert list(emb.tables) == ["user", "tweet"]
    assert (emb.tables.user.num_embeddings, emb.tables.tweet.num_embeddings) == (424241, 72543)
    for key, lr in (("user", 0.01), ("tweet", 0.005)):
        table = emb.tables[key]
        assert table.embedding_dim == 4 and _word(table.data_type) == "fp32"
        assert _word(table.optimizer.algorithm) == "sgd"
        assert table.optimizer.init_learning_rate == lr and table.optimizer.learning_rate.constant == lr
    validate(cfg, device="cpu")
    specs = {s.name: s for s in table_specs(cfg.embeddings)}
    assert specs["user"].optimizer.init_learning_rate == 0.01 and specs["tweet"].optimizer.learning_rate.constant == 0.005
    assert to_tml(cfg) == {"embeddings": _normalise_common(twhin_model()["embeddings"])}


def test_a_bare_common_format_node_converts() -> None:
    conversion = from_tml(twhin_model()["embeddings"], path="model.embeddings")
    assert conversion.format == COMMON_FORMAT and conversion.skipped == []
    assert conversion.embeddings["tables"]["tweet"]["optimizer"] == {"algorithm": "sgd", "init_learning_rate": 0.005, "learning_rate": {"constant": 0.005}}


def _effective(tables: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What training would use per table (common format): rows, dim, type, algorithm, lr, schedule."""
    out = {}
    for t in tables:
        (algorithm, body), = [(k, v) for k, v in t["optimizer"].items() if k != "learning_rate"]
        out[t["name"]] = (t["num_embeddings"], t["embedding_dim"], t["data_type"], algorithm, body["lr"], t["optimizer"].get("learning_rate"))
    return out


def test_twhin_conversion_matches_the_shipped_preset(tmp_path: Path) -> None:
    """conf/embeddings/twhin.yaml was written by hand from the same tml tables."""
    shipped = compose_presets(tmp_path, "twhin", ["embeddings"])  # found on the plugin's search path
    converted = to_tml(from_tml(twhin_model(), path="model"))["embeddings"]["tables"]
    assert _effective(to_tml(shipped)["embeddings"]["tables"]) == _effective(converted)


def test_tml_adam_and_adagrad_defaults_are_written_out() -> None:
    """Ours default eps to 1e-8; tml's adam is 1e-7 and adagrad 0, so they must be explicit."""
    model = twhin_model()
    tables = model["embeddings"]["tables"]
    tables[0]["optimizer"] = {"adam": {"lr": 0.001}}
    tables[1]["optimizer"] = {"adagrad": {"lr": "1e-2"}, "learning_rate": None}  # PyYAML reads 1e-2 as a string
    emb = from_tml(model).embeddings
    assert emb["tables"]["user"]["optimizer"] == {"algorithm": "adam", "init_learning_rate": 0.001, "eps": 1e-7, "beta1": 0.9, "beta2": 0.999}
    assert emb["tables"]["tweet"]["optimizer"] == {"algorithm": "adagrad", "init_learning_rate": 0.01, "eps": 0.0}


def test_to_tml_picks_the_format_that_can_say_it(tmp_path: Path) -> None:
    write_presets(from_tml(recap_model(), path="model"), tmp_path, "r")
    plain = compose_presets(tmp_path, "r", ["embeddings"])
    assert set(to_tml(plain)) == {"large_embeddings"}
    common = to_tml(plain, format=COMMON_FORMAT)["embeddings"]["tables"]
    assert common[0]["optimizer"] == {"sgd": {"lr": 0.01, "momentum": 0.0}, "learning_rate": {"constant": 0.01}}  # the collection's, made explicit
    for override in ("embeddings.tables.user.data_type=fp16", "embeddings/optimizer=adagrad", "embeddings.tables.tweet.optimizer.init_learning_rate=0.5"):
        cfg = compose_presets(tmp_path, "r", ["embeddings"], [override])
        assert set(to_tml(cfg)) == {"embeddings"}, override
        with pytest.raises(TmlConversionError):
            to_tml(cfg, format=RECAP_FORMAT)


# --------------------------------------------------------------------------- conversion errors


def _set(path: List[Any], value: Any):
    def mutate(model: Dict[str, Any]) -> None:
        node = model
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


LARGE = ["large_embeddings"]
R0, R1 = LARGE + ["tables", 0], LARGE + ["tables", 1]
EMB = ["embeddings"]
T0, T1 = EMB + ["tables", 0], EMB + ["tables", 1]
RECAP_CASES = [
    (_set(R1 + ["optimiser"], {"sgd": {"lr": 0.1}}), "model.large_embeddings.tables[1].optimiser", "allowed here: name, num_embeddings, embedding_dim"),
    (_set(R0 + ["optimizer"], {"sgd": {"lr": 0.1}}), "model.large_embeddings.tables[0].optimizer", "belong to tml's common format"),
    (_set(R0 + ["data_type"], "fp16"), "model.large_embeddings.tables[0].data_type", "unknown key in tml's recap format"),
    (_set(LARGE + ["optimizer", "lr"], 0.1), "model.large_embeddings.optimizer.lr", "allowed here: learning_rate, init_learning_rate"),
    (_set(LARGE + ["optimizer", "learning_rate", "cosine"], 0.1), "model.large_embeddings.optimizer.learning_rate.cosine", "allowed here: constant"),
    (_set(LARGE + ["table"], []), "model.large_embeddings.table", "allowed here: tables, optimizer, tables_to_log"),
    (_set(["small_embeddings", "tables", 0, "idx"], 1), "model.small_embeddings.tables[0].idx", "allowed here: name, num_embeddings, embedding_dim, index"),
    (_set(LARGE + ["optimizer", "learning_rate", "linear_ramp_to_constant"], {"learning_rate": 0.1, "num_ramp_steps": 9}),
     "model.large_embeddings.optimizer.learning_rate", "exactly one learning-rate schedule"),
    (_set(R1 + ["name"], "user"), "model.large_embeddings.tables[1].name", "duplicate table name 'user' (also model.large_embeddings.tables[0])"),
    (_set(["stratifiers"], [{"name": "a", "index": 1, "value": 1}, {"name": "a", "index": 2, "value": 1}]), "model.stratifiers[1].name", "duplicate stratifier name"),
    (_set(R0 + ["num_embeddings"], "many"), "model.large_embeddings.tables[0].num_embeddings", "expected an integer"),
    (_set(R0 + ["embedding_dim"], None), "model.large_embeddings.tables[0].embedding_dim", "missing"),
    (_set(LARGE + ["optimizer", "init_learning_rate"], None), "model.large_embeddings.optimizer.init_learning_rate", "missing"),
    (_set(LARGE + ["optimizer"], None), "model.large_embeddings.optimizer", "in the common format (common/modules/embedding, TwHIN's) every table needs"),
    (_set(LARGE + ["tables_to_log"], ["user", "author"]), "model.large_embeddings.tables_to_log[1]", "'author' is not a table"),
    (_set(R0 + ["pretrained"], {"emb_name": "u"}), "model.large_embeddings.tables[0].pretrained.embedding_snapshot_uri", "missing"),
    (_set(["stratifiers"], {"name": "a"}), "model.stratifiers", "expected a list"),
    (_set(["embeddings"], {"tables": []}), "model", "has both large_embeddings and embeddings"),
    (_set(["small_embeddings", "tables", 0, "name"], ".5"), "model.small_embeddings.tables[0].name", "has a dot"),
]
COMMON_CASES = [
    (_set(T1 + ["optimiser"], {"sgd": {"lr": 0.1}}), "model.embeddings.tables[1].optimiser", "allowed here: name, num_embeddings, embedding_dim, pretrained, vocab, optimizer, data_type"),
    (_set(T0 + ["optimizer", "adamw"], {"lr": 0.1}), "model.embeddings.tables[0].optimizer.adamw", "allowed here: learning_rate, adam, sgd, adagrad"),
    (_set(T0 + ["optimizer", "sgd", "nesterov"], True), "model.embeddings.tables[0].optimizer.sgd.nesterov", "allowed here: lr, momentum"),
    (_set(T0 + ["optimizer", "sgd", "momentum"], 0.9), "model.embeddings.tables[0].optimizer.sgd.momentum", "FBGEMM's fused SGD has no momentum"),
    (_set(T0 + ["optimizer", "adam"], {"lr": 0.1}), "model.embeddings.tables[0].optimizer", "found adam and sgd"),
    (_set(T0 + ["optimizer", "sgd"], None), "model.embeddings.tables[0].optimizer", "found none"),
    (_set(T1 + ["optimizer", "learning_rate", "piecewise_constant"], {"learning_rate_boundaries": [1], "learning_rate_values": [1.0, 0.1]}),
     "model.embeddings.tables[1].optimizer.learning_rate", "found constant and piecewise_constant"),
    (_set(T1 + ["optimizer"], None), "model.embeddings.tables[1].optimizer", "is missing (tml requires it)"),
    (_set(T0 + ["data_type"], None), "model.embeddings.tables[0].data_type", "is missing (tml requires it)"),
    (_set(T0 + ["data_type"], "bf16"), "model.embeddings.tables[0].data_type", "allowed: fp32, fp16"),
    (_set(EMB + ["optimizer"], {"init_learning_rate": 0.1}), "model.embeddings.tables[0].optimizer", "belong to tml's common format"),
    (_set(EMB + ["tables_to_log"], ["tweet", "author"]), "model.embeddings.tables_to_log[1]", "'author' is not a table"),
    # TwHIN's own rules (projects/twhin/models/config.py)
    (_set(T1 + ["embedding_dim"], 8), "model.embeddings.tables[1].embedding_dim", "TwHIN (projects/twhin/models/config.py) requires every table to have the same embedding_dim"),
    (_set(T1 + ["data_type"], "fp16"), "model.embeddings.tables[1].data_type", "same data type"),
    (_set(["relations", 1, "rhs"], "author"), "model.relations[1].rhs", "'author' is not a table"),
]


@pytest.mark.parametrize("mutate, path, words", RECAP_CASES)
def test_recap_conversion_errors_name_the_path(mutate, path: str, words: str) -> None:
    _assert_refused(recap_model(), mutate, path, words)


@pytest.mark.parametrize("mutate, path, words", COMMON_CASES)
def test_common_conversion_errors_name_the_path(mutate, path: str, words: str) -> None:
    _assert_refused(twhin_model(), mutate, path, words)


def _assert_refused(model: Dict[str, Any], mutate, path: str, words: str) -> None:
    mutate(model)
    with pytest.raises(TmlConversionError) as info:
        from_tml(model, path="model")
    assert info.value.path == path, str(info.value)
    assert str(info.value).startswith(path + ": ")
    assert words in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_twhin_rules_apply_to_the_twhin_model_only() -> None:
    """Tables of several dims are fine in a common-format node alone; TwHIN's model refuses them."""
    model = twhin_model()
    model["embeddings"]["tables"][1]["embedding_dim"] = 8
    assert from_tml(model["embeddings"], path="model.embeddings").embeddings["tables"]["tweet"]["embedding_dim"] == 8
    with pytest.raises(TmlConversionError, match="same embedding_dim"):
        from_tml(model, path="model")


def test_nothing_to_convert_is_an_error() -> None:
    with pytest.raises(TmlConversionError, match="nothing to convert"):
        from_tml({"tasks": {}, "large_embeddings": None, "small_embeddings": None, "stratifiers": None}, path="model")


def test_to_tml_refuses_what_tml_cannot_express(tmp_path: Path) -> None:
    write_presets(from_tml(twhin_model(), path="model"), tmp_path, "t")
    cases = {
        "embeddings.tables.user.optimizer.algorithm=rowwise_adagrad": "embeddings.tables.user.optimizer.algorithm",
        "embeddings.tables.user.pooling=mean": "embeddings.tables.user.pooling",
        "embeddings.tables.user.data_type=bf16": "embeddings.tables.user.data_type",
        "embeddings.tables.user.weight_init_max=0.5": "embeddings.tables.user.weight_init_max",
        "embeddings.tables.tweet.need_pos=true": "embeddings.tables.tweet.need_pos",
        "embeddings.tables.tweet.num_embeddings_post_pruning=100": "embeddings.tables.tweet.num_embeddings_post_pruning",
    }
    for override, path in cases.items():
        cfg = compose_presets(tmp_path, "t", ["embeddings"], [override])
        with pytest.raises(TmlConversionError) as info:
            to_tml(cfg)
        assert info.value.path == path
    write_presets(from_tml(recap_model(), path="model"), tmp_path, "r")
    inherited = compose_presets(tmp_path, "r", ["embeddings"], ["embeddings/optimizer=rowwise_adagrad"])
    with pytest.raises(TmlConversionError) as info:
        to_tml(inherited)  # every table inherits it: named where it is set
    assert info.value.path == "embeddings.optimizer.algorithm"


# --------------------------------------------------------------------------- writing and the CLI


def test_write_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    conversion = from_tml(recap_model(), path="model")
    (tmp_path / "stratifiers").mkdir()
    (tmp_path / "stratifiers" / "t.yaml").write_text("mine\n")
    with pytest.raises(FileExistsError, match="stratifiers/t.yaml"):
        write_presets(conversion, tmp_path, "t")
    assert not (tmp_path / "embeddings").exists()  # all or nothing
    write_presets(conversion, tmp_path, "t", overwrite=True)
    assert (tmp_path / "stratifiers" / "t.yaml").read_text().startswith("# Converted")
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_bad_preset_names_are_refused(tmp_path: Path) -> None:
    conversion = from_tml(recap_model(), path="model")
    for name in ("base", "a/b", "a.b", "-x", ""):
        with pytest.raises(ValueError, match="preset name"):
            write_presets(conversion, tmp_path, name)


@pytest.fixture()
def tml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recap.v2.yaml"
    path.write_text(RECAP_TML)
    return path


@pytest.fixture()
def twhin_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "local.yaml"
    path.write_text(TWHIN_TML)
    return path


def test_cli_writes_presets_under_conf(tml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([tml_file.name]) == 0  # --key defaults to `model` when the root has no sections
    out = capsys.readouterr().out
    assert "wrote conf/embeddings/recap_v2.yaml" in out and "embeddings=recap_v2" in out
    text = (tml_file.parent / "conf" / "embeddings" / "recap_v2.yaml").read_text()
    assert text.startswith("# Converted by recap-embed-from-tml from recap.v2.yaml (key model.large_embeddings).")
    cfg = compose_presets(tml_file.parent / "conf", "recap_v2", ["embeddings", "small_embeddings", "stratifiers"])
    assert cfg.embeddings.tables.tweet.num_embeddings == 72543 and cfg.embeddings.optimizer.init_learning_rate == 0.01

    assert main([tml_file.name]) == 2  # exists
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exist" in err and "--overwrite" in err
    assert main([tml_file.name, "--overwrite", "--name", "other", "--out", "presets", "--key", "model"]) == 0
    assert (tml_file.parent / "presets" / "small_embeddings" / "other.yaml").exists()


def test_cli_print_writes_no_files(tml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([tml_file.name, "--key", "model.large_embeddings", "--name", "tw", "--print"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ==> embeddings/tw.yaml <==\n# Converted")
    assert "small_embeddings" not in out
    assert yaml.safe_load(out.split("<==\n", 1)[1])["tables"]["user"]["num_embeddings"] == 424241
    assert not (tml_file.parent / "conf").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--key", "model.embeddings"], "no key 'model.embeddings'"),
        (["--key", "training"], "nothing to convert"),
        (["--name", "a.b"], "preset name"),
    ],
)
def test_cli_errors_are_one_line(tml_file: Path, capsys: pytest.CaptureFixture[str], args: List[str], words: str) -> None:
    assert main([tml_file.name, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recap-embed-from-tml: error: ") and err.count("\n") == 1 and words in err


def test_cli_reports_bad_files(tml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["missing.yaml"]) == 2
    assert "cannot read missing.yaml" in capsys.readouterr().err
    tml_file.write_text("model: [unclosed\n")
    assert main([tml_file.name]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    tml_file.write_text(RECAP_TML.replace("      - name: tweet\n", "      - name: tweet\n        optimiser: {sgd: {lr: 0.005}}\n"))
    assert main([tml_file.name]) == 2
    err = capsys.readouterr().err
    assert "recap.v2.yaml: model.large_embeddings.tables[1].optimiser: unknown key" in err


def test_cli_warns_about_our_rules_but_converts(tml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tml_file.write_text(RECAP_TML.replace("        num_embeddings: 72543\n        embedding_dim: 4", "        num_embeddings: 72543\n        embedding_dim: 6"))
    assert main([tml_file.name, "--print"]) == 0
    err = capsys.readouterr().err
    assert "warning: embeddings.tables.tweet.embedding_dim: 6 is not a multiple of 4" in err


def test_module_entry_point(tml_file: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ok = run(python_m("recap_embed.tml", tml_file.name, "--print"), cwd=tml_file.parent, env=env, timeout=120)
    assert "# ==> stratifiers/recap_v2.yaml <==" in ok.stdout
    bad = run(python_m("recap_embed.tml", tml_file.name, "--key", "nope"), cwd=tml_file.parent, env=env, timeout=120, expect=2)
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("key", [None, "model", "model.embeddings"])
def test_cli_converts_twhin_with_and_without_a_key(twhin_file: Path, capsys: pytest.CaptureFixture[str], key: Optional[str]) -> None:
    assert main([twhin_file.name] + (["--key", key] if key else [])) == 0
    out, err = capsys.readouterr()
    assert "wrote conf/embeddings/local.yaml" in out and "embeddings=local" in out
    if key != "model.embeddings":  # TwHIN's model: what is not embedding config is named, not dropped silently
        assert "note: not embedding config, not converted: model.translation_optimizer, model.relations" in err
    assert "warning" not in err
    cfg = compose_presets(twhin_file.parent / "conf", "local", ["embeddings"])
    validate(cfg, device="cpu")
    assert to_tml(cfg) == {"embeddings": _normalise_common(twhin_model()["embeddings"])}


def test_cli_reports_twhins_rules(twhin_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    twhin_file.write_text(TWHIN_TML.replace("num_embeddings: 72_543\n        embedding_dim: 4", "num_embeddings: 72_543\n        embedding_dim: 8"))
    assert main([twhin_file.name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "local.yaml: model.embeddings.tables[1].embedding_dim: is 8 but model.embeddings.tables[0] has 4" in err


# --------------------------------------------------------------------------- round trip


def _schedule(lr: Any) -> Optional[Dict[str, Any]]:
    lr = {k: v for k, v in (lr or {}).items() if v is not None}
    return lr or None


def _optimizer(opt: Dict[str, Any]) -> Dict[str, Any]:
    """A tml OptimizerConfig with tml's defaults filled in and nulls dropped."""
    algorithm = next(k for k in ("sgd", "adam", "adagrad") if opt.get(k) is not None)
    body = {k: v for k, v in opt[algorithm].items() if v is not None}
    defaults = {"sgd": {"momentum": 0.0}, "adam": {"betas": [0.9, 0.999], "eps": 1e-7}, "adagrad": {"eps": 0.0}}
    out: Dict[str, Any] = {algorithm: {**defaults[algorithm], **body}}
    if _schedule(opt.get("learning_rate")):
        out["learning_rate"] = _schedule(opt["learning_rate"])
    return out


def _table_basics(t: Dict[str, Any]) -> Dict[str, Any]:
    item = {k: t[k] for k in ("name", "num_embeddings", "embedding_dim")}
    for key in ("pretrained", "vocab"):
        if t.get(key) is not None:
            item[key] = t[key]
    return item


def _normalise(model: Dict[str, Any]) -> Dict[str, Any]:
    """A recap-format tml model's embedding sections with tml's defaults filled in and nulls dropped."""
    out: Dict[str, Any] = {}
    large = model.get("large_embeddings")
    if large is not None:
        tables = [_table_basics(t) for t in large["tables"]]
        coll = {"init_learning_rate": large["optimizer"]["init_learning_rate"]}
        if _schedule(large["optimizer"].get("learning_rate")):
            coll["learning_rate"] = _schedule(large["optimizer"]["learning_rate"])
        out["large_embeddings"] = {"tables": tables, "optimizer": coll}
        if large.get("tables_to_log"):
            out["large_embeddings"]["tables_to_log"] = large["tables_to_log"]
    if model.get("small_embeddings") is not None:
        out["small_embeddings"] = model["small_embeddings"]
    if model.get("stratifiers") is not None:
        out["stratifiers"] = model["stratifiers"]
    return out


def _normalise_common(emb: Dict[str, Any]) -> Dict[str, Any]:
    """A common-format LargeEmbeddingsConfig with tml's defaults filled in and nulls dropped."""
    tables = [{**_table_basics(t), "data_type": t["data_type"], "optimizer": _optimizer(t["optimizer"])} for t in emb["tables"]]
    out: Dict[str, Any] = {"tables": tables}
    if emb.get("tables_to_log"):
        out["tables_to_log"] = emb["tables_to_log"]
    return out


_rates = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
_steps = st.integers(min_value=1, max_value=10**6)


@st.composite
def _schedules(draw: st.DrawFn, peak: Optional[float] = None) -> Dict[str, Any]:
    rate = st.just(peak) if peak is not None and draw(st.booleans()) else _rates  # sometimes the lr option's own value
    kind = draw(st.sampled_from(["constant", "linear_ramp_to_constant", "linear_ramp_to_cosine", "piecewise_constant"]))
    if kind == "constant":
        body: Any = draw(rate)
    elif kind == "linear_ramp_to_constant":
        body = {"learning_rate": draw(rate), "num_ramp_steps": draw(st.one_of(st.just(1000), _steps))}
    elif kind == "linear_ramp_to_cosine":
        ramp = draw(st.integers(min_value=1, max_value=10**5))
        body = {"learning_rate": draw(rate), "final_learning_rate": draw(st.one_of(st.just(0.0), _rates)),
                "num_ramp_steps": ramp, "final_num_steps": ramp + draw(st.integers(min_value=1, max_value=10**5))}
    else:
        bounds = sorted(draw(st.sets(st.integers(min_value=1, max_value=10**6), max_size=3)))
        body = {"learning_rate_boundaries": bounds, "learning_rate_values": draw(st.lists(_rates, min_size=len(bounds) + 1, max_size=len(bounds) + 1))}
    nulls = {k: None for k in draw(st.sets(st.sampled_from(["constant", "linear_ramp_to_constant", "piecewise_constant"]))) if k != kind}
    return {**nulls, kind: body}  # tml dumps unset one-of fields as null


@st.composite
def _table_optimizers(draw: st.DrawFn) -> Dict[str, Any]:
    algorithm = draw(st.sampled_from(["sgd", "adam", "adagrad"]))
    body: Dict[str, Any] = {"lr": draw(_rates)}
    if algorithm == "sgd" and draw(st.booleans()):
        body["momentum"] = 0.0
    if algorithm == "adam" and draw(st.booleans()):
        body["betas"] = [draw(st.floats(0.5, 0.99)), draw(st.floats(0.9, 0.9999))]
    if algorithm != "sgd" and draw(st.booleans()):
        body["eps"] = draw(st.floats(min_value=0.0, max_value=1e-3))
    out: Dict[str, Any] = {algorithm: body}
    if draw(st.booleans()):
        out["learning_rate"] = draw(_schedules())
    return out


# Names YAML or OmegaConf would read as something else must survive as strings.
_names = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9_]{0,9}", fullmatch=True),
    st.sampled_from(["null", "on", "no", "true", "1e3", "123", "1_000", "0x1f", "0o17"]),
)


@st.composite
def _tml_tables(draw: st.DrawFn, common: bool) -> List[Dict[str, Any]]:
    names = draw(st.lists(_names, min_size=1, max_size=5, unique=True))
    tables = []
    for name in names:
        t: Dict[str, Any] = {"name": name, "num_embeddings": draw(st.integers(1, 10**8)), "embedding_dim": 4 * draw(st.integers(1, 64))}
        for key, values in (
            ("vocab", st.from_regex(r"(gs://|/)[a-z0-9_/]{1,20}", fullmatch=True)),
            ("pretrained", st.fixed_dictionaries({"emb_name": _names, "embedding_snapshot_uri": st.from_regex(r"gs://[a-z0-9_/]{1,20}", fullmatch=True)})),
        ):
            choice = draw(st.sampled_from(["set", "absent", "null"]))
            if choice == "set":
                t[key] = draw(values)
            elif choice == "null":
                t[key] = None
        if common:  # required in the common format
            t["data_type"] = draw(st.sampled_from(["fp32", "fp16"]))
            t["optimizer"] = draw(_table_optimizers())
        tables.append(t)
    return tables


@st.composite
def _tml_models(draw: st.DrawFn) -> Dict[str, Any]:
    """Random recap-format models (collection optimizer), with small tables and strata."""
    tables = draw(_tml_tables(common=False))
    names = [t["name"] for t in tables]
    init = draw(_rates)
    large: Dict[str, Any] = {"tables": tables, "optimizer": {"init_learning_rate": init}}
    if draw(st.booleans()):
        large["optimizer"]["learning_rate"] = draw(_schedules(peak=init))
    if draw(st.booleans()):
        large["tables_to_log"] = draw(st.lists(st.sampled_from(names), unique=True))
    model: Dict[str, Any] = {"large_embeddings": large}
    if draw(st.booleans()):
        small = draw(st.lists(_names, min_size=1, max_size=3, unique=True))
        model["small_embeddings"] = {"tables": [
            {"name": n, "num_embeddings": draw(st.integers(1, 1000)), "embedding_dim": draw(st.integers(1, 32)), "index": draw(st.integers(0, 20))}
            for n in small
        ]}
    if draw(st.booleans()):
        strata = draw(st.lists(_names, min_size=1, max_size=3, unique=True))
        model["stratifiers"] = [{"name": n, "index": draw(st.integers(0, 20)), "value": draw(st.integers(-5, 5))} for n in strata]
    return model


@st.composite
def _tml_common_embeddings(draw: st.DrawFn) -> Dict[str, Any]:
    """Random common-format LargeEmbeddingsConfigs (an optimizer and data type per table)."""
    tables = draw(_tml_tables(common=True))
    emb: Dict[str, Any] = {"tables": tables}
    if draw(st.booleans()):
        emb["tables_to_log"] = draw(st.lists(st.sampled_from([t["name"] for t in tables]), unique=True))
    return emb


def _round_trip(node: Dict[str, Any]) -> Tuple[Any, Any]:
    """`node` converted, written as presets and composed: (composed config, conversion)."""
    original = copy.deepcopy(node)
    conversion = from_tml(node, path="model")
    assert node == original  # the input is not modified
    groups = [g for g, v in (("embeddings", conversion.embeddings), ("small_embeddings", conversion.small_embeddings),
                              ("stratifiers", conversion.stratifiers)) if v is not None]
    with tempfile.TemporaryDirectory() as tmp:
        write_presets(conversion, tmp, "rt")
        cfg = compose_presets(Path(tmp), "rt", groups)
    validate(cfg, device="cuda")  # adam is CUDA-only in ours; the rules still hold
    return cfg, conversion


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=_tml_models())
def test_round_trip_through_composed_presets(model: Dict[str, Any]) -> None:
    cfg, conversion = _round_trip(model)
    expected = _normalise(model)
    assert to_tml(cfg) == expected
    assert to_tml(conversion) == expected  # the plain dicts mean the same as the composed presets


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(emb=_tml_common_embeddings(), twhin=st.booleans())
def test_common_format_round_trip_through_composed_presets(emb: Dict[str, Any], twhin: bool) -> None:
    """Both as TwHIN's model (relations naming the tables; one dim and data type) and alone."""
    if twhin:
        for t in emb["tables"]:
            t["embedding_dim"], t["data_type"] = emb["tables"][0]["embedding_dim"], emb["tables"][0]["data_type"]
        first = str(emb["tables"][0]["name"])
        node: Dict[str, Any] = {"embeddings": emb, "relations": [{"name": "r", "lhs": first, "rhs": first}], "translation_optimizer": {"sgd": {"lr": 0.1}}}
    else:
        node = emb
    cfg, conversion = _round_trip(node)
    assert conversion.format == COMMON_FORMAT
    expected = {"embeddings": _normalise_common(emb)}
    assert to_tml(cfg) == expected
    assert to_tml(conversion) == expected


# --------------------------------------------------------------------------- TwHIN's YAML in the apps


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, "model"])
def test_twhin_yaml_plans_and_trains_in_the_training_app(twhin_file: Path, key: Optional[str]) -> None:
    """Converted, then planned by recap-embed-plan and trained by recap-embed-train as they are.

    The app's data has features `user` and `item`: the tweet table reads `item` through the app's
    item vocab, in place of the app's own item table.
    """
    assert main([twhin_file.name, "--name", "twhin_tml"] + (["--key", key] if key else [])) == 0
    conf = twhin_file.parent / "conf"
    common = [f"hydra.searchpath=[file://{conf}]", "embeddings=twhin_tml"]
    plan_dir = twhin_file.parent / "plan"
    run(python_m("recap_embed.plan", *common, "topology.world_size=2", f"hydra.run.dir={plan_dir}"), cwd=twhin_file.parent, timeout=300)
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert set(plan["tables"]) == {"user", "tweet"}

    run_dir = twhin_file.parent / "run"
    run(
        python_m("recap_embed.train", *common, "~embeddings.tables.item",
                 "embeddings.tables.tweet.feature_names=[item]", "embeddings.tables.tweet.vocab=${data.dir}/vocab/item",
                 "data.synthetic.num_train=20000", "data.synthetic.num_eval=4000", "data.synthetic.unknown_rate=0",
                 "train.epochs=1", "train.progress=false", f"hydra.run.dir={run_dir}"),
        cwd=twhin_file.parent, timeout=300,
    )
    composed = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["embeddings"]["tables"]
    assert {k: (t["num_embeddings"], t["embedding_dim"], t["optimizer"]["init_learning_rate"]) for k, t in composed.items()} == {
        "user": (424241, 4, 0.01), "tweet": (72543, 4, 0.005)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == metrics["rows"]["train"] // 1024 and metrics["embedding_dims"] == {"user": 4, "tweet": 4}
    assert 0.5 < metrics["eval_auroc"] < 1
