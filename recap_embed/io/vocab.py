"""Vocabularies: raw 64-bit entity ids to table rows, read from parquet.

A table's ``vocab`` is a directory of parquet files with two integer columns, ``id`` (the raw
id, any 64-bit value, negative included) and ``row`` (its row in the table). A `Vocab` keeps
them in an ordered hash table of mixed keys and rows (`recap_embed.io._id_table`: 16 bytes per
entry) and maps a batch with a few vectorised passes per 16k ids (about one cache miss per id;
2.5-3x pandas' ``Index.get_indexer`` on one thread, see BENCHMARKS.md §3), optionally over
several threads.

Row layout. Vocab rows are exactly what the files say (several ids may share a row, rows may
have holes). The rows reserved for unknown ids come right after the largest vocab row ``M``:
``R = M + 1``; ``oov_policy=default_row`` reserves row ``R``, ``oov_policy=hash`` reserves rows
``[R, R + oov_buckets)``. Keeping the vocab rows untouched lets a vocab written next to a
trained table (or a snapshot) keep meaning the same rows; the price is that the reserved rows
move when a new vocab version uses larger rows. ``num_embeddings=None`` derives the table size
as `Vocab.required_rows`; a larger ``num_embeddings`` leaves the rows after them unused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_embed.config.schema import OovPolicy
from recap_embed.errors import UserError

from ._id_table import IdTable

__all__ = ["Vocab", "VocabError", "VocabMapper", "hash_ids", "save_vocab"]

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[int]]

#: Columns of a vocab file.
ID_COLUMN = "id"
ROW_COLUMN = "row"

#: Batches below this many ids per thread are mapped on the calling thread alone.
_IDS_PER_THREAD = 1 << 20

_SHOW = 5  # ids shown in an error message


class VocabError(UserError, ValueError):
    """A vocab that cannot be used, or an id it cannot map; the message says what to change."""


# --------------------------------------------------------------------------- hashing


def _s64(x: int) -> int:
    """The int64 with the bits of the uint64 `x` (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = _s64(0x9E3779B97F4A7C15)
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)
_LOW63 = (1 << 63) - 1


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def hash_ids(ids: torch.Tensor) -> torch.Tensor:
    """splitmix64 of every id, keeping the low 63 bits: a non-negative int64 per id.

    Pure int64 arithmetic wrapping mod 2**64, so the value depends on the id alone: the same on
    every process, run, device and torch version (Python's ``hash`` is salted, so unusable).
    """
    z = ids.to(torch.int64) + _GAMMA
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    z = z ^ _shr(z, 31)
    return z & _LOW63


# --------------------------------------------------------------------------- helpers


def _where(table: str, config_path: str) -> str:
    return f"vocab of table {table!r}" + (f" ({config_path})" if config_path else "")


