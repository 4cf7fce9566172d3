"""Warm-start embedding tables from a torchsnapshot: ``load_pretrained(model, specs)``.

After the tables are placed (sharded or not), every table whose spec has ``pretrained`` is filled
from table ``emb_name`` of the torchsnapshot at ``embedding_snapshot_uri``::

    model = shard(LargeEmbeddings.from_config(cfg.embeddings), cfg.sharding)
    reports = load_pretrained(model, table_specs(cfg.embeddings))   # on every rank

The model may be a plain module holding an ``EmbeddingBagCollection`` or a
``DistributedModelParallel`` around one: its weights are found by their state-dict keys, which
end in ``embedding_bags.<table>.weight``. Sharded tables are ``ShardedTensor`` values (each rank
fills its local shards, whatever the sharding: table, column or row wise); data-parallel and
unsharded tables are plain tensors (each rank fills all of it).

Where each part lives: `recap_embed.io.snapshot` finds a table in a snapshot's manifest (matching
rules, confinement of every file to the snapshot, no unpickling); `recap_embed.io.shard_copy`
reads its saved pieces into the local shards in bounded blocks and verifies the copy (what it
costs in time and memory is described there). This module checks every table, then loads them.

Failure semantics. Everything that can be checked from the manifest (names, shapes, dtypes,
coverage of the saved pieces, file sizes) is checked for all tables before the first byte of any
table is written, so such errors leave every weight untouched. Tables are then loaded one at a
time; a read error on table N (staging mode) leaves tables 1..N-1 fully loaded and table N
untouched, and the error names both. With several ranks, each step ends with an agreement
(``all_gather_object``): when one rank fails, every rank raises the same error before writing.

Partial rows: a snapshot whose table has a different row count is an error naming both shapes
and the config path (``<table path>.pretrained``) unless ``allow_partial_rows`` is set; then the
first ``min(rows)`` rows are copied, the others keep their initial values, and a warning is
logged (logger ``recap_embed.io.pretrained``). A different embedding dim is always an error.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from recap_embed.config import TableSpec
from recap_embed.distributed.collectives import agree, is_collective

from .shard_copy import DEFAULT_CHUNK_BYTES, CopyPlan, commit, global_shape, plan_copy, read_into, regions_of, verify
from .snapshot import (
    FLOAT_DTYPES,
    NonFiniteSnapshotError,
    Piece,
    PretrainedError,
    SnapshotLoadError,
    SnapshotReader,
    SnapshotReadError,
    SourceTensor,
    ebc_table,
    snapshot_tables,
)

# Re-exported for one release: `agree` and `collective` moved to recap_embed.distributed.collectives
# (`collective` is `is_collective` there); the reader and the copier to io.snapshot and io.shard_copy.
collective = is_collective

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "check_pretrained",
    "LoadReport",
    "NonFiniteSnapshotError",
    "PretrainedError",
    "SnapshotLoadError",
    "SnapshotReadError",
    "SnapshotReader",
    "SourceTensor",
    "load_pretrained",
    "snapshot_tables",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    """What `load_pretrained` did for one table, on this rank."""

    table: str  # the table's name in the model
    config_path: str  # e.g. 'embeddings.tables.user.pretrained'
    uri: str  # the snapshot
    source_entry: str  # manifest key(s) read, e.g. '0/model/embedding_bags.user.weight'
    source_shape: Tuple[int, ...]
    dest_shape: Tuple[int, ...]
    rows_copied: int  # rows of the table filled from the snapshot (all ranks together)
    partial: bool  # row counts differed and allow_partial_rows copied min(rows)
    source_dtype: str
    dest_dtype: str
    dtype_conversion: Optional[str]  # e.g. 'float32->float16'; None when the dtypes match
    local_elements: int  # elements written on this rank
    bytes_read: int  # bytes read from storage by this rank (verification reads included)
    seconds: float


def _table_weights(model: nn.Module) -> Dict[str, Tuple[str, torch.Tensor]]:
    """``{table: (state-dict key, value)}`` of every ``...embedding_bags.<table>.weight``."""
    found: Dict[str, List[Tuple[str, torch.Tensor]]] = defaultdict(list)
    for key, value in model.state_dict().items():
        table = ebc_table(key)
        if table is not None and isinstance(value, torch.Tensor):
            found[table].append((key, value))
    out = {}
    for table, hits in found.items():
        if len(hits) > 1:
            raise PretrainedError(
                f"table {table!r} is ambiguous in the model: {[k for k, _ in hits]} all end in embedding_bags.{table}.weight"
            )
        out[table] = hits[0]
    return out


@dataclass
class _Job:
    spec: TableSpec
    key: str
    what: str  # '<table path>.pretrained'
    reader: SnapshotReader
    source: SourceTensor
    dest_shape: Tuple[int, ...]
    dest_dtype: torch.dtype
    rows: int
    partial: bool
    plan: CopyPlan


def load_pretrained(
    model: nn.Module,
    specs: Iterable[TableSpec],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    staging: bool = False,
    verify_rows: bool = True,
    storage_options: Optional[Dict[str, Any]] = None,
    pg: Any = None,
) -> Dict[str, LoadReport]:
    """Fill every table whose spec has ``pretrained`` from its torchsnapshot; reports by table name.

    Call it on every rank after placement (it is collective when a process group of more than
    one rank is initialised: `pg`, default the default group). See the module docstring for
    how entries are matched, read, checked and verified. Raises `PretrainedError` (names, shapes,
    entry types; the message names the config path) or `SnapshotReadError` (missing, truncated
    or corrupt snapshots; names the path) before writing anything when the problem can be seen
    in the manifest or the file sizes. ``staging=True`` reads each table into a copy first (a
    failed read then leaves it untouched; memory: the largest local table on top).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    wanted = [s for s in specs if s.pretrained is not None]
    if not wanted:
        return {}
    multi = is_collective(pg)
    readers: Dict[str, SnapshotReader] = {}
    jobs: List[_Job] = []
    reports: Dict[str, LoadReport] = {}
    try:
        # 1. everything that can be checked without reading data, for all tables
        error: Optional[BaseException] = None
        try:
            weights = _table_weights(model)
            for spec in wanted:
                jobs.append(_plan_table(spec, weights, readers, storage_options))
            for job in jobs:
                _check_files(job.reader, job.plan.pieces(), job.what)
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
            error = e
        agree(error, pg, enabled=multi, other_failed=SnapshotLoadError)

        # 2. one table at a time, 3. the weights hold what was read
        seconds = _copy_tables(jobs, chunk_bytes=chunk_bytes, staging=staging, pg=pg, multi=multi)
        _verify_tables(model, jobs, seconds, verify_rows=verify_rows, pg=pg, multi=multi)
        for job in jobs:
            r = reports[job.spec.name] = _report(job, seconds[job.spec.name])
            logger.info(
                "%s: loaded table %r from %s %s: %d rows, %s%.1f MB read in %.2f s",
                job.what, job.spec.name, r.uri, r.source_entry, r.rows_copied,
                f"{r.dtype_conversion}, " if r.dtype_conversion else "", r.bytes_read / 1e6, r.seconds,
            )
    finally:
        for reader in readers.values():
            reader.close()
    return reports


