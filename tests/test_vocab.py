"""Vocab loading, validation and id -> row mapping, checked against a brute-force dict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_embed.config import ConfigValidationError, validate
from recap_embed.config.schema import EmbeddingBagConfig, LargeEmbeddingsConfig, OovPolicy
from recap_embed.io import _id_table as id_table
from recap_embed.io import vocab as vocab_module
from recap_embed.io.vocab import Vocab, VocabError, hash_ids, save_vocab
from recap_embed.io.vocab_mapper import VocabMapper

CFG = "embeddings.tables.user.vocab"
I64 = st.integers(-(2**63), 2**63 - 1)
M64 = (1 << 64) - 1


def ref_splitmix64(x: int) -> int:
    """splitmix64 (Steele et al.) on Python ints, the reference for `hash_ids`."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_map(entries: Dict[int, int], queries: List[int], policy: OovPolicy, buckets: int) -> List[int]:
    r = max(entries.values()) + 1
    out = []
    for q in queries:
        if q in entries:
            out.append(entries[q])
        elif policy is OovPolicy.default_row:
            out.append(r)
        else:
            out.append(r + (ref_splitmix64(q) & ((1 << 63) - 1)) % buckets)
    return out


def load(directory: Path, **kw) -> Vocab:
    kw.setdefault("num_embeddings", None)
    kw.setdefault("oov_policy", OovPolicy.error)
    return Vocab.load(directory, table="user", config_path=CFG, **kw)


def write(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


# --------------------------------------------------------------------------- hashing


def test_hash_is_splitmix64_low_63_bits():
    # splitmix64 seeded with 0 first yields 0xE220A8397B1DCDAF; hash_ids(0) is that output.
    assert int(hash_ids(torch.tensor([0]))) == 0xE220A8397B1DCDAF & ((1 << 63) - 1)
    xs = [-(2**63), -1, 0, 1, 42, 2**63 - 1, 123456789012345, -987654321]
    got = hash_ids(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [ref_splitmix64(x & M64) & ((1 << 63) - 1) for x in xs]
    assert all(g >= 0 for g in got)
    # Well mixed: sequential ids (the worst case for a weak hash) spread evenly over the buckets.
    counts = torch.bincount(hash_ids(torch.arange(20_000)) % 10, minlength=10)
    assert int(counts.min()) > 1800 and int(counts.max()) < 2200


# --------------------------------------------------------------------------- mapping


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.dictionaries(I64, st.integers(0, 40), min_size=1, max_size=40),
    extra=st.lists(I64, max_size=30),
    policy=st.sampled_from([OovPolicy.error, OovPolicy.default_row, OovPolicy.hash]),
    buckets=st.integers(1, 7),
    data=st.data(),
)
def test_map_matches_dict_reference(entries, extra, policy, buckets, data):
    known = list(entries)
    queries = data.draw(st.lists(st.sampled_from(known), max_size=30)) + extra
    queries = data.draw(st.permutations(queries))
    v = Vocab(list(entries), list(entries.values()), table="user", oov_policy=policy,
              oov_buckets=buckets if policy is OovPolicy.hash else 0, config_path=CFG)
    ids = torch.tensor(queries, dtype=torch.int64)
    oov = [q for q in queries if q not in entries]
    if policy is OovPolicy.error and oov:
        with pytest.raises(VocabError, match="not in the vocab"):
            v.map(ids)
    else:
        assert v.map(ids).tolist() == ref_map(entries, queries, policy, buckets)
    assert v.lookups == len(queries) and v.oov_hits == len(oov)


@pytest.mark.parametrize("policy", [OovPolicy.default_row, OovPolicy.hash])
@pytest.mark.parametrize("threads", [1, 3])
def test_large_batch_over_several_chunks_and_threads_matches_reference(tmp_path, monkeypatch, policy, threads):
    """Batches of several probe chunks, split over threads; same answers, same shape."""
    monkeypatch.setattr(vocab_module, "_IDS_PER_THREAD", 1000)
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64))
    rows = rng.integers(0, 3000, size=ids.size)
    save_vocab(tmp_path / "v", ids, rows, num_files=3)
    v = load(tmp_path / "v", oov_policy=policy, oov_buckets=16 if policy is OovPolicy.hash else 0)
    n = 3 * id_table.CHUNK + 1000
    queries = np.where(rng.random(n) < 0.8, rng.choice(ids, size=n), rng.integers(-(2**63), 2**63 - 1, size=n))
    entries = dict(zip(ids.tolist(), rows.tolist()))
    batch = torch.from_numpy(queries).view(-1, 8)
    out = v.map(batch, threads=threads)
    assert out.shape == batch.shape and out.dtype == torch.int64
    assert out.view(-1).tolist() == ref_map(entries, queries.tolist(), policy, 16)
    assert v.oov_hits == sum(q not in entries for q in queries.tolist())


