"""torchrec table configs in and out (recap_embed.interop), and the torchrec fields they carry."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from recap_embed.config import EmbeddingBagConfig as RecapTable
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig, PoolingType

from recap_embed.config import ConfigValidationError, validate
from recap_embed.config.store import register_configs
from recap_embed import instantiate
from recap_embed.interop import TorchrecConversionError, from_torchrec, to_torchrec
from recap_embed.modules import LargeEmbeddings

from launch import Completed, python_m, run
from multiprocess import full_weight


def torchrec_tables() -> List[EmbeddingBagConfig]:
    """Every field with a meaning here, away from its default somewhere; `u` feeds two tables."""
    return [
        EmbeddingBagConfig(name="user", num_embeddings=1000, embedding_dim=8, feature_names=["u", "u_hist"],
                           weight_init_min=-0.01, weight_init_max=0.01),
        EmbeddingBagConfig(name="item", num_embeddings=500, embedding_dim=16, feature_names=["i", "u"],
                           pooling=PoolingType.MEAN, data_type=DataType.FP16, need_pos=True),
        EmbeddingBagConfig(name="author", num_embeddings=300, embedding_dim=4, feature_names=["a"],
                           data_type=DataType.BF16, num_embeddings_post_pruning=200, weight_init_max=0.5),
    ]


def fields_of(config: EmbeddingBagConfig) -> Dict[str, Any]:
    """Every field; init_fn (a fresh partial each time, equal only to itself) by what it does."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "init_fn"}
    fn = config.init_fn
    assert isinstance(fn, functools.partial) and fn.func is torch.nn.init.uniform_ and not fn.args
    out["init_fn"] = ("uniform_", fn.keywords)
    return out


def test_torchrec_configs_round_trip_field_by_field():
    tables = torchrec_tables()
    node = from_torchrec(tables, optimizer={"algorithm": "rowwise_adagrad", "init_learning_rate": 0.05}, tables_to_log=["user"])
    assert list(node.tables) == ["user", "item", "author"]
    assert node.optimizer.algorithm.name == "rowwise_adagrad" and list(node.tables_to_log) == ["user"]
    back = to_torchrec(node)
    assert [fields_of(c) for c in back] == [fields_of(c) for c in tables]
    # The module built from the config gives its EBC the same configs.
    built = instantiate(node)
    assert isinstance(built, LargeEmbeddings)
    assert [fields_of(c) for c in built.ebc.embedding_bag_configs()] == [fields_of(c) for c in tables]
    assert built.embedding_names == ["u@user", "u_hist", "i", "u@item", "a"]
    assert built.output_keys("item") == ["i", "u@item"] and built.feature_names == ["u", "u_hist", "i", "a"]


@st.composite
def random_tables(draw: st.DrawFn) -> List[EmbeddingBagConfig]:
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=5, unique=True))
    pool = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=6, unique=True))
    tables = []
    for name in names:
        rows = draw(st.integers(1, 10**6))
        low = draw(st.none() | st.floats(-1.0, 0.0))
        high = draw(st.none() | st.floats(0.0, 1.0))
        if low is not None and high is None and low > math.sqrt(1 / rows):
            low = None
        if high is not None and low is None and high < -math.sqrt(1 / rows):
            high = None
        tables.append(EmbeddingBagConfig(
            name=name, num_embeddings=rows, embedding_dim=4 * draw(st.integers(1, 64)),
            feature_names=draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True)),  # shared across tables too
            pooling=draw(st.sampled_from([PoolingType.SUM, PoolingType.MEAN])),
            data_type=draw(st.sampled_from([DataType.FP32, DataType.FP16, DataType.BF16])),
            weight_init_min=low, weight_init_max=high,
            num_embeddings_post_pruning=draw(st.none() | st.integers(1, rows)), need_pos=draw(st.booleans()),
        ))
    return tables


@settings(max_examples=40, deadline=None)
@given(tables=random_tables())
def test_random_torchrec_configs_round_trip(tables):
    node = from_torchrec(tables)
    want = [fields_of(c) for c in tables]
    assert [fields_of(c) for c in to_torchrec(node)] == want
    assert [fields_of(c) for c in LargeEmbeddings.from_config(node).ebc.embedding_bag_configs()] == want


def test_asdict_converts_like_the_dataclass():
    a = from_torchrec(torchrec_tables())
    b = from_torchrec([dataclasses.asdict(c) for c in torchrec_tables()])
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)


