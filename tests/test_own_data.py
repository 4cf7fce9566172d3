"""Your own data in one command: other column names, other kinds and number of discrete columns,
vocabs built or given, small tables and strata derived, and the up-front data checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hydra import compose, initialize

import recap_embed.train.config  # noqa: F401  (registers the app's schema)
from launch import python_m, run
from recap_embed.errors import USER_ERRORS

DISCRETE = ["region", "tier", "member", "plan"]
NAMES = ["data.user_column=uid", "data.item_column=movie", "data.label_column=liked", f"data.discrete_columns=[{','.join(DISCRETE)}]"]
FAST = ["train.progress=false", "train.batch_size=256", "train.max_steps=120", "train.eval_every=40"]


def make_table(n: int, seed: int, new_users: float = 0.0) -> pa.Table:
    """A click log with other names and kinds: sparse int64 user ids, int32 item ids, a boolean
    label, and string, gapped-integer, boolean and categorical discrete columns with signal."""
    rng = np.random.default_rng(seed)
    users, items = 300, 80
    user_raw = (np.arange(users, dtype=np.int64) * 7_919 + 10**12) ^ 0x5DEECE66D
    u = rng.integers(0, users, n)
    i = rng.integers(0, items, n)
    user_bias = np.random.default_rng(1).normal(size=users)
    item_bias = np.random.default_rng(2).normal(size=items)
    region = rng.choice(np.array(["north", "south", "east", "west", "Dr. Who"]), n)
    tier = rng.choice(np.array([10, 20, 40]), n)
    member = rng.random(n) < 0.3
    plan = rng.choice(np.array(["free", "plus", "pro"]), n)
    logit = user_bias[u] + item_bias[i] + 0.8 * member + (tier == 40) - 0.5 * (region == "west")
    liked = rng.random(n) < 1 / (1 + np.exp(-logit))
    uid = user_raw[u].copy()
    if new_users:
        unseen = rng.random(n) < new_users
        uid[unseen] = 10**15 + np.arange(int(unseen.sum()))
    return pa.table(
        {
            "uid": uid,
            "movie": i.astype(np.int32),
            "liked": pa.array(liked),
            "region": pa.array(region.tolist(), pa.string()),
            "tier": tier.astype(np.int64),
            "member": pa.array(member),
            "plan": pa.array(plan.tolist()).dictionary_encode(),
            "ignored": np.zeros(n),  # other columns are left alone
        }
    )


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    (root / "train").mkdir()
    table = make_table(12_000, 0)
    pq.write_table(table.slice(0, 6_000), root / "train" / "part-0.parquet")  # a directory of files
    pq.write_table(table.slice(6_000), root / "train" / "part-1.parquet")
    pq.write_table(make_table(3_000, 1, new_users=0.05), root / "eval.parquet")
    return {"root": root, "train": root / "train", "eval": root / "eval.parquet"}


def data_args(own: Dict[str, Path]) -> List[str]:
    return ["data.source=parquet", f"data.train_path={own['train']}", f"data.eval_path={own['eval']}"]


@pytest.mark.slow  # a real training run of the console app in a subprocess
def test_one_command_trains_on_other_columns_and_kinds(own: Dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(python_m("recap_embed.train", f"hydra.run.dir={run_dir}", *data_args(own), *NAMES, *FAST), cwd=tmp_path, timeout=300)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_auroc"] > 0.65, metrics["eval"]
    assert metrics["rows"] == {"train": 10_800, "validation": 1_200, "eval": 3_000}
    # Vocabs built from the training split, in the run dir; eval's new users are OOV, and logged.
    for table in ("user", "item"):
        assert (run_dir / "vocabs" / table / "part-00000.parquet").exists()
    vocab = pq.read_table(run_dir / "vocabs" / "user")
    assert vocab.num_rows == 300 and vocab.column("row").to_pylist() == list(range(300))
    assert 0.03 < metrics["oov_rate"]["user"] < 0.08 and metrics["oov_rate"]["item"] == 0
    log = (run_dir / "recap_embed_train.log").read_text()
    assert "eval: ids not in the table's vocab (OOV): user" in log
    # Codes of every discrete column, saved; small tables and strata derived from them.
    codes = {c["name"]: c for c in json.loads((run_dir / "discrete_codes.json").read_text())["columns"]}
    assert codes["region"]["values"] == ["Dr. Who", "east", "north", "south", "west"]
    assert codes["tier"]["values"] == [10, 20, 40] and codes["member"]["values"] == [False, True]
    assert codes["plan"]["values"] == ["free", "plus", "pro"] and codes["plan"]["unseen_code"] == 3
    derived = yaml.safe_load((run_dir / "derived.yaml").read_text())
    tables = derived["small_embeddings"]["tables"]
    assert list(tables) == DISCRETE
    assert tables["region"] == {"num_embeddings": 6, "embedding_dim": 4, "index": 0}  # round(1.6 * 6 ** 0.56)
    assert tables["member"] == {"num_embeddings": 3, "embedding_dim": 3, "index": 2}
    strata = derived["stratifiers"]["strata"]
    assert strata["member=false"] == {"index": 2, "value": 0} and "member=true" in strata
    assert "tier=40" in strata and len([s for s in strata if s.startswith("region=")]) == 4  # its 4 most frequent of 5
    assert "auroc/member=true" in metrics["eval"] and "auroc/region=west" in metrics["eval"]
    assert metrics["threads"] == 1


def compose_train(overrides: List[str]):
    # Outside the app, data.dir (only used by the synthetic source) has no run dir to default to.
    with initialize(version_base=None, config_path=None):
        return compose("recap_embed_train", overrides=["data.dir=unused", *overrides])


def trainer(own: Dict[str, Path], run_dir: Path, *overrides: str):
    from recap_embed.train.loop import Trainer

    return Trainer(compose_train([*data_args(own), *NAMES, *FAST, *overrides]), run_dir)


def test_given_vocab_and_given_tables_are_used_as_they_are(own: Dict[str, Path], tmp_path: Path) -> None:
    from recap_embed.io.vocab import save_vocab

    ids = pq.read_table(own["train"]).column("uid").to_numpy()
    distinct = np.unique(ids)
    save_vocab(tmp_path / "user_vocab", distinct, np.arange(distinct.size)[::-1].copy())
    # The synthetic presets read columns 0..2 (here region, tier, member): their rows suffice.
    t = trainer(own, tmp_path / "run", f"embeddings.tables.user.vocab={tmp_path / 'user_vocab'}", "small_embeddings=synthetic", "stratifiers=synthetic")
    assert not (tmp_path / "run" / "vocabs" / "user").exists() and (tmp_path / "run" / "vocabs" / "item").exists()
    assert t.derived_small is None and t.derived_strata is None
    assert [s.name for s in t.metrics.stratifiers] == ["device_0", "device_1", "country_0"]
    assert [tb.name for tb in t.model.module.small.tables] == ["country", "device", "hour"] if hasattr(t.model, "module") else True
    assert t.vocab.vocabs["user"].map(torch.tensor([int(distinct[0])])).tolist() == [distinct.size - 1]  # the given vocab's rows
    metrics = t.run()
    assert 0 <= metrics["eval_auroc"] <= 1 and not (tmp_path / "run" / "derived.yaml").exists()


def test_given_small_table_too_small_for_a_column(own: Dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(USER_ERRORS) as err:
        trainer(own, tmp_path, "small_embeddings=synthetic", "small_embeddings.tables.device.num_embeddings=2")
    message = str(err.value)
    # tier has 3 training values: codes 0..2 (eval has no other value).
    assert "small_embeddings.tables.device.num_embeddings: 2 rows are too few for column 'tier' (index 1)" in message
    assert "codes go up to 2; set num_embeddings >= 3" in message


def test_built_vocab_paths_are_set_without_a_second_parse_of_the_tables(own: Dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from recap_embed.train.preflight import build_vocab_paths, preflight

    # The submodules by their module names: `recap_embed.config.validate` is also a function.
    resolve, validate_module = (sys.modules[f"recap_embed.config.{name}"] for name in ("resolve", "validate"))

    parsed_sections: List[str] = []
    real = resolve.parse_section

    def counting(node, schema, prefix, problems):
        parsed_sections.append(schema.__name__)
        return real(node, schema, prefix, problems)

    for module in (resolve, validate_module):
        monkeypatch.setattr(module, "parse_section", counting)
    # user: renamed, so its vocab dir follows the name; item: rows given, so no vocab is built.
    cfg = compose_train([*data_args(own), *NAMES, "embeddings.tables.user.name=people", "embeddings.tables.user.feature_names=[user]",
                         "embeddings.tables.item.num_embeddings=500"])
    assert build_vocab_paths(cfg, tmp_path) == ["user"] and not parsed_sections
    assert cfg.embeddings.tables.user.vocab == str(tmp_path / "vocabs" / "people") and cfg.embeddings.tables.item.vocab is None
    parsed = preflight(cfg, torch.device("cpu"), 1)
    assert parsed_sections.count("LargeEmbeddingsConfig") == 1  # once, by validate
    assert {s.key: s.vocab for s in parsed.embeddings.tables} == {"user": str(tmp_path / "vocabs" / "people"), "item": None}

    # A table whose fields cannot be read is left to validate, which names it.
    cfg = compose_train([*data_args(own), *NAMES, "embeddings.tables.item.num_embeddings=???"])
    assert build_vocab_paths(cfg, tmp_path) == ["user"] and cfg.embeddings.tables.item.vocab is None
    with pytest.raises(USER_ERRORS, match=r"embeddings\.tables\.item\.num_embeddings"):
        preflight(cfg, torch.device("cpu"), 1)


def write(tmp_path: Path, name: str, table: pa.Table) -> Path:
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def replace(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


BASE = make_table(2_000, 5)
# (how to break the training file, the setting it fails on, words the one line must hold)
BAD = {
    "missing_discrete_column": (lambda t: t.drop(["tier"]), ["'tier' (data.discrete_columns)", "the file has", "set data.discrete_columns"]),
    "missing_label": (lambda t: t.drop(["liked"]), ["'liked' (data.label_column)"]),
    "string_ids": (lambda t: replace(t, "uid", pa.array([str(x) for x in t.column("uid").to_pylist()])), ["column 'uid' (data.user_column)", "ids must be integers"]),
    "null_ids": (lambda t: replace(t, "movie", pa.array([None] + t.column("movie").to_pylist()[1:], pa.int32())), ["column 'movie' (data.item_column)", "1 null ids (first at row 0)"]),
    "labels_not_binary": (lambda t: replace(t, "liked", pa.array(np.where(t.column("liked").to_numpy(zero_copy_only=False), 5, 0))), ["column 'liked' (data.label_column)", "other than 0 and 1", "(5)"]),
    "one_class": (lambda t: replace(t, "liked", pa.array(np.ones(t.num_rows, dtype=np.int8))), ["all 2000 labels are 1", "both classes"]),
    "continuous_discrete": (lambda t: replace(t, "tier", pa.array(np.linspace(0, 1, t.num_rows))), ["column 'tier' (data.discrete_columns)", "not whole numbers", "bucket"]),
    "list_discrete": (lambda t: replace(t, "region", pa.array([[1]] * t.num_rows)), ["column 'region' (data.discrete_columns)", "holds list<"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_training_file_stops_with_one_line(tmp_path: Path, name: str) -> None:
    from recap_embed.train.loop import Trainer

    breaks, words = BAD[name]
    train = write(tmp_path, "train.parquet", breaks(BASE))
    evaluation = write(tmp_path, "eval.parquet", BASE)
    cfg = compose_train(["data.source=parquet", f"data.train_path={train}", f"data.eval_path={evaluation}", *NAMES, *FAST])
    with pytest.raises(USER_ERRORS) as err:
        Trainer(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and str(train) in message, message
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "run" / "vocabs").exists()


def test_other_data_errors(tmp_path: Path) -> None:
    from recap_embed.train.loop import Trainer

    train = write(tmp_path, "train.parquet", BASE)
    evaluation = write(tmp_path, "eval.parquet", replace(BASE, "tier", pa.array([str(x) for x in BASE.column("tier").to_pylist()])))
    (tmp_path / "garbage.parquet").write_text("not parquet")

    def error(*overrides: str, eval_path: Path = evaluation) -> str:
        cfg = compose_train(["data.source=parquet", f"data.train_path={train}", f"data.eval_path={eval_path}", *NAMES, *FAST, *overrides])
        with pytest.raises(USER_ERRORS) as err:
            Trainer(cfg, tmp_path / "run")
        return str(err.value)

    assert "holds strings, but the training data's holds integers" in error() and str(evaluation) in error()
    assert error(eval_path=tmp_path / "nope.parquet").startswith("data.eval_path: ") and "does not exist" in error(eval_path=tmp_path / "nope.parquet")
    assert "cannot read parquet" in error(eval_path=tmp_path / "garbage.parquet")
    few = error("train.batch_size=4096", eval_path=train)
    assert "1800 training rows after holding out 200 for validation" in few and "train.batch_size=4096" in few
    assert "data.validation_fraction: 1.5 is not allowed" in error("data.validation_fraction=1.5", eval_path=train)
    assert "train.threads: 0 is not allowed" in error("train.threads=0", eval_path=train)
    assert "named twice" in error("data.label_column=uid", eval_path=train)
    assert "train.early_stopping.patience: 0 is not allowed" in error("train.early_stopping.patience=0", eval_path=train)