def test_mixing_is_a_bijection_and_the_torch_probe_agrees():
    """Keys are mixed ids (no id stored), so mix must be invertible; the torch probe (used on other
    devices) must give what the numpy one gives, including ids whose mixed key is 0 or 2**64-1
    (the padding's key)."""
    edge = id_table.unmix(np.array([0, (1 << 64) - 1, 1 << 63, (1 << 63) - 1], dtype=np.uint64))
    rng = np.random.default_rng(1)
    xs = np.concatenate([edge, rng.integers(-(2**63), 2**63 - 1, size=20000, dtype=np.int64), np.arange(-50, 50)])
    assert np.array_equal(id_table.unmix(id_table.mix(xs)), xs)
    for keep in (slice(0, None), slice(4, None)):  # edge ids in the vocab, then only queried
        ids = np.unique(xs[keep])
        v = Vocab(ids, rng.integers(0, 2**40, size=ids.size), table="user", oov_policy="default_row")
        queries = torch.from_numpy(np.concatenate([xs, rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64)]))
        rows_np, miss_np = v._table.lookup(queries)
        rows_t, miss_t = v._table._lookup_torch(queries)
        assert torch.equal(rows_np, rows_t) and torch.equal(miss_np, miss_t)
        known = dict(zip(ids.tolist(), v.entries()[1].tolist()))
        assert miss_np.tolist() == [q not in known for q in queries.tolist()]
        assert [r for r, m in zip(rows_np.tolist(), miss_np.tolist()) if not m] == [known[q] for q in queries.tolist() if q in known]
        got_ids, got_rows = v.entries()
        assert got_ids.tolist() == sorted(ids.tolist())


def test_ids_crowding_one_home_slot_are_all_found():
    """Ids whose mixed keys are consecutive share a home slot: the entries spread over hundreds
    of slots after it, and the probe window grows to cover them."""
    crowd = id_table.unmix(np.arange(1 << 60, (1 << 60) + 300, dtype=np.uint64))
    others = np.random.default_rng(2).integers(-(2**63), 2**63 - 1, size=700, dtype=np.int64)
    ids = np.concatenate([crowd, others])
    v = Vocab(ids, np.arange(ids.size), table="user", oov_policy="default_row")
    assert v._table.window >= 256
    near = id_table.unmix(np.arange((1 << 60) - 5, (1 << 60) + 305, dtype=np.uint64))  # the crowd and its neighbours
    queries = torch.from_numpy(np.concatenate([ids, near]))
    want = {int(i): r for r, i in enumerate(ids.tolist())}
    assert v.map(queries).tolist() == [want.get(q, ids.size) for q in queries.tolist()]
    assert torch.equal(v._table._lookup_torch(queries)[0], v._table.lookup(queries)[0])


def test_large_table_memory_is_16_bytes_per_entry():
    ids = np.arange(100_000, dtype=np.int64) * 7919
    v = Vocab(ids, np.arange(ids.size), table="user")
    assert v.nbytes / len(v) <= 16.01
    big_rows = Vocab(ids[:1000], np.arange(1000) + 2**33, table="user")  # rows past int32: 8-byte rows
    assert big_rows.map(torch.tensor([ids[5]])).tolist() == [5 + 2**33]


def test_map_accepts_int32_and_empty_batches():
    v = Vocab([7, 3], [1, 0], table="user", oov_policy="default_row")
    assert v.map(torch.tensor([3, 7, 5], dtype=torch.int32)).tolist() == [0, 1, 2]
    empty = v.map(torch.empty(0, dtype=torch.int64))
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(VocabError, match="integer tensor"):
        v.map(torch.tensor([1.0]))


