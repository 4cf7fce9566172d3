"""Parquet splits for the training app: read the columns it needs, check them up front, encode.

Every split (the synthetic log's too) goes through here, so each rule has one place:

* columns: the two id columns, the label column and the discrete columns, named by `data.*`;
* ids are integers with no nulls (any integer width; uint64 keeps its 64 bits);
* labels are 0/1 (integers, booleans or floats 0.0/1.0), no nulls, both classes in the split;
* discrete columns hold integers, strings, booleans or categoricals (floats only when every value
  is a whole number, as pandas writes integer columns with nulls); null is a value like any other.

A bad split stops the job before any table is built, with one line naming the file, the column,
the setting that names the column, what is wrong and what is allowed.

Discrete values become codes with `DiscreteCodes`: fitted on the training rows, code ``c`` is the
``c``-th smallest training value (nulls last), and code ``len(values)`` stands for every value the
training rows do not have (seen only in validation or eval). `to_json` is what the run dir keeps
(`discrete_codes.json`), so a code in a checkpoint, a table row or a stratum can be read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap_embed.errors import DataError

__all__ = ["Columns", "DataError", "DiscreteCodes", "read_split"]

#: Values quoted in a message.
_SHOW = 3


@dataclass(frozen=True)
class Columns:
    """Which column means what, and the settings that name them (for messages)."""

    user: str = "user_id"
    item: str = "item_id"
    label: str = "click"
    discrete: Tuple[str, ...] = ()

    @classmethod
    def from_config(cls, data: Any) -> "Columns":
        """From the app's `data` section."""
        return cls(str(data.user_column), str(data.item_column), str(data.label_column), tuple(str(c) for c in data.discrete_columns))

    def settings(self) -> Dict[str, str]:
        """{column: the setting that names it}, in file order of the checks."""
        out = {self.user: "data.user_column", self.item: "data.item_column", self.label: "data.label_column"}
        for c in self.discrete:
            out.setdefault(c, "data.discrete_columns")
        return out

    def check_distinct(self) -> None:
        names = [self.user, self.item, self.label, *self.discrete]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(
                f"data: column(s) {repeated} named twice among data.user_column, data.item_column, data.label_column "
                f"and data.discrete_columns ({names}); each column has one role"
            )


def _describe(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return f"categorical of {t.value_type}"
    return str(t)


def _show(values: Sequence[Any]) -> str:
    return ", ".join(repr(v) for v in values[:_SHOW]) + (", ..." if len(values) > _SHOW else "")


def _open(path: str, setting: str) -> Tuple[Any, List[str]]:
    """The parquet dataset at `path` (a file or a directory of files) and its files."""
    import pyarrow.dataset as ds

    p = Path(path)
    if not p.exists():
        raise DataError(f"{setting}: {path} does not exist; set it to a parquet file or a directory of parquet files")
    try:
        dataset = ds.dataset(str(p), format="parquet")
        files = list(dataset.files)
    except (pa.ArrowException, OSError) as e:  # unreadable footer, not parquet, permissions
        raise DataError(f"{setting}: cannot read parquet at {path}: {' '.join(str(e).split())}") from None
    if not files:
        raise DataError(f"{setting}: {path} is a directory with no parquet files")
    return dataset, files


def read_split(path: str, columns: Columns, setting: str) -> pa.Table:
    """The split at `path` (named by `setting`, e.g. data.train_path): the needed columns, checked.

    Returns a table with the id columns as int64, the label as float32 and the discrete columns
    normalised (`_discrete_array`): what `DiscreteCodes` and `Examples` are built from.
    """
    dataset, files = _open(path, setting)
    where = files[0] if len(files) == 1 else f"{path} ({len(files)} files)"
    schema = dataset.schema
    settings = columns.settings()
    missing = [c for c in settings if c not in schema.names]
    if missing:
        hint = "; set data.discrete_columns to the discrete columns of your data" if any(settings[c] == "data.discrete_columns" for c in missing) else ""
        which = ", ".join(f"{c!r} ({settings[c]})" for c in missing)
        raise DataError(f"{where}: no column {which}; the file has {schema.names}{hint}")
    try:
        table = dataset.to_table(columns=list(settings))
    except (pa.ArrowException, OSError) as e:  # files whose schemas disagree, truncated files
        raise DataError(f"{setting}: cannot read parquet at {path}: {' '.join(str(e).split())}") from None
    if table.num_rows == 0:
        raise DataError(f"{where}: has no rows; {setting} needs at least one example")
    out: Dict[str, pa.Array] = {}
    for name in (columns.user, columns.item):
        out[name] = _id_array(table.column(name), where, name, settings[name])
    out[columns.label] = _label_array(table.column(columns.label), where, columns.label)
    for name in columns.discrete:
        out[name] = _discrete_array(table.column(name), where, name)
    return pa.table(out)


def _id_array(col: pa.ChunkedArray, where: str, name: str, setting: str) -> pa.Array:
    t = col.type
    if not pa.types.is_integer(t):
        raise DataError(
            f"{where}: column {name!r} ({setting}) holds {_describe(t)} values; ids must be integers "
            f"(raw 64-bit ids, mapped to rows by the table's vocab); convert the column to int64"
        )
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: column {name!r} ({setting}) has {col.null_count} null ids (first at row {first}); every example needs an id")
    arr = col.combine_chunks()
    if t == pa.uint64():  # the same 64 bits as the int64 of a hash
        return pa.Array.from_buffers(pa.int64(), len(arr), arr.buffers(), offset=arr.offset)
    return arr.cast(pa.int64())


def _label_array(col: pa.ChunkedArray, where: str, name: str) -> pa.Array:
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)):
        raise DataError(f"{where}: column {name!r} (data.label_column) holds {_describe(t)} values; labels must be 0 or 1 (integer, boolean or float)")
    if col.null_count:
        raise DataError(f"{where}: column {name!r} (data.label_column) has {col.null_count} null labels; every example needs a label 0 or 1")
    values = col.combine_chunks().cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = (values != 0) & (values != 1)
    if bad.any():
        shown = [int(v) if float(v).is_integer() else float(v) for v in np.unique(values[bad])]
        raise DataError(
            f"{where}: column {name!r} (data.label_column) has {int(bad.sum())} labels other than 0 and 1 "
            f"({_show(shown)}); labels must be 0 or 1 (e.g. click = rating >= 4)"
        )
    positives = int(values.sum())
    if positives in (0, values.size):
        raise DataError(
            f"{where}: column {name!r} (data.label_column): all {values.size} labels are {int(positives > 0)}; "
            f"a split needs both classes (AUC is undefined otherwise)"
        )
    return pa.array(values.astype(np.float32))


