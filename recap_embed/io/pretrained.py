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

Finding the source. The snapshot's manifest (``Snapshot(uri).get_manifest()``) lists entries as
``<rank>/<app key>/<state-dict key>``. A table matches when an entry's logical path (without the
rank) ends in a component that is exactly ``embedding_bags.<emb_name>.weight`` or
``<prefix>.embedding_bags.<emb_name>.weight`` (what ``Snapshot.take(app_state={"model": m})``
writes for an EBC, a DMP, or a module holding one), or when the logical path is exactly
``<emb_name>`` or ``<app key>/<emb_name>`` (a plain tensor saved under that name, e.g. with
``torchsnapshot.StateDict(user=tensor)``). There is no substring matching: two matches are an
error listing both (set ``emb_name`` to the full logical path of the one you mean), a miss is an
error listing the table names the snapshot has. The entries of one logical path written by
several ranks are one table: ``ShardedTensor`` shards are merged, and plain tensors written by
every rank (data-parallel replicas) are read from the lowest rank.

Reading, and what it costs. torchsnapshot 0.1.0 only reads whole entries: ``read_object`` of a
plain entry reads the whole table (``memory_budget_bytes`` tiles the reads but the output is the
full table), sharded reads read every overlapping saved shard whole (up to 512 MiB each), and
``read_object(path, sharded_tensor)`` from an unsharded entry fails silently (FACTS). So this
module reads the bytes itself. Every tensor entry written with the ``buffer_protocol`` serializer
(all float and int dtypes) is raw row-major bytes at a known ``location`` and ``byte_range``, so
rows ``[a, b)`` of a saved piece (a plain tensor, a chunk of a ``ChunkedTensor``, or a saved
shard of a ``ShardedTensor``) are one contiguous byte range. For each local destination shard,
each overlapping saved piece is read in blocks of at most ``chunk_bytes`` of rows (one row if a
row is larger) into one reused buffer, the columns the shard needs are kept, converted to the
destination dtype (fp32 <-> fp16/bf16) and copied in. Local snapshots (a path or ``fs://``) are
read with ``readinto`` straight into that buffer; other URIs (``s3://``, ``gs://``, registered
plugins) go through torchsnapshot's storage plugin as byte-range reads (one more temporary of a
block). A rank reads only the rows its shards need; a column shard reads whole rows of the saved
piece and keeps its columns (I/O of whole rows, memory still bounded by ``chunk_bytes``); two
local shards of one table read their rows separately. Reads are sequential, one block in flight,
and the next block is read by a background thread while the current one is converted, copied
and checksummed, so a cold load goes at the disk's speed (BENCHMARKS.md §6).

Memory, measured (one process, a 409,600 x 128 fp32 table = 200 MiB saved by ``Snapshot.take``,
``chunk_bytes`` = 16 MiB, peak RSS above the RSS before the load, one read buffer): ``staging=False``
27-42 MiB, ``staging=True`` 226-258 MiB (the 200 MiB staging copy plus the same); for comparison
torchsnapshot's ``read_object`` into the table 204 MiB and ``Snapshot.restore`` 204 MiB.
With ``staging=False`` (default) rows are copied into the weights as they arrive: peak extra
memory is a block (two half blocks: the one being copied and the one being read) plus an 8 MiB
checksum temporary, but an I/O error in the middle of a table leaves that table partly written (the error
says so and names it; load again, or start from fresh weights: at start-up the weights are only
their random initialisation). With ``staging=True`` the rows of a table are first read into a
staging copy of this rank's local shards (host memory, destination dtype), then copied in one go:
peak extra memory is the local shards of the largest table on top, and a failed read leaves the
table untouched; use it to load into weights that already hold something worth keeping. Before any table is read every file the load needs is checked to
exist and to be long enough (``stat`` locally, a 1-byte read elsewhere), so a truncated or
incomplete snapshot fails before the first write in both modes.

Failure semantics. Everything that can be checked from the manifest (names, shapes, dtypes,
coverage of the saved pieces, file sizes) is checked for all tables before the first byte of any
table is written, so such errors leave every weight untouched. Tables are then loaded one at a
time; a read error on table N (staging mode) leaves tables 1..N-1 fully loaded and table N
untouched, and the error names both. With several ranks, each step ends with an agreement
(``all_gather_object``): when one rank fails, every rank raises the same error before writing.

Verification: after the copy the destination is fetched again from ``model.state_dict()`` and
(1) an exact checksum of the bits of every local shard is compared with the checksum of the
values read, (2) the first, middle and last rows of each local shard are read again from the
snapshot and compared bit for bit. A mismatch raises: a copy that silently did not reach the
weights cannot pass. When streaming, each block of the destination is read back and summed right
after its copy (overlapping the next read); when the shard fetched again is that same memory
(same address, shape and strides) those sums are its checksum, otherwise (the model handed out a
copy) the shard is summed again.