def test_oov_rate_counts_and_resets():
    v = Vocab([10, 20, 30], [0, 1, 2], table="user", oov_policy=OovPolicy.default_row)
    assert v.oov_rate() == 0.0
    v.map(torch.tensor([10, 11, 20, 21]))
    v.map(torch.tensor([30, 31, 32, 33]))
    assert (v.lookups, v.oov_hits) == (8, 5)
    assert v.oov_rate() == pytest.approx(5 / 8)
    v.reset_counts()
    assert (v.lookups, v.oov_hits, v.oov_rate()) == (0, 0, 0.0)


def test_error_policy_names_table_and_unknown_ids():
    v = Vocab([1, 2, 3], [0, 1, 2], table="user", config_path=CFG)
    unknown = list(range(100, 110))
    with pytest.raises(VocabError) as e:
        v.map(torch.tensor([1] + unknown + [100]))
    msg = str(e.value)
    assert "'user'" in msg and CFG in msg
    assert "11 of 12 ids (10 distinct)" in msg
    assert "[100, 101, 102, 103, 104]" in msg and "105" not in msg
    assert "oov_policy=default_row" in msg
    assert v.oov_hits == 11  # counted before raising, so logs see it


# --------------------------------------------------------------------------- layout


def test_num_embeddings_is_derived_per_policy(tmp_path):
    save_vocab(tmp_path / "v", [5, -9, 12, 7], [3, 0, 9, 3])  # two ids share row 3; rows have holes
    assert load(tmp_path / "v").num_embeddings == 10
    d = load(tmp_path / "v", oov_policy=OovPolicy.default_row)
    assert (d.oov_row, d.required_rows, d.num_embeddings) == (10, 11, 11)
    assert d.map(torch.tensor([1])).tolist() == [10]
    h = load(tmp_path / "v", oov_policy=OovPolicy.hash, oov_buckets=4)
    assert (h.oov_row, h.required_rows, h.num_embeddings) == (10, 14, 14)
    assert set(h.map(torch.arange(1000, 1400)).tolist()) == {10, 11, 12, 13}
    big = load(tmp_path / "v", oov_policy=OovPolicy.hash, oov_buckets=4, num_embeddings=100)
    assert (big.num_embeddings, big.required_rows) == (100, 14)
    exact = load(tmp_path / "v", oov_policy=OovPolicy.hash, oov_buckets=4, num_embeddings=14)
    assert exact.num_embeddings == 14
    # Buckets are ignored (not an error) by the other policies, so sweeps can keep them set.
    assert load(tmp_path / "v", oov_policy=OovPolicy.default_row, oov_buckets=8).num_embeddings == 11


def test_memory_is_16_bytes_per_entry(tmp_path):
    save_vocab(tmp_path / "v", np.arange(1000, dtype=np.int64) * 7, np.arange(1000)[::-1].copy())
    v = load(tmp_path / "v")
    # 1/0.75 slots of an 8-byte key and a 4-byte row per entry, plus a few padding slots
    assert len(v) == 1000 and 16_000 <= v.nbytes <= 16_000 * 1.02
    assert v.ids.dtype == v.rows.dtype == torch.int64
    assert bool((v.ids[1:] > v.ids[:-1]).all())


def test_multi_file_vocab_with_mixed_integer_types(tmp_path):
    d = tmp_path / "v"
    write(d / "b.parquet", id=pa.array([30, -5], pa.int64()), row=pa.array([2, 0], pa.int32()))
    write(d / "a.parquet", id=pa.array([7], pa.int32()), row=pa.array([1], pa.int16()), extra=["x"])
    write(d / "c.parquet", id=pa.array([], pa.int64()), row=pa.array([], pa.int64()))  # empty file is fine
    (d / "_SUCCESS").write_text("")  # Spark marker, ignored
    write(d / ".hidden.parquet", id=[1], row=[-1])  # skipped: hidden
    v = load(d)
    assert v.ids.tolist() == [-5, 7, 30] and v.rows.tolist() == [0, 1, 2]
    assert v.map(torch.tensor([30, 7, -5])).tolist() == [2, 1, 0]


