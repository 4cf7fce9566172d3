"""A matrix of bad inputs: each stops the job before it spends anything, with a message that names
the config path (or file), the bad value and what is allowed, and no traceback from the console
scripts unless HYDRA_FULL_ERROR=1.

Rules of `validate` already covered in tests/test_validate.py (rows and dims, duplicate names and
features, tables_to_log, empty pretrained names, schedule order and counts, two schedules, CPU
algorithms, oov_policy/buckets, data_type, feature_names, CPU sharding types, unknown sharding
tables, batch_size, small-table and stratifier indices) are not repeated here; this file adds the
rules it does not reach and every other kind of bad input. Families:

* ``RULES``: the remaining rules of `validate`, through compose (the minimal app's conf).
* ``COMPOSE``: bad YAML types, unknown keys and overrides that Hydra/OmegaConf reject at compose.
* ``PRESETS``: a user's own preset files with type errors, unknown keys and missing values.
* ``APP``: the training app through its Python API (`Trainer`): bad snapshots, vocabularies,
  indices beyond the data's width, unknown tables, device limits, untrusted targets; each asserts
  that no checkpoint and no metrics.json were written (and, where the check needs no data, that
  no data was generated).
* ``CLI``: the console scripts in subprocesses (run two at a time), with and without
  HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import yaml
from hydra import compose, initialize
from hydra.errors import HydraException

import recap_embed.train.config  # noqa: F401  (registers the app's schema)
from conftest import TESTS, compose_app
from launch import console, run as run_command
from recap_embed.config import ConfigValidationError, validate
from recap_embed.errors import USER_ERRORS

REPO = TESTS.parent

# The app's data, kept tiny: 200 users + 1 OOV row, 50 items.
TINY = [
    "data.synthetic.num_users=200",
    "data.synthetic.num_items=50",
    "data.synthetic.num_train=2000",
    "data.synthetic.num_eval=500",
    "train.progress=false",
    "train.max_steps=2",
]
USER_ROWS = 201
DIM = 16


class Case(NamedTuple):
    overrides: List[str]
    path: str  # the config path (or file) the message must name
    words: List[str]  # the bad value and what is allowed


def check_message(message: str, case: Case) -> None:
    assert case.path in message, (case.path, message)
    for word in case.words:
        assert word in message, (word, message)


# --------------------------------------------------------------------------- RULES: validate


def problems_of(overrides: List[str], **kwargs) -> str:
    cfg = compose_app(["+small_embeddings=synthetic", "+stratifiers=synthetic", *overrides])
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, **{"device": "cpu", "num_discrete_features": 3, **kwargs})
    return str(err.value)


T = "embeddings.tables.user"
OPT = "embeddings.optimizer"
LR = f"{OPT}.learning_rate"

RULES = {
    "vocab_empty": Case([f"{T}.vocab=''"], f"{T}.vocab", ["is empty", "directory of parquet files"]),
    "oov_buckets_negative": Case([f"{T}.oov_buckets=-3"], f"{T}.oov_buckets", ["-3", "non-negative"]),
    "eps_negative": Case([f"{OPT}.eps=-1e-3"], f"{OPT}.eps", ["-0.001", ">= 0"]),
    "weight_decay_negative": Case([f"{OPT}.weight_decay=-0.5"], f"{OPT}.weight_decay", ["-0.5", ">= 0"]),
    "beta1_one": Case([f"{OPT}.beta1=1.0"], f"{OPT}.beta1", ["1.0", "[0, 1)"]),
    "table_beta2_negative": Case([f"{T}.optimizer.beta2=-0.1"], f"{T}.optimizer.beta2", ["-0.1", "[0, 1)"]),
    "table_adam_cpu": Case([f"{T}.optimizer.algorithm=partial_rowwise_adam"], f"{T}.optimizer.algorithm", ["partial_rowwise_adam", "allowed on CPU", "rowwise_adagrad"]),
    "ramp_rate_negative": Case(
        ["embeddings/lr=linear_ramp_to_constant", f"{LR}.linear_ramp_to_constant.learning_rate=-0.1"],
        f"{LR}.linear_ramp_to_constant.learning_rate", ["-0.1", ">= 0"],
    ),
    "cosine_final_rate_negative": Case(
        ["embeddings/lr=linear_ramp_to_cosine", f"{LR}.linear_ramp_to_cosine.final_learning_rate=-1"],
        f"{LR}.linear_ramp_to_cosine.final_learning_rate", ["-1", ">= 0"],
    ),
    "cosine_final_steps_zero": Case(
        ["embeddings/lr=linear_ramp_to_cosine", f"{LR}.linear_ramp_to_cosine.final_num_steps=0"],
        f"{LR}.linear_ramp_to_cosine.final_num_steps", ["0", "positive integer"],
    ),
    "piecewise_negative_boundary": Case(
        ["embeddings/lr=piecewise_constant", f"{LR}.piecewise_constant.learning_rate_boundaries=[-5,10]"],
        f"{LR}.piecewise_constant.learning_rate_boundaries", ["[-5, 10]", "non-negative", "strictly increasing"],
    ),
    "piecewise_negative_value": Case(
        ["embeddings/lr=piecewise_constant", f"{LR}.piecewise_constant.learning_rate_values=[0.1,-0.01,0.001]"],
        f"{LR}.piecewise_constant.learning_rate_values[1]", ["-0.01", ">= 0"],
    ),
    "small_dim_zero": Case(["small_embeddings.tables.country.embedding_dim=0"], "small_embeddings.tables.country.embedding_dim", ["0", "positive integer"]),
    "device_unknown": Case(["sharding.device=tpu"], "sharding.device", ["'tpu'", "auto, cpu, cuda, cuda:N"]),
    "hbm_cap_zero": Case(["sharding.hbm_cap_gb=0"], "sharding.hbm_cap_gb", ["0", "positive size in GB"]),
    "ddr_cap_negative": Case(["sharding.ddr_cap_gb=-8"], "sharding.ddr_cap_gb", ["-8", "positive size in GB"]),
    "cache_load_factor": Case(["+sharding.tables={user: {cache_load_factor: 1.5}}"], "sharding.tables.user.cache_load_factor", ["1.5", "(0, 1]"]),
    "plan_unknown_table": Case(
        ["+sharding.plan={nope: {sharding_type: table_wise, compute_kernel: fused}}"],
        "sharding.plan.nope", ["'nope'", "not a table", "tweet, user"],
    ),
    "plan_row_wise_cpu": Case(
        ["+sharding.plan={user: {sharding_type: row_wise, compute_kernel: fused}}"],
        "sharding.plan.user.sharding_type", ["row_wise", "needs CUDA", "table_wise"],
    ),
    "table_grid_shard_cpu": Case(["+sharding.tables={user: {sharding_types: [grid_shard]}}"], "sharding.tables.user.sharding_types[0]", ["grid_shard", "allowed on CPU"]),
    "stratum_value_missing": Case(["stratifiers.strata.device_0.value=???"], "stratifiers.strata.device_0.value", ["missing", "int"]),
}


@pytest.mark.parametrize("name", list(RULES))
def test_rule(name: str) -> None:
    case = RULES[name]
    kwargs = {"device": None} if name == "device_unknown" else {}  # the config's device, not a given one
    check_message(problems_of(case.overrides, **kwargs), case)


# --------------------------------------------------------------------------- COMPOSE


def compose_error(overrides: List[str]) -> str:
    with pytest.raises(HydraException) as err:
        compose_app(overrides)
    cause = err.value.__cause__
    return f"{err.value}\n{cause if cause is not None else ''}"


COMPOSE = {
    # Tables are typed nodes: these fail when the config is composed, naming the full key.
    "table_unknown_key": Case([f"{T}.frobnicate=1"], f"{T}.frobnicate", ["frobnicate", "not in 'EmbeddingBagConfig'"]),
    "snapshot_unknown_key": Case([f"{T}.pretrained.uri=/snap"], f"{T}.pretrained.uri", ["'uri' not in 'EmbeddingSnapshot'"]),
    "pooling_enum": Case([f"{T}.pooling=max"], f"{T}.pooling", ["'max'", "sum, mean"]),
    "rows_not_int": Case([f"{T}.num_embeddings=lots"], f"{T}.num_embeddings", ["'lots'", "Integer"]),
    "unknown_table": Case(["embeddings.tables.usr.embedding_dim=8"], "embeddings.tables.usr", ["'usr'", "not in struct"]),
    "collection_dim_type": Case(["embeddings.embedding_dim=sixteen"], "embeddings.embedding_dim", ["'sixteen'", "Integer"]),
    "collection_unknown_key": Case(["embeddings.frobnicate=1"], "embeddings.frobnicate", ["Key 'frobnicate' not in 'LargeEmbeddingsConfig'"]),
    "tables_to_log_type": Case(["embeddings.tables_to_log=user"], "embeddings.tables_to_log", ["user"]),
    "unknown_group_option": Case(["embeddings/optimizer=nope"], "embeddings/optimizer/nope", ["Could not find", "Available options", "rowwise_adagrad"]),
    "unknown_table_option": Case(["embeddings/tables=[nope]"], "embeddings/tables/nope", ["Could not load"]),
    "delete_unknown_table": Case(["~embeddings.tables.nope"], "embeddings.tables.nope", ["does not exist"]),
    "sharding_batch_type": Case(["sharding.batch_size=big"], "sharding.batch_size", ["'big'", "Integer"]),
}


@pytest.mark.parametrize("name", list(COMPOSE))
def test_compose_rejects(name: str) -> None:
    case = COMPOSE[name]
    check_message(compose_error(case.overrides), case)


# --------------------------------------------------------------------------- PRESETS: user files


PRESETS = {
    # file content of conf/embeddings/mine.yaml, path, words
    "yaml_type_error": ("defaults: [base, _self_]\nembedding_dim: sixteen\ntables: {t: {num_embeddings: 10}}\n", "embeddings.embedding_dim", ["sixteen", "Integer"]),
    "yaml_table_typo": ("defaults: [base, _self_]\ntables: {t: {num_embedings: 10}}\n", "embeddings.tables.t.num_embedings", ["'num_embedings' not in 'EmbeddingBagConfig'"]),
    # Hydra's message names the file, not the key (OmegaConf reports an empty full_key here).
    "yaml_tables_list": ("defaults: [base, _self_]\ntables: [t]\n", "embeddings/mine", ["Cannot merge DictConfig with ListConfig"]),
    "yaml_syntax": ("defaults: [base, _self_]\ntables: {t: {num_embeddings: 10}\n", "mine.yaml", ["line 2, column 9", "expected ',' or '}'"]),
}
SMALL_PRESETS = {
    "small_index_missing": ("defaults: [base, _self_]\ntables: {os: {num_embeddings: 3, embedding_dim: 4}}\n", "small_embeddings.tables.os.index", ["missing", "index"]),
    "small_dim_type": ("defaults: [base, _self_]\ntables: {os: {num_embeddings: 3, embedding_dim: four, index: 0}}\n", "small_embeddings.tables.os.embedding_dim", ["'four'", "Integer"]),
}


def preset_error(tmp_path: Path, group: str, text: str) -> str:
    conf = tmp_path / "conf"
    (conf / group).mkdir(parents=True)
    (conf / group / "mine.yaml").write_text(text)
    (conf / "train.yaml").write_text(f"defaults:\n  - {group}: mine\n  - _self_\n")
    try:
        cfg = compose_app(config_dir=conf)
    except HydraException as e:
        return f"{e}\n{e.__cause__ or ''}"
    except yaml.YAMLError as e:  # the app turns these into a composition error (see the CLI case)
        return str(e)
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, device="cpu")
    return str(err.value)


@pytest.mark.parametrize("name", [*PRESETS, *SMALL_PRESETS])
def test_bad_preset_file(tmp_path: Path, name: str) -> None:
    group, (text, path, words) = ("embeddings", PRESETS[name]) if name in PRESETS else ("small_embeddings", SMALL_PRESETS[name])
    check_message(preset_error(tmp_path, group, text), Case([], path, words))


# --------------------------------------------------------------------------- APP: the Trainer


def compose_train(overrides: List[str]):
    with initialize(version_base=None, config_path=None):
        return compose("recap_embed_train", overrides=overrides)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Dict[str, Path]:
    """Generated data with its vocabs, snapshots (good and broken) and bad vocab directories."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torchsnapshot import Snapshot, StateDict

    from recap_embed.train.data import generate_synthetic

    root = tmp_path_factory.mktemp("assets")
    cfg = compose_train([f"data.dir={root / 'data'}", *TINY])
    generate_synthetic(root / "data", cfg.data.synthetic, 0)
    out = {"root": root, "data": root / "data"}

    Snapshot.take(str(root / "snap"), app_state={"model": StateDict(user=torch.randn(USER_ROWS, DIM))})
    out["snap"] = root / "snap"
    manifest = yaml.safe_load((root / "snap" / ".snapshot_metadata").read_text())["manifest"]
    location = manifest["0/model/user"]["location"]
    for damage in ("truncated", "missing_file", "bad_manifest", "no_manifest"):
        shutil.copytree(root / "snap", root / damage)
        out[damage] = root / damage
    data_file = root / "truncated" / location
    data_file.write_bytes(data_file.read_bytes()[:100])
    (root / "missing_file" / location).unlink()
    (root / "bad_manifest" / ".snapshot_metadata").write_text("version: [unclosed\n")
    (root / "no_manifest" / ".snapshot_metadata").unlink()
    (root / "a_file").write_text("not a snapshot\n")
    out["a_file"] = root / "a_file"
    Snapshot.take(str(root / "pickled"), app_state={"model": StateDict(user=("not", "a", "tensor"))})
    out["pickled"] = root / "pickled"
    out.update(escaping_snapshots(root, root / "snap", "0/model/user"))
    nan = torch.full((USER_ROWS, DIM), float("nan"))
    Snapshot.take(str(root / "nan_table"), app_state={"model": StateDict(user=nan)})
    one_inf = torch.randn(USER_ROWS, DIM)
    one_inf[17, 3] = float("inf")
    Snapshot.take(str(root / "inf_row"), app_state={"model": StateDict(user=one_inf)})
    out["nan_table"], out["inf_row"] = root / "nan_table", root / "inf_row"

    def vocab(name: str, columns: Dict[str, list]) -> None:
        (root / name).mkdir()
        pq.write_table(pa.table({k: pa.array(v, type=pa.int64()) for k, v in columns.items()}), root / name / "part-0.parquet")
        out[name] = root / name

    vocab("wrong_columns", {"key": [1, 2], "row": [0, 1]})
    vocab("duplicates", {"id": [11, 12, 12, 13], "row": [0, 1, 2, 3]})
    vocab("negative_rows", {"id": [11, 12], "row": [0, -4]})
    (root / "no_parquet").mkdir()
    out["no_parquet"] = root / "no_parquet"
    out.update(bad_splits(root, root / "data" / "train.parquet"))
    out.update(recorded_vocabs(root, root / "snap"))
    out["a_dir"] = root / "no_parquet"
    (root / "garbage").mkdir()
    (root / "garbage" / "part-0.parquet").write_text("not parquet")
    out["garbage"] = root / "garbage"
    return out


