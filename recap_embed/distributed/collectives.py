"""Rank, world size, agreement, and the process group's set-up and teardown, in one place.

Every layer needs some of these (loading a snapshot, saving a checkpoint, sharding, logging table
statistics, the training loop, exiting on an error), and each rule must be the same everywhere:
how a one-process job gets a group, how ranks agree that one of them failed so that none is left
waiting in a later collective, how a job leaves its group without gloo aborting the process.
This module depends only on torch.distributed and `recap_embed.errors`, so every other module may
import it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, List, Optional, Tuple, Type, TypeVar

import torch.distributed as dist
from torch import nn

from recap_embed.errors import RANK_FAILURES

__all__ = [
    "RanksFailedError",
    "agree",
    "all_ranks",
    "backend_for",
    "env_world_size",
    "is_collective",
    "is_initialized",
    "join_process_group",
    "leave_on_exit",
    "leave_process_group",
    "model_process_group",
    "model_world_size",
    "one_rank_group",
    "rank0_then_all",
    "rank_and_world",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RanksFailedError(RuntimeError):
    """Raised on a rank that did not fail itself when other ranks of the job did."""


# --------------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    """Whether a default process group exists (torchrun's, the user's, or the one `shard` made)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(pg: Any = None) -> Tuple[int, int]:
    """``(rank, world size)`` in `pg` (the default group when None); ``(0, 1)`` without a group."""
    if is_initialized():
        return dist.get_rank(pg), dist.get_world_size(pg)
    return 0, 1


def is_collective(pg: Any = None) -> bool:
    """Whether other ranks take part: a group of more than one process is initialised."""
    return is_initialized() and dist.get_world_size(pg) > 1


def env_world_size() -> int:
    """The world size torchrun announces (``WORLD_SIZE``), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def model_process_group(model: nn.Module) -> Optional[Any]:
    """The group a sharded model (DMP) runs in; the default group, or None, for any other model."""
    env = getattr(model, "_env", None)
    pg = getattr(env, "process_group", None) if env is not None else None
    if pg is None and is_initialized():
        pg = dist.group.WORLD
    return pg


def model_world_size(model: nn.Module) -> int:
    """How many ranks a sharded model (DMP) spans; the default group's size for any other model."""
    env = getattr(model, "_env", None)
    if env is not None:
        return int(env.world_size)
    return rank_and_world()[1]


# --------------------------------------------------------------------------- agreement


def agree(
    error: Optional[BaseException],
    pg: Any = None,
    *,
    enabled: bool = True,
    other_failed: Type[BaseException] = RanksFailedError,
) -> None:
    """Raise on every rank when any rank failed (one ``all_gather_object`` when `enabled`).

    A rank that failed raises its own exception; the others raise `other_failed` quoting the
    failed ranks' messages. Either carries ``rank_failures`` (``{global rank: message}``), which
    `recap_embed.errors.user_error_status` uses to print each cause once per job. Without
    `enabled` (one process) it just re-raises `error`.
    """
    if not enabled:
        if error is not None:
            raise error
        return
    gathered: List[Optional[str]] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(gathered, None if error is None else f"{type(error).__name__}: {error}", group=pg)
    failed = [(r, e) for r, e in enumerate(gathered) if e]
    if not failed:
        return
    failures = {(dist.get_global_rank(pg, r) if pg is not None else r): e for r, e in failed}
    if error is None:
        lines = "\n".join(f"  rank {r}: {e}" for r, e in failed)
        error = other_failed(f"failed on {len(failed)} other rank(s):\n{lines}")
    try:
        setattr(error, RANK_FAILURES, failures)
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass
    raise error


def all_ranks(fn: Callable[..., T], *args: Any, pg: Any = None) -> T:
    """`fn(*args)` on every rank, then an agreement: when any rank failed, every rank raises
    (the failed ones their own error), so no rank is left waiting in a later collective and each
    cause is printed once."""
    error, result = None, None
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
        if getattr(e, RANK_FAILURES, None) is not None:  # from an agreement inside: every rank raised
            raise
        error = e
    agree(error, pg, enabled=is_collective(pg))
    return result  # type: ignore[return-value]


def rank0_then_all(fn: Callable[[], T], pg: Any = None, *, error_type: Type[BaseException] = RanksFailedError) -> T:
    """Run `fn` on rank 0 only; every rank gets its result, or raises `error_type` with rank 0's
    error (one broadcast, which is also a barrier)."""
    rank, world = rank_and_world(pg)
    box: List[Any] = [None]
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - sent to every rank
            box = [("error", f"{type(e).__name__}: {e}")]
    if world > 1:
        src = dist.get_global_rank(pg, 0) if pg is not None else 0
        dist.broadcast_object_list(box, src=src, group=pg)
    status, value = box[0]
    if status == "error":
        raise error_type(value)
    return value


# --------------------------------------------------------------------------- joining and leaving


def backend_for(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device_type == "cuda" else "gloo"


def join_process_group(device_type: str) -> bool:
    """Join the group torchrun describes (``WORLD_SIZE`` > 1) unless one exists; returns whether
    this call created it (and so whether the caller should leave it)."""
    if env_world_size() > 1 and not is_initialized():
        dist.init_process_group(backend=backend_for(device_type))
        return True
    return False


def one_rank_group(pg: Optional[Any], device_type: str) -> Any:
    """The group to shard in: `pg`, the default group, or (one process, none initialised) a
    one-rank group over an in-memory store, which torchrec's fused kernels need even alone.

    With ``WORLD_SIZE`` > 1 and no group, every rank would build a model of its own: refused.
    """
    if pg is not None:
        return pg
    if is_initialized():
        return dist.group.WORLD
    world = env_world_size()
    if world > 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but torch.distributed is not initialised; call "
            f"torch.distributed.init_process_group(...) on every rank before shard()"
        )
    backend = backend_for(device_type)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    logger.info("single process: initialised a one-rank %s process group (in-memory store) for fused kernels", backend)
    return dist.group.WORLD


def leave_process_group() -> None:
    """Leave the group together: every rank waits for the others, then destroys it.

    Left to interpreter exit, gloo's threads can be torn down while a peer still talks to them,
    and a rank that finished cleanly dies with SIGABRT ("terminate called without an active
    exception").
    """
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_on_exit(code: int) -> None:
    """On the way out after an error: leave a one-rank group; with other ranks, exit right away
    with `code` instead, because tearing a gloo group down while the peers exit too can abort the
    process (SIGABRT from a gloo thread that loses its connection) and turn a clean exit status
    into a crash. No barrier: the other ranks may be gone already."""
    try:
        if not is_initialized():
            return
        if dist.get_world_size() > 1:
            logging.shutdown()  # flush the run's log file and the console
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort on the way out
        pass
