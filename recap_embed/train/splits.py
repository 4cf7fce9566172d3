"""The app's splits in memory: which files they come from, the validation rows held out of the
training split, and the discrete columns encoded with codes fitted on the training rows only
(so validation and eval see training's codes, and a value training lacks gets the unseen code).

Reading and checking one file is `own_data`'s job; generating the synthetic log is `data`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig

from recap_embed.config import ConfigError

from .config import DataSource
from .data import Examples
from .own_data import Columns, DataError, DiscreteCodes, read_split

__all__ = ["data_paths", "read_splits"]

log = logging.getLogger("recap_embed.train")


def data_paths(data: Any) -> Dict[str, str]:
    """{"train": path, "eval": path} of the `data` section: the synthetic log's files under
    `data.dir`, or the Parquet files or directories it names."""
    if data.source == DataSource.synthetic:
        return {"train": str(Path(data.dir) / "train.parquet"), "eval": str(Path(data.dir) / "eval.parquet")}
    if not data.train_path or not data.eval_path:
        raise ConfigError("data.source=parquet needs data.train_path and data.eval_path (parquet files or directories)")
    return {"train": str(data.train_path), "eval": str(data.eval_path)}


def read_splits(cfg: DictConfig, rank: int) -> Tuple[Dict[str, Examples], DiscreteCodes, Dict[str, Dict[str, float]]]:
    """Read the splits (the synthetic log must exist already), check them, hold out the validation
    rows and encode the discrete columns with codes fitted on the training rows.

    Returns the examples per split (`train`, `validation` when held out, `eval`; raw ids,
    codes), the codes, and per split the share of rows per column whose value training lacks.
    """
    data = cfg.data
    paths = data_paths(data)
    columns = Columns.from_config(data)
    tables = {"train": read_split(paths["train"], columns, "data.train_path"), "eval": read_split(paths["eval"], columns, "data.eval_path")}
    held = _hold_out_validation(tables, columns, data, paths["train"])
    batch = int(cfg.train.batch_size)
    if tables["train"].num_rows < batch:
        after = f" after holding out {held} for validation (data.validation_fraction)" if held else ""
        raise DataError(
            f"{paths['train']}: {tables['train'].num_rows} training rows{after} are fewer than train.batch_size={batch}, "
            f"so no full batch trains; lower train.batch_size"
        )
    codes = DiscreteCodes.fit(tables["train"], columns.discrete)
    examples: Dict[str, Examples] = {}
    unseen: Dict[str, Dict[str, float]] = {}
    for split, table in tables.items():
        discrete, unseen[split] = codes.encode(table, paths["eval"] if split == "eval" else paths["train"])
        examples[split] = Examples(
            torch.from_numpy(table.column(columns.user).to_numpy().copy()),
            torch.from_numpy(table.column(columns.item).to_numpy().copy()),
            torch.from_numpy(discrete),
            torch.from_numpy(table.column(columns.label).to_numpy().copy()),
        )
    if rank == 0:
        for split in ("validation", "eval"):
            if split in unseen and columns.discrete:
                log.info("%s: rows with a discrete value the training split lacks: %s", split, ", ".join(f"{c} {r:.2%}" for c, r in unseen[split].items()))
    return examples, codes, unseen


def _hold_out_validation(tables: Dict[str, pa.Table], columns: Columns, data: Any, train_path: str) -> int:
    """Move `data.validation_fraction` of the training rows (a seeded draw, kept in file order)
    into ``tables["validation"]``; returns how many. Both classes must be among them."""
    n = tables["train"].num_rows
    held = int(round(float(data.validation_fraction) * n))
    if held:
        order = np.random.default_rng(int(data.seed)).permutation(n)
        train = tables["train"]
        tables["validation"] = train.take(np.sort(order[:held]))
        tables["train"] = train.take(np.sort(order[held:]))
        labels = tables["validation"].column(columns.label).to_numpy()
        if labels.min() == labels.max():
            raise DataError(
                f"{train_path}: the {held} rows held out for validation (data.validation_fraction={data.validation_fraction}) "
                f"all have label {int(labels[0])}; hold out more rows, or set data.validation_fraction=0"
            )
    elif float(data.validation_fraction) > 0:
        raise DataError(f"{train_path}: data.validation_fraction={data.validation_fraction} of its {n} rows holds out no row; raise it, or set 0")
    return held