def test_the_node_composes_into_a_preset_and_instantiates(tmp_path: Path):
    node = from_torchrec(torchrec_tables(), is_weighted=True)
    conf = tmp_path / "conf"
    (conf / "embeddings").mkdir(parents=True)
    (conf / "embeddings" / "from_torchrec.yaml").write_text("defaults:\n  - base\n  - _self_\n\n" + OmegaConf.to_yaml(node))
    (conf / "app.yaml").write_text(yaml.safe_dump({"defaults": [{"embeddings": "from_torchrec"}, "_self_"]}))
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="app", overrides=["embeddings.tables.author.embedding_dim=8"])
    GlobalHydra.instance().clear()
    validate(cfg, device="cuda")  # bf16 is a CUDA type
    with pytest.raises(ConfigValidationError, match="embeddings.tables.author.data_type: bf16 needs CUDA"):
        validate(cfg, device="cpu")
    want = [fields_of(c) for c in torchrec_tables()]
    want[2]["embedding_dim"] = 8
    assert [fields_of(c) for c in to_torchrec(cfg.embeddings)] == want
    module = instantiate(cfg.embeddings)
    assert module.is_weighted and [fields_of(c) for c in module.ebc.embedding_bag_configs()] == want


def test_default_init_range_and_plain_tables_stay_plain():
    """A torchrec config with every default gives a table with nothing but its rows, dim and features."""
    node = from_torchrec([EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["t"])])
    table = node.tables.t
    assert OmegaConf.get_type(table) is RecapTable  # a typed node: every other field is our default
    assert (table.num_embeddings, table.embedding_dim, list(table.feature_names)) == (10, 4, ["t"])
    assert OmegaConf.to_container(table) == {**OmegaConf.to_container(OmegaConf.structured(RecapTable)),
                                            "num_embeddings": 10, "embedding_dim": 4, "feature_names": ["t"]}
    (config,) = to_torchrec(node)
    assert config.init_fn.keywords == {"a": -math.sqrt(1 / 10), "b": math.sqrt(1 / 10)}


def test_rows_from_an_override_for_tables_sized_by_their_vocab():
    cfg = {"tables": {"t": {"num_embeddings": None, "vocab": "/nowhere"}}, "embedding_dim": 8}
    (config,) = to_torchrec(cfg, num_embeddings_override={"t": 77})
    assert (config.name, config.num_embeddings, config.embedding_dim, config.feature_names) == ("t", 77, 8, ["t"])


def _custom_init(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.normal_(t)


REFUSED = [
    ({"pooling": PoolingType.NONE}, "configs[0] ('t').pooling", ["NONE", "EmbeddingBagCollection", "SUM, MEAN"]),
    ({"data_type": DataType.INT8}, "configs[0] ('t').data_type", ["INT8", "inference", "FP32, FP16, BF16"]),
    ({"init_fn": _custom_init}, "configs[0] ('t').init_fn", ["custom callable", "weight_init_min and weight_init_max"]),
    ({"init_fn": functools.partial(torch.nn.init.uniform_, a=-1.0, b=1.0)}, "configs[0] ('t').init_fn",
     ["uniform over [-1.0, 1.0]", "weight_init_min/max give [-0.316", "set those to the range you mean"]),
    ({"init_fn": functools.partial(torch.nn.init.normal_, std=0.1)}, "configs[0] ('t').init_fn", ["custom callable"]),
    ({"input_dim": 16}, "configs[0] ('t').input_dim", ["16", "no equivalent for input_dim", "None"]),
    ({"total_num_buckets": 4}, "configs[0] ('t').total_num_buckets", ["no equivalent for total_num_buckets"]),
    ({"use_virtual_table": True}, "configs[0] ('t').use_virtual_table", ["no equivalent for use_virtual_table"]),
    ({"enable_embedding_update": True}, "configs[0] ('t').enable_embedding_update", ["no equivalent"]),
    ({"feature_names": []}, "configs[0] ('t').feature_names", ["is empty", "set feature_names"]),
    ({"name": ""}, "configs[0].name", ["non-empty name"]),
]


@pytest.mark.parametrize("change, path, words", REFUSED, ids=[c[1].rsplit(".", 1)[-1] + "-" + str(i) for i, c in enumerate(REFUSED)])
def test_fields_without_an_equivalent_are_refused_by_name(change, path, words):
    fields = {"name": "t", "num_embeddings": 10, "embedding_dim": 4, "feature_names": ["t"], **change}
    with pytest.raises(TorchrecConversionError) as err:
        from_torchrec([EmbeddingBagConfig(**fields)])
    assert err.value.path == path and str(err.value).startswith(path + ": ")
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_other_refusals_name_what_is_wrong():
    base = dict(num_embeddings=10, embedding_dim=4, feature_names=["t"])
    with pytest.raises(TorchrecConversionError, match=r"configs\[1\]\.name: 't' is also the name of configs\[0\]"):
        from_torchrec([EmbeddingBagConfig(name="t", **base), EmbeddingBagConfig(name="t", **base)])
    with pytest.raises(TorchrecConversionError, match=r"configs\[0\]: is a EmbeddingConfig.*takes torchrec.EmbeddingBagConfig"):
        from_torchrec([EmbeddingConfig(name="t", **base)])
    with pytest.raises(TorchrecConversionError, match=r"configs\[0\]\.colour: is not a field of torchrec's EmbeddingBagConfig"):
        from_torchrec([{"name": "t", **base, "colour": 1}])
    with pytest.raises(TorchrecConversionError, match="unknown collection field.*sharding"):
        from_torchrec([EmbeddingBagConfig(name="t", **base)], sharding={})
    # The tables share dim 6, so the node's collection has it too: one problem, at the collection.
    with pytest.raises(ConfigValidationError, match=r"\(1 problem\):\n  embeddings\.embedding_dim: 6 is not a multiple of 4"):
        from_torchrec([EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=6, feature_names=["t"])])


