"""Tables are typed structured configs in the composed config: what an app reads is what it gets.

Composed in a foreign app that has only a primary config (tests/apps/minimal: `embeddings: twhin`),
through the compose API and as a real `@hydra.main` process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import MINIMAL_APP, compose_app
from launch import python_script, run
from recap_embed.config import (
    ConfigWarning,
    DataType,
    EmbeddingBagConfig,
    OptimizerAlgorithm,
    ParsedConfig,
    TableOptimizerConfig,
    validate,
)


def test_app_code_reads_each_tables_effective_settings():
    cfg = compose_app()
    user = cfg.embeddings.tables.user
    assert OmegaConf.get_type(user) is EmbeddingBagConfig
    assert OmegaConf.get_type(user.optimizer) is TableOptimizerConfig
    assert user.embedding_dim == 4  # inherited from embeddings.embedding_dim
    assert user.data_type is DataType.fp32  # the enum, not a string
    assert user.optimizer.algorithm is OptimizerAlgorithm.sgd  # inherited from embeddings.optimizer
    assert user.optimizer.init_learning_rate == 0.01 and cfg.embeddings.tables.tweet.optimizer.init_learning_rate == 0.005
    assert user.optimizer.eps == cfg.embeddings.optimizer.eps


def test_one_key_changes_every_table_that_sets_none():
    cfg = compose_app(["embeddings.embedding_dim=16", "embeddings.tables.user.embedding_dim=64", "embeddings/optimizer=rowwise_adagrad"])
    assert cfg.embeddings.tables.user.embedding_dim == 64
    assert cfg.embeddings.tables.tweet.embedding_dim == 16
    assert {t.optimizer.algorithm for t in cfg.embeddings.tables.values()} == {OptimizerAlgorithm.rowwise_adagrad}
    parsed = validate(cfg, device="cpu")
    assert {s.key: s.embedding_dim for s in parsed.embeddings.tables} == {"user": 64, "tweet": 16}
    assert {s.optimizer.algorithm for s in parsed.embeddings.tables} == {OptimizerAlgorithm.rowwise_adagrad}


def test_a_table_setting_interpolates_into_the_apps_own_config(tmp_path: Path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "train.yaml").write_text(
        "defaults:\n  - embeddings: twhin\n  - _self_\n"
        "model:\n  input_dim: ${embeddings.tables.user.embedding_dim}\n  user_lr: ${embeddings.tables.user.optimizer.init_learning_rate}\n"
    )
    cfg = compose_app(["embeddings.embedding_dim=32"], config_dir=conf)
    assert cfg.model.input_dim == 32 and cfg.model.user_lr == 0.01


def test_cfg_job_resolve_shows_the_effective_table():
    out = run(python_script(MINIMAL_APP / "app.py", "--cfg", "job", "--resolve", "embeddings.embedding_dim=8"), cwd=MINIMAL_APP, timeout=120)
    shown = yaml.safe_load(out.stdout)
    user = shown["embeddings"]["tables"]["user"]
    assert user["embedding_dim"] == 8 and user["data_type"] == "fp32"
    assert user["optimizer"]["algorithm"] == "sgd" and user["optimizer"]["init_learning_rate"] == 0.01


def test_add_remove_and_override_tables_from_the_command_line():
    cfg = compose_app(["+embeddings.tables={item: {num_embeddings: 1000, pooling: mean}}", "~embeddings.tables.tweet",
                       "embeddings/tables=[author]", "embeddings.tables.user.optimizer.init_learning_rate=0.5"])
    assert list(cfg.embeddings.tables) == ["user", "author", "item"]
    item = cfg.embeddings.tables.item
    assert OmegaConf.get_type(item) is EmbeddingBagConfig and item.embedding_dim == 4 and item.pooling.name == "mean"
    assert cfg.embeddings.tables.user.optimizer.init_learning_rate == 0.5
    assert cfg.embeddings.optimizer.init_learning_rate == 0.01  # the collection is not touched
    validate(cfg, device="cpu")


def test_a_table_schedule_from_the_lr_group_follows_the_tables_own_rate():
    cfg = compose_app([
        "embeddings/tables=[author]",
        "+embeddings/lr@embeddings.tables.author.optimizer.learning_rate=linear_ramp_to_constant",
        "embeddings.tables.author.optimizer.init_learning_rate=0.3",
    ])
    parsed = validate(cfg, device="cpu")
    author = {s.key: s for s in parsed.embeddings.tables}["author"]
    assert author.optimizer.learning_rate.linear_ramp_to_constant.learning_rate == 0.3


def test_pretrained_snapshot_is_set_with_a_dotted_key():
    cfg = compose_app(["embeddings.tables.user.pretrained.embedding_snapshot_uri=/snapshots/twhin"])
    tables = {s.key: s for s in validate(cfg, device="cpu").embeddings.tables}
    assert tables["user"].pretrained.emb_name == "user" and tables["tweet"].pretrained is None


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["embeddings.optimizer.init_learning_rate=0.1"], ["embeddings.optimizer.init_learning_rate=0.1 has no effect", "user=0.01", "tweet=0.005"]),
        (["embeddings/lr=linear_ramp_to_cosine"], ["embeddings.optimizer.learning_rate (linear_ramp_to_cosine) has no effect", "user: constant", "tweet: constant"]),
    ],
)
def test_a_collection_setting_every_table_overrides_is_reported_once(overrides, words):
    cfg = compose_app(overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(cfg, device="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert len(messages) == len(set(messages)), messages  # each setting once
    mine = [m for m in messages if words[0] in m]
    assert len(mine) == 1, messages
    for word in words:
        assert word in mine[0], (word, mine[0])


def test_no_warning_when_the_collection_setting_is_used():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        validate(compose_app(), device="cpu")  # user's own rate equals the collection's
        validate(compose_app(["embeddings/tables=[author]", "embeddings.optimizer.init_learning_rate=0.1"]), device="cpu")


def test_a_tables_own_rate_hidden_by_the_collections_schedule_is_reported():
    cfg = compose_app(["embeddings/tables=[author]", "embeddings.tables.author.optimizer.init_learning_rate=0.3",
                       "embeddings/lr=linear_ramp_to_constant"])
    with pytest.warns(ConfigWarning, match=r"tables\.\{author\}\.optimizer\.init_learning_rate has no effect"):
        validate(cfg, device="cpu")


def test_builders_take_the_parsed_config_without_parsing_again(monkeypatch):
    from recap_embed.modules import LargeEmbeddings

    parsed = validate(compose_app(), device="cpu")
    assert isinstance(parsed, ParsedConfig)
    calls = []

    def parse_again(*args, **kwargs):
        calls.append(args)
        raise AssertionError("parsed again")

    # Every way a config section is parsed goes through parse_section (validate, table_specs) or
    # to_container: none may run for a parsed config.
    for module_name in ("recap_embed.config.validate", "recap_embed.config.resolve"):
        monkeypatch.setattr(sys.modules[module_name], "parse_section", parse_again)
    monkeypatch.setattr(sys.modules["recap_embed.config.resolve"], "to_container", parse_again)
    module = LargeEmbeddings.from_config(parsed)
    assert module.parsed is parsed.embeddings and not calls
    assert [s.name for s in module.specs] == ["user", "tweet"]


def test_a_sweep_over_the_collection_dim_changes_every_table(tmp_path: Path):
    out = run(python_script(MINIMAL_APP / "app.py", "-m", "embeddings.embedding_dim=8,16", f"hydra.sweep.dir={tmp_path}"), cwd=MINIMAL_APP, timeout=180)
    assert "DIMS {'user': 8, 'tweet': 8}" in out.stdout and "DIMS {'user': 16, 'tweet': 16}" in out.stdout