def _discrete_array(col: pa.ChunkedArray, where: str, name: str) -> pa.Array:
    """int64, large_string or bool values (nulls kept): categoricals decoded, whole floats as ints."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if pa.types.is_integer(t):
        try:
            return col.combine_chunks().cast(pa.int64())
        except pa.ArrowInvalid:  # uint64 values beyond int64
            raise DataError(f"{where}: column {name!r} (data.discrete_columns) has {t} values beyond 2**63-1; use int64 or strings") from None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.combine_chunks().cast(pa.large_string())
    if pa.types.is_boolean(t):
        return col.combine_chunks()
    if pa.types.is_floating(t):
        values = col.combine_chunks()
        present = values.drop_null().to_numpy(zero_copy_only=False)
        fraction = present[~np.isfinite(present) | (present != np.round(present))]
        if fraction.size:
            raise DataError(
                f"{where}: column {name!r} (data.discrete_columns) holds {t} values that are not whole numbers "
                f"({_show(np.unique(fraction).tolist())}); discrete columns hold integers, strings, booleans or "
                f"categoricals: bucket a continuous column first"
            )
        return values.cast(pa.int64())
    raise DataError(
        f"{where}: column {name!r} (data.discrete_columns) holds {_describe(t)} values; discrete columns hold "
        f"integers, strings, booleans or categoricals"
    )


def _kind(t: pa.DataType) -> str:
    return "integers" if pa.types.is_integer(t) else "booleans" if pa.types.is_boolean(t) else "strings"


class DiscreteCodes:
    """The code of every value of each discrete column, fitted on the training rows.

    ``values[i]`` holds column i's distinct training values in code order (sorted, null last);
    ``counts[i]`` the training rows of each. Code ``len(values[i])`` is "not in training".
    """

    def __init__(self, columns: Sequence[str], values: Sequence[pa.Array], counts: Sequence[np.ndarray]) -> None:
        self.columns = tuple(columns)
        self.values = tuple(values)
        self.counts = tuple(np.asarray(c, dtype=np.int64) for c in counts)

    @classmethod
    def fit(cls, table: pa.Table, columns: Sequence[str]) -> "DiscreteCodes":
        values, counts = [], []
        for name in columns:
            col = table.column(name).combine_chunks()
            distinct = pc.unique(col)
            distinct = distinct.take(pc.array_sort_indices(distinct, null_placement="at_end"))
            codes = pc.index_in(col, value_set=distinct, skip_nulls=False).to_numpy(zero_copy_only=False)
            values.append(distinct)
            counts.append(np.bincount(codes.astype(np.int64), minlength=len(distinct)))
        return cls(columns, values, counts)

    def rows(self, i: int) -> int:
        """Codes of column i, the "not in training" code included: the rows its table needs."""
        return len(self.values[i]) + 1

    def unseen_code(self, i: int) -> int:
        return len(self.values[i])

    def label(self, i: int, code: int) -> str:
        """A printable value: `M`, `25`, `true`, `null`, or `<unseen>`."""
        if code == self.unseen_code(i):
            return "<unseen>"
        value = self.values[i][code].as_py()
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    def encode(self, table: pa.Table, where: str) -> Tuple[np.ndarray, Dict[str, float]]:
        """Codes [N, F] (int64) of a split, and the share of its rows whose value training lacks, per column."""
        out = np.empty((table.num_rows, len(self.columns)), dtype=np.int64)
        unseen: Dict[str, float] = {}
        for i, name in enumerate(self.columns):
            col = table.column(name).combine_chunks()
            if _kind(col.type) != _kind(self.values[i].type) and len(self.values[i]):
                raise DataError(
                    f"{where}: column {name!r} (data.discrete_columns) holds {_kind(col.type)}, but the training "
                    f"data's holds {_kind(self.values[i].type)}; every split must use the same type"
                )
            codes = pc.index_in(col, value_set=self.values[i].cast(col.type), skip_nulls=False)
            missing = codes.null_count
            out[:, i] = pc.fill_null(codes, self.unseen_code(i)).to_numpy(zero_copy_only=False)
            unseen[name] = missing / max(1, table.num_rows)
        return out, unseen

    def to_json(self) -> Dict[str, Any]:
        return {
            "rule": "code c is the c-th smallest training value (null last); the last code is every value training lacks",
            "columns": [
                {
                    "name": name,
                    "index": i,
                    "type": _kind(self.values[i].type),
                    "values": self.values[i].to_pylist(),
                    "train_rows": self.counts[i].tolist(),
                    "unseen_code": self.unseen_code(i),
                }
                for i, name in enumerate(self.columns)
            ],
        }
