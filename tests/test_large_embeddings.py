"""LargeEmbeddings in one process: building from configs, outputs after shard(), stats, plans."""

from __future__ import annotations

import gc
import json
import time
from typing import Dict

import pytest
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchrec import KeyedJaggedTensor

from conftest import compose_app
from multiprocess import full_weight, load_full_weights, reference_pool
from recap_embed.config import ConfigError, ConfigValidationError, LargeEmbeddingsConfig
from recap_embed.distributed import describe_plan, load_plan_file, plan_placements, resolve_device, save_plan_file, shard
from recap_embed.modules import LargeEmbeddings, table_stats


def embeddings(tables: Dict[str, dict], **kw) -> dict:
    return {"tables": tables, "embedding_dim": 8, **kw}


def kjt(features: Dict[str, list], weighted: bool = False) -> KeyedJaggedTensor:
    """features: {name: [[ids of example 0], [ids of example 1], ...]} (same batch size)."""
    keys = list(features)
    lengths = [len(bag) for k in keys for bag in features[k]]
    values = [i for k in keys for bag in features[k] for i in bag]
    weights = torch.linspace(0.5, 2.0, len(values)) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.long), lengths=torch.tensor(lengths, dtype=torch.int32), weights=weights
    )


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------- building


def test_instantiate_composed_twhin_and_shard_with_device_strings():
    cfg = compose_app(["sharding.device=cpu"])
    model = instantiate(cfg.embeddings)
    assert isinstance(model, LargeEmbeddings)
    assert [(s.key, s.num_embeddings, s.embedding_dim) for s in model.specs] == [("user", 424_241, 4), ("tweet", 72_543, 4)]
    assert [s.optimizer.learning_rate.constant for s in model.specs] == [0.01, 0.005]
    assert all(p.is_meta for p in model.parameters())
    assert model.ebc.embedding_bags["user"].weight.shape == (424_241, 4)
    assert cfg.sharding.device == "cpu" and isinstance(cfg.sharding.device, str)

    dmp = shard(model, cfg.sharding)
    rows = {r["table"]: r for r in describe_plan(dmp)}
    assert rows["user"]["rows"] == 424_241 and rows["user"]["compute_kernel"] == "fused"
    out = dmp(kjt({"user": [[1, 2], [3]], "tweet": [[4], []]})).to_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {"user": (2, 4), "tweet": (2, 4)}
    assert out["tweet"][1].abs().sum() == 0  # an empty bag pools to zeros
    assert all(v.device.type == "cpu" for v in out.values())


def test_device_strings_resolve_to_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"sharding\.device: 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"no CUDA device"):
            resolve_device("cuda:0")


def test_from_python_dataclass_dict_and_instantiate_agree():
    tables = {"user": {"num_embeddings": 100}, "item": {"num_embeddings": 50, "embedding_dim": 12, "pooling": "mean"}}
    from_dict = LargeEmbeddings.from_config(embeddings(tables))
    from_dataclass = LargeEmbeddings.from_config(LargeEmbeddingsConfig(tables=tables, embedding_dim=8))
    node = OmegaConf.create({"_target_": "recap_embed.modules.LargeEmbeddings", **embeddings(tables)})
    from_hydra = instantiate(node)
    for m in (from_dict, from_dataclass, from_hydra):
        assert [(s.name, s.num_embeddings, s.embedding_dim, s.pooling.name) for s in m.specs] == [
            ("user", 100, 8, "sum"),
            ("item", 50, 12, "mean"),
        ]
        assert m.feature_names == ["user", "item"]


def test_bad_config_names_the_path():
    with pytest.raises(ConfigValidationError, match=r"embeddings\.tables\.user\.embedding_dim: 6 is not a multiple of 4"):
        LargeEmbeddings.from_config(embeddings({"user": {"num_embeddings": 10, "embedding_dim": 6}}))
    with pytest.raises(ConfigValidationError, match=r"model\.emb\.tables\.user\.num_embeddings"):
        LargeEmbeddings.from_config(embeddings({"user": {"num_embeddings": -1}}), config_path="model.emb")