def test_uint64_ids_keep_their_bits(tmp_path):
    raw = np.array([2**64 - 1, 2**63, 5], dtype=np.uint64)
    write(tmp_path / "v" / "p.parquet", id=pa.array(raw, pa.uint64()), row=[0, 1, 2])
    v = load(tmp_path / "v")
    assert v.map(torch.tensor([-1, -(2**63), 5])).tolist() == [0, 1, 2]


def test_save_vocab_round_trip_and_atomic(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.permutation(np.arange(-50, 50, dtype=np.int64))
    rows = rng.integers(0, 20, size=ids.size)
    out = save_vocab(tmp_path / "deep" / "v", ids, rows, num_files=4)
    assert sorted(os.listdir(out)) == [f"part-{i:05d}.parquet" for i in range(4)]
    v = load(out)
    assert v.map(torch.from_numpy(ids)).tolist() == rows.tolist()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_vocab(out, [1], [0])
    with pytest.raises(VocabError, match="appear more than once"):
        save_vocab(out, [1, 1], [0, 1], overwrite=True)
    assert load(out).map(torch.from_numpy(ids)).tolist() == rows.tolist()  # old vocab intact
    save_vocab(out, [1, 2], [0, 1], overwrite=True)
    assert load(out).ids.tolist() == [1, 2]
    assert sorted(os.listdir(tmp_path / "deep")) == ["v"]  # no temp or backup dirs left
    with pytest.raises(VocabError, match="negative"):
        save_vocab(tmp_path / "w", [1], [-1])
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- bad vocabs


def expect_error(directory: Path, *fragments: str, **kw) -> str:
    with pytest.raises(VocabError) as e:
        load(directory, **kw)
    msg = str(e.value)
    for f in (CFG, "'user'") + fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "nope", "does not exist")


def test_directory_without_parquet_files(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "ids.csv").write_text("id,row\n1,0\n")
    expect_error(tmp_path / "v", "no *.parquet files", "'id'", "'row'")


def test_empty_vocab(tmp_path):
    write(tmp_path / "v" / "p.parquet", id=pa.array([], pa.int64()), row=pa.array([], pa.int64()))
    expect_error(tmp_path / "v", "0 rows")


def test_wrong_columns(tmp_path):
    write(tmp_path / "v" / "p.parquet", key=[1, 2], row=[0, 1])
    msg = expect_error(tmp_path / "v", "p.parquet", "no column 'id'", "int64")
    assert "['key', 'row']" in msg  # says what the file has


def test_non_integer_columns(tmp_path):
    write(tmp_path / "v" / "p.parquet", id=["a", "b"], row=[0, 1])
    expect_error(tmp_path / "v", "p.parquet", "column 'id'", "string", "int64")
    write(tmp_path / "w" / "q.parquet", id=[1, 2], row=[0.0, 1.0])
    expect_error(tmp_path / "w", "q.parquet", "column 'row'", "double")


def test_null_values(tmp_path):
    write(tmp_path / "v" / "p.parquet", id=pa.array([1, None], pa.int64()), row=[0, 1])
    expect_error(tmp_path / "v", "p.parquet", "column 'id'", "1 null")


def test_duplicate_ids_across_files(tmp_path):
    write(tmp_path / "v" / "a.parquet", id=[1, 2, 3, 4], row=[0, 1, 2, 3])
    write(tmp_path / "v" / "b.parquet", id=[4, 3, 9], row=[5, 2, 6])
    msg = expect_error(tmp_path / "v", "column 'id'", "2 ids that appear more than once", "a.parquet", "b.parquet")
    assert "id 3 (rows [2, 2]" in msg and "id 4 (rows [3, 5]" in msg


def test_negative_rows(tmp_path):
    write(tmp_path / "v" / "a.parquet", id=[1, 2], row=[0, 1])
    write(tmp_path / "v" / "b.parquet", id=[3, 4], row=[-1, 2])
    expect_error(tmp_path / "v", "b.parquet", "column 'row'", "negative", "id 3 -> row -1")