Partial rows: a snapshot whose table has a different row count is an error naming both shapes
and the config path (``<table path>.pretrained``) unless ``allow_partial_rows`` is set; then the
first ``min(rows)`` rows are copied, the others keep their initial values, and a warning is
logged (logger ``recap_embed.io.pretrained``). A different embedding dim is always an error.

Security. Every file location the manifest names (and the manifest itself) must stay inside the
snapshot directory after resolving symlinks: an absolute location, ``..`` or a symlink leading out
is refused naming the entry, when the snapshot is opened and again at each read. Float tensors
read are checked finite (nan/inf refused before they are copied). The manifest is YAML read with
``yaml.CSafeLoader`` (no objects). Data files of tensor
entries are raw bytes (``buffer_protocol``), read here into a uint8 buffer viewed as the entry's
dtype; nothing is unpickled. torchsnapshot itself unpickles two things: ``ObjectEntry`` (any non-tensor,
non-primitive value, e.g. ``None``, a tuple, a custom object, saved with ``torch.save``) and
tensor entries whose serializer is ``torch_save`` (dtypes without buffer protocol, e.g. quantized
or complex). It reads both with ``torch.load`` without arguments, which is the restricted
``weights_only=True`` unpickler on torch >= 2.6 (unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set)
and full pickle on older torch. This loader refuses both kinds: a table entry that is an
``ObjectEntry`` or a ``torch_save`` tensor is an error, never read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import reduce
from operator import mul
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchsnapshot.io_types import ReadIO
from torchsnapshot.manifest import (
    ChunkedTensorEntry,
    Entry,
    ObjectEntry,
    ShardedTensorEntry,
    SnapshotMetadata,
    TensorEntry,
    is_container_entry,
)
from torchsnapshot.serialization import Serializer, string_to_dtype
from torchsnapshot.storage_plugin import url_to_storage_plugin_in_event_loop

from recap_embed.config import TableSpec
from recap_embed.distributed.collectives import agree, is_collective
from recap_embed.errors import UserError

# Re-exported for one release (they moved to recap_embed.distributed.collectives).
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

#: Largest block of rows read at once (a single row is read whole even if larger).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

#: Read the next block in a background thread while the current one is copied (see `_blocks`).
READ_AHEAD = True

METADATA_FILE = ".snapshot_metadata"  # torchsnapshot's manifest, written last by `take`

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- errors, report


class SnapshotLoadError(RuntimeError):
    """Loading from a torchsnapshot failed; the message names the snapshot and what to do."""


class SnapshotReadError(SnapshotLoadError, UserError):
    """The snapshot is missing, incomplete, truncated or corrupt, or a file cannot be read."""


class PretrainedError(SnapshotLoadError, UserError):
    """The snapshot does not hold what the config asks for (name, shape, entry type)."""


