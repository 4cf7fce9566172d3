"""Every semantic rule of `validate`: the error names the full path, the bad value and what is allowed."""

from __future__ import annotations

from typing import List

import pytest

from recap_embed.config import ConfigValidationError, validate
from conftest import compose_app


def problems_of(overrides: List[str], **kwargs) -> dict:
    cfg = compose_app(overrides)
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, **{"device": "cpu", **kwargs})
    problems: dict = {}
    for path, msg in err.value.problems:
        problems[path] = f"{problems[path]} | {msg}" if path in problems else msg
        assert f"{path}: {msg}" in str(err.value)  # the rendered message is what a user reads
    return problems


@pytest.mark.parametrize(
    "overrides, path, words",
    [
        (["embeddings.tables.user.num_embeddings=0"], "embeddings.tables.user.num_embeddings", ["0", "positive integer"]),
        (["embeddings.tables.user.num_embeddings=-5"], "embeddings.tables.user.num_embeddings", ["-5", "positive integer"]),
        (["embeddings.tables.user.embedding_dim=0"], "embeddings.tables.user.embedding_dim", ["0", "positive integer"]),
        (["embeddings.tables.user.embedding_dim=6"], "embeddings.tables.user.embedding_dim", ["6", "multiple of 4"]),
        (["embeddings.embedding_dim=10"], "embeddings.embedding_dim", ["10", "multiple of 4"]),
        (["embeddings.tables.tweet.name=user"], "embeddings.tables", ["'user'", "unique"]),
        (["embeddings.tables.tweet.feature_names=[tweet,tweet]"], "embeddings.tables.tweet.feature_names", ["'tweet' 2 times", "once per table"]),
        (["embeddings.tables.tweet.feature_names=[user]", "embeddings.tables.user.vocab=/v/user"], "embeddings.tables.tweet.vocab",
         ["feature 'user' is also read by table 'user'", "'/v/user'", "here vocab None", "map its ids the same way"]),
        (["embeddings.tables.user.data_type=bf16"], "embeddings.tables.user.data_type", ["bf16 needs CUDA", "allowed on CPU: fp32, fp16"]),
        (["embeddings.tables.user.weight_init_min=0.5", "embeddings.tables.user.weight_init_max=0.1"], "embeddings.tables.user.weight_init_min",
         ["0.5", "[0.5, 0.1] empty", "weight_init_min <= weight_init_max"]),
        (["embeddings.tables.tweet.weight_init_min=0.1"], "embeddings.tables.tweet.weight_init_min", ["[0.1, 0.00371", "sqrt(1/rows)"]),
        (["embeddings.tables.user.weight_init_max=nan"], "embeddings.tables.user.weight_init_max", ["nan", "finite"]),
        (["embeddings.tables.user.num_embeddings_post_pruning=0"], "embeddings.tables.user.num_embeddings_post_pruning", ["0", "positive integer"]),
        (["embeddings.tables.tweet.num_embeddings_post_pruning=72544"], "embeddings.tables.tweet.num_embeddings_post_pruning", ["72544", "72543 rows", "1..72543"]),
        (["embeddings.tables_to_log=[user,item]"], "embeddings.tables_to_log[1]", ["'item'", "allowed: tweet, user"]),
        (["embeddings.tables.user.pretrained={emb_name: '', embedding_snapshot_uri: /snap}"], "embeddings.tables.user.pretrained.emb_name", ["empty"]),
        (["embeddings.tables.user.pretrained.embedding_snapshot_uri=''"], "embeddings.tables.user.pretrained.embedding_snapshot_uri", ["empty", "torchsnapshot"]),
        (["embeddings.tables.user.pretrained.emb_name=user"], "embeddings.tables.user.pretrained.embedding_snapshot_uri", ["not set", "no effect"]),
        (
            ["embeddings/lr=piecewise_constant", "embeddings.optimizer.learning_rate.piecewise_constant.learning_rate_boundaries=[100,50]"],
            "embeddings.optimizer.learning_rate.piecewise_constant.learning_rate_boundaries",
            ["[100, 50]", "strictly increasing"],
        ),
        (
            ["embeddings/lr=piecewise_constant", "embeddings.optimizer.learning_rate.piecewise_constant.learning_rate_values=[0.1,0.01]"],
            "embeddings.optimizer.learning_rate.piecewise_constant.learning_rate_values",
            ["2 values for 2 boundaries", "exactly 3"],
        ),
        (
            ["embeddings/lr=linear_ramp_to_cosine", "embeddings.optimizer.learning_rate.linear_ramp_to_cosine.num_ramp_steps=20000"],
            "embeddings.optimizer.learning_rate.linear_ramp_to_cosine.num_ramp_steps",
            ["20000", "final_num_steps (10000)"],
        ),
        (
            ["embeddings/lr=linear_ramp_to_constant", "embeddings.optimizer.learning_rate.linear_ramp_to_constant.num_ramp_steps=0"],
            "embeddings.optimizer.learning_rate.linear_ramp_to_constant.num_ramp_steps",
            ["0", "positive integer"],
        ),
        (["embeddings.optimizer.learning_rate={linear_ramp_to_constant: {learning_rate: 0.1, num_ramp_steps: 5}}"], "embeddings.optimizer.learning_rate", ["2 schedules", "choose one"]),
        (["embeddings/optimizer=adam"], "embeddings.optimizer.algorithm", ["adam", "cannot be fused on CPU", "rowwise_adagrad"]),
        (["embeddings.tables.user.optimizer.algorithm=lamb"], "embeddings.tables.user.optimizer.algorithm", ["lamb", "CPU"]),
        (["embeddings.tables.user.optimizer.learning_rate.constant=-1"], "embeddings.tables.user.optimizer.learning_rate.constant", ["-1", ">= 0"]),
        (["embeddings.optimizer.init_learning_rate=-0.1"], "embeddings.optimizer.init_learning_rate", ["-0.1", ">= 0"]),
        (["embeddings.tables.user.oov_policy=hash"], "embeddings.tables.user.oov_buckets", ["oov_buckets > 0"]),
        (["embeddings.tables.user.num_embeddings=null"], "embeddings.tables.user.num_embeddings", ["vocab"]),
        (["sharding=table_wise", "sharding.sharding_types=[row_wise]"], "sharding.sharding_types[0]", ["row_wise", "CUDA", "table_wise"]),
        (["sharding=auto", "+sharding.tables={item: {sharding_types: [table_wise]}}"], "sharding.tables.item", ["'item'", "tweet", "user"]),
        (["sharding=auto", "sharding.batch_size=0"], "sharding.batch_size", ["0", "positive integer"]),
    ],
)
def test_rule_names_path_value_and_what_is_allowed(overrides, path, words):
    problems = problems_of(overrides)
    assert path in problems, problems
    for word in words:
        assert word in problems[path], (word, problems[path])


