"""Run a test function on N spawned CPU ranks (gloo) and return what each rank returns.

Pattern of torchrec/distributed/test_utils/multi_process.py: fresh ``spawn`` processes, a free
MASTER_PORT, ``GLOO_DEVICE_TRANSPORT=TCP``, LOCAL_RANK / LOCAL_WORLD_SIZE set. A rank that
raises fails the call with its traceback; ranks still running after `timeout` seconds (e.g.
blocked in a collective a failed peer never joined) are killed and the call fails, so a hang
becomes a test failure instead of a stuck test run.

``fn(rank, world_size, *args)`` must be a module-level function; arguments and results must be
picklable. Starting a rank (importing torch and torchrec) costs seconds: batch many checks into
one call and return numbers for the parent to assert on.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List

import torch.multiprocessing as mp

from launch import clean_env, free_port

__all__ = ["run_ranks"]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, out: Any, args: tuple, pg_timeout: float) -> None:
    # The tests' one clean environment (tests/launch.py), with this rank's own variables.
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                    LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.clear()
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        out.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 120.0, pg_timeout: float = 60.0) -> List[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process each."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, results, args, pg_timeout), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    done: Dict[int, Any] = {}
    failures: List[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size and not failures:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(done))
                raise AssertionError(f"rank(s) {missing} did not finish within {timeout:.0f} s (hung collective?)")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                crashed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in done]
                if crashed:
                    try:  # its traceback may still be in flight
                        rank, ok, value = results.get(timeout=3.0)
                    except queue.Empty:
                        raise AssertionError(f"rank(s) {crashed} died with exit codes {[procs[r].exitcode for r in crashed]}") from None
                else:
                    continue
            if ok:
                done[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10 if not failures else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failures:
        raise AssertionError("a spawned rank failed:\n" + "\n".join(failures))
    return [done[r] for r in range(world_size)]


# --------------------------------------------------------------------------- helpers for the tests
# Shared by the single-process and the multi-rank tests (the ranks import this module too).


def table_weight_entry(model: Any, table: str) -> Any:
    """The state_dict entry of a table of the (only) LargeEmbeddings: ShardedTensor or tensor."""
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith(f"embedding_bags.{table}.weight")]
    assert len(keys) == 1, keys
    return sd[keys[0]]


def load_full_weights(model: Any, full: Dict[str, Any]) -> None:
    """Copy full (unsharded) tables into whatever part of them this rank holds."""
    import torch

    with torch.no_grad():
        for table, weight in full.items():
            entry = table_weight_entry(model, table)
            if hasattr(entry, "local_shards"):
                for shard in entry.local_shards():
                    (r0, c0), (r, c) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(weight[r0 : r0 + r, c0 : c0 + c])
            else:
                entry.copy_(weight)


def local_pieces(model: Any, table: str) -> List[Any]:
    """``(row offset, col offset, tensor copy)`` of every piece of `table` on this rank."""
    entry = table_weight_entry(model, table)
    if hasattr(entry, "local_shards"):
        return [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]), s.tensor.detach().clone())
                for s in entry.local_shards()]
    return [(0, 0, entry.detach().clone())]


def full_weight(model: Any, table: str) -> Any:
    """The whole table, from a model whose every piece is on this rank (one process)."""
    import torch

    pieces = local_pieces(model, table)
    rows = max(r0 + t.shape[0] for r0, _, t in pieces)
    cols = max(c0 + t.shape[1] for _, c0, t in pieces)
    out = torch.empty(rows, cols, dtype=pieces[0][2].dtype)
    for r0, c0, t in pieces:
        out[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t
    return out


def max_piece_diff(model: Any, table: str, reference: Any) -> float:
    """Largest |local piece - same slice of reference| of a table on this rank (0.0: no piece)."""
    worst = 0.0
    for r0, c0, t in local_pieces(model, table):
        ref = reference[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]]
        if t.numel():
            worst = max(worst, float((t.float() - ref.float()).abs().max()))
    return worst


def reference_pool(weight: Any, ids: Any, lengths: Any, mode: str, per_sample_weights: Any = None) -> Any:
    """Pooled rows with plain torch: [bags, dim]; an empty bag pools to zeros."""
    import torch
    import torch.nn.functional as F

    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)[:-1]])
    return F.embedding_bag(ids.long(), weight, offsets, mode=mode, per_sample_weights=per_sample_weights)