def _copy_tables(jobs: List[_Job], *, chunk_bytes: int, staging: bool, pg: Any, multi: bool) -> Dict[str, float]:
    """One table at a time: read (staged or streamed), agree, commit; seconds per table."""
    done: List[str] = []
    seconds: Dict[str, float] = {}
    for job in jobs:
        t0 = time.perf_counter()
        error, staged = None, []
        try:
            staged = read_into(job.reader, job.plan, chunk_bytes=chunk_bytes, staging=staging)
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
            state = "left untouched" if staging else "PARTLY WRITTEN: load it again before training"
            cls = type(e) if isinstance(e, SnapshotLoadError) else SnapshotReadError
            error = cls(f"{e}\n  while loading {job.what} (table {job.spec.name!r} {state}; "
                        f"tables already loaded: {done or 'none'})")
        agree(error, pg, enabled=multi, other_failed=SnapshotLoadError)
        commit(staged)
        del staged
        done.append(job.spec.name)
        seconds[job.spec.name] = time.perf_counter() - t0
    return seconds


def _verify_tables(model: nn.Module, jobs: List[_Job], seconds: Dict[str, float], *, verify_rows: bool, pg: Any, multi: bool) -> None:
    """The weights, fetched again from the model, hold what was read (adds the time to `seconds`)."""
    error = None
    try:
        fresh = _table_weights(model)
        for job in jobs:
            t0 = time.perf_counter()
            verify(job.reader, job.plan, regions_of(fresh[job.spec.name][1], job.rows), job.what, sample_rows=verify_rows)
            seconds[job.spec.name] += time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
        error = e
    agree(error, pg, enabled=multi, other_failed=SnapshotLoadError)


def _open_source(spec: TableSpec, readers: Dict[str, SnapshotReader], storage_options: Any) -> Tuple[SnapshotReader, SourceTensor]:
    """The snapshot a spec names (opened once per URI) and its entry for the table."""
    pre = spec.pretrained
    what = f"{spec.path}.pretrained"
    uri = str(pre.embedding_snapshot_uri)
    if uri not in readers:
        try:
            readers[uri] = SnapshotReader(uri, storage_options)
        except SnapshotReadError as e:
            raise SnapshotReadError(f"{what}.embedding_snapshot_uri: {e}") from None
    reader = readers[uri]
    try:
        return reader, reader.find_table(pre.emb_name or spec.name)
    except PretrainedError as e:
        raise PretrainedError(f"{what}: {e}") from None


def _check_files(reader: SnapshotReader, pieces: Iterable[Piece], what: str) -> None:
    try:
        reader.check_files(pieces)
    except SnapshotReadError as e:
        raise SnapshotReadError(f"{what}.embedding_snapshot_uri: {e}") from None


