"""Migration from tml YAML: conversion rules, presets that compose, the CLI, and a round trip."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig

from recap_embed.cli.from_tml import main
from recap_embed.config import validate
from recap_embed.config.store import register_configs
from recap_embed.config.tml import (
    TmlConversionError,
    from_tml,
    render_presets,
    to_tml,
    write_presets,
)

REPO = Path(__file__).resolve().parents[1]

# The seed's TwHIN tables as the tml heavy ranker wrote them (a list, per-table SGD).
TWHIN_TML = """\
training:
  num_train_steps: 10
model:
  tasks: {}
  large_embeddings:
    tables:
      - name: user
        num_embeddings: 424241
        embedding_dim: 4
        data_type: fp32
        optimizer:
          sgd: {lr: 0.01}
          learning_rate: {constant: 0.01}
      - name: tweet
        num_embeddings: 72543
        embedding_dim: 4
        data_type: fp32
        optimizer:
          sgd: {lr: 0.005}
          learning_rate: {constant: 0.005}
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


# --------------------------------------------------------------------------- the TwHIN seed


def test_twhin_presets_compose_to_the_tml_values(tmp_path: Path) -> None:
    conversion = from_tml(twhin_model(), path="model")
    written = write_presets(conversion, tmp_path, "twhin_tml", source="twhin.yaml")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "embeddings/twhin_tml.yaml",
        "small_embeddings/twhin_tml.yaml",
        "stratifiers/twhin_tml.yaml",
    ]
    for path in written:
        assert path.read_text().startswith("# Converted by recap-embed-from-tml from twhin.yaml")

    cfg = compose_presets(tmp_path, "twhin_tml", ["embeddings", "small_embeddings", "stratifiers"])
    emb = cfg.embeddings
    assert list(emb.tables) == ["user", "tweet"]
    assert (emb.tables.user.num_embeddings, emb.tables.tweet.num_embeddings) == (424241, 72543)
    assert emb.tables.user.embedding_dim == emb.tables.tweet.embedding_dim == 4
    assert _word(emb.tables.user.data_type) == _word(emb.tables.tweet.data_type) == "fp32"
    for key, lr in (("user", 0.01), ("tweet", 0.005)):
        opt = emb.tables[key].optimizer
        assert _word(opt.algorithm) == "sgd"
        assert opt.init_learning_rate == lr and opt.learning_rate.constant == lr
    assert _word(emb.optimizer.algorithm) == "sgd"
    assert emb.optimizer.init_learning_rate == 0.01 and emb.optimizer.learning_rate.constant == 0.01
    assert list(emb.tables_to_log) == ["user"]
    assert cfg.small_embeddings.tables.country.index == 3
    assert cfg.stratifiers.strata.country_us.value == 1
    validate(cfg, device="cpu", num_discrete_features=8)
    assert to_tml(cfg) == _normalise(twhin_model())


def _word(value: Any) -> Any:
    """An enum's member name, or the value (tables may be open mappings holding plain strings)."""
    return getattr(value, "name", value)


def _effective(large: Dict[str, Any]) -> Dict[str, Any]:
    """What training would use per table: rows, dim, type, algorithm and schedule."""
    collection = large["optimizer"].get("learning_rate")
    out = {}
    for t in large["tables"]:
        opt = t.get("optimizer") or {}
        algorithm = next((k for k in ("sgd", "adam", "adagrad") if k in opt), "sgd")
        out[t["name"]] = (t["num_embeddings"], t["embedding_dim"], t["data_type"], algorithm, opt.get("learning_rate") or collection)
    return out


def test_twhin_conversion_matches_the_shipped_preset(tmp_path: Path) -> None:
    """conf/embeddings/twhin.yaml was written by hand from the same tml tables."""
    shipped = compose_presets(tmp_path, "twhin", ["embeddings"])  # found on the plugin's search path
    converted = to_tml(from_tml(twhin_model(), path="model"))["large_embeddings"]
    assert _effective(to_tml(shipped)["large_embeddings"]) == _effective(converted)


