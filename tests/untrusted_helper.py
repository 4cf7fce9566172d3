"""Callables for tests/test_untrusted.py: each leaves a file behind when it is called, so a test
can prove that a refused `_target_` never ran. Import name: `untrusted_helper` (tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Where the callables below write their marker (set by the test).
MARKER_ENV = "RECAP_EMBED_TEST_MARKER"


def touch(path: str) -> str:
    Path(path).write_text("called\n")
    return path


def _mark() -> None:
    touch(os.environ[MARKER_ENV])


def make_stratifiers(**kwargs: Any) -> Any:
    """A user's own factory for the `stratifiers` section."""
    from recap_embed.modules import Stratifiers

    _mark()
    return Stratifiers(**kwargs)


def make_small_then_stop(**kwargs: Any) -> Any:
    """Marks that it was called, then stops the job (a user error) before anything is trained."""
    from recap_embed.config import ConfigError

    _mark()
    raise ConfigError("untrusted_helper.make_small_then_stop was called")


class Payload:
    """Pickles to a call of `touch`: unpickling it with full pickle would write the marker."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (touch, (self.path,))
