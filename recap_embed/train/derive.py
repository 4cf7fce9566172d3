"""What the training app derives from the training split when the config leaves it out.

Plain Python over the data, handed to the existing builders (`SmallEmbeddings`, `Stratifiers`,
`LargeEmbeddings` through a vocab directory), so a derived table is checked like a written one:

* **Small tables** (an empty `small_embeddings` section, `data.derive.small_embeddings`): one per
  discrete column, keyed by the column name. Rows: the column's codes, i.e. its distinct training
  values plus one row for values training lacks. Dim: ``min(max_dim, max(1, round(1.6 * rows ** 0.56)))``,
  the rule of thumb fastai uses for categorical embeddings, capped by `data.derive.max_dim`
  (2 values -> 3 rows -> dim 3; 20 -> 9; 100 -> 21, capped to 16).
* **Strata** (an empty `stratifiers` section, `data.derive.stratifiers`): the
  `data.derive.strata_per_column` most frequent training values of each column (all of them when
  it has fewer; ties: the smaller value), named ``<column>=<value>`` (``auroc/gender=F``).
* **Vocabs** (a large table with neither `vocab` nor `num_embeddings`): the distinct raw ids of the
  table's features in the training rows, row ``r`` for the ``r``-th smallest id, written to
  ``<run dir>/vocabs/<table>``; ids it lacks follow the table's `oov_policy`.

The derived sections are written to the run dir as `derived.yaml`, in config form: copy them into a
preset to pin them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq

from recap_embed.files import atomic_write_text
from recap_embed.io.vocab import save_vocab

from .own_data import DataError, DiscreteCodes

__all__ = ["derived_dim", "derive_small_tables", "derive_strata", "derive_from_training", "vocab_from_ids", "write_vocab", "VOCAB_DIR"]

log = logging.getLogger("recap_embed.train")

#: Where built vocabs go, under the run dir.
VOCAB_DIR = "vocabs"


Sections = Tuple[Optional[Dict[str, Dict[str, int]]], Optional[Dict[str, Dict[str, int]]]]


def derive_from_training(cfg: Any, codes: DiscreteCodes, train: Any, vocabs: Mapping[str, Any], output_dir: Path, rank: int) -> Sections:
    """Everything the config leaves to the training split (`train`, its `Examples`): the small
    tables and strata of empty sections (as `data.derive` asks), and the vocab of each table in
    `vocabs` ({key: spec}, their paths set by `preflight.build_vocab_paths`). Rank 0 writes the
    vocabs, the codes (discrete_codes.json) and the derived sections (derived.yaml) into the run
    dir. Returns (small tables or None, strata or None), in config form."""
    d = cfg.data.derive
    small = strata = None
    if d.small_embeddings and not len(cfg.small_embeddings.get("tables") or {}):
        small = derive_small_tables(codes, int(d.max_dim))
    if d.stratifiers and not len(cfg.stratifiers.get("strata") or {}):
        strata = derive_strata(codes, int(d.strata_per_column))
    by_feature = {"user": train.user_ids.numpy(), "item": train.item_ids.numpy()}
    vocab_ids = {key: vocab_from_ids([by_feature[f] for f in spec.feature_names]) for key, spec in vocabs.items()}
    if rank == 0:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for key, spec in vocabs.items():
            write_vocab(Path(spec.vocab), vocab_ids[key], spec.path)
        atomic_write_text(output_dir / "discrete_codes.json", json.dumps(codes.to_json(), indent=2) + "\n")
        if small is not None or strata is not None:
            atomic_write_text(output_dir / "derived.yaml", as_yaml(small, strata))
        if small:
            log.info("small tables derived from the data: %s", ", ".join(f"{k} {t['num_embeddings']}x{t['embedding_dim']}" for k, t in small.items()))
        if strata:
            log.info("strata derived from the data: %s", ", ".join(strata))
    return small, strata


def derived_dim(rows: int, max_dim: int) -> int:
    """The dim of a derived small table with `rows` rows (see the module docstring)."""
    return int(min(max_dim, max(1, round(1.6 * rows**0.56))))


def _key(name: str) -> str:
    """A table or stratum key: module names cannot hold '.'."""
    return name.replace(".", "_")


def derive_small_tables(codes: DiscreteCodes, max_dim: int) -> Dict[str, Dict[str, int]]:
    """{column: {num_embeddings, embedding_dim, index}} in column order: a `small_embeddings.tables` value."""
    if max_dim < 1:
        raise DataError(f"data.derive.max_dim: {max_dim} is not allowed; use a positive dim")
    return {
        _key(name): {"num_embeddings": codes.rows(i), "embedding_dim": derived_dim(codes.rows(i), max_dim), "index": i}
        for i, name in enumerate(codes.columns)
    }


def derive_strata(codes: DiscreteCodes, per_column: int) -> Dict[str, Dict[str, int]]:
    """{"<column>=<value>": {index, value}}: a `stratifiers.strata` value (value is the code)."""
    if per_column < 0:
        raise DataError(f"data.derive.strata_per_column: {per_column} is not allowed; use 0 or more strata per column")
    strata: Dict[str, Dict[str, int]] = {}
    for i, name in enumerate(codes.columns):
        counts = codes.counts[i]
        # Most rows first; a stable sort keeps the smaller code first among ties.
        for code in np.argsort(-counts, kind="stable")[:per_column].tolist():
            strata[f"{name}={codes.label(i, code)}"] = {"index": i, "value": int(code)}
    return strata


def vocab_from_ids(ids: Sequence[np.ndarray]) -> np.ndarray:
    """The distinct ids of the arrays, sorted: id ``ids[r]`` gets row ``r``."""
    return np.unique(np.concatenate([np.asarray(a, dtype=np.int64) for a in ids])) if len(ids) else np.empty(0, np.int64)


def write_vocab(directory: Path, ids: np.ndarray, table_path: str) -> str:
    """Write the vocab of `ids` (rows 0..n-1) to `directory`; an identical one there is kept.

    A different vocab already in the directory (a rerun in the same run dir over other training
    data) is an error: its rows may be what a checkpoint there was trained with.
    """
    directory = Path(directory)
    rows = np.arange(ids.size, dtype=np.int64)
    if directory.exists():
        try:
            existing = pq.read_table(directory).sort_by("id")
            same = existing.num_rows == ids.size and np.array_equal(existing.column("id").to_numpy(), ids) and np.array_equal(
                existing.column("row").to_numpy(), rows
            )
        except Exception:  # noqa: BLE001 - unreadable counts as different
            same = False
        if not same:
            raise FileExistsError(
                f"{table_path}.vocab: {directory} already holds a vocab built from other training data (an earlier "
                f"run in this directory); it is kept: set another hydra.run.dir, or set {table_path}.vocab={directory} to use it"
            )
        log.info("%s: reusing the vocab built earlier in this run dir (%d ids)", table_path, ids.size)
        return "reused"
    save_vocab(directory, ids, rows)
    log.info("%s: vocab of %d ids built from the training split -> %s", table_path, ids.size, directory)
    return "built"


def check_given_small_tables(tables: Sequence[Any], codes: DiscreteCodes, max_codes: Mapping[int, int]) -> None:
    """Tables the config gives: each must have a row for every code its column takes in any split.

    `tables` are `SmallTable`s; `max_codes` is the largest code of each column over all splits.
    """
    for t in tables:
        if t.index >= len(codes.columns):
            continue  # validate reported it
        top = max_codes.get(t.index, -1)
        if top >= t.num_embeddings:
            name, i = codes.columns[t.index], t.index
            unseen = f" (code {codes.unseen_code(i)}: values the training split lacks)" if top == codes.unseen_code(i) else ""
            raise DataError(
                f"{t.path}.num_embeddings: {t.num_embeddings} rows are too few for column {name!r} (index {t.index}), "
                f"whose codes go up to {top}{unseen}; set num_embeddings >= {top + 1}, or leave small_embeddings "
                f"empty to derive its tables (codes: discrete_codes.json in the run dir)"
            )


def describe_given_strata(strata: Sequence[Any], codes: DiscreteCodes) -> List[str]:
    """Warnings for strata the config gives whose `value` (a code) reads differently from the raw value."""
    notes = []
    for s in strata:
        if s.index >= len(codes.columns):
            continue
        name = codes.columns[s.index]
        if s.value < 0 or s.value >= codes.rows(s.index):
            notes.append(
                f"{s.path}.value: {s.value} is no code of column {name!r} (codes 0..{codes.rows(s.index) - 1}); "
                f"stratum {s.name!r} has no rows and its metrics are NaN"
            )
            continue
        label = codes.label(s.index, s.value)
        if label != str(s.value):
            notes.append(
                f"{s.path}.value: {s.value} is the code of value {label!r} of column {name!r} (values become codes "
                f"in sorted order: discrete_codes.json in the run dir); stratum {s.name!r} is {name}={label}"
            )
    return notes


def as_yaml(small: Optional[Mapping[str, Any]], strata: Optional[Mapping[str, Any]]) -> str:
    """The derived sections in config form (derived.yaml)."""
    import yaml

    body: Dict[str, Any] = {}
    if small is not None:
        body["small_embeddings"] = {"tables": dict(small)}
    if strata is not None:
        body["stratifiers"] = {"strata": dict(strata)}
    head = "# Derived by recap-embed-train from the training split (data.derive); stratum values and small-table\n# rows are codes (discrete_codes.json). Copy a section into a preset to pin it.\n"
    return head + yaml.safe_dump(body, sort_keys=False)
