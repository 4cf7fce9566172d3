"""The discrete-feature matrix ([batch, features] ids) that small tables and strata each read one
column of: one check that it has that shape and that every column read exists."""

from __future__ import annotations

from typing import Iterable, Tuple, Type

import torch

__all__ = ["check_columns"]


def check_columns(
    discrete: torch.Tensor, readers: Iterable[Tuple[str, str, str, int]], *, path: str, error: Type[Exception]
) -> None:
    """Raise `error` unless `discrete` is 2-D and holds the column each reader reads.

    `readers`: ``(config path, kind, name, index)`` per table or stratum; `path` names the
    section in the shape error.
    """
    if not isinstance(discrete, torch.Tensor) or discrete.dim() != 2:
        shape = list(discrete.shape) if isinstance(discrete, torch.Tensor) else type(discrete).__name__
        raise error(f"{path}: expected discrete features of shape [batch, features], got {shape}")
    width = discrete.shape[1]
    for reader_path, kind, name, index in readers:
        if index >= width:
            raise error(
                f"{reader_path}: {kind} {name!r} reads column {index} (index), but the discrete features have only "
                f"{width} columns (0..{width - 1}); widen the input or change {reader_path}.index"
            )