def test_collection_schedule_picks_the_matching_lr_option(tmp_path: Path) -> None:
    """A schedule equal to the `lr` option is not restated, so `embeddings/lr=` still switches."""
    text = render_presets(from_tml(twhin_model(), path="model"), "t")["embeddings/t.yaml"]
    doc = yaml.safe_load(text)
    assert doc["defaults"] == ["base", {"optimizer": "sgd"}, {"lr": "constant"}, "_self_", {"tables": []}]
    assert doc["optimizer"] == {"init_learning_rate": 0.01}  # constant 0.01 is the option's ${..init_learning_rate}
    assert "algorithm" not in doc["optimizer"]

    write_presets(from_tml(twhin_model(), path="model"), tmp_path, "t")
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
    model = twhin_model()
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
    large = twhin_model()["large_embeddings"]
    conversion = from_tml(large, path="model.large_embeddings")
    assert conversion.small_embeddings is None and conversion.stratifiers is None
    assert list(conversion.embeddings["tables"]) == ["user", "tweet"]
    assert conversion.origin == {"embeddings": "model.large_embeddings"}


def test_tml_adam_and_adagrad_defaults_are_written_out() -> None:
    """Ours default eps to 1e-8; tml's adam is 1e-7 and adagrad 0, so they must be explicit."""
    model = twhin_model()
    tables = model["large_embeddings"]["tables"]
    tables[0]["optimizer"] = {"adam": {"lr": 0.001}}
    tables[1]["optimizer"] = {"adagrad": {"lr": "1e-2"}, "learning_rate": None}  # PyYAML reads 1e-2 as a string
    emb = from_tml(model).embeddings
    assert emb["tables"]["user"]["optimizer"] == {"algorithm": "adam", "init_learning_rate": 0.001, "eps": 1e-7, "beta1": 0.9, "beta2": 0.999}
    assert emb["tables"]["tweet"]["optimizer"] == {"algorithm": "adagrad", "init_learning_rate": 0.01, "eps": 0.0}


def test_environment_variables_become_oc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = twhin_model()
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


# --------------------------------------------------------------------------- conversion errors


def _set(path: List[Any], value: Any):
    def mutate(model: Dict[str, Any]) -> None:
        node = model
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


LARGE = ["large_embeddings"]
T0, T1 = LARGE + ["tables", 0], LARGE + ["tables", 1]


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (_set(T1 + ["optimiser"], {"sgd": {"lr": 0.1}}), "model.large_embeddings.tables[1].optimiser", "allowed here: name, num_embeddings, embedding_dim"),
        (_set(T0 + ["optimizer", "adamw"], {"lr": 0.1}), "model.large_embeddings.tables[0].optimizer.adamw", "allowed here: learning_rate, adam, sgd, adagrad"),
        (_set(T0 + ["optimizer", "sgd", "nesterov"], True), "model.large_embeddings.tables[0].optimizer.sgd.nesterov", "allowed here: lr, momentum"),
        (_set(LARGE + ["optimizer", "lr"], 0.1), "model.large_embeddings.optimizer.lr", "allowed here: learning_rate, init_learning_rate"),
        (_set(LARGE + ["optimizer", "learning_rate", "cosine"], 0.1), "model.large_embeddings.optimizer.learning_rate.cosine", "allowed here: constant"),
        (_set(LARGE + ["table"], []), "model.large_embeddings.table", "allowed here: tables, optimizer, tables_to_log"),
        (_set(["small_embeddings", "tables", 0, "idx"], 1), "model.small_embeddings.tables[0].idx", "allowed here: name, num_embeddings, embedding_dim, index"),
        (_set(T0 + ["optimizer", "sgd", "momentum"], 0.9), "model.large_embeddings.tables[0].optimizer.sgd.momentum", "no momentum"),
        (_set(T0 + ["optimizer", "adam"], {"lr": 0.1}), "model.large_embeddings.tables[0].optimizer", "found adam and sgd"),
        (_set(T0 + ["optimizer", "sgd"], None), "model.large_embeddings.tables[0].optimizer", "found none"),
        (_set(T1 + ["optimizer", "learning_rate", "piecewise_constant"], {"learning_rate_boundaries": [1], "learning_rate_values": [1.0, 0.1]}),
         "model.large_embeddings.tables[1].optimizer.learning_rate", "found constant and piecewise_constant"),
        (_set(LARGE + ["optimizer", "learning_rate", "linear_ramp_to_constant"], {"learning_rate": 0.1, "num_ramp_steps": 9}),
         "model.large_embeddings.optimizer.learning_rate", "exactly one learning-rate schedule"),
        (_set(T1 + ["name"], "user"), "model.large_embeddings.tables[1].name", "duplicate table name 'user' (also model.large_embeddings.tables[0])"),
        (_set(["stratifiers"], [{"name": "a", "index": 1, "value": 1}, {"name": "a", "index": 2, "value": 1}]), "model.stratifiers[1].name", "duplicate stratifier name"),
        (_set(T0 + ["num_embeddings"], "many"), "model.large_embeddings.tables[0].num_embeddings", "expected an integer"),
        (_set(T0 + ["embedding_dim"], None), "model.large_embeddings.tables[0].embedding_dim", "missing"),
        (_set(T0 + ["data_type"], "bf16"), "model.large_embeddings.tables[0].data_type", "allowed: fp32, fp16"),
        (_set(LARGE + ["optimizer", "init_learning_rate"], None), "model.large_embeddings.optimizer.init_learning_rate", "missing"),
        (_set(LARGE + ["tables_to_log"], ["user", "author"]), "model.large_embeddings.tables_to_log[1]", "'author' is not a table"),
        (_set(T0 + ["pretrained"], {"emb_name": "u"}), "model.large_embeddings.tables[0].pretrained.embedding_snapshot_uri", "missing"),
        (_set(["stratifiers"], {"name": "a"}), "model.stratifiers", "expected a list"),
    ],
)
def test_conversion_errors_name_the_path(mutate, path: str, words: str) -> None:
    model = twhin_model()
    mutate(model)
    with pytest.raises(TmlConversionError) as info:
        from_tml(model, path="model")
    assert info.value.path == path
    assert str(info.value).startswith(path + ": ")
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_nothing_to_convert_is_an_error() -> None:
    with pytest.raises(TmlConversionError, match="nothing to convert"):
        from_tml({"tasks": {}, "large_embeddings": None, "small_embeddings": None, "stratifiers": None}, path="model")


