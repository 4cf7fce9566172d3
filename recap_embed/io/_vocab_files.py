"""The parquet side of a vocab: which files a directory holds, their columns, reading, writing.

A vocab directory holds ``*.parquet`` files with an ``id`` and a ``row`` integer column. Every
file's columns are checked from its footer before anything is read, then the columns are read
straight into preallocated int64 arrays (peak memory: the vocab plus one file's columns). Kept
apart from `recap_embed.io.vocab.Vocab` so the file format lives in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._vocab_checks import ID_COLUMN, ROW_COLUMN, VocabError, as_int64

__all__ = ["Locator", "locate_duplicates", "read_vocab_files", "vocab_files", "write_parts"]

#: Finds the files (and how often) each of the given duplicate ids appears in.
Locator = Callable[[np.ndarray], Dict[int, List[str]]]


def vocab_files(path: Path, given: str, ctx: str) -> List[Path]:
    """The ``*.parquet`` files directly in `path`, sorted; names starting with '.' or '_' are
    skipped, as Spark and Hive do. `given`: the directory as the user wrote it, for messages."""
    if not path.exists():
        raise VocabError(f"{ctx}: directory {given!r} does not exist; set vocab to a directory of parquet files")
    if not path.is_dir():
        raise VocabError(f"{ctx}: {given!r} is not a directory; set vocab to a directory of parquet files")
    files = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise VocabError(
            f"{ctx}: directory {given!r} has no *.parquet files; "
            f"a vocab is parquet files with columns {ID_COLUMN!r} and {ROW_COLUMN!r} (int64)"
        )
    return files


def read_vocab_files(files: List[Path], given: str, ctx: str) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """(ids, rows, entries per file) of every file, in file order; only the two columns are read."""
    counts = [_file_rows(f, ctx) for f in files]
    total = sum(counts)
    if total == 0:
        raise VocabError(
            f"{ctx}: the {len(files)} parquet file(s) in {given!r} have 0 rows; "
            f"an empty vocab would send every id to the OOV rows, write at least one (id, row) pair"
        )
    ids = np.empty(total, dtype=np.int64)
    rows = np.empty(total, dtype=np.int64)
    bounds = np.cumsum([0] + counts).tolist()
    for f, lo, hi in zip(files, bounds, bounds[1:]):
        _read_columns(f, ctx, ids[lo:hi], rows[lo:hi])
    pa.default_memory_pool().release_unused()  # decoded pages, else kept by the arrow allocator
    return ids, rows, counts


def locate_duplicates(files: List[Path], counts: List[int], ctx: str) -> Locator:
    """A `Locator` over `files` (read again only when a duplicate is reported)."""

    def locate(dups: np.ndarray) -> Dict[int, List[str]]:
        found: Dict[int, List[str]] = {int(d): [] for d in dups}
        for f, n in zip(files, counts):
            file_ids = np.empty(n, dtype=np.int64)
            _read_columns(f, ctx, file_ids, np.empty(n, dtype=np.int64))
            for d in dups[np.isin(dups, file_ids)]:
                found[int(d)].append(f"{f.name} x{int((file_ids == d).sum())}")
        return found

    return locate


def write_parts(directory: Path, ids: np.ndarray, rows: np.ndarray, num_files: int) -> None:
    """Writes ``part-00000.parquet`` ... into `directory`, the entries split evenly in their order."""
    bounds = np.linspace(0, ids.size, num_files + 1).astype(np.int64)
    for i in range(num_files):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        part = pa.table({ID_COLUMN: pa.array(ids[lo:hi]), ROW_COLUMN: pa.array(rows[lo:hi])})
        pq.write_table(part, directory / f"part-{i:05d}.parquet")


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
            values = as_int64(chunk.to_numpy(zero_copy_only=False), c, f"{ctx}: file {path.name}, column {c!r}")
            out[at:at + values.size] = values
            at += values.size
