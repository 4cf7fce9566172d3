"""What building, reading and writing a vocab all check, and the error they raise.

`recap_embed.io.vocab` (the `Vocab`) and `recap_embed.io._vocab_files` (its parquet files) both
need these: the OOV layout of a table (policy, buckets, the rows reserved after the vocab rows),
ids and rows as int64 arrays, and rows inside ``[0, num_embeddings)``. Kept below both, so
neither imports the other's internals and every message reads the same.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from recap_embed.config.schema import OovPolicy
from recap_embed.errors import UserError

__all__ = [
    "ArrayLike",
    "ID_COLUMN",
    "PathLike",
    "ROW_COLUMN",
    "SHOW",
    "VocabError",
    "as_int64",
    "check_layout",
    "check_rows",
    "reserved_rows",
    "row_budget",
    "show",
    "where",
]

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[int]]

#: Columns of a vocab file.
ID_COLUMN = "id"
ROW_COLUMN = "row"

SHOW = 5  # ids shown in an error message


class VocabError(UserError, ValueError):
    """A vocab that cannot be used, or an id it cannot map; the message says what to change."""


def where(table: str, config_path: str) -> str:
    """The start of every message about one table's vocab."""
    return f"vocab of table {table!r}" + (f" ({config_path})" if config_path else "")


def show(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def as_int64(values: ArrayLike, what: str, ctx: str) -> np.ndarray:
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


def reserved_rows(policy: OovPolicy, buckets: int) -> int:
    """Rows reserved for unknown ids after the vocab rows: 0 (error), 1 (default_row) or `buckets` (hash)."""
    return {OovPolicy.error: 0, OovPolicy.default_row: 1, OovPolicy.hash: buckets}[policy]


def row_budget(num_embeddings: Optional[int], reserved: int) -> Optional[int]:
    """Rows a vocab may use: num_embeddings less the OOV rows that must follow them."""
    return None if num_embeddings is None else num_embeddings - reserved


def check_rows(rows: np.ndarray, ids: np.ndarray, source: str, ctx: str, budget: Optional[int],
               num_embeddings: Optional[int], policy: OovPolicy, reserved: int, needed: Optional[int] = None) -> None:
    """Negative rows and rows past the budget, reported with the ids that carry them.

    `needed`: the num_embeddings the whole vocab needs (default: what these rows need).
    """
    if rows.size == 0:
        return
    bad = rows < 0
    if bad.any():
        idx = np.flatnonzero(bad)[:SHOW]
        pairs = ", ".join(f"id {ids[i]} -> row {rows[i]}" for i in idx)
        raise VocabError(
            f"{ctx}: {source}, column {ROW_COLUMN!r} has {int(bad.sum())} negative rows ({pairs}); "
            f"rows must be in [0, num_embeddings)"
        )
    if budget is not None:
        bad = rows >= budget
        if bad.any():
            idx = np.flatnonzero(bad)[:SHOW]
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


def check_layout(
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
    reserved = reserved_rows(policy, buckets)
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