def test_to_tml_refuses_what_tml_cannot_express(tmp_path: Path) -> None:
    write_presets(from_tml(twhin_model(), path="model"), tmp_path, "t")
    cases = {
        "embeddings.tables.user.optimizer.algorithm=rowwise_adagrad": "embeddings.tables.user.optimizer.algorithm",
        "embeddings.tables.user.pooling=mean": "embeddings.tables.user.pooling",
        "embeddings/optimizer=adagrad": "embeddings.optimizer.algorithm",
    }
    for override, path in cases.items():
        cfg = compose_presets(tmp_path, "t", ["embeddings"], [override])
        with pytest.raises(TmlConversionError) as info:
            to_tml(cfg)
        assert info.value.path == path


# --------------------------------------------------------------------------- writing and the CLI


def test_write_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    conversion = from_tml(twhin_model(), path="model")
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
    conversion = from_tml(twhin_model(), path="model")
    for name in ("base", "a/b", "a.b", "-x", ""):
        with pytest.raises(ValueError, match="preset name"):
            write_presets(conversion, tmp_path, name)


@pytest.fixture()
def tml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recap.v2.yaml"
    path.write_text(TWHIN_TML)
    return path


def test_cli_writes_presets_under_conf(tml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([tml_file.name]) == 0  # --key defaults to `model` when the root has no sections
    out = capsys.readouterr().out
    assert "wrote conf/embeddings/recap_v2.yaml" in out and "embeddings=recap_v2" in out
    text = (tml_file.parent / "conf" / "embeddings" / "recap_v2.yaml").read_text()
    assert text.startswith("# Converted by recap-embed-from-tml from recap.v2.yaml (key model.large_embeddings).")
    cfg = compose_presets(tml_file.parent / "conf", "recap_v2", ["embeddings", "small_embeddings", "stratifiers"])
    assert cfg.embeddings.tables.tweet.optimizer.init_learning_rate == 0.005

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
    tml_file.write_text(TWHIN_TML.replace("        data_type: fp32\n        optimizer:\n          sgd: {lr: 0.005}", "        data_type: fp32\n        optimiser:\n          sgd: {lr: 0.005}"))
    assert main([tml_file.name]) == 2
    err = capsys.readouterr().err
    assert "recap.v2.yaml: model.large_embeddings.tables[1].optimiser: unknown key" in err


def test_cli_warns_about_our_rules_but_converts(tml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tml_file.write_text(TWHIN_TML.replace("embedding_dim: 4\n        data_type: fp32\n        optimizer:\n          sgd: {lr: 0.005}", "embedding_dim: 6\n        data_type: fp32\n        optimizer:\n          sgd: {lr: 0.005}"))
    assert main([tml_file.name, "--print"]) == 0
    err = capsys.readouterr().err
    assert "warning: embeddings.tables.tweet.embedding_dim: 6 is not a multiple of 4" in err


def test_module_entry_point(tml_file: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = [sys.executable, "-m", "recap_embed.cli.from_tml"]
    ok = subprocess.run([*run, tml_file.name, "--print"], cwd=tml_file.parent, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "# ==> stratifiers/recap_v2.yaml <==" in ok.stdout
    bad = subprocess.run([*run, tml_file.name, "--key", "nope"], cwd=tml_file.parent, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


# --------------------------------------------------------------------------- round trip


def _normalise(model: Dict[str, Any]) -> Dict[str, Any]:
    """A tml model's embedding sections with tml's defaults filled in and nulls dropped."""

    def schedule(lr: Any) -> Optional[Dict[str, Any]]:
        lr = {k: v for k, v in (lr or {}).items() if v is not None}
        return lr or None

    def optimizer(opt: Dict[str, Any]) -> Dict[str, Any]:
        algorithm = next(k for k in ("sgd", "adam", "adagrad") if opt.get(k) is not None)
        body = {k: v for k, v in opt[algorithm].items() if v is not None}
        defaults = {"sgd": {"momentum": 0.0}, "adam": {"betas": [0.9, 0.999], "eps": 1e-7}, "adagrad": {"eps": 0.0}}
        out: Dict[str, Any] = {algorithm: {**defaults[algorithm], **body}}
        if schedule(opt.get("learning_rate")):
            out["learning_rate"] = schedule(opt["learning_rate"])
        return out

    out: Dict[str, Any] = {}
    large = model.get("large_embeddings")
    if large is not None:
        tables = []
        for t in large["tables"]:
            item = {k: t[k] for k in ("name", "num_embeddings", "embedding_dim")}
            item["data_type"] = t.get("data_type") or "fp32"
            for key in ("pretrained", "vocab"):
                if t.get(key) is not None:
                    item[key] = t[key]
            if t.get("optimizer") is not None:
                item["optimizer"] = optimizer(t["optimizer"])
            tables.append(item)
        coll = {"init_learning_rate": large["optimizer"]["init_learning_rate"]}
        if schedule(large["optimizer"].get("learning_rate")):
            coll["learning_rate"] = schedule(large["optimizer"]["learning_rate"])
        out["large_embeddings"] = {"tables": tables, "optimizer": coll}
        if large.get("tables_to_log"):
            out["large_embeddings"]["tables_to_log"] = large["tables_to_log"]
    if model.get("small_embeddings") is not None:
        out["small_embeddings"] = model["small_embeddings"]
    if model.get("stratifiers") is not None:
        out["stratifiers"] = model["stratifiers"]
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
    st.sampled_from(["null", "on", "no", "true", "1e3", "123", "1_000", "0x1f", ".5"]),
)


@st.composite
def _tml_models(draw: st.DrawFn) -> Dict[str, Any]:
    names = draw(st.lists(_names, min_size=1, max_size=5, unique=True))
    tables = []
    for name in names:
        t: Dict[str, Any] = {"name": name, "num_embeddings": draw(st.integers(1, 10**8)), "embedding_dim": 4 * draw(st.integers(1, 64))}
        for key, values in (
            ("data_type", st.sampled_from(["fp32", "fp16"])),
            ("vocab", st.from_regex(r"(gs://|/)[a-z0-9_/]{1,20}", fullmatch=True)),
            ("pretrained", st.fixed_dictionaries({"emb_name": _names, "embedding_snapshot_uri": st.from_regex(r"gs://[a-z0-9_/]{1,20}", fullmatch=True)})),
            ("optimizer", _table_optimizers()),
        ):
            choice = draw(st.sampled_from(["set", "absent", "null"]))
            if choice == "set":
                t[key] = draw(values)
            elif choice == "null":
                t[key] = None
        tables.append(t)
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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=_tml_models())
def test_round_trip_through_composed_presets(model: Dict[str, Any]) -> None:
    original = copy.deepcopy(model)
    conversion = from_tml(model, path="model")
    assert model == original  # the input is not modified
    groups = [g for g, v in (("embeddings", conversion.embeddings), ("small_embeddings", conversion.small_embeddings),
                              ("stratifiers", conversion.stratifiers)) if v is not None]
    with tempfile.TemporaryDirectory() as tmp:
        write_presets(conversion, tmp, "rt")
        cfg = compose_presets(Path(tmp), "rt", groups)
    validate(cfg, device="cuda")  # adam is CUDA-only in ours; the rules still hold
    expected = _normalise(original)
    assert to_tml(cfg) == expected
    assert to_tml(conversion) == expected  # the plain dicts mean the same as the composed presets
