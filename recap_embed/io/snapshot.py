"""Reading a torchsnapshot without trusting it: its manifest, the tables it holds, and byte
ranges of their saved pieces (`SnapshotReader`), for warm starts and checkpoint restores alike.

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
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import reduce
from operator import mul
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import unquote

import torch
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

from recap_embed.errors import UserError

__all__ = [
    "FLOAT_DTYPES",
    "METADATA_FILE",
    "NonFiniteSnapshotError",
    "Piece",
    "PretrainedError",
    "SnapshotLoadError",
    "SnapshotReadError",
    "SnapshotReader",
    "SourceTensor",
    "ebc_table",
    "entry_locations",
    "snapshot_tables",
]

METADATA_FILE = ".snapshot_metadata"  # torchsnapshot's manifest, written last by `take`

#: Dtypes a table may be saved in and loaded into.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SnapshotLoadError(RuntimeError):
    """Loading from a torchsnapshot failed; the message names the snapshot and what to do."""


class SnapshotReadError(SnapshotLoadError, UserError):
    """The snapshot is missing, incomplete, truncated or corrupt, or a file cannot be read."""


class PretrainedError(SnapshotLoadError, UserError):
    """The snapshot does not hold what the config asks for (name, shape, entry type)."""


class NonFiniteSnapshotError(SnapshotReadError):
    """A tensor read from a snapshot holds nan or inf."""


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
        """Names `find_table` accepts: EBC tables, and plain tensors saved directly under an app key
        (``StateDict(user=tensor)``); a dotted key there is another module's parameter
        (``mlp.0.weight``), not a table, and is not listed (table names have no dots)."""
        names = set()
        for lp, by_rank in self._by_path.items():
            entry = next(iter(by_rank.values()))
            if not isinstance(entry, (TensorEntry, ChunkedTensorEntry, ShardedTensorEntry)):
                continue
            comps = lp.split("/")
            last = unquote(comps[-1])
            table = ebc_table(last)
            if table is not None:
                names.add(table)
            elif len(comps) == 2 and "." not in last:
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


def ebc_table(key: str) -> Optional[str]:
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