def test_null_rows_from_override_or_vocab(tmp_path):
    from recap_embed.io.vocab import save_vocab

    tables = {"user": {"num_embeddings": None, "vocab": str(tmp_path / "user")}}
    with pytest.raises(Exception, match=r"does not exist"):
        LargeEmbeddings.from_config(embeddings(tables))
    m = LargeEmbeddings.from_config(embeddings(tables), num_embeddings_override={"user": 77})
    assert m.specs[0].num_embeddings == 77 and m.ebc.embedding_bags["user"].weight.shape == (77, 8)
    save_vocab(tmp_path / "user", ids=[1001, 1002, 1003], rows=[0, 2, 5])
    m = LargeEmbeddings.from_config(embeddings({"user": {**tables["user"], "oov_policy": "default_row"}}))
    assert m.specs[0].num_embeddings == 7  # rows 0..5, then one default row for unknown ids
    assert m.vocabs["user"].required_rows == 7
    with pytest.raises(ConfigError, match=r"embeddings\.tables\.t\.num_embeddings: is 10 but num_embeddings_override gives 11"):
        LargeEmbeddings.from_config(embeddings({"t": {"num_embeddings": 10}}), num_embeddings_override={"t": 11})


def test_a_trillion_parameters_instantiate_fast_without_memory():
    node = OmegaConf.create(
        {
            "_target_": "recap_embed.modules.LargeEmbeddings",
            "embedding_dim": 128,
            "tables": {f"t{i:02d}": {"num_embeddings": 400_000_000} for i in range(20)},
        }
    )
    instantiate(OmegaConf.create({"_target_": "recap_embed.modules.LargeEmbeddings", "tables": {"w": {"num_embeddings": 8}}}))  # warm imports
    gc.collect()
    rss = rss_bytes()
    start = time.perf_counter()
    model = instantiate(node)
    elapsed = time.perf_counter() - start
    grown = rss_bytes() - rss
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 20 * 400_000_000 * 128 == 1_024_000_000_000
    assert all(p.is_meta for p in params)
    assert elapsed < 1.0, f"instantiate took {elapsed:.2f} s"
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"  # 1e12 fp32 params would be 4 TB
    print(f"\n1e12-parameter config: instantiate {elapsed * 1000:.0f} ms, RSS +{grown / 2**20:.1f} MiB")


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_outputs_per_table_match_plain_torch(weighted):
    tables = {
        "a": {"num_embeddings": 20},  # sum, fp32, dim 8
        "b": {"num_embeddings": 30, "embedding_dim": 12, "pooling": "sum" if weighted else "mean"},
        "c": {"num_embeddings": 16, "embedding_dim": 4, "data_type": "fp16"},
    }
    model = LargeEmbeddings.from_config(embeddings(tables, is_weighted=weighted))
    dmp = shard(model, {"device": "cpu"})
    full = {t: torch.randn(spec["num_embeddings"], spec.get("embedding_dim", 8), generator=torch.Generator().manual_seed(i))
            for i, (t, spec) in enumerate(tables.items())}
    full["c"] = full["c"].half()
    load_full_weights(dmp, full)
    assert full_weight(dmp, "c").dtype == torch.float16  # fp16 storage in the fused kernel
    assert torch.equal(full_weight(dmp, "a"), full["a"])

    batch = {"a": [[0, 19, 3], [5], []], "b": [[1, 2], [29], [7, 7, 8]], "c": [[15], [0, 1, 2, 3], [9]]}
    features = kjt(batch, weighted=weighted)
    out = dmp(features).to_dict()
    assert list(out) == ["a", "b", "c"]
    dims = {"a": 8, "b": 12, "c": 4}
    per_feature_weights = features.to_dict()
    for t, bags in batch.items():
        assert out[t].shape == (3, dims[t]) and out[t].dtype == torch.float32
        jt = per_feature_weights[t]
        psw = jt.weights() if weighted else None
        mode = tables[t].get("pooling", "sum")
        want = reference_pool(full[t].float(), jt.values(), jt.lengths(), mode, psw)
        tol = 2e-3 if t == "c" else 1e-5
        torch.testing.assert_close(out[t], want, atol=tol, rtol=tol)