def bad_splits(root: Path, train: Path) -> Dict[str, Path]:
    """Copies of the generated train split with labels that are not 0/1, no rows, an unknown code."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(train)
    click = table.column("click").to_numpy().astype(np.float64)
    out = {}

    def write(name: str, t) -> None:
        pq.write_table(t, root / f"{name}.parquet")
        out[name] = root / f"{name}.parquet"

    def with_click(values) -> "pa.Table":
        return table.set_column(table.column_names.index("click"), "click", pa.array(values))

    write("labels_0_2", with_click((click * 2).astype(np.int8)))
    write("labels_signed", with_click((click * 2 - 1).astype(np.int8)))
    nan = click.copy()
    nan[::7] = np.nan
    write("labels_nan", with_click(nan))
    write("no_rows", table.slice(0, 0))
    country = table.column("country").to_numpy().copy()
    country[3] = 99
    write("code_99", table.set_column(table.column_names.index("country"), "country", pa.array(country)))
    return out


def recorded_vocabs(root: Path, snap: Path) -> Dict[str, Path]:
    """Copies of a snapshot whose checkpoint record says its user rows came from another vocab, or from raw ids."""
    import json

    out = {}
    for name, fp in {"snap_other_vocab": {"entries": 7, "sha256": "0" * 64}, "snap_raw_ids": None}.items():
        shutil.copytree(snap, root / name)
        (root / name / "recap_embed.json").write_text(json.dumps({"format": "recap_embed.checkpoint", "version": 1, "vocabs": {"user": fp}}))
        out[name] = root / name
    return out


SECRET = 7.0  # the value of every float in the file outside the snapshots


def escaping_snapshots(root: Path, good: Path, key: str) -> Dict[str, Path]:
    """Copies of snapshot `good` whose entry `key` (or manifest) reads a file outside the snapshot:
    an absolute location, a location climbing out with '..', a data file that is a symlink to the
    outside file, and a manifest that is a symlink out of the directory. The outside file has the
    entry's exact size, so a reader that follows any of them would load it without complaint."""
    import json

    manifest = json.loads((good / ".snapshot_metadata").read_text())
    entry = manifest["manifest"][key]
    secret = root / f"secret-{good.name}.bin"
    start, end = entry.get("byte_range") or [0, (good / entry["location"]).stat().st_size]
    secret.write_bytes(bytes(start) + __import__("struct").pack(f"<{(end - start) // 4}f", *[SECRET] * ((end - start) // 4)))
    out = {}

    def variant(name: str, location: Optional[str] = None) -> Path:
        target = root / name / good.name  # the same directory name (checkpoints are step_<N>)
        shutil.copytree(good, target)
        if location is not None:
            changed = json.loads(json.dumps(manifest))
            changed["manifest"][key]["location"] = location
            (target / ".snapshot_metadata").write_text(json.dumps(changed))
        out[name] = target
        return target

    variant("escape_absolute", str(secret))
    variant("escape_dotdot", f"../../{secret.name}")
    linked = variant("escape_symlink")
    (linked / entry["location"]).unlink()
    (linked / entry["location"]).symlink_to(secret)
    outside_manifest = root / f"outside-manifest-{good.name}.json"
    outside_manifest.write_text((good / ".snapshot_metadata").read_text())
    meta = variant("escape_manifest_symlink")
    (meta / ".snapshot_metadata").unlink()
    (meta / ".snapshot_metadata").symlink_to(outside_manifest)
    return out


def app_error(run_dir: Path, overrides: List[str], data_dir: Optional[Path] = None) -> str:
    """Build the Trainer; it must raise a user error before training. Without `data_dir` the data
    would be generated under `run_dir`: it must not have been (the check came first)."""
    from recap_embed.train.loop import Trainer

    cfg = compose_train([f"data.dir={data_dir or run_dir / 'data'}", *TINY, *overrides])
    with pytest.raises(USER_ERRORS) as err:
        Trainer(cfg, run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
    if data_dir is None:
        assert not (run_dir / "data").exists(), "data was generated before a check that needs none"
    return str(err.value)


U = "embeddings.tables.user"
P = f"{U}.pretrained"
# (overrides with {asset} placeholders, needs the generated data, path, words)
APP = {
    "pretrained_missing_path": ([f"{P}.embedding_snapshot_uri={{root}}/nope"], False, f"{P}.embedding_snapshot_uri", ["nope'", "does not exist"]),
    "pretrained_is_a_file": ([f"{P}.embedding_snapshot_uri={{a_file}}"], False, f"{P}.embedding_snapshot_uri", ["a_file'", "is not a directory"]),
    "pretrained_not_a_snapshot": ([f"{P}.embedding_snapshot_uri={{no_manifest}}"], False, f"{P}.embedding_snapshot_uri", ["no_manifest'", "not a complete torchsnapshot", ".snapshot_metadata"]),
    "pretrained_bad_manifest": ([f"{P}.embedding_snapshot_uri={{bad_manifest}}"], False, f"{P}.embedding_snapshot_uri", ["bad_manifest'", "corrupt"]),
    "pretrained_truncated": ([f"{P}.embedding_snapshot_uri={{truncated}}"], False, f"{P}.embedding_snapshot_uri", ["truncated'", "cut short", "100 bytes", f"{USER_ROWS * DIM * 4}"]),
    "pretrained_file_missing": ([f"{P}.embedding_snapshot_uri={{missing_file}}"], False, f"{P}.embedding_snapshot_uri", ["missing_file'", "is missing", "incomplete or corrupt"]),
    "pretrained_missing_table": ([f"{P}.embedding_snapshot_uri={{snap}}", f"{P}.emb_name=nope"], False, P, ["no table 'nope'", "user"]),
    "pretrained_wrong_dim": ([f"{P}.embedding_snapshot_uri={{snap}}", f"{U}.embedding_dim=8"], False, P, [f"[{USER_ROWS}, {DIM}]", "embedding_dim 8"]),
    "pretrained_wrong_rows": ([f"{P}.embedding_snapshot_uri={{snap}}", f"{U}.num_embeddings=300"], False, P, [f"[{USER_ROWS}, {DIM}]", "300 rows", "allow_partial_rows=true"]),
    "pretrained_pickled_entry": ([f"{P}.embedding_snapshot_uri={{pickled}}"], False, P, ["pickled object", "refusing"]),
    "pretrained_absolute_location": ([f"{P}.embedding_snapshot_uri={{escape_absolute}}"], False, f"{P}.embedding_snapshot_uri", ["'0/model/user'", "outside the snapshot directory", "secret-snap.bin"]),
    "pretrained_dotdot_location": ([f"{P}.embedding_snapshot_uri={{escape_dotdot}}"], False, f"{P}.embedding_snapshot_uri", ["'0/model/user'", "outside the snapshot directory", "../../secret-snap.bin"]),
    "pretrained_symlinked_file": ([f"{P}.embedding_snapshot_uri={{escape_symlink}}"], False, f"{P}.embedding_snapshot_uri", ["'0/model/user'", "outside the snapshot directory", "symlink"]),
    "pretrained_symlinked_manifest": ([f"{P}.embedding_snapshot_uri={{escape_manifest_symlink}}"], False, f"{P}.embedding_snapshot_uri", ["'the manifest'", ".snapshot_metadata", "outside the snapshot directory"]),
    "pretrained_all_nan": ([f"{P}.embedding_snapshot_uri={{nan_table}}"], True, P, ["nan_table'", f"{USER_ROWS * DIM} non-finite value(s)", "rows [0, 1, 2, 3, 4] ..."]),
    "pretrained_one_inf": ([f"{P}.embedding_snapshot_uri={{inf_row}}"], True, P, ["inf_row'", "1 non-finite value(s)", "rows [17]"]),
    "vocab_missing_dir": ([f"{U}.vocab={{root}}/no_vocab"], True, U, ["no_vocab'", "does not exist", "directory of parquet files"]),
    "vocab_wrong_columns": ([f"{U}.vocab={{wrong_columns}}"], True, U, ["part-0.parquet", "no column 'id'", "['key', 'row']"]),
    "vocab_duplicates": ([f"{U}.vocab={{duplicates}}"], True, U, ["id 12", "rows [1, 2]", "each id must appear once"]),
    "vocab_negative_rows": ([f"{U}.vocab={{negative_rows}}"], True, U, ["row -4", "[0, num_embeddings)"]),
    "vocab_rows_beyond_table": ([f"{U}.num_embeddings=50"], True, U, ["num_embeddings=50 is too small", f"num_embeddings >= {USER_ROWS}"]),
    "vocab_no_parquet": ([f"{U}.vocab={{no_parquet}}"], True, U, ["no_parquet'", "no *.parquet files"]),
    "vocab_not_parquet": ([f"{U}.vocab={{garbage}}"], True, U, ["part-0.parquet", "cannot read parquet"]),
    "raw_ids_beyond_rows": ([f"{U}.vocab=null", f"{U}.num_embeddings=1000"], True, U, ["raw ids", "allowed: ids in [0, 1000)", f"{U}.vocab"]),
    "stratifier_beyond_width": (["stratifiers=synthetic", "stratifiers.strata.device_0.index=3"], False, "stratifiers.strata.device_0.index", ["3 is beyond the data's 3 discrete features", "0..2"]),
    "small_beyond_width": (["small_embeddings=synthetic", "data.discrete_columns=[country,device]"], False, "small_embeddings.tables.hour.index", ["2 is beyond the data's 2 discrete features", "0..1"]),
    "new_table_without_feature": (["+embeddings.tables={{clicks: {{num_embeddings: 8}}}}"], False, "embeddings.tables.clicks", ["'clicks'", "user, item"]),
    "adam_on_cpu": (["embeddings/optimizer=adam", "sharding=cpu"], False, "embeddings.optimizer.algorithm", ["adam", "allowed on CPU", "rowwise_adagrad"]),
    "row_wise_on_cpu": (["sharding=cpu", "sharding.sharding_types=[row_wise]"], False, "sharding.sharding_types[0]", ["row_wise", "table_wise"]),
    "row_wise_preset_needs_cuda": (["sharding=row_wise"], False, "sharding.device", ["'cuda'", "no CUDA device", "auto or cpu"]),
    "untrusted_small_target": (["small_embeddings._target_=builtins.eval"], False, "small_embeddings._target_", ["'builtins.eval'", "allowed prefixes", "allowed_targets"]),
    "missing_data_dir": (["data.dir=???"], False, f"{U}.vocab", ["data.dir", "Missing mandatory value"]),
    # refused before training: sizes, steps, rates, names (no data is generated for these)
    "batch_size_zero": (["train.batch_size=0"], False, "train.batch_size", ["0 is not allowed", "positive integer"]),
    "epochs_negative": (["train.epochs=-1"], False, "train.epochs", ["-1 is not allowed", "positive integer"]),
    "max_steps_zero": (["train.max_steps=0"], False, "train.max_steps", ["0 is not allowed", "or null for every epoch"]),
    "eval_every_negative": (["train.eval_every=-5"], False, "train.eval_every", ["-5", "integer >= 0"]),
    "checkpoint_every_negative": (["train.checkpoint_every=-1"], False, "train.checkpoint_every", ["-1", "0: the final checkpoint only"]),
    "keep_checkpoints_zero": (["train.keep_checkpoints=0"], False, "train.keep_checkpoints", ["0 is not allowed"]),
    "dense_optimizer_unknown": (["train.dense_optimizer.name=lbfgs"], False, "train.dense_optimizer.name", ["'lbfgs'", "adam, adagrad, sgd"]),
    "dense_lr_nan": (["train.dense_optimizer.lr=nan"], False, "train.dense_optimizer.lr", ["nan", "finite learning rate >= 0"]),
    "dense_lr_negative": (["train.dense_optimizer.lr=-0.1"], False, "train.dense_optimizer.lr", ["-0.1", "finite learning rate >= 0"]),
    "dense_weight_decay_inf": (["train.dense_optimizer.weight_decay=inf"], False, "train.dense_optimizer.weight_decay", ["inf", "finite weight decay"]),
    "table_lr_inf": (["embeddings.optimizer.init_learning_rate=inf"], False, "embeddings.optimizer.init_learning_rate", ["inf", "finite learning rate"]),
    "table_lr_nan": ([f"{U}.optimizer.init_learning_rate=nan"], False, f"{U}.optimizer.init_learning_rate", ["nan", "finite learning rate"]),
    "schedule_rate_inf": (["embeddings/lr=linear_ramp_to_constant", "embeddings.optimizer.learning_rate.linear_ramp_to_constant.learning_rate=inf"], False,
                          "embeddings.optimizer.learning_rate.linear_ramp_to_constant.learning_rate", ["inf", "finite learning rate"]),
    "eps_nan": (["embeddings.optimizer.eps=nan"], False, "embeddings.optimizer.eps", ["nan", "finite value"]),
    "layer_width_zero": (["model.hidden=[64,0]"], False, "model.hidden[1]", ["0 is not allowed", "positive layer width"]),
    "no_training_rows": (["data.synthetic.num_train=0"], False, "data.synthetic.num_train", ["0 is not allowed"]),
    "unknown_rate_above_one": (["data.synthetic.unknown_rate=1.5"], False, "data.synthetic.unknown_rate", ["1.5", "[0, 1)"]),
    "data_seed_negative": (["data.seed=-3"], False, "data.seed", ["-3", "integer >= 0"]),
    "table_name_with_dot": ([f"{U}.name=user.v2", f"{U}.feature_names=[user]"], False, U, ["'user.v2'", "contains '.'"]),
    "table_name_attribute": ([f"{U}.name=items", f"{U}.feature_names=[user]"], False, U, ["'items'", "attribute of torch's ModuleDict"]),
    "data_dir_is_a_file": (["data.dir={a_file}"], False, "data.dir", ["a_file'", "is a file, not a directory"]),
    "plan_file_is_a_dir": (["sharding.plan_file={a_dir}"], False, "sharding.plan_file", ["no_parquet'", "is a directory"]),
    "dense_part_too_large": (["embeddings.embedding_dim=1000000000"], False, "model", ["dense part", "TiB", "available"]),
    # refused once the data is read, before sharding
    "labels_zero_two": (["data.source=parquet", "data.train_path={labels_0_2}", "data.eval_path={data}/eval.parquet"], True, "labels_0_2.parquet", ["column 'click'", "other than 0 and 1 (2)"]),
    "labels_signed": (["data.source=parquet", "data.train_path={labels_signed}", "data.eval_path={data}/eval.parquet"], True, "labels_signed.parquet", ["other than 0 and 1 (-1)", "must be 0 or 1"]),
    "labels_nan": (["data.source=parquet", "data.train_path={labels_nan}", "data.eval_path={data}/eval.parquet"], True, "labels_nan.parquet", ["other than 0 and 1 (nan)"]),
    "train_split_empty": (["data.source=parquet", "data.train_path={no_rows}", "data.eval_path={data}/eval.parquet"], True, "no_rows.parquet", ["has no rows", "data.train_path"]),
    "eval_split_empty": (["data.source=parquet", "data.train_path={data}/train.parquet", "data.eval_path={no_rows}"], True, "no_rows.parquet", ["has no rows", "data.eval_path"]),
    "train_split_below_one_batch": (["train.batch_size=4096"], True, "train.batch_size=4096", ["training rows", "no full batch trains"]),
    "code_beyond_small_table": (["small_embeddings=synthetic", "data.source=parquet", "data.train_path={code_99}", "data.eval_path={data}/eval.parquet"], True, "small_embeddings.tables.country.num_embeddings", ["32 rows are too few", "num_embeddings >= 33"]),
    "stale_data_dir": (["data.synthetic.num_users=300"], True, "data.dir", ["data.synthetic.num_users: 200 there, 300 now", "another data.dir"]),
    "warm_start_other_vocab": ([f"{P}.embedding_snapshot_uri={{snap_other_vocab}}"], True, P, ["a vocab of 7 ids", f"a vocab of {USER_ROWS - 1:,} ids", "other ids"]),
    "warm_start_raw_ids": ([f"{P}.embedding_snapshot_uri={{snap_raw_ids}}"], True, P, ["raw ids as rows (no vocab)", "other ids"]),
    "tables_beyond_host_memory": ([f"embeddings.tables.item.num_embeddings={{huge_rows}}"], True, "embeddings", ["GiB available", "embeddings.tables.item", "fp16"]),
    "planner_does_not_fit": (["sharding.ddr_cap_gb=0.000001"], True, "sharding", ["do not fit on 1 cpu rank", "insufficient storage", "largest: user"]),
    "weight_decay_ignored_by_cpu_kernel": (["embeddings.optimizer.weight_decay=0.01", "sharding.sharding_types=[table_wise]"], True, f"{U}.optimizer.weight_decay", ["0.01", "has no effect", "kernel ignores weight decay"]),
}


@pytest.mark.parametrize("name", list(APP))
def test_app_stops_before_training(tmp_path: Path, assets: Dict[str, Path], name: str) -> None:
    overrides, needs_data, path, words = APP[name]
    if name == "row_wise_preset_needs_cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    import torch

    from recap_embed.distributed.memory import available_bytes

    values = {k: str(v) for k, v in assets.items()}
    values["huge_rows"] = str(int(2 * available_bytes(torch.device("cpu")) / (DIM * 4)))  # twice this host's memory
    overrides = [o.format(**values) for o in overrides]
    if name == "missing_data_dir":  # data.dir itself is the bad value
        from recap_embed.train.loop import Trainer

        cfg = compose_train([*TINY, *overrides])
        with pytest.raises(USER_ERRORS) as err:
            Trainer(cfg, tmp_path)
        assert not any(tmp_path.iterdir())
        message = str(err.value)
    else:
        message = app_error(tmp_path / "run", overrides, assets["data"] if needs_data else None)
    check_message(message, Case(overrides, path, words))


# --------------------------------------------------------------------------- CHECKPOINTS: restore


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Dict[str, Path]:
    import torch
    from torchsnapshot import StateDict

    from recap_embed.io.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    good = save_checkpoint(root / "good", 3, {"model": StateDict(w=torch.ones(64, 8), step=3)})
    out = {"good": good, **escaping_snapshots(root, good, "0/model/w")}
    bad = torch.ones(64, 8)
    bad[5] = float("nan")
    out["nan"] = save_checkpoint(root / "nan", 3, {"model": StateDict(w=bad, step=3)})
    return out


@pytest.mark.parametrize("name", ["escape_absolute", "escape_dotdot", "escape_symlink", "escape_manifest_symlink", "nan"])
def test_restore_reads_nothing_from_outside_and_nothing_non_finite(checkpoints: Dict[str, Path], name: str) -> None:
    import torch
    from torchsnapshot import StateDict

    from recap_embed.io.checkpoint import restore_checkpoint

    dest = {"model": StateDict(w=torch.zeros(64, 8), step=-1)}
    with pytest.raises(USER_ERRORS) as err:
        restore_checkpoint(checkpoints[name], dest)
    message = str(err.value)
    assert str(checkpoints[name]) in message, message
    if name == "nan":
        assert "8 non-finite value(s)" in message and "rows [5]" in message, message
    else:
        assert "outside the snapshot directory" in message, message
        assert not (dest["model"]["w"] == SECRET).any(), "bytes from outside the checkpoint were restored"
        assert dest["model"]["step"] == -1 and torch.equal(dest["model"]["w"], torch.zeros(64, 8))
    good = {"model": StateDict(w=torch.zeros(64, 8), step=-1)}
    assert restore_checkpoint(checkpoints["good"], good) == 3 and torch.equal(good["model"]["w"], torch.ones(64, 8))


# --------------------------------------------------------------------------- CLI: console scripts


class CliCase(NamedTuple):
    script: str
    args: List[str]
    full_error: bool  # HYDRA_FULL_ERROR=1
    code: Optional[int]  # exit status (None: any non-zero)
    path: str
    words: List[str]
    before_data: bool = True  # the run dir must have no data either


CLI = {
    "validate": CliCase("recap-embed-train", [f"{U}.embedding_dim=6"], False, 2, f"{U}.embedding_dim", ["6 is not a multiple of 4", "positive multiples of 4"]),
    "validate_full_error": CliCase("recap-embed-train", [f"{U}.embedding_dim=6"], True, None, f"{U}.embedding_dim", ["Traceback", "ConfigValidationError"]),
    "group_option": CliCase("recap-embed-train", ["embeddings/optimizer=nope"], False, 1, "embeddings/optimizer/nope", ["Could not find", "rowwise_adagrad"]),
    "group_option_full_error": CliCase("recap-embed-train", ["embeddings/optimizer=nope"], True, 1, "embeddings/optimizer/nope", ["Traceback", "MissingConfigException"]),
    "override_type": CliCase("recap-embed-train", ["embeddings.embedding_dim=abc"], False, 1, "embeddings.embedding_dim", ["'abc'", "Integer"]),
    "override_unknown_key": CliCase("recap-embed-train", ["train.nope=1"], False, 1, "train.nope", ["Key 'nope' not in 'TrainingConfig'"]),
    "delete_unknown_table": CliCase("recap-embed-train", ["~embeddings.tables.nope"], False, 1, "embeddings.tables.nope", ["does not exist"]),
    "new_table_without_feature": CliCase("recap-embed-train", ["+embeddings.tables={nope: {num_embeddings: 8}}"], False, 2, "embeddings.tables.nope", ["'nope'", "user, item"]),
    "pretrained_missing": CliCase("recap-embed-train", [f"{P}.embedding_snapshot_uri=nowhere/snap"], False, 2, f"{P}.embedding_snapshot_uri", ["'nowhere/snap'", "does not exist"]),
    "vocab_missing": CliCase("recap-embed-train", [f"{U}.vocab=nowhere/vocab"], False, 2, U, ["'nowhere/vocab'", "does not exist"], before_data=False),
    "untrusted_target": CliCase("recap-embed-train", ["embeddings._target_=os.system"], False, 2, "embeddings._target_", ["'os.system'", "allowed prefixes"]),
    "adam_on_cpu": CliCase("recap-embed-train", ["embeddings/optimizer=adam", "sharding=cpu"], False, 2, "embeddings.optimizer.algorithm", ["adam", "allowed on CPU"]),
    "yaml_syntax": CliCase("recap-embed-train", ["--config-dir=userconf", "embeddings=mine"], False, 1, "embeddings/mine is not valid YAML", ["mine.yaml", "line 2, column 9"]),
    "tml_unknown_key": CliCase("recap-embed-from-tml", ["bad.yaml"], False, 2, "large_embeddings.tables[0].num_embedings", ["bad.yaml", "num_embeddings"]),
    "plan_search_bounded": CliCase("recap-embed-plan", ["topology.world_size=1000000", "timeout_s=3"], False, 2, "timeout_s", ["world_size=1000000", "did not finish within 3 s"]),
    "run_dir_is_a_file": CliCase("recap-embed-train", ["hydra.run.dir=a_file"], False, 2, "hydra.run.dir", ["'a_file' is a file, not a directory"]),
    "tml_unknown_key_full_error": CliCase("recap-embed-from-tml", ["bad.yaml"], True, None, "large_embeddings.tables[0].num_embedings", ["Traceback", "TmlConversionError"]),
}

BAD_TML = {"large_embeddings": {"tables": [{"name": "user", "num_embedings": 10, "embedding_dim": 8}], "optimizer": {"init_learning_rate": 0.1}}}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, assets: Dict[str, Path]) -> Dict[str, Tuple[int, str, Path]]:
    """Every CLI case, two at a time: (exit status, stdout + stderr, run dir)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "bad.yaml").write_text(yaml.safe_dump(BAD_TML))
    (root / "a_file").write_text("not a directory\n")
    (root / "userconf" / "embeddings").mkdir(parents=True)
    (root / "userconf" / "embeddings" / "mine.yaml").write_text(PRESETS["yaml_syntax"][0])

    def run(name: str) -> Tuple[int, str, Path]:
        case = CLI[name]
        run_dir = root / name
        args = list(case.args)
        if case.script == "recap-embed-train":
            data = f"data.dir={assets['data']}" if not case.before_data else f"data.dir={run_dir / 'data'}"
            flags = [a for a in args if a.startswith("--")]
            run_arg = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={run_dir}"]
            args = [*flags, *run_arg, data, *TINY, *(a for a in args if not a.startswith("--"))]
        elif case.script == "recap-embed-plan":
            args = [f"hydra.run.dir={run_dir}", *args]
        env = {"HYDRA_FULL_ERROR": "1"} if case.full_error else None
        out = run_command(console(case.script, *args), cwd=root, env=env, timeout=240, expect=None)
        return out.returncode, out.output, run_dir

    # The cheap (compose-time) cases first, so the pool stays busy with the slow ones.
    order = sorted(CLI, key=lambda n: CLI[n].code != 1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(order, pool.map(run, order)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLI))
def test_console_script(cli_results: Dict[str, Tuple[int, str, Path]], name: str) -> None:
    case = CLI[name]
    code, output, run_dir = cli_results[name]
    assert code != 0, output[-2000:]
    if case.code is not None:
        assert code == case.code, output[-2000:]
    check_message(output, Case(case.args, case.path, case.words))
    if not case.full_error:
        assert "Traceback" not in output, output[-3000:]
    if case.script == "recap-embed-train":
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
        if case.before_data:
            assert not (run_dir / "data").exists()
    if code == 2:  # ours: the cause is printed once
        marker = "error:" if case.script == "recap-embed-from-tml" else "[ERROR]"
        assert output.count(marker) == 1, output[-3000:]


def test_case_count() -> None:
    total = len(RULES) + len(COMPOSE) + len(PRESETS) + len(SMALL_PRESETS) + len(APP) + len(CLI)
    assert total >= 40, total