def _shard_one_process(cfg: Dict[str, Any]):
    from recap_embed.distributed import shard

    plan = {"wide": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [0]},
            "dp": {"sharding_type": "data_parallel", "compute_kernel": "dense"}}
    return shard(LargeEmbeddings.from_config(cfg), {"device": "cpu", "plan": {k: v for k, v in plan.items() if k in cfg["tables"]}})


def test_init_range_sets_the_weights_when_the_tables_are_placed():
    tables = [
        EmbeddingBagConfig(name="wide", num_embeddings=20_000, embedding_dim=8, feature_names=["w"], weight_init_min=0.25, weight_init_max=0.5),
        EmbeddingBagConfig(name="dp", num_embeddings=2_000, embedding_dim=4, feature_names=["d"], weight_init_min=-0.002, weight_init_max=0.002),
    ]
    model = _shard_one_process(OmegaConf.to_container(from_torchrec(tables)))
    for name, low, high in (("wide", 0.25, 0.5), ("dp", -0.002, 0.002)):
        w = full_weight(model, name)
        assert float(w.min()) >= low and float(w.max()) <= high, name
        assert float(w.max()) - float(w.min()) > 0.95 * (high - low), name  # the range, not a sliver of it


def test_training_refuses_torchrec_flags_it_cannot_honour():
    cfg = {"tables": {"wide": {"num_embeddings": 100, "embedding_dim": 4, "num_embeddings_post_pruning": 60},
                      "dp": {"num_embeddings": 100, "embedding_dim": 4, "need_pos": True}}}
    with pytest.raises(ConfigValidationError) as err:
        _shard_one_process(cfg)
    problems = dict(err.value.problems)
    assert "torchrec's sharders would allocate 60 rows" in problems["embeddings.tables.wide.num_embeddings_post_pruning"]
    assert "position-weighted feature processor" in problems["embeddings.tables.dp.need_pos"]
    cfg["tables"]["wide"]["num_embeddings_post_pruning"] = 100  # as many as it has: nothing pruned
    cfg["tables"]["dp"]["need_pos"] = False
    _shard_one_process(cfg)


def test_bf16_is_refused_on_cpu_before_placement():
    cfg = {"tables": {"wide": {"num_embeddings": 100, "embedding_dim": 4, "data_type": "bf16"}}}
    LargeEmbeddings.from_config(cfg)  # built on meta: the device is not known yet
    with pytest.raises(ConfigValidationError, match="embeddings.tables.wide.data_type: bf16 needs CUDA"):
        _shard_one_process(cfg)


# --------------------------------------------------------------------------- the training app


def _train(*overrides: str, cwd: Path) -> Completed:
    """A small run of the training app; it exits 0 or the test fails with its output."""
    small = ["train.progress=false", "train.epochs=1", "data.synthetic.num_train=20000", "data.synthetic.num_eval=4000"]
    return run(python_m("recap_embed.train", *small, *overrides), cwd=cwd, timeout=300)


@pytest.mark.slow
def test_training_app_with_a_shared_feature_trains_and_warm_starts(tmp_path: Path):
    """`user2` reads the app's `user` feature through the same vocab; its outputs are user@user, user@user2."""
    shared = ["+embeddings.tables={user2: {vocab: '${data.dir}/vocab/user', num_embeddings: null, oov_policy: default_row, "
              "feature_names: [user], embedding_dim: 8}}"]
    first = tmp_path / "first"
    _train(*shared, f"hydra.run.dir={first}", cwd=tmp_path)
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["embedding_dims"] == {"user": 16, "item": 16, "user2": 8} and metrics["eval_auroc"] > 0.55
    ckpt = metrics["checkpoint"]
    warm = tmp_path / "warm"
    _train(*shared, f"hydra.run.dir={warm}", f"data.dir={first / 'data'}", "train.max_steps=1",
           f"embeddings.tables.user2.pretrained.embedding_snapshot_uri={ckpt}", cwd=tmp_path)
    assert set(json.loads((warm / "metrics.json").read_text())["pretrained"]) == {"user2"}
