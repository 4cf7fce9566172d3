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

Beside it: `recap_embed.io.vocab_mapper` (a batch's features through their tables' vocabs),
`recap_embed.io._vocab_files` (the parquet files) and `recap_embed.io._vocab_checks` (the checks
and `VocabError`, shared by both).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from recap_embed.config.schema import OovPolicy

from ._id_table import IdTable
from ._vocab_checks import (
    ID_COLUMN,
    ROW_COLUMN,
    SHOW,
    ArrayLike,
    PathLike,
    VocabError,
    as_int64,
    check_layout,
    check_rows,
    reserved_rows,
    row_budget,
    show,
    where,
)
from ._vocab_files import Locator, locate_duplicates, read_vocab_files, vocab_files, write_parts

__all__ = ["Vocab", "VocabError", "VocabMapper", "hash_ids", "save_vocab"]

#: Batches below this many ids per thread are mapped on the calling thread alone.
_IDS_PER_THREAD = 1 << 20


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
        locate: Optional[Locator],
    ) -> None:
        """`locate` finds the files of duplicate ids."""
        self.table = table
        self.config_path = config_path
        ctx = where(table, config_path)
        self.oov_policy, self.oov_buckets, reserved = check_layout(oov_policy, oov_buckets, num_embeddings, ctx)
        source = source or "the given arrays"
        id_arr = as_int64(ids, ID_COLUMN, f"{ctx}: {source}")
        row_arr = as_int64(rows, ROW_COLUMN, f"{ctx}: {source}")
        if id_arr.shape != row_arr.shape:
            raise VocabError(f"{ctx}: {source} has {id_arr.size} ids but {row_arr.size} rows; give one row per id")
        if id_arr.size == 0:
            raise VocabError(f"{ctx}: {source} has no entries; a vocab needs at least one (id, row) pair")
        check_rows(row_arr, id_arr, source, ctx, row_budget(num_embeddings, reserved),
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
        ctx = where(table, config_path)
        given = str(directory)
        files = vocab_files(Path(os.path.expanduser(given)), given, ctx)
        policy, oov_buckets, reserved = check_layout(oov_policy, oov_buckets, num_embeddings, ctx)
        budget = row_budget(num_embeddings, reserved)
        ids, rows, counts = read_vocab_files(files, given, ctx)
        # Rows are checked per file, so that a bad row is reported with the file it is in.
        needed = int(rows.max()) + 1 + reserved
        bounds = np.cumsum([0] + counts).tolist()
        for f, lo, hi in zip(files, bounds, bounds[1:]):
            check_rows(rows[lo:hi], ids[lo:hi], f"file {f.name}", ctx, budget, num_embeddings, policy, reserved, needed)
        vocab = cls.__new__(cls)
        vocab._init(
            ids, rows, table=table, num_embeddings=num_embeddings, oov_policy=policy, oov_buckets=oov_buckets,
            config_path=config_path, source=f"directory {given!r}", locate=locate_duplicates(files, counts, ctx),
        )
        return vocab

    # ------------------------------------------------------------------ layout

    @property
    def oov_rows(self) -> int:
        """Rows reserved for unknown ids: 0 (error), 1 (default_row) or oov_buckets (hash)."""
        return reserved_rows(self.oov_policy, self.oov_buckets)

    @property
    def oov_row(self) -> int:
        """R: the first row after the vocab rows, where the reserved OOV rows start."""
        return self.max_row + 1

    def fingerprint(self) -> Dict[str, Any]:
        """``{"entries", "sha256"}`` of the (id, row) pairs in id order: equal iff every id has the same row.
        Checkpoints record it, so rows are never loaded under another vocabulary."""
        ids, rows = self.entries()
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(ids.numpy(), dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(rows.numpy(), dtype=np.int64).tobytes())
        return {"entries": int(ids.numel()), "sha256": digest.hexdigest()}

    @property
    def required_rows(self) -> int:
        """Rows the table needs: vocab rows, then 1 (default_row) or `oov_buckets` (hash) rows."""
        return self.oov_row + reserved_rows(self.oov_policy, self.oov_buckets)

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
            raise VocabError(f"{where(self.table, self.config_path)}: ids must be an integer tensor (int64), got {ids.dtype}")
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
                f"{where(self.table, self.config_path)}: {n_miss} of {n} ids ({unknown.numel()} distinct) are not in "
                f"the vocab, e.g. {show(unknown[:SHOW].tolist())}; add them to the vocab, or set "
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
    locate: Optional[Locator],
) -> None:
    dup_ids = torch.unique(ids[1:][dup])
    sample = dup_ids[:SHOW].numpy()
    found = locate(sample) if locate is not None else {}
    parts = []
    for d in sample:
        d_rows = rows[ids == int(d)].tolist()
        files = f" in {', '.join(found[int(d)])}" if found.get(int(d)) else ""
        parts.append(f"id {int(d)} (rows {d_rows}{files})")
    raise VocabError(
        f"{ctx}: {source}, column {ID_COLUMN!r} has {dup_ids.numel()} ids that appear more than once, e.g. "
        f"{'; '.join(parts)}; each id must appear once"
    )


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
        write_parts(tmp, sorted_ids, sorted_rows, num_files)
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


# --------------------------------------------------------------------------- moved names


def __getattr__(name: str) -> Any:
    # `VocabMapper` moved to recap_embed.io.vocab_mapper (which imports this module), re-exported here
    # for one release: resolved on first use, as an import at the top would make the two a cycle.
    if name == "VocabMapper":
        warnings.warn(
            "recap_embed.io.vocab.VocabMapper is deprecated: import VocabMapper from recap_embed.io.vocab_mapper",
            DeprecationWarning,
            stacklevel=2,
        )
        from .vocab_mapper import VocabMapper

        return VocabMapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