class NonFiniteSnapshotError(SnapshotReadError):
    """A tensor read from a snapshot holds nan or inf."""


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


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class Piece:
    """One saved block of a tensor: raw row-major bytes at `location`, from `byte_start`."""

    offsets: Tuple[int, ...]  # where the block sits in the whole tensor
    sizes: Tuple[int, ...]
    location: str  # file path inside the snapshot
    byte_start: int
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return reduce(mul, self.sizes[1:], 1) * _element_size(self.dtype)

    @property
    def byte_end(self) -> int:
        return self.byte_start + self.sizes[0] * self.row_bytes


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of a snapshot as the pieces that hold it (one, a ChunkedTensor's, or shards)."""

    uri: str
    logical_path: str  # manifest key without the rank
    keys: Tuple[str, ...]  # manifest keys it was assembled from
    kind: str  # 'Tensor' | 'ChunkedTensor' | 'ShardedTensor'
    shape: Tuple[int, ...]  # () for a scalar
    dtype: torch.dtype
    pieces: Tuple[Piece, ...]  # pieces of the tensor viewed with at least one dim

    @property
    def describe(self) -> str:
        if self.kind == "ShardedTensor":
            ranks = sorted({int(k.split("/", 1)[0]) for k in self.keys})
            return f"{self.logical_path} (ShardedTensor, {len(self.pieces)} saved shards from ranks {ranks})"
        return self.keys[0] if self.kind == "Tensor" else f"{self.keys[0]} ({self.kind}, {len(self.pieces)} chunks)"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _local_root(uri: str) -> Optional[str]:
    """The directory of a local snapshot URI (a path or fs://path), else None."""
    if "://" not in uri:
        return uri
    protocol, path = uri.split("://", 1)
    return path if protocol in ("", "fs") else None


class SnapshotReader:
    """Read-only access to a torchsnapshot: its manifest and byte ranges of its tensors.

    Opening reads and parses the manifest only. Use as a context manager (it owns an event loop
    and a storage plugin). Raises `SnapshotReadError` naming the path when the path does not
    exist or holds no complete snapshot (torchsnapshot writes the manifest last).
    """

    def __init__(self, uri: Any, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.uri = os.fspath(uri) if isinstance(uri, os.PathLike) else str(uri)
        self.bytes_read = 0
        self._loop = asyncio.new_event_loop()
        self._storage: Any = None
        try:
            root = _local_root(self.uri)
            if root is not None and not os.path.isdir(root):
                what = "is not a directory" if os.path.exists(root) else "does not exist"
                raise SnapshotReadError(f"snapshot {self.uri!r} {what}")
            if root is not None and not os.path.isfile(os.path.join(root, METADATA_FILE)):
                raise SnapshotReadError(
                    f"{self.uri!r} is not a complete torchsnapshot: it has no {METADATA_FILE} "
                    "(the wrong directory, or a snapshot whose writing did not finish)"
                )
            self._real_root = os.path.realpath(root) if root is not None else None
            if root is not None:
                self.confined(METADATA_FILE, "the manifest")
            try:
                self._storage = url_to_storage_plugin_in_event_loop(self.uri, self._loop, storage_options)
            except Exception as e:  # noqa: BLE001 - unknown protocol, missing client library, ...
                raise SnapshotReadError(f"snapshot {self.uri!r}: cannot open its storage: {type(e).__name__}: {e}") from None
            raw = self._read(METADATA_FILE, None)
            try:
                self.metadata = SnapshotMetadata.from_yaml(raw.decode("utf-8"))
            except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt manifest
                raise SnapshotReadError(f"snapshot {self.uri!r}: its manifest {METADATA_FILE} is corrupt: {e}") from None
            self.world_size = int(self.metadata.world_size)
            # logical path -> {rank: entry}
            self._by_path: Dict[str, Dict[int, Entry]] = defaultdict(dict)
            for key, entry in self.metadata.manifest.items():
                for location in entry_locations(entry):
                    self.confined(location, key)
                rank, _, logical = key.partition("/")
                self._by_path[logical][int(rank)] = entry
        except BaseException:
            self.close()
            raise

    # -- lifecycle
    def close(self) -> None:
        if self._storage is not None:
            try:
                self._storage.sync_close(event_loop=self._loop)
            finally:
                self._storage = None
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> "SnapshotReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- confinement
    def confined(self, location: Any, entry: str) -> str:
        """The path to open for `location`, which must stay inside the snapshot; else SnapshotReadError.

        A manifest names its files relative to the snapshot. An absolute location, one that climbs
        out with ``..``, or (local snapshots) one whose real path leaves the snapshot's real
        directory through a symlink would make the reader return bytes from elsewhere as the
        table's weights: refused, naming the entry.
        """
        text = str(location)
        parts = text.replace("\\", "/").split("/")
        escapes = (
            not isinstance(location, str) or not text or "\x00" in text or os.path.isabs(text)
            or text.startswith(("/", "\\")) or ".." in parts or (len(text) > 1 and text[1] == ":")
        )
        root = _local_root(self.uri)
        if not escapes and root is not None:
            real = os.path.realpath(os.path.join(root, text))
            escapes = os.path.commonpath([real, self._real_root]) != self._real_root
        if escapes:
            raise SnapshotReadError(
                f"snapshot {self.uri!r}: entry {entry!r} points at {text!r}, outside the snapshot directory "
                "(an absolute path, '..' or a symlink that leaves it); refusing to read it"
            )
        return os.path.join(root, text) if root is not None else text

    # -- raw reads
    def _read(self, location: str, byte_range: Optional[Tuple[int, int]]) -> bytes:
        self.confined(location, location)
        rio = ReadIO(path=location, byte_range=byte_range)
        try:
            self._storage.sync_read(rio, event_loop=self._loop)
        except FileNotFoundError:
            raise SnapshotReadError(
                f"snapshot {self.uri!r}: file {location!r} is missing (incomplete or corrupt snapshot)"
            ) from None
        except Exception as e:  # noqa: BLE001 - storage plugins raise their own errors
            raise SnapshotReadError(f"snapshot {self.uri!r}: cannot read {location!r}: {type(e).__name__}: {e}") from None
        buf = rio.buf.getvalue()  # BytesIO built from bytes: no copy
        self.bytes_read += len(buf)
        return buf

    def read_file(self, location: str) -> bytes:
        """A whole file of the snapshot (used for small object entries only)."""
        return self._read(location, None)

    def read_range(self, location: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file of the snapshot; a short read is an error."""
        buf = self._read(location, (start, end))
        if len(buf) != end - start:
            raise SnapshotReadError(
                f"snapshot {self.uri!r}: file {location!r} is cut short: bytes [{start}, {end}) "
                f"requested, {len(buf)} read (truncated or corrupt snapshot)"
            )
        return buf

    def read_range_into(self, location: str, start: int, out: memoryview) -> None:
        """Fill `out` with the bytes of a file of the snapshot from `start`; a short read is an error.

        Local snapshots are read with ``readinto`` straight into `out` (no other buffer); other
        URIs go through the storage plugin (one temporary of ``len(out)`` bytes).
        """
        n = len(out)
        root = _local_root(self.uri)
        if root is None:
            out[:] = self.read_range(location, start, start + n)
            return
        got = 0
        try:
            with open(self.confined(location, location), "rb", buffering=0) as f:
                f.seek(start)
                while got < n:
                    k = f.readinto(out[got:])
                    if not k:
                        break
                    got += k
        except FileNotFoundError:
            raise SnapshotReadError(
                f"snapshot {self.uri!r}: file {location!r} is missing (incomplete or corrupt snapshot)"
            ) from None
        except OSError as e:
            raise SnapshotReadError(f"snapshot {self.uri!r}: cannot read {location!r}: {e}") from None
        self.bytes_read += got
        if got != n:
            raise SnapshotReadError(
                f"snapshot {self.uri!r}: file {location!r} is cut short: bytes [{start}, {start + n}) "
                f"requested, {got} read (truncated or corrupt snapshot)"
            )

    def check_files(self, pieces: Iterable[Piece]) -> None:
        """Every file `pieces` live in exists and is long enough (stat locally, else a 1-byte read)."""
        need: Dict[str, int] = {}
        for p in pieces:
            need[p.location] = max(need.get(p.location, 0), p.byte_end)
        root = _local_root(self.uri)
        for location, end in sorted(need.items()):
            if end == 0:
                continue
            if root is not None:
                path = self.confined(location, location)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    raise SnapshotReadError(
                        f"snapshot {self.uri!r}: file {location!r} is missing (incomplete or corrupt snapshot)"
                    ) from None
                if size < end:
                    raise SnapshotReadError(
                        f"snapshot {self.uri!r}: file {location!r} is cut short: {size} bytes, "
                        f"the manifest needs {end} (truncated or corrupt snapshot)"
                    )
            else:
                self.read_range(location, end - 1, end)

    # -- the manifest
    def logical_paths(self) -> List[str]:
        return sorted(self._by_path)

    def entries(self, logical_path: str) -> Dict[int, Entry]:
        return dict(self._by_path.get(logical_path, {}))

    def entry_for_rank(self, logical_path: str, rank: Optional[int]) -> Tuple[int, Entry]:
        """The entry of a non-sharded path a rank restores: its own, else the lowest rank's."""
        by_rank = self._by_path.get(logical_path)
        if not by_rank:
            raise KeyError(logical_path)
        if rank is not None and rank in by_rank:
            return rank, by_rank[rank]
        r = min(by_rank)
        return r, by_rank[r]

    def source(self, logical_path: str, rank: Optional[int] = None) -> SourceTensor:
        """The tensor at `logical_path`: shards of all ranks merged, else `rank`'s (or the lowest) entry.

        Raises KeyError when the path is absent, PretrainedError when it is not a tensor or
        is stored in a way that would need unpickling, SnapshotReadError when the manifest
        contradicts itself.
        """
        by_rank = self._by_path.get(logical_path)
        if not by_rank:
            raise KeyError(logical_path)
        sharded = {r: e for r, e in by_rank.items() if isinstance(e, ShardedTensorEntry)}
        if sharded:
            if len(sharded) != len(by_rank):
                raise SnapshotReadError(f"snapshot {self.uri!r}: {logical_path!r} is sharded on some ranks only")
            keys = tuple(f"{r}/{logical_path}" for r in sorted(sharded))
            pieces = []
            for r in sorted(sharded):
                for s in sharded[r].shards:
                    pieces.append(self._piece(keys[0], s.tensor, s.offsets, s.sizes))
            if not pieces:
                raise SnapshotReadError(f"snapshot {self.uri!r}: {logical_path!r} has no saved shards")
            ndim = len(pieces[0].sizes)
            shape = tuple(max(p.offsets[d] + p.sizes[d] for p in pieces) for d in range(ndim))
            dtypes = {p.dtype for p in pieces}
            if len(dtypes) != 1:
                raise SnapshotReadError(f"snapshot {self.uri!r}: shards of {logical_path!r} disagree on dtype: {dtypes}")
            return SourceTensor(self.uri, logical_path, keys, "ShardedTensor", shape, pieces[0].dtype, tuple(pieces))
        r, entry = self.entry_for_rank(logical_path, rank)
        key = f"{r}/{logical_path}"
        if isinstance(entry, TensorEntry):
            shape = tuple(entry.shape)
            sizes = shape or (1,)
            piece = self._piece(key, entry, [0] * len(sizes), list(sizes), scalar=not shape)
            return SourceTensor(self.uri, logical_path, (key,), "Tensor", shape, piece.dtype, (piece,))
        if isinstance(entry, ChunkedTensorEntry):
            shape = tuple(entry.shape)
            pieces = tuple(self._piece(key, c.tensor, c.offsets, c.sizes) for c in entry.chunks)
            return SourceTensor(self.uri, logical_path, (key,), "ChunkedTensor", shape, string_to_dtype(entry.dtype), pieces)
        if isinstance(entry, ObjectEntry):
            raise PretrainedError(
                f"snapshot {self.uri!r}: entry {key!r} is a pickled object ({entry.obj_type}, read "
                "by torch.load), not a tensor; refusing to read it"
            )
        raise PretrainedError(f"snapshot {self.uri!r}: entry {key!r} is a {entry.type}, not a tensor")

    def _piece(self, key: str, t: TensorEntry, offsets: Sequence[int], sizes: Sequence[int], scalar: bool = False) -> Piece:
        if t.serializer != Serializer.BUFFER_PROTOCOL.value:
            raise PretrainedError(
                f"snapshot {self.uri!r}: entry {key!r} is stored with the {t.serializer!r} serializer "
                "(unpickled by torch.load); refusing to read it (only raw buffer_protocol tensors are read)"
            )
        try:
            dtype = string_to_dtype(t.dtype)
        except ValueError as e:
            raise SnapshotReadError(f"snapshot {self.uri!r}: entry {key!r}: {e}") from None
        saved = (list(t.shape) or [1]) if scalar else list(t.shape)
        if [int(s) for s in saved] != [int(s) for s in sizes]:
            raise SnapshotReadError(f"snapshot {self.uri!r}: entry {key!r}: piece shape {t.shape} != {list(sizes)}")
        start = 0 if t.byte_range is None else int(t.byte_range[0])
        piece = Piece(tuple(int(o) for o in offsets), tuple(int(s) for s in sizes), t.location, start, dtype)
        if t.byte_range is not None and int(t.byte_range[1]) - int(t.byte_range[0]) != piece.byte_end - start:
            raise SnapshotReadError(
                f"snapshot {self.uri!r}: entry {key!r}: byte range {t.byte_range} does not hold "
                f"{list(sizes)} x {dtype} ({piece.byte_end - start} bytes)"
            )
        return piece

    # -- tables
    def find_table(self, emb_name: str) -> SourceTensor:
        """The one tensor entry that is table `emb_name` (see the module docstring for the rule)."""
        suffix = f"embedding_bags.{emb_name}.weight"
        hits = []
        for lp, by_rank in self._by_path.items():
            entry = next(iter(by_rank.values()))
            if is_container_entry(entry):
                continue
            comps = lp.split("/")
            last = unquote(comps[-1])
            if (
                lp == emb_name
                or last == suffix
                or last.endswith("." + suffix)
                or (len(comps) == 2 and unquote(comps[1]) == emb_name)
            ):
                hits.append(lp)
        if not hits:
            names = self.table_names()
            shown = ", ".join(names[:50]) + (f", ... ({len(names)} in all)" if len(names) > 50 else "")
            raise PretrainedError(
                f"snapshot {self.uri!r} has no table {emb_name!r}; its tables: [{shown}]"
                if names
                else f"snapshot {self.uri!r} has no table {emb_name!r}; it holds no tensor entries"
            )
        if len(hits) > 1:
            listed = ", ".join(sorted(hits))
            raise PretrainedError(
                f"snapshot {self.uri!r}: table {emb_name!r} is ambiguous, it matches {len(hits)} entries: "
                f"[{listed}]; set emb_name to the full path of one of them"
            )
        return self.source(hits[0])

    def table_names(self) -> List[str]:
        """Names `find_table` accepts: EBC tables, and plain tensors saved directly under an app key."""
        names = set()
        for lp, by_rank in self._by_path.items():
            entry = next(iter(by_rank.values()))
            if not isinstance(entry, (TensorEntry, ChunkedTensorEntry, ShardedTensorEntry)):
                continue
            comps = lp.split("/")
            last = unquote(comps[-1])
            table = _ebc_table(last)
            if table is not None:
                names.add(table)
            elif len(comps) == 2:
                names.add(last)
        return sorted(names)


def entry_locations(entry: Entry) -> List[Any]:
    """Every file location a manifest entry reads (containers and primitives read none)."""
    if isinstance(entry, ShardedTensorEntry):
        return [s.tensor.location for s in entry.shards]
    if isinstance(entry, ChunkedTensorEntry):
        return [c.tensor.location for c in entry.chunks]
    if isinstance(entry, (TensorEntry, ObjectEntry)):
        return [entry.location]
    return []


def _ebc_table(key: str) -> Optional[str]:
    """'user' for '...embedding_bags.user.weight', else None."""
    marker = "embedding_bags."
    if not key.endswith(".weight"):
        return None
    if key.startswith(marker):
        rest = key[len(marker) :]
    elif "." + marker in key:
        rest = key[key.rindex("." + marker) + len(marker) + 1 :]
    else:
        return None
    name = rest[: -len(".weight")]
    return name or None


def snapshot_tables(uri: Any, storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{table name: (shape, dtype)}`` of every table a snapshot holds (reads the manifest only)."""
    out = {}
    with SnapshotReader(uri, storage_options) as reader:
        for name in reader.table_names():
            try:
                src = reader.find_table(name)
            except SnapshotLoadError:
                continue
            out[name] = (src.shape, str(src.dtype).replace("torch.", ""))
    return out


# --------------------------------------------------------------------------- the copier


@dataclass
class Region:
    """One local destination block: `tensor` is the live storage, at `offsets` in the whole."""

    tensor: torch.Tensor
    offsets: Tuple[int, ...]
    rows: int  # rows to fill, from the block's first row (fewer than it has: partial rows)

    @property
    def fill(self) -> torch.Tensor:
        return self.tensor if self.rows == self.tensor.shape[0] else self.tensor.narrow(0, 0, self.rows)


@dataclass
class _Task:
    piece: Piece
    lo: Tuple[int, ...]  # overlap in whole-tensor coordinates
    hi: Tuple[int, ...]


@dataclass
class CopyPlan:
    """How to fill the local blocks of one destination from one source (no I/O done yet)."""

    source: SourceTensor
    regions: List[Region]
    tasks: List[List[_Task]]  # per region
    expected: List[int] = field(default_factory=list)  # checksums of what was copied, per region
    bytes_read: int = 0  # by this rank, for this plan (verification reads included)
    written: Optional[List[int]] = None  # streaming: checksums of the destination right after the copy
    storage: Optional[List[Tuple[Any, ...]]] = None  # streaming: the memory each region was written to

    @property
    def elements(self) -> int:
        return sum(r.fill.numel() for r in self.regions)

    def pieces(self) -> List[Piece]:
        return [t.piece for ts in self.tasks for t in ts]


def regions_of(value: torch.Tensor, rows_limit: Optional[int] = None) -> List[Region]:
    """The local blocks of a tensor or ShardedTensor, clipped to global rows ``< rows_limit``."""
    if isinstance(value, ShardedTensor):
        blocks = [(s.tensor, tuple(int(o) for o in s.metadata.shard_offsets)) for s in value.local_shards()]
    else:
        t = value.detach()
        blocks = [(t.view(1) if t.dim() == 0 else t, (0,) * max(t.dim(), 1))]
    out = []
    for t, off in blocks:
        if t.is_meta:
            raise PretrainedError("the destination is on the meta device: place (shard) the model before loading")
        rows = t.shape[0]
        if rows_limit is not None:
            rows = max(0, min(off[0] + rows, rows_limit) - off[0])
        out.append(Region(t, off, rows))
    return out


def global_shape(value: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in (value.size() if isinstance(value, ShardedTensor) else value.shape))


def plan_copy(source: SourceTensor, regions: List[Region], what: str) -> CopyPlan:
    """Match every local block with the saved pieces it overlaps; check they cover it exactly."""
    tasks: List[List[_Task]] = []
    for region in regions:
        fill_sizes = (region.rows,) + tuple(region.tensor.shape[1:])
        ts = []
        covered = 0
        for p in source.pieces:
            lo = tuple(max(o, d) for o, d in zip(p.offsets, region.offsets))
            hi = tuple(min(o + s, d + z) for o, s, d, z in zip(p.offsets, p.sizes, region.offsets, fill_sizes))
            if len(lo) != len(fill_sizes):
                raise PretrainedError(f"{what}: the saved tensor has {len(p.sizes)} dims, the destination {len(fill_sizes)}")
            if all(h > l for l, h in zip(lo, hi)):
                ts.append(_Task(p, lo, hi))
                covered += reduce(mul, (h - l for l, h in zip(lo, hi)), 1)
        want = reduce(mul, fill_sizes, 1)
        if covered != want:
            raise SnapshotReadError(
                f"{what}: the saved pieces of {source.describe} cover {covered} of the {want} elements "
                f"of the local block at {list(region.offsets)} (missing or overlapping shards: a corrupt manifest)"
            )
        tasks.append(ts)
    return CopyPlan(source, regions, tasks)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_CHECKSUM_BLOCK = 1 << 20  # elements summed at once (the int64 temporary is 8 MiB)


def checksum(t: torch.Tensor) -> int:
    """An exact, order-independent checksum of a tensor's bits (sum of its elements as integers).

    Summed in blocks of rows: torch widens the integer view to int64 before summing, which for a
    whole table would be a temporary twice its size.
    """
    if t.numel() == 0:
        return 0
    if t.dim() == 0:
        t = t.view(1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    try:
        iv = t.view(_INT_OF_SIZE[t.element_size()])
    except (KeyError, RuntimeError):
        iv = t.contiguous().view(torch.uint8)
    per_row = max(1, iv[0].numel()) if iv.dim() > 1 else 1
    step = max(1, _CHECKSUM_BLOCK // per_row)
    total = 0
    for r in range(0, iv.shape[0], step):
        total += int(iv[r : r + step].sum(dtype=torch.int64).item())
    return total


def _blocks(reader: SnapshotReader, task: _Task, chunk_bytes: int, rows: Optional[Tuple[int, int]] = None,
            read_ahead: bool = False):
    """(global first row, source view) per block of at most `chunk_bytes` rows of one task.

    The view yielded is valid until the next block is requested. With `read_ahead`, a second
    buffer is filled by a background thread while the caller works on the current block, so that
    conversion, copy and checksums overlap the I/O (``readinto`` and torch release the GIL); each
    buffer is then half a block, so the memory bound stays `chunk_bytes`.
    """
    p = task.piece
    row_bytes = p.row_bytes
    r0, r1 = rows if rows is not None else (task.lo[0], task.hi[0])
    # Two buffers of half the block each: the memory bound stays `chunk_bytes`.
    step = max(1, (chunk_bytes // (2 if read_ahead else 1)) // max(row_bytes, 1))
    starts = list(range(r0, r1, step))
    if not starts:
        return
    read_ahead = read_ahead and len(starts) > 1
    buffers = [torch.empty(min(step, r1 - r0) * row_bytes, dtype=torch.uint8) for _ in range(2 if read_ahead else 1)]
    views = [memoryview(b.numpy()) for b in buffers]

    def read(k: int) -> None:
        r = starts[k]
        n = min(step, r1 - r)
        reader.read_range_into(p.location, p.byte_start + (r - p.offsets[0]) * row_bytes, views[k % len(views)][: n * row_bytes])

    def view(k: int) -> torch.Tensor:
        n = min(step, r1 - starts[k])
        src = buffers[k % len(buffers)][: n * row_bytes].view(p.dtype).view((n,) + p.sizes[1:])
        for d in range(1, len(p.sizes)):
            src = src.narrow(d, task.lo[d] - p.offsets[d], task.hi[d] - task.lo[d])
        return src

    if not read_ahead:
        for k, r in enumerate(starts):
            read(k)
            yield r, view(k)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recap_embed-read") as pool:
        pending = pool.submit(read, 0)
        try:
            for k, r in enumerate(starts):
                pending.result()
                # The caller is done with block k - 1, whose buffer the next read reuses.
                pending = pool.submit(read, k + 1) if k + 1 < len(starts) else None
                yield r, view(k)
        finally:
            if pending is not None:  # stopped early: let the read in flight finish before the buffer goes
                pending.exception()


def _dest_view(target: torch.Tensor, region_offsets: Tuple[int, ...], task: _Task, r: int, n: int) -> torch.Tensor:
    v = target.narrow(0, r - region_offsets[0], n)
    for d in range(1, target.dim()):
        v = v.narrow(d, task.lo[d] - region_offsets[d], task.hi[d] - task.lo[d])
    return v


def read_into(
    reader: SnapshotReader, plan: CopyPlan, *, chunk_bytes: int, staging: bool, require_finite: bool = True
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Read every block of `plan`, into staging buffers (returned as (fill, staged) pairs to commit)
    or straight into the destination (returns []). Sets ``plan.expected`` (checksums of the values
    read); streaming also sets ``plan.written`` (checksums of the destination blocks read back
    right after each copy, while the next block is being read) and ``plan.storage``.

    With `require_finite`, a float block holding nan or inf raises `NonFiniteSnapshotError` before
    it is copied (a table of NaNs would train to NaN without a word)."""
    staged = []
    plan.expected = []
    plan.written = None if staging else []
    plan.storage = [] if not staging else None
    before = reader.bytes_read
    with torch.no_grad():
        for region, tasks in zip(plan.regions, plan.tasks):
            fill = region.fill
            target = torch.empty(fill.shape, dtype=fill.dtype) if staging else fill
            expected = written = 0
            for task in tasks:
                for r, src in _blocks(reader, task, chunk_bytes, read_ahead=READ_AHEAD):
                    conv = src if src.dtype == target.dtype else src.to(target.dtype)
                    if require_finite and conv.is_floating_point():
                        _check_finite(conv, plan.source, r)
                    expected += checksum(conv)
                    dest = _dest_view(target, region.offsets, task, r, src.shape[0])
                    dest.copy_(conv)
                    if not staging:
                        written += checksum(dest)
                    del src, conv, dest
            plan.expected.append(expected)
            if staging:
                staged.append((fill, target))
            else:
                plan.written.append(written)
                plan.storage.append(_storage_key(fill))
    plan.bytes_read += reader.bytes_read - before
    return staged


def _check_finite(block: torch.Tensor, source: SourceTensor, first_row: int) -> None:
    finite = torch.isfinite(block)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    rows = (~finite).reshape(block.shape[0], -1).any(dim=1).nonzero().flatten() + first_row
    raise NonFiniteSnapshotError(
        f"snapshot {source.uri!r}: {source.describe} holds {bad} non-finite value(s) (nan or inf) in rows "
        f"{rows[:5].tolist()}{' ...' if rows.numel() > 5 else ''}; refusing to load them (a model trained from "
        f"them is NaN): use another snapshot"
    )


def _storage_key(t: torch.Tensor) -> Tuple[Any, ...]:
    """What makes two tensors the same memory: device, address, shape, strides, dtype."""
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def commit(staged: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for fill, target in staged:
            fill.copy_(target)


def verify(reader: Optional[SnapshotReader], plan: CopyPlan, fresh: List[Region], what: str, sample_rows: bool = True) -> None:
    """The freshly fetched destination holds what was read: checksums, and sampled rows re-read."""
    if [r.offsets for r in fresh] != [r.offsets for r in plan.regions]:
        raise SnapshotLoadError(f"{what}: the destination's local blocks changed during the load")
    before = reader.bytes_read if reader is not None else 0
    for i, (region, tasks, expected) in enumerate(zip(fresh, plan.tasks, plan.expected)):
        fill = region.fill
        if plan.written is not None and plan.storage is not None and plan.storage[i] == _storage_key(fill):
            # The weights fetched again are the memory the blocks were copied into and read back
            # from right after the copy: that read-back checksum is this memory's.
            found = plan.written[i]
        else:  # another tensor (a copy, or a staged load): sum what the model holds now
            found = checksum(fill)
        if found != expected:
            raise SnapshotLoadError(
                f"{what}: after the copy the destination block at {list(region.offsets)} does not hold the "
                f"values read from {plan.source.describe} (checksum {found}, expected {expected}): the write "
                "did not reach the model's weights"
            )
        if not sample_rows or reader is None or region.rows == 0:
            continue
        for g in sorted({region.offsets[0], region.offsets[0] + region.rows // 2, region.offsets[0] + region.rows - 1}):
            for task in tasks:
                if not task.lo[0] <= g < task.hi[0]:
                    continue
                for r, src in _blocks(reader, task, 1, rows=(g, g + 1)):
                    got = _dest_view(fill, region.offsets, task, r, 1).detach().to("cpu")
                    if not bits_equal(src.to(fill.dtype), got):
                        raise SnapshotLoadError(
                            f"{what}: row {g} of the destination differs from {plan.source.describe} after the copy"
                        )
    if reader is not None:
        plan.bytes_read += reader.bytes_read - before


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaNs with equal payloads compare equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool or a.element_size() not in _INT_OF_SIZE:
        return bool(torch.equal(a, b))
    it = _INT_OF_SIZE[a.element_size()]
    return bool(torch.equal(a.view(it), b.view(it)))


# --------------------------------------------------------------------------- load_pretrained


def _table_weights(model: nn.Module) -> Dict[str, Tuple[str, torch.Tensor]]:
    """``{table: (state-dict key, value)}`` of every ``...embedding_bags.<table>.weight``."""
    found: Dict[str, List[Tuple[str, torch.Tensor]]] = defaultdict(list)
    for key, value in model.state_dict().items():
        table = _ebc_table(key)
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

        # 2. one table at a time: read (staged or streamed), agree, commit
        done: List[str] = []
        seconds: Dict[str, float] = {}
        for job in jobs:
            t0 = time.perf_counter()
            error, staged = None, []
            try:
                staged = read_into(job.reader, job.plan, chunk_bytes=chunk_bytes, staging=staging)
            except Exception as e:  # noqa: BLE001
                state = "left untouched" if staging else "PARTLY WRITTEN: load it again before training"
                cls = type(e) if isinstance(e, SnapshotLoadError) else SnapshotReadError
                error = cls(f"{e}\n  while loading {job.what} (table {job.spec.name!r} {state}; "
                            f"tables already loaded: {done or 'none'})")
            agree(error, pg, enabled=multi, other_failed=SnapshotLoadError)
            commit(staged)
            del staged
            done.append(job.spec.name)
            seconds[job.spec.name] = time.perf_counter() - t0

        # 3. the weights, fetched again, hold what was read
        error = None
        try:
            fresh = _table_weights(model)
            for job in jobs:
                t0 = time.perf_counter()
                verify(job.reader, job.plan, regions_of(fresh[job.spec.name][1], job.rows), job.what, sample_rows=verify_rows)
                seconds[job.spec.name] += time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            error = e
        agree(error, pg, enabled=multi, other_failed=SnapshotLoadError)
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
            if len(source.shape) != 2 or source.dtype not in _FLOAT_DTYPES:
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
    if source.dtype not in _FLOAT_DTYPES or dest_dtype not in _FLOAT_DTYPES:
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