def _show(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _as_int64(values: ArrayLike, what: str, ctx: str) -> np.ndarray:
    """A 1-D int64 numpy view of `values` (no copy when it already is one)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise VocabError(f"{ctx}: {what} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise VocabError(f"{ctx}: {what} must be integers (int64), got {arr.dtype}")
    if arr.dtype == np.uint64:
        if what == ROW_COLUMN and (arr > np.iinfo(np.int64).max).any():
            raise VocabError(f"{ctx}: {what} has values above 2**63-1; rows must be in [0, num_embeddings)")
        return arr.view(np.int64)  # ids: same 64 bits as an int64 tensor of the same hashes
    return arr.astype(np.int64, copy=False)


def _row_budget(num_embeddings: Optional[int], reserved: int) -> Optional[int]:
    """Rows a vocab may use: num_embeddings less the OOV rows that must follow them."""
    return None if num_embeddings is None else num_embeddings - reserved


def _check_rows(rows: np.ndarray, ids: np.ndarray, source: str, ctx: str, budget: Optional[int],
                num_embeddings: Optional[int], policy: OovPolicy, reserved: int, needed: Optional[int] = None) -> None:
    """Negative rows and rows past the budget, reported with the ids that carry them.

    `needed`: the num_embeddings the whole vocab needs (default: what these rows need).
    """
    if rows.size == 0:
        return
    bad = rows < 0
    if bad.any():
        idx = np.flatnonzero(bad)[:_SHOW]
        pairs = ", ".join(f"id {ids[i]} -> row {rows[i]}" for i in idx)
        raise VocabError(
            f"{ctx}: {source}, column {ROW_COLUMN!r} has {int(bad.sum())} negative rows ({pairs}); "
            f"rows must be in [0, num_embeddings)"
        )
    if budget is not None:
        bad = rows >= budget
        if bad.any():
            idx = np.flatnonzero(bad)[:_SHOW]
            pairs = ", ".join(f"id {ids[i]} -> row {rows[i]}" for i in idx)
            if needed is None:
                needed = int(rows.max()) + 1 + reserved
            oov = (
                f"{reserved} OOV row(s) of oov_policy={policy.name} follow the vocab rows, so " if reserved else ""
            )
            raise VocabError(
                f"{ctx}: {source}, column {ROW_COLUMN!r} has {int(bad.sum())} rows >= {budget} ({pairs}): "
                f"num_embeddings={num_embeddings} is too small ({oov}rows must be in [0, {budget})); "
                f"set num_embeddings >= {needed}, or null to derive it from the vocab"
            )


def _coerce_policy(policy: Union[OovPolicy, str], ctx: str) -> OovPolicy:
    if isinstance(policy, OovPolicy):
        return policy
    try:
        return OovPolicy[str(policy)]
    except KeyError:
        raise VocabError(f"{ctx}: oov_policy={policy!r} is not allowed; use one of {[p.name for p in OovPolicy]}") from None


def _check_layout(
    policy: Union[OovPolicy, str], buckets: int, num_embeddings: Optional[int], ctx: str
) -> Tuple[OovPolicy, int, int]:
    """(policy, buckets kept, rows reserved after the vocab rows), or a VocabError."""
    policy = _coerce_policy(policy, ctx)
    if isinstance(buckets, bool) or not isinstance(buckets, (int, np.integer)) or buckets < 0:
        raise VocabError(f"{ctx}: oov_buckets={buckets!r} is not allowed; use a non-negative integer")
    if policy is OovPolicy.hash and buckets == 0:
        raise VocabError(
            f"{ctx}: oov_policy=hash needs oov_buckets > 0 (the extra rows unknown ids hash into); "
            f"set oov_buckets, or use oov_policy=default_row or error"
        )
    # Buckets are ignored by the other policies, so that a sweep over oov_policy may keep them set.
    buckets = int(buckets) if policy is OovPolicy.hash else 0
    reserved = {OovPolicy.error: 0, OovPolicy.default_row: 1, OovPolicy.hash: buckets}[policy]
    if num_embeddings is not None:
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, (int, np.integer)) or num_embeddings <= 0:
            raise VocabError(
                f"{ctx}: num_embeddings={num_embeddings!r} is not allowed; use a positive integer, or null to derive it from the vocab"
            )
        if num_embeddings <= reserved:
            raise VocabError(
                f"{ctx}: num_embeddings={num_embeddings} leaves no row for the vocab: oov_policy={policy.name} "
                f"reserves {reserved} row(s) after the vocab rows; set num_embeddings > {reserved} "
                f"(vocab rows + {reserved}), or null to derive it"
            )
    return policy, buckets, reserved


# --------------------------------------------------------------------------- Vocab


class Vocab:
    """Raw ids and their rows in a hash table (16 bytes per entry) plus the OOV policy of one table.

    Build one with `Vocab.load` (a parquet directory) or from arrays; `map` turns ids into rows.
    `lookups` and `oov_hits` count what `map` saw since the last `reset_counts`, for logging.
    """

    def __init__(
        self,
        ids: ArrayLike,
        rows: ArrayLike,
        *,
        table: str,
        num_embeddings: Optional[int] = None,
        oov_policy: Union[OovPolicy, str] = OovPolicy.error,
        oov_buckets: int = 0,
        config_path: str = "",
        source: str = "",
    ) -> None:
        """Validates `ids`/`rows` and builds the table; `source` names where they came from in messages."""
        self._init(ids, rows, table=table, num_embeddings=num_embeddings, oov_policy=oov_policy,
                   oov_buckets=oov_buckets, config_path=config_path, source=source, locate=None)

    def _init(
        self,
        ids: ArrayLike,
        rows: ArrayLike,
        *,
        table: str,
        num_embeddings: Optional[int],
        oov_policy: Union[OovPolicy, str],
        oov_buckets: int,
        config_path: str,
        source: str,
        locate: Optional[Callable[[np.ndarray], Dict[int, List[str]]]],
    ) -> None:
        """`locate` finds the files of duplicate ids."""
        self.table = table
        self.config_path = config_path
        ctx = _where(table, config_path)
        self.oov_policy, self.oov_buckets, reserved = _check_layout(oov_policy, oov_buckets, num_embeddings, ctx)
        source = source or "the given arrays"
        id_arr = _as_int64(ids, ID_COLUMN, f"{ctx}: {source}")
        row_arr = _as_int64(rows, ROW_COLUMN, f"{ctx}: {source}")
        if id_arr.shape != row_arr.shape:
            raise VocabError(f"{ctx}: {source} has {id_arr.size} ids but {row_arr.size} rows; give one row per id")
        if id_arr.size == 0:
            raise VocabError(f"{ctx}: {source} has no entries; a vocab needs at least one (id, row) pair")
        _check_rows(row_arr, id_arr, source, ctx, _row_budget(num_embeddings, reserved),
                    num_embeddings, self.oov_policy, reserved)

        table, ids_h, rows_h, dup = IdTable.build(id_arr, row_arr)
        if table is None:
            _raise_duplicates(torch.from_numpy(ids_h), torch.from_numpy(rows_h), torch.from_numpy(dup), source, ctx, locate)
        del ids_h, rows_h
        self._table: IdTable = table
        self.max_row = int(row_arr.max())
        # _check_rows guarantees required_rows <= num_embeddings.
        self.num_embeddings = self.required_rows if num_embeddings is None else int(num_embeddings)
        self.lookups = 0
        self.oov_hits = 0

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        directory: PathLike,
        *,
        table: str,
        num_embeddings: Optional[int],
        oov_policy: Union[OovPolicy, str],
        oov_buckets: int = 0,
        config_path: str = "",
    ) -> "Vocab":
        """Reads every ``*.parquet`` file directly in `directory` (names starting with '.' or '_'
        are skipped, as Spark and Hive do); only the ``id`` and ``row`` columns are read."""
        ctx = _where(table, config_path)
        path = Path(os.path.expanduser(str(directory)))
        if not path.exists():
            raise VocabError(f"{ctx}: directory {str(directory)!r} does not exist; set vocab to a directory of parquet files")
        if not path.is_dir():
            raise VocabError(f"{ctx}: {str(directory)!r} is not a directory; set vocab to a directory of parquet files")
        files = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise VocabError(
                f"{ctx}: directory {str(directory)!r} has no *.parquet files; "
                f"a vocab is parquet files with columns {ID_COLUMN!r} and {ROW_COLUMN!r} (int64)"
            )
        policy, oov_buckets, reserved = _check_layout(oov_policy, oov_buckets, num_embeddings, ctx)
        budget = _row_budget(num_embeddings, reserved)
        # Read straight into the final arrays: peak memory is the vocab plus one file's columns.
        counts = [_file_rows(f, ctx) for f in files]
        total = sum(counts)
        if total == 0:
            raise VocabError(
                f"{ctx}: the {len(files)} parquet file(s) in {str(directory)!r} have 0 rows; "
                f"an empty vocab would send every id to the OOV rows, write at least one (id, row) pair"
            )
        ids = np.empty(total, dtype=np.int64)
        rows = np.empty(total, dtype=np.int64)
        bounds = np.cumsum([0] + counts).tolist()
        for f, lo, hi in zip(files, bounds, bounds[1:]):
            _read_columns(f, ctx, ids[lo:hi], rows[lo:hi])
        pa.default_memory_pool().release_unused()  # decoded pages, else kept by the arrow allocator
        # Rows are checked per file, so that a bad row is reported with the file it is in.
        needed = int(rows.max()) + 1 + reserved
        for f, lo, hi in zip(files, bounds, bounds[1:]):
            _check_rows(rows[lo:hi], ids[lo:hi], f"file {f.name}", ctx, budget, num_embeddings, policy, reserved, needed)

        def locate(dups: np.ndarray) -> Dict[int, List[str]]:
            found: Dict[int, List[str]] = {int(d): [] for d in dups}
            for f, n in zip(files, counts):
                file_ids = np.empty(n, dtype=np.int64)
                _read_columns(f, ctx, file_ids, np.empty(n, dtype=np.int64))
                for d in dups[np.isin(dups, file_ids)]:
                    found[int(d)].append(f"{f.name} x{int((file_ids == d).sum())}")
            return found

        vocab = cls.__new__(cls)
        vocab._init(
            ids, rows, table=table, num_embeddings=num_embeddings, oov_policy=policy, oov_buckets=oov_buckets,
            config_path=config_path, source=f"directory {str(directory)!r}", locate=locate,
        )
        return vocab

    # ------------------------------------------------------------------ layout

    def _reserved_count(self) -> int:
        return {OovPolicy.error: 0, OovPolicy.default_row: 1, OovPolicy.hash: self.oov_buckets}[self.oov_policy]

    @property
    def oov_rows(self) -> int:
        """Rows reserved for unknown ids: 0 (error), 1 (default_row) or oov_buckets (hash)."""
        return self._reserved_count()

    @property
    def oov_row(self) -> int:
        """R: the first row after the vocab rows, where the reserved OOV rows start."""
        return self.max_row + 1

    def fingerprint(self) -> Dict[str, Any]:
        """``{"entries", "sha256"}`` of the (id, row) pairs in id order: equal iff every id has the same row.
        Checkpoints record it, so rows are never loaded under another vocabulary."""
        import hashlib

        ids, rows = self.entries()
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(ids.numpy(), dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(rows.numpy(), dtype=np.int64).tobytes())
        return {"entries": int(ids.numel()), "sha256": digest.hexdigest()}

    @property
    def required_rows(self) -> int:
        """Rows the table needs: vocab rows, then 1 (default_row) or `oov_buckets` (hash) rows."""
        return self.oov_row + self._reserved_count()

    def entries(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows): every raw id, sorted, and its row (int64 CPU tensors, built on each call)."""
        ids, rows = self._table.entries()
        ids, order = torch.sort(ids)
        return ids, rows[order]

    @property
    def ids(self) -> torch.Tensor:
        """The sorted raw ids (int64; built on each access, see `entries`)."""
        return self.entries()[0]

    @property
    def rows(self) -> torch.Tensor:
        """The row of each id in `ids` (int64; built on each access, see `entries`)."""
        return self.entries()[1]

    @property
    def nbytes(self) -> int:
        """Memory held by the vocab: 16 bytes per entry (21.3 when a row does not fit in int32)."""
        return self._table.nbytes

    @property
    def device(self) -> torch.device:
        return self._table.keys.device

    def __len__(self) -> int:
        return self._table.size

    def __repr__(self) -> str:
        return (
            f"Vocab(table={self.table!r}, entries={len(self)}, num_embeddings={self.num_embeddings}, "
            f"oov_policy={self.oov_policy.name}, oov_buckets={self.oov_buckets})"
        )

    def to(self, device: Union[str, torch.device]) -> "Vocab":
        """Moves the table (e.g. to the GPU that holds the batches; it is then probed with torch
        ops there); returns self."""
        self._table.to(torch.device(device))
        return self

    # ------------------------------------------------------------------ mapping

    def map(self, ids: torch.Tensor, threads: Optional[int] = None) -> torch.Tensor:
        """Rows (int64, same shape and device as `ids`) of raw ids, OOV ids per the policy.

        `threads`: threads to probe with (default ``torch.get_num_threads()``; batches below a
        million ids per thread use fewer, a small batch only the calling thread).
        """
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise VocabError(f"{_where(self.table, self.config_path)}: ids must be an integer tensor (int64), got {ids.dtype}")
        flat = ids.reshape(-1).to(device=self.device, dtype=torch.int64).contiguous()
        n = flat.numel()
        self.lookups += n
        if n == 0:
            return torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
        if threads is None:
            threads = torch.get_num_threads()
        threads = max(1, min(int(threads), n // _IDS_PER_THREAD))
        out, miss = self._table.lookup(flat, threads=threads)
        n_miss = int(miss.sum())
        if n_miss:
            self.oov_hits += n_miss
            self._fill_oov(out, flat, miss, n_miss, n)
        return out.view(ids.shape).to(ids.device)

    def _fill_oov(self, out: torch.Tensor, keys: torch.Tensor, miss: torch.Tensor, n_miss: int, n: int) -> None:
        if self.oov_policy is OovPolicy.default_row:
            out[miss] = self.oov_row
        elif self.oov_policy is OovPolicy.hash:
            out[miss] = self.oov_row + hash_ids(keys[miss]) % self.oov_buckets
        else:
            unknown = torch.unique(keys[miss])
            raise VocabError(
                f"{_where(self.table, self.config_path)}: {n_miss} of {n} ids ({unknown.numel()} distinct) are not in "
                f"the vocab, e.g. {_show(unknown[:_SHOW].tolist())}; add them to the vocab, or set "
                f"oov_policy=default_row (one shared row) or oov_policy=hash with oov_buckets > 0"
            )

    __call__ = map

    def oov_rate(self) -> float:
        """Share of looked-up ids that were not in the vocab since the last reset (0.0 if none)."""
        return self.oov_hits / self.lookups if self.lookups else 0.0

    def reset_counts(self) -> None:
        """Starts a new logging window."""
        self.lookups = 0
        self.oov_hits = 0


def _raise_duplicates(
    ids: torch.Tensor, rows: torch.Tensor, dup: torch.Tensor, source: str, ctx: str,
    locate: Optional[Callable[[np.ndarray], Dict[int, List[str]]]],
) -> None:
    dup_ids = torch.unique(ids[1:][dup])
    sample = dup_ids[:_SHOW].numpy()
    where = locate(sample) if locate is not None else {}
    parts = []
    for d in sample:
        d_rows = rows[ids == int(d)].tolist()
        files = f" in {', '.join(where[int(d)])}" if where.get(int(d)) else ""
        parts.append(f"id {int(d)} (rows {d_rows}{files})")
    raise VocabError(
        f"{ctx}: {source}, column {ID_COLUMN!r} has {dup_ids.numel()} ids that appear more than once, e.g. "
        f"{'; '.join(parts)}; each id must appear once"
    )


def _file_rows(path: Path, ctx: str) -> int:
    """Rows of one parquet file, after checking from its footer that it has the vocab columns."""
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise VocabError(f"{ctx}: cannot read parquet file {path.name} ({path}): {e}") from None
    names = list(schema.names)
    missing = [c for c in (ID_COLUMN, ROW_COLUMN) if c not in names]
    if missing:
        raise VocabError(
            f"{ctx}: file {path.name} has no column {' or '.join(repr(c) for c in missing)}; it has columns "
            f"{names}; a vocab file needs columns {ID_COLUMN!r} (raw id) and {ROW_COLUMN!r} (table row), both int64"
        )
    for c in (ID_COLUMN, ROW_COLUMN):
        if names.count(c) > 1:
            raise VocabError(f"{ctx}: file {path.name} has {names.count(c)} columns named {c!r}; keep one")
        t = schema.field(c).type
        if not pa.types.is_integer(t):
            raise VocabError(
                f"{ctx}: file {path.name}, column {c!r} has type {t}; it must be an integer column (int64 expected)"
            )
    return int(meta.num_rows)


def _read_columns(path: Path, ctx: str, ids_out: np.ndarray, rows_out: np.ndarray) -> None:
    """Copies the `id` and `row` columns of a file checked by `_file_rows` into the int64 outputs."""
    try:
        data = pq.read_table(path, columns=[ID_COLUMN, ROW_COLUMN])
    except (pa.ArrowException, OSError) as e:
        raise VocabError(f"{ctx}: cannot read parquet file {path.name} ({path}): {e}") from None
    if data.num_rows != ids_out.size:
        raise VocabError(f"{ctx}: file {path.name} changed while it was read ({data.num_rows} rows, {ids_out.size} before); retry")
    for c, out in ((ID_COLUMN, ids_out), (ROW_COLUMN, rows_out)):
        col = data.column(c)
        if col.null_count:
            raise VocabError(f"{ctx}: file {path.name}, column {c!r} has {col.null_count} null values; every entry needs an {c}")
        at = 0
        for chunk in col.chunks:
            values = _as_int64(chunk.to_numpy(zero_copy_only=False), c, f"{ctx}: file {path.name}, column {c!r}")
            out[at:at + values.size] = values
            at += values.size


# --------------------------------------------------------------------------- writing


def save_vocab(
    directory: PathLike, ids: ArrayLike, rows: ArrayLike, *, num_files: int = 1, overwrite: bool = False
) -> Path:
    """Writes a vocab directory that `Vocab.load` accepts; returns its path.

    The entries are checked like `Vocab` does and written sorted by id (so loading skips the
    sort), as ``part-00000.parquet`` ... into a temporary sibling directory that is renamed into
    place at the end: a failure leaves no half-written vocab. An existing `directory` is an
    error unless `overwrite`.
    """
    if isinstance(num_files, bool) or not isinstance(num_files, int) or num_files < 1:
        raise VocabError(f"save_vocab: num_files={num_files!r} is not allowed; use a positive integer")
    target = Path(os.path.expanduser(str(directory)))
    if target.exists() and not overwrite:
        raise FileExistsError(f"save_vocab: {str(directory)!r} exists; remove it or pass overwrite=True")
    checked = Vocab(ids, rows, table=target.name, source=f"save_vocab({str(directory)!r})")
    sorted_ids, sorted_rows = (t.numpy() for t in checked.entries())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Optional[Path] = None
    try:
        bounds = np.linspace(0, sorted_ids.size, num_files + 1).astype(np.int64)
        for i in range(num_files):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            part = pa.table({ID_COLUMN: pa.array(sorted_ids[lo:hi]), ROW_COLUMN: pa.array(sorted_rows[lo:hi])})
            pq.write_table(part, tmp / f"part-{i:05d}.parquet")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / target.name).exists() and not target.exists():
            os.replace(old / target.name, target)  # put the previous vocab back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- KJT mapping


class VocabMapper:
    """Replaces the raw ids of the features that have a vocab with rows, in a KeyedJaggedTensor.

    Features without a vocab pass through unchanged (values become int64 if they were not);
    keys, lengths, offsets, weights and variable batch sizes are kept. No parameters: it runs in
    the data pipeline, before the batch reaches the model.
    """

    def __init__(self, vocabs: Mapping[str, Vocab]) -> None:
        """`vocabs`: feature name -> Vocab (features of one table share one Vocab)."""
        self.vocabs: Dict[str, Vocab] = dict(vocabs)

    @classmethod
    def from_config(cls, embeddings: Any) -> "VocabMapper":
        """Loads the vocab of every table that sets one; a table feeds its ``feature_names``.

        `embeddings` is the parsed config (``validate(cfg)`` or its ``.embeddings``), used as it is,
        or an embeddings section (DictConfig, dataclass or dict), checked by `validate` first (which
        also makes tables sharing a feature share its vocab).
        """
        from recap_embed.config import EmbeddingsSpec, ParsedConfig, validate

        if isinstance(embeddings, ParsedConfig):
            embeddings = embeddings.embeddings
        if not isinstance(embeddings, EmbeddingsSpec):
            embeddings = validate(embeddings, section="embeddings", device="meta").embeddings
        vocabs: Dict[str, Vocab] = {}
        for spec in embeddings.tables:
            if spec.vocab is None:
                continue
            vocab = Vocab.load(
                spec.vocab,
                table=spec.name,
                num_embeddings=spec.num_embeddings,
                oov_policy=spec.oov_policy,
                oov_buckets=spec.oov_buckets,
                config_path=f"{spec.path}.vocab",
            )
            for f in spec.feature_names:
                vocabs.setdefault(f, vocab)  # tables sharing a feature share its vocab (a validate rule)
        return cls(vocabs)

    @property
    def tables(self) -> Dict[str, Vocab]:
        """Table name -> Vocab, e.g. to size tables whose num_embeddings is derived."""
        return {v.table: v for v in self.vocabs.values()}

    def to(self, device: Union[str, torch.device]) -> "VocabMapper":
        for v in {id(v): v for v in self.vocabs.values()}.values():
            v.to(device)
        return self

    def __call__(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        if not any(k in self.vocabs for k in keys):
            return kjt
        values = kjt.values()
        offsets = kjt.offset_per_key()
        pieces = []
        for i, k in enumerate(keys):
            seg = values[offsets[i]:offsets[i + 1]]
            pieces.append(self.vocabs[k].map(seg) if k in self.vocabs else seg.to(torch.int64))
        if offsets[-1] < values.numel():  # values past the last key (padding) stay as they are
            pieces.append(values[offsets[-1]:].to(torch.int64))
        stride_kwargs: Dict[str, Any] = (
            {"stride_per_key_per_rank": kjt.stride_per_key_per_rank()}
            if kjt.variable_stride_per_key()
            else {"stride": kjt.stride()}
        )
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(pieces),
            weights=kjt.weights_or_none(),
            lengths=kjt.lengths(),
            offsets=kjt.offsets(),
            length_per_key=kjt.length_per_key(),
            offset_per_key=offsets,
            inverse_indices=kjt.inverse_indices_or_none(),
            **stride_kwargs,
        )

    def oov_rates(self) -> Dict[str, float]:
        """Table name -> OOV rate since the last reset, for logging."""
        return {name: v.oov_rate() for name, v in self.tables.items()}

    def reset_counts(self) -> None:
        for v in self.tables.values():
            v.reset_counts()