def test_table_stats_norms_and_touched_rows():
    tables = {"a": {"num_embeddings": 10}, "b": {"num_embeddings": 40, "embedding_dim": 4}}
    dmp = shard(LargeEmbeddings.from_config(embeddings(tables, tables_to_log=["a"])), {"device": "cpu"})
    full = {"a": torch.arange(80.0).reshape(10, 8) / 10, "b": torch.ones(40, 4)}
    load_full_weights(dmp, full)
    with torch.no_grad():
        dmp(kjt({"a": [[1, 2], [2]], "b": [[0], [39]]}))
        dmp(kjt({"a": [[7], []], "b": [[1], [1]]}))
    stats = table_stats(dmp, ["a", "b"])
    norms = full["a"].norm(dim=1)
    assert stats["a"]["mean_row_norm"] == pytest.approx(float(norms.mean()), rel=1e-6)
    assert stats["a"]["max_row_norm"] == pytest.approx(float(norms.max()), rel=1e-6)
    assert stats["a"]["touched_fraction"] == pytest.approx(3 / 10)  # rows 1, 2, 7
    assert stats["b"]["mean_row_norm"] == pytest.approx(2.0) and "touched_fraction" not in stats["b"]  # not tracked
    dmp.module.track_touched(["b"])
    with torch.no_grad():
        dmp(kjt({"a": [[0], [0]], "b": [[3], [4]]}))
    again = table_stats(dmp)  # default: tables_to_log
    assert list(again) == ["a"] and again["a"]["touched_fraction"] == pytest.approx(1 / 10)  # reset after each call
    assert table_stats(dmp, ["b"])["b"]["touched_fraction"] == pytest.approx(2 / 40)


# --------------------------------------------------------------------------- placement


def test_explicit_plan_and_plan_file_round_trip(tmp_path):
    tables = {"a": {"num_embeddings": 10}, "b": {"num_embeddings": 12}, "small": {"num_embeddings": 4, "embedding_dim": 4}}
    cfg = {"device": "cpu", "plan": {"a": {"sharding_type": "column_wise", "compute_kernel": "fused", "ranks": [0, 0]},
                                      "b": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [0]},
                                      "small": {"sharding_type": "data_parallel", "compute_kernel": "dense"}}}
    dmp = shard(LargeEmbeddings.from_config(embeddings(tables)), cfg)
    rows = {r["table"]: r for r in describe_plan(dmp)}
    assert rows["a"]["sharding_type"] == "column_wise" and rows["a"]["shards"] == [[10, 4, 0], [10, 4, 0]]
    assert rows["b"]["sharding_type"] == "table_wise" and rows["b"]["ranks"] == [0]
    assert rows["small"]["sharding_type"] == "data_parallel" and rows["small"]["compute_kernel"] == "dense"

    path = tmp_path / "plan.json"
    save_plan_file(path, plan_placements(dmp), world_size=1, device_type="cpu")
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["tables"]["a"] == {"sharding_type": "column_wise", "compute_kernel": "fused", "ranks": [0, 0]}
    assert load_plan_file(path).tables["small"].ranks == []
    again = shard(LargeEmbeddings.from_config(embeddings(tables)), {"device": "cpu", "plan_file": str(path)})
    assert [(r["table"], r["sharding_type"], r["shards"]) for r in describe_plan(again)] == [
        (r["table"], r["sharding_type"], r["shards"]) for r in describe_plan(dmp)
    ]

    doc["version"] = 7
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"sharding\.plan_file .*version 7 is not supported"):
        load_plan_file(path)


