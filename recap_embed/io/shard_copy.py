"""Copying saved pieces into the local shards of a destination: plan (`plan_copy`), read in
bounded blocks (`read_into`), commit staged copies (`commit`) and check the result (`verify`).

Reading, and what it costs. torchsnapshot 0.1.0 only reads whole entries: ``read_object`` of a
plain entry reads the whole table (``memory_budget_bytes`` tiles the reads but the output is the
full table), sharded reads read every overlapping saved shard whole (up to 512 MiB each), and
``read_object(path, sharded_tensor)`` from an unsharded entry fails silently (torch 2.13). So this
module reads the bytes itself. Every tensor entry written with the ``buffer_protocol`` serializer
(all float and int dtypes) is raw row-major bytes at a known ``location`` and ``byte_range``, so
rows ``[a, b)`` of a saved piece (a plain tensor, a chunk of a ``ChunkedTensor``, or a saved
shard of a ``ShardedTensor``) are one contiguous byte range. For each local destination shard,
each overlapping saved piece is read in blocks of at most ``chunk_bytes`` of rows (one row if a
row is larger) into one reused buffer, the columns the shard needs are kept, converted to the
destination dtype (fp32 <-> fp16/bf16) and copied in. Local snapshots (a path or ``fs://``) are
read with ``readinto`` straight into that buffer; other URIs (``s3://``, ``gs://``, registered
plugins) go through torchsnapshot's storage plugin as byte-range reads (one more temporary of a
block). A rank reads only the rows its shards need; a column shard reads whole rows of the saved
piece and keeps its columns (I/O of whole rows, memory still bounded by ``chunk_bytes``); two
local shards of one table read their rows separately. Reads are sequential, one block in flight,
and the next block is read by a background thread while the current one is converted, copied
and checksummed, so a cold load goes at the disk's speed (BENCHMARKS.md §6).

Memory, measured (one process, a 409,600 x 128 fp32 table = 200 MiB saved by ``Snapshot.take``,
``chunk_bytes`` = 16 MiB, peak RSS above the RSS before the load, one read buffer): ``staging=False``
27-42 MiB, ``staging=True`` 226-258 MiB (the 200 MiB staging copy plus the same); for comparison
torchsnapshot's ``read_object`` into the table 204 MiB and ``Snapshot.restore`` 204 MiB.
With ``staging=False`` (default) rows are copied into the weights as they arrive: peak extra
memory is a block (two half blocks: the one being copied and the one being read) plus, for fp16
and bf16, an 8 MiB checksum temporary, but an I/O error in the middle of a table leaves that table partly written (the error
says so and names it; load again, or start from fresh weights: at start-up the weights are only
their random initialisation). With ``staging=True`` the rows of a table are first read into a
staging copy of this rank's local shards (host memory, destination dtype), then copied in one go:
peak extra memory is the local shards of the largest table on top, and a failed read leaves the
table untouched; use it to load into weights that already hold something worth keeping. Before any table is read every file the load needs is checked to
exist and to be long enough (``stat`` locally, a 1-byte read elsewhere), so a truncated or
incomplete snapshot fails before the first write in both modes.

Verification: after the copy the destination is fetched again from ``model.state_dict()`` and
(1) a checksum of the bits of every local shard (their sum as integers modulo 2**32, `checksum`)
is compared with the checksum of the values read, (2) the first, middle and last rows of each local shard are read again from the
snapshot and compared bit for bit. A mismatch raises: a copy that silently did not reach the
weights cannot pass. When streaming, each block of the destination is read back and summed right
after its copy (overlapping the next read); when the shard fetched again is that same memory
(same address, shape and strides) those sums are its checksum, otherwise (the model handed out a
copy) the shard is summed again. Float blocks are checked finite before they are copied (`_check_finite`:
one sum, the exact scan only when the sum is not finite).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from operator import mul
from typing import Any, List, Optional, Tuple

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from .snapshot import NonFiniteSnapshotError, Piece, PretrainedError, SnapshotLoadError, SnapshotReadError, SnapshotReader, SourceTensor

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "CopyPlan",
    "Region",
    "bits_equal",
    "checksum",
    "commit",
    "global_shape",
    "plan_copy",
    "read_into",
    "regions_of",
    "verify",
]

#: Largest block of rows read at once (a single row is read whole even if larger).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

#: Read the next block in a background thread while the current one is copied (see `_blocks`).
READ_AHEAD = True


@dataclass
class Region:
    """One local destination block: `tensor` is the live storage, at `offsets` in the whole."""

    tensor: torch.Tensor
    offsets: Tuple[int, ...]
    rows: int  # rows to fill, from the block's first row (fewer than it has: partial rows)

    @property
    def fill(self) -> torch.Tensor:
        return self.tensor if self.rows == self.tensor.shape[0] else self.tensor.narrow(0, 0, self.rows)


@dataclass
class _Task:
    piece: Piece
    lo: Tuple[int, ...]  # overlap in whole-tensor coordinates
    hi: Tuple[int, ...]


@dataclass
class CopyPlan:
    """How to fill the local blocks of one destination from one source (no I/O done yet)."""

    source: SourceTensor
    regions: List[Region]
    tasks: List[List[_Task]]  # per region
    expected: List[int] = field(default_factory=list)  # checksums of what was copied, per region
    bytes_read: int = 0  # by this rank, for this plan (verification reads included)
    written: Optional[List[int]] = None  # streaming: checksums of the destination right after the copy
    storage: Optional[List[Tuple[Any, ...]]] = None  # streaming: the memory each region was written to

    @property
    def elements(self) -> int:
        return sum(r.fill.numel() for r in self.regions)

    def pieces(self) -> List[Piece]:
        return [t.piece for ts in self.tasks for t in ts]


def regions_of(value: torch.Tensor, rows_limit: Optional[int] = None) -> List[Region]:
    """The local blocks of a tensor or ShardedTensor, clipped to global rows ``< rows_limit``."""
    if isinstance(value, ShardedTensor):
        blocks = [(s.tensor, tuple(int(o) for o in s.metadata.shard_offsets)) for s in value.local_shards()]
    else:
        t = value.detach()
        blocks = [(t.view(1) if t.dim() == 0 else t, (0,) * max(t.dim(), 1))]
    out = []
    for t, off in blocks:
        if t.is_meta:
            raise PretrainedError("the destination is on the meta device: place (shard) the model before loading")
        rows = t.shape[0]
        if rows_limit is not None:
            rows = max(0, min(off[0] + rows, rows_limit) - off[0])
        out.append(Region(t, off, rows))
    return out


def global_shape(value: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in (value.size() if isinstance(value, ShardedTensor) else value.shape))


def plan_copy(source: SourceTensor, regions: List[Region], what: str) -> CopyPlan:
    """Match every local block with the saved pieces it overlaps; check they cover it exactly."""
    tasks: List[List[_Task]] = []
    for region in regions:
        fill_sizes = (region.rows,) + tuple(region.tensor.shape[1:])
        ts = []
        covered = 0
        for p in source.pieces:
            lo = tuple(max(o, d) for o, d in zip(p.offsets, region.offsets))
            hi = tuple(min(o + s, d + z) for o, s, d, z in zip(p.offsets, p.sizes, region.offsets, fill_sizes))
            if len(lo) != len(fill_sizes):
                raise PretrainedError(f"{what}: the saved tensor has {len(p.sizes)} dims, the destination {len(fill_sizes)}")
            if all(h > l for l, h in zip(lo, hi)):
                ts.append(_Task(p, lo, hi))
                covered += reduce(mul, (h - l for l, h in zip(lo, hi)), 1)
        want = reduce(mul, fill_sizes, 1)
        if covered != want:
            raise SnapshotReadError(
                f"{what}: the saved pieces of {source.describe} cover {covered} of the {want} elements "
                f"of the local block at {list(region.offsets)} (missing or overlapping shards: a corrupt manifest)"
            )
        tasks.append(ts)
    return CopyPlan(source, regions, tasks)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_CHECKSUM_BLOCK = 1 << 20  # elements of 1- and 2-byte dtypes summed at once (an 8 MiB int64 temporary)

#: Checksums are sums modulo 2**32: `checksum` values add with `add_checksums`.
CHECKSUM_MASK = (1 << 32) - 1


def checksum(t: torch.Tensor) -> int:
    """An order-independent checksum of a tensor's bits: the sum of its elements read as integers,
    modulo 2**32 (so sums of blocks, `add_checksums`, equal the sum of the whole).

    4-byte dtypes (fp32) are summed as int32 with int32 accumulation, which wraps: one pass at
    memory speed and no temporary. 8-byte dtypes are summed as their two int32 halves (as int64
    values modulo 2**32 a change of the upper half, sign and exponent, would not show). Narrower dtypes would overflow their own width, so they are
    widened to int64 in blocks of rows (a whole table widened at once would be a temporary
    several times its size).
    """
    if t.numel() == 0:
        return 0
    if t.dim() == 0:
        t = t.view(1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    ints = _INT_OF_SIZE.get(min(t.element_size(), 4))
    try:
        iv = t.view(ints) if ints is not None else t.contiguous().view(torch.uint8)
    except RuntimeError:  # a view whose last dim is not contiguous
        iv = t.contiguous().view(ints)
    if iv.element_size() == 4:
        return int(iv.sum(dtype=iv.dtype).item()) & CHECKSUM_MASK
    per_row = max(1, iv[0].numel()) if iv.dim() > 1 else 1
    step = max(1, _CHECKSUM_BLOCK // per_row)
    total = 0
    for r in range(0, iv.shape[0], step):
        total += int(iv[r : r + step].sum(dtype=torch.int64).item())
    return total & CHECKSUM_MASK


def add_checksums(a: int, b: int) -> int:
    """The checksum of two blocks from theirs."""
    return (a + b) & CHECKSUM_MASK


def _blocks(reader: SnapshotReader, task: _Task, chunk_bytes: int, rows: Optional[Tuple[int, int]] = None,
            read_ahead: bool = False):
    """(global first row, source view) per block of at most `chunk_bytes` rows of one task.

    The view yielded is valid until the next block is requested. With `read_ahead`, a second
    buffer is filled by a background thread while the caller works on the current block, so that
    conversion, copy and checksums overlap the I/O (``readinto`` and torch release the GIL); each
    buffer is then half a block, so the memory bound stays `chunk_bytes`.
    """
    p = task.piece
    row_bytes = p.row_bytes
    r0, r1 = rows if rows is not None else (task.lo[0], task.hi[0])
    # Two buffers of half the block each: the memory bound stays `chunk_bytes`.
    step = max(1, (chunk_bytes // (2 if read_ahead else 1)) // max(row_bytes, 1))
    starts = list(range(r0, r1, step))
    if not starts:
        return
    read_ahead = read_ahead and len(starts) > 1
    buffers = [torch.empty(min(step, r1 - r0) * row_bytes, dtype=torch.uint8) for _ in range(2 if read_ahead else 1)]
    views = [memoryview(b.numpy()) for b in buffers]

    def read(k: int) -> None:
        r = starts[k]
        n = min(step, r1 - r)
        reader.read_range_into(p.location, p.byte_start + (r - p.offsets[0]) * row_bytes, views[k % len(views)][: n * row_bytes])

    def view(k: int) -> torch.Tensor:
        n = min(step, r1 - starts[k])
        src = buffers[k % len(buffers)][: n * row_bytes].view(p.dtype).view((n,) + p.sizes[1:])
        for d in range(1, len(p.sizes)):
            src = src.narrow(d, task.lo[d] - p.offsets[d], task.hi[d] - task.lo[d])
        return src

    if not read_ahead:
        for k, r in enumerate(starts):
            read(k)
            yield r, view(k)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recap_embed-read") as pool:
        pending = pool.submit(read, 0)
        try:
            for k, r in enumerate(starts):
                pending.result()
                # The caller is done with block k - 1, whose buffer the next read reuses.
                pending = pool.submit(read, k + 1) if k + 1 < len(starts) else None
                yield r, view(k)
        finally:
            if pending is not None:  # stopped early: let the read in flight finish before the buffer goes
                pending.exception()


def _dest_view(target: torch.Tensor, region_offsets: Tuple[int, ...], task: _Task, r: int, n: int) -> torch.Tensor:
    v = target.narrow(0, r - region_offsets[0], n)
    for d in range(1, target.dim()):
        v = v.narrow(d, task.lo[d] - region_offsets[d], task.hi[d] - task.lo[d])
    return v


def read_into(
    reader: SnapshotReader, plan: CopyPlan, *, chunk_bytes: int, staging: bool, require_finite: bool = True
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Read every block of `plan`, into staging buffers (returned as (fill, staged) pairs to commit)
    or straight into the destination (returns []). Sets ``plan.expected`` (checksums of the values
    read); streaming also sets ``plan.written`` (checksums of the destination blocks read back
    right after each copy, while the next block is being read) and ``plan.storage``.

    With `require_finite`, a float block holding nan or inf raises `NonFiniteSnapshotError` before
    it is copied (a table of NaNs would train to NaN without a word)."""
    staged = []
    plan.expected = []
    plan.written = None if staging else []
    plan.storage = [] if not staging else None
    before = reader.bytes_read
    with torch.no_grad():
        for region, tasks in zip(plan.regions, plan.tasks):
            fill = region.fill
            target = torch.empty(fill.shape, dtype=fill.dtype) if staging else fill
            expected = written = 0
            for task in tasks:
                for r, src in _blocks(reader, task, chunk_bytes, read_ahead=READ_AHEAD):
                    conv = src if src.dtype == target.dtype else src.to(target.dtype)
                    if require_finite and conv.is_floating_point():
                        _check_finite(conv, plan.source, r)
                    expected = add_checksums(expected, checksum(conv))
                    dest = _dest_view(target, region.offsets, task, r, src.shape[0])
                    dest.copy_(conv)
                    if not staging:
                        written = add_checksums(written, checksum(dest))
                    del src, conv, dest
            plan.expected.append(expected)
            if staging:
                staged.append((fill, target))
            else:
                plan.written.append(written)
                plan.storage.append(_storage_key(fill))
    plan.bytes_read += reader.bytes_read - before
    return staged


