"""How console scripts end on a bad input: one clear line, no traceback (unless asked)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Dict, Iterator, Optional

from recap_embed.config.errors import ConfigError


class UserError(Exception):
    """Marker base of errors whose message is the whole story: a bad input (a config value, a
    missing or corrupt file), not a bug. Console scripts print the message alone.

    Errors are classified where they are raised: a ValueError or OSError that is not one of these
    is a bug (or an unexpected failure) and keeps its traceback."""


class InputPathError(UserError, OSError):
    """A path the user gave is missing, of the wrong kind (a file for a directory) or unusable."""


class DataError(UserError, ValueError):
    """The contents of the user's data cannot be trained on (labels, empty splits, codes out of range)."""


#: The exit status of a command stopped by a user error (a crash is 1).
EXIT_USER_ERROR = 2

#: Errors that mean "the input is wrong": reported as their message alone.
USER_ERRORS = (ConfigError, UserError)

#: Attribute set on an exception raised by a multi-rank agreement (``pretrained.agree``):
#: ``{global rank: "Type: message"}`` of every rank that failed.
RANK_FAILURES = "rank_failures"


def current_rank() -> int:
    """This process's global rank from torchrun's RANK (0 when unset or malformed)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def should_report(error: BaseException, rank: Optional[int] = None) -> bool:
    """Whether this rank prints `error`: the cause of a failure is printed once in a job.

    Without agreement information every rank reports its own error. After an agreement, a rank
    that failed reports its error unless a lower rank failed with the same message; a rank that
    did not fail reports nothing (rank 0 logs one line pointing at the failed ranks instead).
    """
    failures: Optional[Dict[int, str]] = getattr(error, RANK_FAILURES, None)
    if not failures:
        return True
    rank = current_rank() if rank is None else rank
    mine = failures.get(rank)
    return mine is not None and not any(r < rank and m == mine for r, m in failures.items())


def full_traceback_requested() -> bool:
    """HYDRA_FULL_ERROR=1, as in the Hydra apps: every error keeps its traceback."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_error_status(error: BaseException, emit: Callable[[str], None], code: int = EXIT_USER_ERROR) -> Optional[int]:
    """Report `error` through `emit` (one line) and return the exit status it ends the command
    with, or None when it is a bug, which the caller re-raises with its traceback.

    In a multi-process job the cause is reported once: by the lowest rank that failed with it
    (rank 0 when all failed alike, the failed rank when only it did). Ranks that stop only because
    another rank failed return `code` too, rank 0 saying which rank failed.
    """
    failures = getattr(error, RANK_FAILURES, None) or {}
    rank = current_rank()
    peer_only = bool(failures) and rank not in failures
    if not (isinstance(error, USER_ERRORS) or peer_only):
        return None
    if peer_only:
        if rank == 0:
            ranks = ", ".join(str(r) for r in sorted(failures))
            emit(f"stopped: rank {ranks} failed (its error is reported by that rank)")
    elif getattr(error, "rank0_only", False) and rank != 0:
        pass  # the same stop on every rank: rank 0 says it
    elif should_report(error, rank):
        prefix = f"[rank {rank}] " if rank != 0 and os.environ.get("RANK") is not None else ""
        emit(f"{prefix}{error}")
    return int(getattr(error, "exit_code", code))  # e.g. 143 after SIGTERM: stopped, not failed


@contextlib.contextmanager
def report_and_exit(
    log: logging.Logger, code: int = EXIT_USER_ERROR, leave: Optional[Callable[[int], None]] = None
) -> Iterator[None]:
    """Turn a user error into one logged line and exit with its status (`code` unless the error
    carries its own); HYDRA_FULL_ERROR=1 re-raises. Every rank of a job exits (see
    `user_error_status`); commands that return their status instead call that directly.

    `leave(status)` runs just before the exit: the torch apps pass
    `recap_embed.distributed.collectives.leave_on_exit` to leave their process group.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - anything else is re-raised below
        status = None if full_traceback_requested() else user_error_status(e, lambda m: log.error("%s", m), code)
        if status is None:
            raise
        if leave is not None:
            leave(status)
        sys.exit(status)