def test_rows_out_of_range(tmp_path):
    write(tmp_path / "v" / "a.parquet", id=[1, 2], row=[0, 99])
    write(tmp_path / "v" / "b.parquet", id=[3], row=[100])
    msg = expect_error(tmp_path / "v", "a.parquet", "column 'row'", "id 2 -> row 99", "num_embeddings=50", num_embeddings=50)
    assert "num_embeddings >= 101" in msg  # what the whole vocab needs, not just this file


def test_hash_without_buckets(tmp_path):
    save_vocab(tmp_path / "v", [1], [0])
    expect_error(tmp_path / "v", "oov_policy=hash", "oov_buckets > 0", oov_policy=OovPolicy.hash)


def test_num_embeddings_too_small_for_reserved_rows(tmp_path):
    save_vocab(tmp_path / "v", [1, 2, 3], [0, 1, 2])
    assert load(tmp_path / "v", num_embeddings=3).num_embeddings == 3  # error policy: no reserved row
    expect_error(tmp_path / "v", "part-00000.parquet", "column 'row'", "num_embeddings >= 4",
                 num_embeddings=3, oov_policy=OovPolicy.default_row)
    expect_error(tmp_path / "v", "num_embeddings >= 8", "oov_policy=hash",
                 num_embeddings=6, oov_policy=OovPolicy.hash, oov_buckets=5)
    expect_error(tmp_path / "v", "leaves no row", num_embeddings=5, oov_policy=OovPolicy.hash, oov_buckets=5)


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "p.parquet").write_bytes(b"not parquet")
    expect_error(tmp_path / "v", "p.parquet", "cannot read")


# --------------------------------------------------------------------------- KJT


def test_mapper_maps_only_features_with_a_vocab_and_keeps_weights():
    v = Vocab([100, 200, 300], [2, 0, 1], table="user", oov_policy=OovPolicy.default_row)
    mapper = VocabMapper({"user_id": v})
    kjt = KeyedJaggedTensor(
        keys=["user_id", "item_id"],
        values=torch.tensor([300, 100, 999, 200, 7, 8, 9]),
        lengths=torch.tensor([2, 0, 2, 1, 2, 0]),  # user_id: [300,100] [] [999,200]; item_id: [7] [8,9] []
        weights=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
    )
    out = mapper(kjt)
    assert out.keys() == ["user_id", "item_id"]
    assert out.values().tolist() == [1, 2, 3, 0, 7, 8, 9]  # 999 is OOV -> row 3; item ids untouched
    assert torch.equal(out.lengths(), kjt.lengths()) and torch.equal(out.offsets(), kjt.offsets())
    assert torch.equal(out.weights(), kjt.weights())
    assert out.stride() == 3
    assert out["user_id"].to_dense()[2].tolist() == [3, 0]
    assert v.oov_rate() == pytest.approx(1 / 4)
    unmapped = KeyedJaggedTensor(keys=["item_id"], values=torch.tensor([5]), lengths=torch.tensor([1]))
    assert mapper(unmapped).values().tolist() == [5]


def test_mapper_keeps_variable_batch_sizes():
    v = Vocab([100, 200], [0, 1], table="user", oov_policy=OovPolicy.default_row)
    kjt = KeyedJaggedTensor(keys=["user_id", "item_id"], values=torch.tensor([200, 100, 5]),
                            lengths=torch.tensor([1, 1, 1]), stride_per_key_per_rank=[[2], [1]])
    out = VocabMapper({"user_id": v})(kjt)
    assert out.variable_stride_per_key() and out.stride_per_key_per_rank() == [[2], [1]]
    assert out["user_id"].values().tolist() == [1, 0] and out["item_id"].values().tolist() == [5]