def _check_finite(block: torch.Tensor, source: SourceTensor, first_row: int) -> None:
    # A finite sum means every value is finite (nan and inf propagate through a sum), and one
    # reduction runs at memory speed, where ``isfinite(block).all()`` is about 50x slower; only
    # a non-finite sum (a bad value, or an overflow of finite ones) pays for the exact scan.
    total = block.sum(dtype=torch.float32 if block.element_size() < 4 else block.dtype)
    if bool(torch.isfinite(total)):
        return
    finite = torch.isfinite(block)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    rows = (~finite).reshape(block.shape[0], -1).any(dim=1).nonzero().flatten() + first_row
    raise NonFiniteSnapshotError(
        f"snapshot {source.uri!r}: {source.describe} holds {bad} non-finite value(s) (nan or inf) in rows "
        f"{rows[:5].tolist()}{' ...' if rows.numel() > 5 else ''}; refusing to load them (a model trained from "
        f"them is NaN): use another snapshot"
    )


def _storage_key(t: torch.Tensor) -> Tuple[Any, ...]:
    """What makes two tensors the same memory: device, address, shape, strides, dtype."""
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def commit(staged: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for fill, target in staged:
            fill.copy_(target)


def verify(reader: Optional[SnapshotReader], plan: CopyPlan, fresh: List[Region], what: str, sample_rows: bool = True) -> None:
    """The freshly fetched destination holds what was read: checksums, and sampled rows re-read."""
    if [r.offsets for r in fresh] != [r.offsets for r in plan.regions]:
        raise SnapshotLoadError(f"{what}: the destination's local blocks changed during the load")
    before = reader.bytes_read if reader is not None else 0
    for i, (region, tasks, expected) in enumerate(zip(fresh, plan.tasks, plan.expected)):
        fill = region.fill
        if plan.written is not None and plan.storage is not None and plan.storage[i] == _storage_key(fill):
            # The weights fetched again are the memory the blocks were copied into and read back
            # from right after the copy: that read-back checksum is this memory's.
            found = plan.written[i]
        else:  # another tensor (a copy, or a staged load): sum what the model holds now
            found = checksum(fill)
        if found != expected:
            raise SnapshotLoadError(
                f"{what}: after the copy the destination block at {list(region.offsets)} does not hold the "
                f"values read from {plan.source.describe} (checksum {found}, expected {expected}): the write "
                "did not reach the model's weights"
            )
        if not sample_rows or reader is None or region.rows == 0:
            continue
        for g in sorted({region.offsets[0], region.offsets[0] + region.rows // 2, region.offsets[0] + region.rows - 1}):
            for task in tasks:
                if not task.lo[0] <= g < task.hi[0]:
                    continue
                for r, src in _blocks(reader, task, 1, rows=(g, g + 1)):
                    got = _dest_view(fill, region.offsets, task, r, 1).detach().to("cpu")
                    if not bits_equal(src.to(fill.dtype), got):
                        raise SnapshotLoadError(
                            f"{what}: row {g} of the destination differs from {plan.source.describe} after the copy"
                        )
    if reader is not None:
        plan.bytes_read += reader.bytes_read - before


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaNs with equal payloads compare equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool or a.element_size() not in _INT_OF_SIZE:
        return bool(torch.equal(a, b))
    it = _INT_OF_SIZE[a.element_size()]
    return bool(torch.equal(a.view(it), b.view(it)))