def check_pretrained(specs: Iterable[TableSpec], *, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Before any table exists: every ``pretrained`` the specs name can be loaded, as far as the
    manifests and file sizes tell.

    Checks that each snapshot opens, holds the table (the matching rules of `load_pretrained`)
    as a 2-D float tensor with the spec's embedding dim (and its rows, when the spec knows them
    and ``allow_partial_rows`` is off), and that the files holding it exist and are long enough.
    Reads manifests and file sizes only; not collective. Raises `PretrainedError` or
    `SnapshotReadError` naming the config path, like `load_pretrained` (which checks again).
    """
    readers: Dict[str, SnapshotReader] = {}
    try:
        for spec in specs:
            pre = spec.pretrained
            if pre is None:
                continue
            what = f"{spec.path}.pretrained"
            emb_name = pre.emb_name or spec.name
            reader, source = _open_source(spec, readers, storage_options)
            if len(source.shape) != 2 or source.dtype not in FLOAT_DTYPES:
                raise PretrainedError(
                    f"{what}: {source.describe} is a {list(source.shape)} {source.dtype} tensor; a table "
                    f"must be a 2-D float tensor"
                )
            if source.shape[1] != spec.embedding_dim:
                raise PretrainedError(
                    f"{what}: embedding dim differs: snapshot table {emb_name!r} ({source.describe}) has shape "
                    f"{list(source.shape)}, table {spec.name!r} has embedding_dim {spec.embedding_dim}"
                )
            rows = spec.num_embeddings
            if rows is not None and source.shape[0] != rows and not pre.allow_partial_rows:
                raise PretrainedError(
                    f"{what}: row count differs: snapshot table {emb_name!r} ({source.describe}) has shape "
                    f"{list(source.shape)}, table {spec.name!r} has {rows} rows; set "
                    f"{what}.allow_partial_rows=true to copy the first {min(rows, source.shape[0])} rows"
                )
            _check_files(reader, source.pieces, what)
    finally:
        for reader in readers.values():
            reader.close()


def _plan_table(spec: TableSpec, weights: Mapping[str, Tuple[str, torch.Tensor]], readers: Dict[str, SnapshotReader], storage_options: Any) -> _Job:
    pre = spec.pretrained
    what = f"{spec.path}.pretrained"
    if spec.name not in weights:
        raise PretrainedError(
            f"{what}: the model has no weight for table {spec.name!r} (no state-dict key ending in "
            f"embedding_bags.{spec.name}.weight; tables found: {sorted(weights)})"
        )
    key, value = weights[spec.name]
    emb_name = pre.emb_name or spec.name
    reader, source = _open_source(spec, readers, storage_options)
    dest_shape = global_shape(value)
    dest_dtype = value.dtype
    if len(source.shape) != 2 or len(dest_shape) != 2:
        raise PretrainedError(f"{what}: {source.describe} has shape {list(source.shape)}, the table {list(dest_shape)}: both must be 2-D")
    if source.dtype not in FLOAT_DTYPES or dest_dtype not in FLOAT_DTYPES:
        raise PretrainedError(f"{what}: cannot load {source.dtype} weights into a {dest_dtype} table")
    if source.shape[1] != dest_shape[1]:
        raise PretrainedError(
            f"{what}: embedding dim differs: snapshot table {emb_name!r} ({source.describe}) has shape "
            f"{list(source.shape)}, table {spec.name!r} has shape {list(dest_shape)}"
        )
    rows = min(source.shape[0], dest_shape[0])
    partial = source.shape[0] != dest_shape[0]
    if partial and not pre.allow_partial_rows:
        raise PretrainedError(
            f"{what}: row count differs: snapshot table {emb_name!r} ({source.describe}) has shape "
            f"{list(source.shape)}, table {spec.name!r} has shape {list(dest_shape)}; set "
            f"{what}.allow_partial_rows=true to copy the first {rows} rows"
        )
    if partial:
        logger.warning(
            "%s: snapshot table %r has shape %s, table %r has shape %s: copying the first %d rows "
            "(allow_partial_rows); %s",
            what, emb_name, list(source.shape), spec.name, list(dest_shape), rows,
            f"rows {rows}..{dest_shape[0] - 1} keep their initial values" if dest_shape[0] > rows
            else f"the snapshot's rows {rows}..{source.shape[0] - 1} are not loaded",
        )
    plan = plan_copy(source, regions_of(value, rows), what)
    return _Job(spec, key, what, reader, source, dest_shape, dest_dtype, rows, partial, plan)


def _report(job: _Job, seconds: float) -> LoadReport:
    src, dst = job.source.dtype, job.dest_dtype
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return LoadReport(
        table=job.spec.name,
        config_path=job.what,
        uri=job.source.uri,
        source_entry=job.source.describe,
        source_shape=job.source.shape,
        dest_shape=job.dest_shape,
        rows_copied=job.rows,
        partial=job.partial,
        source_dtype=name(src),
        dest_dtype=name(dst),
        dtype_conversion=None if src == dst else f"{name(src)}->{name(dst)}",
        local_elements=job.plan.elements,
        bytes_read=job.plan.bytes_read,
        seconds=seconds,
    )
