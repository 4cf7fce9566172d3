"""load_pretrained: tables filled from a torchsnapshot, exactly, whatever the placement.

Single-process tests cover the unsharded paths and every error; one spawned 2-rank run covers
table-wise, column-wise, data-parallel and row-wise (hand-built ShardedTensor) destinations,
from unsharded (chunked) and sharded snapshots, and the ranks' agreement on failures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch
import torchsnapshot
from torchsnapshot.knobs import override_max_chunk_size_bytes

from multiprocess import run_ranks
from recap_embed.config import table_specs
from recap_embed.io.pretrained import (
    LoadReport,
    NonFiniteSnapshotError,
    PretrainedError,
    SnapshotLoadError,
    SnapshotReadError,
    SnapshotReader,
    load_pretrained,
    snapshot_tables,
)

DIM = 8
USER_ROWS = 3000  # 96 kB in fp32: several chunks with the small chunk sizes below
ITEM_ROWS = 60
CHUNK = 4096  # torchsnapshot ChunkedTensor chunk size for the source snapshots
READ = 700  # load_pretrained chunk_bytes: 21 rows of 32 bytes per read


# --------------------------------------------------------------------------- helpers (ranks import them)


def make_ebc(user_rows: int = USER_ROWS, dim: int = DIM, fp16: bool = False, device: str = "cpu", seed: int = 0):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.embedding_configs import DataType

    torch.manual_seed(seed)
    dt = DataType.FP16 if fp16 else DataType.FP32
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=user_rows, feature_names=["u"], data_type=dt),
            EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=ITEM_ROWS, feature_names=["i"], data_type=dt),
        ],
        device=torch.device(device),
    )


def specs(uri: str, user: Optional[Dict[str, Any]] = None, item: Optional[Dict[str, Any]] = None, user_rows: int = USER_ROWS, dim: int = DIM):
    tables: Dict[str, Any] = {"user": {"num_embeddings": user_rows, "embedding_dim": dim}, "item": {"num_embeddings": ITEM_ROWS}}
    if user is not None:
        tables["user"]["pretrained"] = {"embedding_snapshot_uri": uri, **user}
    if item is not None:
        tables["item"]["pretrained"] = {"embedding_snapshot_uri": uri, **item}
    return table_specs({"tables": tables, "embedding_dim": DIM})


def weights(model) -> Dict[str, torch.Tensor]:
    return {k.split(".")[-2]: v.detach().clone() for k, v in model.state_dict().items()}


def take_unsharded(path: Path, seed: int = 1, **kw) -> Dict[str, torch.Tensor]:
    """An unsharded EBC saved with plain Snapshot.take (tables stored as ChunkedTensors)."""
    src = make_ebc(seed=seed, **kw)
    with override_max_chunk_size_bytes(CHUNK):
        torchsnapshot.Snapshot.take(str(path), app_state={"model": src})
    return weights(src)


def dmp_model(rank: int, world: int, layout: str, fp16: bool = False):
    """EBC built on meta, fused SGD attached, then DMP with an explicit plan."""
    import torchrec.optim as trec_optim
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, data_parallel, table_wise
    from torchrec.distributed.types import ShardingPlan
    from torchrec.modules.embedding_configs import DataType

    dt = DataType.FP16 if fp16 else DataType.FP32
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="user", embedding_dim=DIM, num_embeddings=USER_ROWS, feature_names=["u"], data_type=dt),
            EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=ITEM_ROWS, feature_names=["i"], data_type=dt),
        ],
        device=torch.device("meta"),
    )
    _apply_optimizer_in_backward(trec_optim.SGD, ebc.parameters(), {"lr": 0.1})
    if layout == "table_wise":
        per = {"user": table_wise(rank=0), "item": table_wise(rank=world - 1)}
    else:  # column_wise user, data_parallel item (a plain tensor on every rank)
        per = {"user": column_wise(ranks=list(range(world))), "item": data_parallel()}
    plan = construct_module_sharding_plan(
        ebc, per_param_sharding=per, local_size=world, world_size=world, device_type="cpu", sharder=EmbeddingBagCollectionSharder()
    )
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}))


class RowWise(torch.nn.Module):
    """A row-wise sharded table (the CUDA-only torchrec layout), built by hand on gloo."""

    def __init__(self, rank: int, world: int, rows: int = USER_ROWS) -> None:
        super().__init__()
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata, init_from_local_shards

        per = (rows + world - 1) // world
        mine = min(per, rows - rank * per)
        torch.manual_seed(100 + rank)
        md = ShardMetadata(shard_offsets=[rank * per, 0], shard_sizes=[mine, DIM], placement=f"rank:{rank}/cpu")
        self.weight = init_from_local_shards([Shard(torch.randn(mine, DIM), md)], [rows, DIM])

    def state_dict(self, *a: Any, **kw: Any):  # what a sharded EBC's state dict looks like
        return {"ebc.embedding_bags.user.weight": self.weight}


def gather(model) -> Dict[str, np.ndarray]:
    """Whole tables from every rank's local pieces (all_gather_object of numpy arrays)."""
    import torch.distributed as dist

    mine = []
    for key, v in model.state_dict().items():
        table = key.split(".")[-2]
        if hasattr(v, "local_shards"):
            shape = list(v.size())
            for s in v.local_shards():
                mine.append((table, shape, list(s.metadata.shard_offsets), s.tensor.detach().float().numpy().copy()))
        else:
            mine.append((table, list(v.shape), [0, 0], v.detach().float().numpy().copy()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out: Dict[str, np.ndarray] = {}
    for pieces in every:
        for table, shape, off, arr in pieces:
            full = out.setdefault(table, np.full(shape, np.nan, dtype=np.float32))
            full[off[0] : off[0] + arr.shape[0], off[1] : off[1] + arr.shape[1]] = arr
    return out


# --------------------------------------------------------------------------- single process


def test_unsharded_roundtrip_chunked_reads(tmp_path):
    src = take_unsharded(tmp_path / "snap")
    model = make_ebc(seed=2)
    reports = load_pretrained(model, specs(str(tmp_path / "snap"), user={}, item={}), chunk_bytes=READ)
    got = weights(model)
    assert torch.equal(got["user"], src["user"]) and torch.equal(got["item"], src["item"])
    r = reports["user"]
    assert isinstance(r, LoadReport)
    assert r.config_path == "embeddings.tables.user.pretrained"
    assert r.source_entry.startswith("0/model/embedding_bags.user.weight (ChunkedTensor")
    assert (r.rows_copied, r.partial, r.dtype_conversion) == (USER_ROWS, False, None)
    assert r.local_elements == USER_ROWS * DIM
    assert r.bytes_read >= USER_ROWS * DIM * 4 and r.seconds > 0
    assert snapshot_tables(tmp_path / "snap") == {"item": ((ITEM_ROWS, DIM), "float32"), "user": ((USER_ROWS, DIM), "float32")}


def test_streaming_fs_uri_and_only_tables_with_pretrained(tmp_path):
    src = take_unsharded(tmp_path / "snap")
    model = make_ebc(seed=2)
    before = weights(model)
    reports = load_pretrained(model, specs(f"fs://{tmp_path / 'snap'}", user={}), chunk_bytes=READ, staging=False)
    assert list(reports) == ["user"]
    got = weights(model)
    assert torch.equal(got["user"], src["user"]) and torch.equal(got["item"], before["item"])


def test_storage_plugin_path_as_for_s3_and_gs(tmp_path, monkeypatch):
    """URIs that are not local go through torchsnapshot's storage plugin (byte-range reads)."""
    import recap_embed.io.snapshot as mod

    src = take_unsharded(tmp_path / "snap")
    monkeypatch.setattr(mod, "_local_root", lambda uri: None)  # treat the path like a remote URI
    model = make_ebc(seed=2)
    reports = load_pretrained(model, specs(str(tmp_path / "snap"), user={}, item={}), chunk_bytes=READ)
    assert torch.equal(weights(model)["user"], src["user"]) and reports["user"].bytes_read >= USER_ROWS * DIM * 4
    f = max(_data_files(tmp_path / "snap"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:-8])
    fresh = make_ebc(seed=2)
    before = weights(fresh)
    with pytest.raises(SnapshotReadError, match="cut short"):
        load_pretrained(fresh, specs(str(tmp_path / "snap"), user={}, item={}))
    assert all(torch.equal(before[t], weights(fresh)[t]) for t in before)
    with pytest.raises(SnapshotReadError, match="missing"):
        load_pretrained(fresh, specs(str(tmp_path / "nowhere"), user={}))


def test_fp16_destination_from_fp32_source(tmp_path):
    src = take_unsharded(tmp_path / "snap")
    model = make_ebc(seed=2, fp16=True)
    reports = load_pretrained(model, specs(str(tmp_path / "snap"), user={}, item={}), chunk_bytes=READ)
    got = weights(model)
    assert got["user"].dtype == torch.float16
    assert torch.equal(got["user"], src["user"].half()) and torch.equal(got["item"], src["item"].half())
    assert reports["user"].dtype_conversion == "float32->float16"
    # and back: an fp16 snapshot into an fp32 table
    torchsnapshot.Snapshot.take(str(tmp_path / "snap16"), app_state={"model": model})
    model32 = make_ebc(seed=3)
    load_pretrained(model32, specs(str(tmp_path / "snap16"), user={}))
    assert torch.equal(weights(model32)["user"], got["user"].float())


def test_missing_table_lists_available_names(tmp_path):
    take_unsharded(tmp_path / "snap")
    model = make_ebc(seed=2)
    with pytest.raises(PretrainedError) as e:
        load_pretrained(model, specs(str(tmp_path / "snap"), user={"emb_name": "usr"}))
    msg = str(e.value)
    assert "embeddings.tables.user.pretrained" in msg and "'usr'" in msg and "[item, user]" in msg


def test_shape_mismatch_names_both_shapes_and_path(tmp_path):
    take_unsharded(tmp_path / "snap")
    model = make_ebc(user_rows=USER_ROWS + 5, seed=2)
    before = weights(model)
    with pytest.raises(PretrainedError) as e:
        load_pretrained(model, specs(str(tmp_path / "snap"), user={}, item={}, user_rows=USER_ROWS + 5))
    msg = str(e.value)
    assert f"[{USER_ROWS}, {DIM}]" in msg and f"[{USER_ROWS + 5}, {DIM}]" in msg
    assert "embeddings.tables.user.pretrained" in msg and "allow_partial_rows" in msg
    assert all(torch.equal(before[t], weights(model)[t]) for t in before)  # item was not loaded either
    # a different dim is an error even with allow_partial_rows
    wide = make_ebc(dim=12, seed=2)
    with pytest.raises(PretrainedError, match=rf"embedding dim differs.*\[{USER_ROWS}, {DIM}\].*\[{USER_ROWS}, 12\]"):
        load_pretrained(wide, specs(str(tmp_path / "snap"), user={"allow_partial_rows": True}, dim=12))


def test_allow_partial_rows(tmp_path, caplog):
    src = take_unsharded(tmp_path / "snap")
    grown = make_ebc(user_rows=USER_ROWS + 100, seed=2)
    before = weights(grown)["user"]
    with caplog.at_level(logging.WARNING, logger="recap_embed"):
        reports = load_pretrained(grown, specs(str(tmp_path / "snap"), user={"allow_partial_rows": True}, user_rows=USER_ROWS + 100), chunk_bytes=READ)
    got = weights(grown)["user"]
    assert torch.equal(got[:USER_ROWS], src["user"]) and torch.equal(got[USER_ROWS:], before[USER_ROWS:])
    assert reports["user"].rows_copied == USER_ROWS and reports["user"].partial
    assert any("allow_partial_rows" in r.getMessage() and r.name.startswith("recap_embed") for r in caplog.records)
    shrunk = make_ebc(user_rows=1000, seed=2)
    load_pretrained(shrunk, specs(str(tmp_path / "snap"), user={"allow_partial_rows": True}, user_rows=1000))
    assert torch.equal(weights(shrunk)["user"], src["user"][:1000])


def _data_files(path: Path) -> List[Path]:
    return [p for p in path.rglob("*") if p.is_file() and p.name != ".snapshot_metadata"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "no_manifest", "corrupt_manifest", "missing_dir", "not_a_snapshot"])
def test_broken_snapshot_clear_error_weights_untouched(tmp_path, damage):
    snap = tmp_path / "snap"
    take_unsharded(snap)
    uri = str(snap)
    if damage == "truncate":
        f = max(_data_files(snap), key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[: f.stat().st_size - 100])
        expect = "cut short"
    elif damage == "delete":
        for f in _data_files(snap):
            f.unlink()
        expect = "missing"
    elif damage == "no_manifest":
        (snap / ".snapshot_metadata").unlink()
        expect = "not a complete torchsnapshot"
    elif damage == "corrupt_manifest":
        (snap / ".snapshot_metadata").write_text("{manifest: [unbalanced")
        expect = "corrupt"
    elif damage == "missing_dir":
        uri = str(tmp_path / "nowhere")
        expect = "does not exist"
    else:
        uri = str(tmp_path)
        expect = "not a complete torchsnapshot"
    model = make_ebc(seed=2)
    before = weights(model)
    with pytest.raises(SnapshotReadError, match=expect) as e:
        load_pretrained(model, specs(uri, user={}, item={}))
    assert uri in str(e.value)
    after = weights(model)
    assert all(torch.equal(before[t], after[t]) for t in before)


@pytest.mark.parametrize("staging", [True, False])
def test_read_failure_midway_leaves_table_untouched(tmp_path, monkeypatch, staging):
    """Files pass the size check, then a read fails in the middle of table 2 (e.g. network).
    Staged, the table is left untouched; streamed (the default), the error says it is partly written."""
    src = take_unsharded(tmp_path / "snap")
    model = make_ebc(seed=2)
    before = weights(model)
    with SnapshotReader(str(tmp_path / "snap")) as reader:
        item = reader.find_table("item").pieces[0]
    real = SnapshotReader.read_range_into

    def flaky(self, location, start, out):
        if location == item.location and item.byte_start <= start < item.byte_end:
            raise SnapshotReadError(f"snapshot {self.uri!r}: cannot read {location!r}: connection reset")
        return real(self, location, start, out)

    monkeypatch.setattr(SnapshotReader, "read_range_into", flaky)
    with pytest.raises(SnapshotReadError) as e:
        load_pretrained(model, specs(str(tmp_path / "snap"), user={}, item={"emb_name": "item"}), chunk_bytes=READ, staging=staging)
    state = "left untouched" if staging else "PARTLY WRITTEN: load it again before training"
    assert f"table 'item' {state}" in str(e.value) and "tables already loaded: ['user']" in str(e.value)
    after = weights(model)
    assert torch.equal(after["user"], src["user"])
    if staging:
        assert torch.equal(after["item"], before["item"])


def test_verification_catches_a_write_that_does_not_land(tmp_path, monkeypatch):
    import recap_embed.io.pretrained as mod

    take_unsharded(tmp_path / "snap")
    monkeypatch.setattr(mod, "commit", lambda staged: None)  # a copy that silently does nothing
    with pytest.raises(SnapshotLoadError, match="did not reach the model's weights"):
        load_pretrained(make_ebc(seed=2), specs(str(tmp_path / "snap"), user={}), staging=True)


def test_verification_catches_streamed_writes_into_a_copy(tmp_path):
    """A model whose state_dict hands out copies: the streamed rows land in a copy, and the
    shard fetched again (other memory) is summed again and found unchanged."""

    class Copies(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = make_ebc(seed=2)

        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            return {k: v.detach().clone() for k, v in self.ebc.state_dict().items()}

    take_unsharded(tmp_path / "snap")
    with pytest.raises(SnapshotLoadError, match="did not reach the model's weights"):
        load_pretrained(Copies(), specs(str(tmp_path / "snap"), user={}), chunk_bytes=READ)


def test_object_and_pickled_entries_are_refused(tmp_path, monkeypatch):
    snap = tmp_path / "snap"
    torchsnapshot.Snapshot.take(
        str(snap),
        app_state={"extra": torchsnapshot.StateDict(blob={1, 2}, cplx=torch.zeros(4, 2, dtype=torch.complex64))},
    )
    kinds = {k: type(v).__name__ for k, v in torchsnapshot.Snapshot(str(snap)).get_manifest().items()}
    assert kinds["0/extra/blob"] == "ObjectEntry"

    def no_unpickling(*a, **kw):
        raise AssertionError("load_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = make_ebc(seed=2)
    with pytest.raises(PretrainedError, match="pickled object.*refusing"):
        load_pretrained(model, specs(str(snap), user={"emb_name": "blob"}))
    with pytest.raises(PretrainedError, match="torch_save.*refusing"):
        load_pretrained(model, specs(str(snap), user={"emb_name": "cplx"}))


def test_exact_names_ambiguity_and_plain_tensors(tmp_path):
    a, b = make_ebc(seed=1), make_ebc(seed=5)
    vectors = torch.randn(USER_ROWS, DIM)
    torchsnapshot.Snapshot.take(
        str(tmp_path / "snap"),
        app_state={"a": a, "b": b, "extra": torchsnapshot.StateDict(user_vectors=vectors, user_vectors_v2=vectors + 1)},
    )
    model = make_ebc(seed=2)
    with pytest.raises(PretrainedError, match=r"ambiguous.*\[a/embedding_bags.user.weight, b/embedding_bags.user.weight\]"):
        load_pretrained(model, specs(str(tmp_path / "snap"), user={}))
    load_pretrained(model, specs(str(tmp_path / "snap"), user={"emb_name": "b/embedding_bags.user.weight"}))
    assert torch.equal(weights(model)["user"], weights(b)["user"])
    load_pretrained(model, specs(str(tmp_path / "snap"), user={"emb_name": "user_vectors"}))  # not user_vectors_v2
    assert torch.equal(weights(model)["user"], vectors)
    with pytest.raises(PretrainedError, match="no table 'vectors'"):  # no substring matching
        load_pretrained(model, specs(str(tmp_path / "snap"), user={"emb_name": "vectors"}))


def test_nested_module_prefix(tmp_path):
    class Holder(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.ebc = make_ebc(seed=seed)

    src = Holder(1)
    torchsnapshot.Snapshot.take(str(tmp_path / "snap"), app_state={"model": src})
    dst = Holder(2)
    reports = load_pretrained(dst, specs(str(tmp_path / "snap"), user={}, item={}))
    assert reports["user"].source_entry == "0/model/ebc.embedding_bags.user.weight"
    assert torch.equal(dst.ebc.embedding_bags["user"].weight, src.ebc.embedding_bags["user"].weight)


# --------------------------------------------------------------------------- two ranks


def _two_rank_checks(rank: int, world: int, unsharded: str, sharded: str) -> Dict[str, Any]:
    import torch.distributed as dist

    out: Dict[str, Any] = {}
    tw = dmp_model(rank, world, "table_wise")
    rep = load_pretrained(tw, specs(unsharded, user={}, item={}), chunk_bytes=READ)
    out["table_wise"] = gather(tw)
    out["tw_local_elements"] = {t: r.local_elements for t, r in rep.items()}
    torchsnapshot.Snapshot.take(sharded, app_state={"model": tw})  # a sharded snapshot to read below

    cw = dmp_model(rank, world, "column_wise")
    load_pretrained(cw, specs(unsharded, user={}, item={}), chunk_bytes=READ)
    out["column_wise"] = gather(cw)

    cw2 = dmp_model(rank, world, "column_wise")
    rep = load_pretrained(cw2, specs(sharded, user={}, item={}), chunk_bytes=READ, staging=False)
    out["column_wise_from_sharded"] = gather(cw2)
    out["sharded_source"] = rep["user"].source_entry

    rw = RowWise(rank, world)
    load_pretrained(rw, specs(sharded, user={}), chunk_bytes=READ)
    out["row_wise"] = gather(rw)

    # every rank raises the same config error (no hang)
    try:
        load_pretrained(cw2, specs(unsharded, user={"emb_name": "nope"}))
    except PretrainedError as e:
        out["missing"] = str(e)

    # a read failure on rank 1 only: both ranks raise before writing, weights untouched
    before = gather(cw2)
    if rank == 1:
        def broken(self, location, start, out):
            raise SnapshotReadError(f"snapshot {self.uri!r}: cannot read {location!r}: disk error")

        SnapshotReader.read_range_into = broken
    try:
        load_pretrained(cw2, specs(unsharded, user={}))
    except SnapshotLoadError as e:
        out["one_rank_failed"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    out["untouched"] = all(np.array_equal(before[t], v) for t, v in gather(cw2).items())
    return out


def test_two_ranks_table_wise_column_wise_row_wise(tmp_path):
    src = take_unsharded(tmp_path / "unsharded")
    results = run_ranks(_two_rank_checks, 2, str(tmp_path / "unsharded"), str(tmp_path / "sharded"), timeout=150)
    for r in results:
        for layout in ("table_wise", "column_wise", "column_wise_from_sharded"):
            assert np.array_equal(r[layout]["user"], src["user"].numpy()), layout
            assert np.array_equal(r[layout]["item"], src["item"].numpy()), layout
        assert np.array_equal(r["row_wise"]["user"], src["user"].numpy())
        assert "ShardedTensor" in r["sharded_source"]
        assert "no table 'nope'" in r["missing"] and "[item, user]" in r["missing"]
        assert r["untouched"]
    assert results[0]["tw_local_elements"] == {"user": USER_ROWS * DIM, "item": 0}
    assert results[1]["tw_local_elements"] == {"user": 0, "item": ITEM_ROWS * DIM}
    assert "disk error" in results[1]["one_rank_failed"]
    assert "failed on 1 other rank" in results[0]["one_rank_failed"] and "disk error" in results[0]["one_rank_failed"]

    # the 2-rank sharded snapshot also loads into an unsharded model
    model = make_ebc(seed=7)
    reports = load_pretrained(model, specs(str(tmp_path / "sharded"), user={}, item={}), chunk_bytes=READ)
    assert torch.equal(weights(model)["user"], src["user"]) and torch.equal(weights(model)["item"], src["item"])
    assert "ranks [0, 1]" in reports["user"].source_entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_refuses_any_bad_value_and_accepts_sums_that_overflow(dtype):
    """The fast check (one sum) must neither miss a single nan/inf nor refuse large finite values."""
    from recap_embed.io.shard_copy import _check_finite
    from recap_embed.io.snapshot import SourceTensor

    source = SourceTensor("snap", "t", ("0/t",), "Tensor", (64, 8), dtype, ())
    huge = torch.full((64, 8), torch.finfo(dtype).max, dtype=dtype)  # the sum overflows to inf
    _check_finite(huge, source, 0)
    _check_finite(-huge, source, 0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        block = torch.zeros((64, 8), dtype=dtype)
        block[37, 5] = bad
        with pytest.raises(NonFiniteSnapshotError, match=r"1 non-finite value\(s\).*rows \[137\]"):
            _check_finite(block, source, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_checksum_is_the_bit_sum_modulo_2_32_and_blocks_add_up(dtype):
    """Every path of `checksum` (wrapping int32 sums, widened blocks) gives the same number: the
    exact sum of the elements' bits mod 2**32, for whole tensors, row blocks and column views; and a
    flipped sign bit changes it (for fp64 too)."""
    import numpy as np

    from recap_embed.io.shard_copy import add_checksums, checksum

    torch.manual_seed(0)
    t = (torch.randn(3001, 12, dtype=torch.float64) * 1e30).to(dtype)  # large values: int sums overflow
    ints = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int32}[t.element_size()]  # 8 bytes: two int32 halves

    def exact(x: torch.Tensor) -> int:
        bits = x.contiguous().view(torch.uint8).numpy().view(ints)
        return int(sum(int(v) for v in bits.ravel())) & 0xFFFFFFFF

    assert checksum(t) == exact(t)
    blocks = 0
    for r in range(0, t.shape[0], 700):
        blocks = add_checksums(blocks, checksum(t[r:r + 700]))
    assert blocks == checksum(t)
    columns = t.narrow(1, 3, 5)  # a column shard's view: not contiguous
    assert checksum(columns) == exact(columns)
    changed = t.clone()
    changed[1500, 7] = -changed[1500, 7] if changed[1500, 7] != 0 else 1
    assert checksum(changed) != checksum(t)


def test_the_tables_a_snapshot_lists_are_tables_not_the_other_modules_parameters(tmp_path):
    """A checkpoint of a whole model holds an MLP beside the tables: only the tables are offered."""
    model = torch.nn.Module()
    model.ebc = make_ebc(seed=3)
    model.mlp = torch.nn.Sequential(torch.nn.Linear(4, 2))
    torchsnapshot.Snapshot.take(str(tmp_path / "snap"), app_state={"model": model, "extra": torchsnapshot.StateDict(bias=torch.ones(3))})
    assert set(snapshot_tables(str(tmp_path / "snap"))) == {"user", "item", "bias"}
    with pytest.raises(PretrainedError, match=r"has no table 'nope'; its tables: \[bias, item, user\]$"):
        load_pretrained(make_ebc(seed=2), specs(str(tmp_path / "snap"), user={"emb_name": "nope"}))


def test_no_sharded_tensor_deprecation_notice_from_this_package(tmp_path):
    """torch's "use DTensor" FutureWarning names our modules when we touch torchrec's ShardedTensors;
    a user can do nothing about it, so the package ignores it for its own modules only: every such
    notice our calls raise is matched by that filter, and only as coming from recap_embed."""
    import importlib
    import warnings

    from omegaconf import OmegaConf

    import recap_embed.io
    from recap_embed import instantiate
    from recap_embed.distributed import shard
    from recap_embed.io.checkpoint import restore_checkpoint, save_checkpoint

    importlib.reload(recap_embed.io)  # install it here: pytest restores the filters after each test
    ours = [f for f in warnings.filters if f[0] == "ignore" and f[1] is not None and f[1].pattern == "Please use DTensor instead"]
    assert len(ours) == 1, "recap_embed.io installs the filter once"
    _, message, category, module, _ = ours[0]
    take_unsharded(tmp_path / "snap")
    cfg = OmegaConf.create({
        "_target_": "recap_embed.modules.LargeEmbeddings", "embedding_dim": DIM,
        "optimizer": {"algorithm": "sgd", "init_learning_rate": 0.01},
        "tables": {"user": {"num_embeddings": USER_ROWS, "pretrained": {"embedding_snapshot_uri": str(tmp_path / "snap")}}},
    })
    model = shard(instantiate(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # see every notice, the package's filter set aside
        load_pretrained(model, table_specs(cfg))
        restore_checkpoint(save_checkpoint(tmp_path / "ck", 1, {"model": model}), {"model": model})
    package = Path(recap_embed.io.__file__).resolve().parents[2]
    notices = [w for w in caught if "DTensor instead" in str(w.message) and Path(w.filename).resolve().is_relative_to(package / "recap_embed")]
    assert notices, "our calls raise the notice (otherwise the filter is dead code)"
    for w in notices:
        name = ".".join(Path(w.filename).resolve().relative_to(package).with_suffix("").parts)
        assert message.match(str(w.message)) and issubclass(w.category, category) and module.match(name), (name, str(w.message))
    assert not module.match("my_training_script") and not module.match("torchrec.distributed")
