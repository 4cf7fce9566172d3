"""Sizes in words, for messages and reports."""

from __future__ import annotations

from typing import Union


def format_bytes(n: Union[int, float]) -> str:
    """1,023 B, 6.5 MiB, 68.0 GiB, 21.7 TiB."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n):,} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError  # pragma: no cover


__all__ = ["format_bytes"]