def test_mapper_from_config(tmp_path):
    save_vocab(tmp_path / "users", [11, 12, 13], [0, 1, 2])
    save_vocab(tmp_path / "items", [-1, -2], [0, 5])
    cfg = OmegaConf.merge(OmegaConf.structured(LargeEmbeddingsConfig), {"tables": {
        "user": {"num_embeddings": None, "vocab": str(tmp_path / "users"), "oov_policy": "hash",
                 "oov_buckets": 2, "feature_names": ["viewer", "author"]},
        "item": {"name": "items", "num_embeddings": 10, "vocab": str(tmp_path / "items"),
                 "oov_policy": "default_row"},
        "raw": {"num_embeddings": 100},  # no vocab: ids are rows already
    }})
    for given in (cfg, validate(cfg, device="meta"), validate(cfg, device="meta").embeddings):  # config or parsed
        mapper = VocabMapper.from_config(given)
        assert sorted(mapper.vocabs) == ["author", "items", "viewer"]
        assert mapper.vocabs["viewer"] is mapper.vocabs["author"]
        assert mapper.vocabs["viewer"].oov_policy is OovPolicy.hash
        assert {k: v.num_embeddings for k, v in mapper.tables.items()} == {"user": 5, "items": 10}
    kjt = KeyedJaggedTensor(keys=["viewer", "items", "raw"], values=torch.tensor([13, -2, -3, 42]),
                            lengths=torch.tensor([1, 2, 1]))
    assert mapper(kjt).values().tolist() == [2, 5, 6, 42]
    assert mapper.oov_rates() == {"user": 0.0, "items": 0.5}

    typed = LargeEmbeddingsConfig(tables={"user": EmbeddingBagConfig(vocab=str(tmp_path / "users"), oov_policy=OovPolicy.default_row)})
    assert VocabMapper.from_config(typed).vocabs["user"].num_embeddings == 4

    plain = {"tables": {"user": {"vocab": str(tmp_path / "missing"), "num_embeddings": None}}}
    with pytest.raises(VocabError, match=r"embeddings\.tables\.user\.vocab.*does not exist"):
        VocabMapper.from_config(plain)
    bad = {"tables": {"user": {"vocab": str(tmp_path / "users"), "oov_policy": "drop"}}}
    with pytest.raises(ConfigValidationError, match=r"embeddings\.tables\.user\.oov_policy: 'drop' is not allowed"):
        VocabMapper.from_config(bad)


def test_mapper_maps_a_shared_feature_once(tmp_path):
    """Tables reading one feature through the same vocab share its mapping; different vocabs cannot."""
    save_vocab(tmp_path / "users", [11, 12, 13], [0, 1, 2])
    save_vocab(tmp_path / "other", [11, 12], [1, 0])
    same = {"user": {"num_embeddings": None, "vocab": str(tmp_path / "users"), "feature_names": ["u"]},
            "user2": {"num_embeddings": 8, "vocab": str(tmp_path / "users"), "feature_names": ["u", "v"]}}
    mapper = VocabMapper.from_config({"tables": same})
    assert sorted(mapper.vocabs) == ["u", "v"] and mapper.vocabs["u"].table == "user"
    kjt = KeyedJaggedTensor(keys=["u", "v"], values=torch.tensor([13, 11]), lengths=torch.tensor([1, 1]))
    assert mapper(kjt).values().tolist() == [2, 0]
    differ = {**same, "user2": {**same["user2"], "vocab": str(tmp_path / "other")}}
    with pytest.raises(ConfigValidationError, match=r"feature 'u'"):
        VocabMapper.from_config({"tables": differ})


def test_the_mapper_is_still_importable_from_its_old_module():
    """`recap_embed.io.vocab` re-exports the mapper for one release, saying where it moved."""
    with pytest.warns(DeprecationWarning, match=r"import VocabMapper from recap_embed\.io\.vocab_mapper"):
        from recap_embed.io.vocab import VocabMapper as old

    assert old is VocabMapper
    assert sorted(vocab_module.__all__) == ["Vocab", "VocabError", "VocabMapper", "hash_ids", "save_vocab"]
    with pytest.raises(AttributeError, match="no attribute 'Mapper'"):
        vocab_module.Mapper  # noqa: B018 - only the moved name is resolved lazily




def test_fingerprint_names_the_id_to_row_mapping(tmp_path):
    """Equal for the same (id, row) pairs however they were written; different when one row moves."""
    save_vocab(tmp_path / "a", [5, 3, 9], [0, 1, 2])
    save_vocab(tmp_path / "b", [9, 5, 3], [2, 0, 1])
    save_vocab(tmp_path / "c", [5, 3, 9], [0, 2, 1])
    a, b, c = (Vocab.load(tmp_path / n, table="t", num_embeddings=None, oov_policy="error").fingerprint() for n in "abc")
    assert a == b and a["entries"] == 3
    assert a["sha256"] != c["sha256"]