def test_all_problems_are_reported_at_once():
    problems = problems_of(["embeddings.tables.user.embedding_dim=6", "embeddings.tables.tweet.num_embeddings=0", "embeddings/optimizer=adam"])
    assert {"embeddings.tables.user.embedding_dim", "embeddings.tables.tweet.num_embeddings", "embeddings.optimizer.algorithm"} <= set(problems)


def test_adam_is_fine_on_cuda_and_inherited_problems_are_reported_once():
    cfg = compose_app(["embeddings/optimizer=adam"])
    validate(cfg, device="cuda")
    problems = problems_of(["embeddings/optimizer=adam"])
    assert list(problems) == ["embeddings.optimizer.algorithm"]


@pytest.mark.parametrize("overrides, path", [
    (["embeddings.optimizer.init_learning_rate=nan"], "embeddings.optimizer.init_learning_rate"),
    (["embeddings.optimizer.eps=-1"], "embeddings.optimizer.eps"),
    (["embeddings.embedding_dim=-4"], "embeddings.embedding_dim"),
])
def test_one_bad_collection_value_is_one_problem_not_one_per_inheriting_table(overrides, path):
    problems = problems_of(overrides)
    assert path in problems and not [p for p in problems if ".tables." in p], problems


def test_a_table_setting_its_own_bad_value_is_reported_at_the_table():
    problems = problems_of(["embeddings.embedding_dim=-4", "embeddings.tables.user.embedding_dim=6", "embeddings.tables.user.optimizer.init_learning_rate=nan"])
    assert {"embeddings.embedding_dim", "embeddings.tables.user.embedding_dim", "embeddings.tables.user.optimizer.init_learning_rate"} <= set(problems)
    assert not [p for p in problems if p.startswith("embeddings.tables.tweet.")], problems