def test_planner_respects_constraints():
    tables = {"a": {"num_embeddings": 1000}, "b": {"num_embeddings": 1000, "embedding_dim": 16}}
    cfg = {"device": "cpu", "sharding_types": ["table_wise"], "tables": {"b": {"sharding_types": ["column_wise"], "pooling_factor": 3.0}}}
    dmp = shard(LargeEmbeddings.from_config(embeddings(tables)), cfg)
    rows = {r["table"]: r["sharding_type"] for r in describe_plan(dmp)}
    assert rows == {"a": "table_wise", "b": "column_wise"}


@pytest.mark.parametrize(
    "cfg, where",
    [
        ({"sharding_types": ["row_wise"]}, r"sharding\.sharding_types\[0\]: row_wise needs CUDA"),
        ({"tables": {"a": {"sharding_types": ["table_row_wise"]}}}, r"sharding\.tables\.a\.sharding_types\[0\]: table_row_wise needs CUDA"),
        ({"plan": {"a": {"sharding_type": "row_wise", "compute_kernel": "fused"}}}, r"sharding\.plan\.a\.sharding_type: row_wise needs CUDA"),
        ({"plan_file": "PLAN"}, r"sharding\.plan_file .*tables\.a\.sharding_type: grid_shard needs CUDA"),
        ({"plan": {"a": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [3]}}}, r"sharding\.plan\.a\.ranks: \[3\] outside"),
        ({"plan": {"a": {"sharding_type": "data_parallel", "compute_kernel": "fused"}}}, r"sharding\.plan\.a\.compute_kernel: fused does not go with data_parallel"),
        ({"compute_kernels": ["fused_uvm_caching"]}, r"sharding\.compute_kernels\[0\]: fused_uvm_caching needs CUDA"),
    ],
)
def test_what_cpu_cannot_run_is_refused_before_any_collective(tmp_path, cfg, where):
    if cfg.get("plan_file") == "PLAN":
        path = tmp_path / "plan.json"
        save_plan_file(path, {"a": {"sharding_type": "grid_shard", "compute_kernel": "fused", "ranks": [0]}})
        cfg = {"plan_file": str(path)}
    was = dist.is_initialized()
    model = LargeEmbeddings.from_config(embeddings({"a": {"num_embeddings": 10}}))
    with pytest.raises(ConfigValidationError, match=where):
        shard(model, {"device": "cpu", **cfg})
    assert dist.is_initialized() == was  # no process group was even created
    assert all(p.is_meta for p in model.parameters()) and not hasattr(model.ebc.embedding_bags["a"].weight, "_in_backward_optimizers")


def test_cpu_refuses_gpu_only_optimizers_naming_the_table():
    model = LargeEmbeddings.from_config(embeddings({"a": {"num_embeddings": 10, "optimizer": {"algorithm": "adam"}}}))
    with pytest.raises(ConfigValidationError, match=r"embeddings\.tables\.a\.optimizer\.algorithm: adam cannot be fused on CPU"):
        shard(model, {"device": "cpu"})


def test_shard_accepts_a_plain_dict_sharding_section():
    from recap_embed.distributed import describe_plan, shard

    m = LargeEmbeddings.from_config({"tables": {"user": {"num_embeddings": 100, "embedding_dim": 8}}, "embedding_dim": 8})
    model = shard(m, {"device": "cpu", "tables": {"user": {"sharding_types": ["table_wise"]}}})
    assert [row["sharding_type"] for row in describe_plan(model)] == ["table_wise"]


def test_tables_without_a_torch_optimizer_are_never_planned_data_parallel():
    from recap_embed.config import ShardingConfig
    from recap_embed.distributed.planner import build_constraints

    m = LargeEmbeddings.from_config(
        {"tables": {"small": {"num_embeddings": 10}, "big": {"num_embeddings": 10}}, "embedding_dim": 8,
         "optimizer": {"algorithm": "lamb"}}
    )
    constraints = build_constraints(ShardingConfig(), "sharding", m.specs, "cuda")
    for name in ("small", "big"):
        assert constraints[name].sharding_types and "data_parallel" not in constraints[name].sharding_types
