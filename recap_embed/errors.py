"""How console scripts end on a bad input: one clear line, no traceback (unless asked)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from recap_embed.config.errors import ConfigError

#: Errors that mean "the input is wrong": reported as their message alone.
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


@contextlib.contextmanager
def report_and_exit(log: logging.Logger, code: int = 2) -> Iterator[None]:
    """Turn a user error into one logged line and exit `code`; HYDRA_FULL_ERROR=1 re-raises.

    In a multi-process job every rank exits; the message is logged by rank 0, or by the rank
    that failed when only it did.
    """
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        log.error("%s%s", prefix, e)
        _shutdown()
        sys.exit(code)


def _shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort on the way out
        pass