def test_torchrec_table_fields_that_hold():
    """A feature two tables read (same mapping), bf16 on CUDA, a set init range and pruned rows."""
    cfg = compose_app([
        "embeddings.tables.tweet.feature_names=[user,tweet]",
        "embeddings.tables.user.data_type=bf16",
        "embeddings.tables.user.weight_init_min=-0.01", "embeddings.tables.user.weight_init_max=0.01",
        "embeddings.tables.tweet.weight_init_min=0", "embeddings.tables.tweet.weight_init_max=0",  # zeros: a legal range
        "embeddings.tables.tweet.num_embeddings_post_pruning=1000", "embeddings.tables.tweet.need_pos=true",
    ])
    validate(cfg, device="cuda")
    validate(cfg, device="meta")  # building on meta: device rules wait for the placement
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, device="cpu")
    assert [p for p, _ in err.value.problems] == ["embeddings.tables.user.data_type"]


def test_sharding_row_wise_is_fine_on_cuda():
    validate(compose_app(["sharding=row_wise"]))  # the preset's device is cuda


def test_small_embeddings_and_strata_indices(tmp_path):
    conf = tmp_path / "conf"
    (conf / "small_embeddings").mkdir(parents=True)
    (conf / "stratifiers").mkdir()
    (conf / "small_embeddings" / "mine.yaml").write_text(
        "defaults: [base, _self_]\ntables:\n  country: {num_embeddings: 10, embedding_dim: 4, index: -1}\n"
        "  device: {num_embeddings: 0, embedding_dim: 4, index: 7}\n  os: {name: device, num_embeddings: 3, embedding_dim: 4, index: 1}\n"
    )
    (conf / "stratifiers" / "mine.yaml").write_text("defaults: [base, _self_]\nstrata:\n  us: {index: -2, value: 3}\n  ios: {index: 9, value: 1}\n")
    (conf / "train.yaml").write_text("defaults:\n  - small_embeddings: mine\n  - stratifiers: mine\n  - _self_\n")
    cfg = compose_app(config_dir=conf)
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, num_discrete_features=4)
    problems = dict(err.value.problems)
    assert "-1" in problems["small_embeddings.tables.country.index"]
    assert "beyond the data's 4 discrete features" in problems["small_embeddings.tables.device.index"]
    assert "positive integer" in problems["small_embeddings.tables.device.num_embeddings"]
    assert "'device'" in problems["small_embeddings.tables"]
    assert "-2" in problems["stratifiers.strata.us.index"]
    assert "allowed: 0..3" in problems["stratifiers.strata.ios.index"]


def test_validate_accepts_a_single_section_and_dataclasses():
    from recap_embed.config import EmbeddingBagConfig, LargeEmbeddingsConfig

    cfg = LargeEmbeddingsConfig(tables={"t": EmbeddingBagConfig(num_embeddings=10, embedding_dim=6)})
    with pytest.raises(ConfigValidationError) as err:
        validate(cfg, device="cpu")
    assert "embeddings.tables.t.embedding_dim" in dict(err.value.problems)
    validate(LargeEmbeddingsConfig(tables={"t": EmbeddingBagConfig(num_embeddings=10, embedding_dim=8)}), device="cpu")


def test_a_bare_section_that_fits_several_schemas_must_be_named():
    from recap_embed.config import ConfigError

    with pytest.raises(ConfigError, match="cannot tell which section"):
        validate({"tables": {"user": {"sharding_types": ["table_wise"]}}}, device="cpu")
    validate({"sharding": {"tables": {"user": {"sharding_types": ["table_wise"]}}}}, device="cpu")
