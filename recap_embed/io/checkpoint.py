"""Checkpoints of the whole embedding training state, with torchsnapshot.

``app_state`` maps names to Stateful objects (anything with ``state_dict``/``load_state_dict``):
the model (a ``DistributedModelParallel`` or a plain module), the fused optimizer
(``dmp.fused_optimizer``), an LR scheduler, a step counter (``torchsnapshot.StateDict(step=...)``),
``torchsnapshot.RNGState()``::

    app_state = {"model": dmp, "optimizer": dmp.fused_optimizer, "scheduler": sched,
                 "progress": torchsnapshot.StateDict(step=0)}
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        restore_checkpoint(last, app_state)            # every rank
    ...
    save_checkpoint(ckpt_dir, step, app_state)         # every rank; or asynchronous=True

Layout and completeness. Checkpoint N is the directory ``<directory>/step_<N>/``: a torchsnapshot
(``.snapshot_metadata`` plus data files) and a ``COMPLETE`` marker (JSON: step, world size, time).
It is written as ``<directory>/.step_<N>.incomplete/``; once ``Snapshot.take`` (or the
asynchronous snapshot's ``wait()``) has returned on every rank, rank 0 writes ``COMPLETE`` and
renames the directory to ``step_<N>`` (an atomic rename on a local file system), then all ranks
pass a barrier. `latest_checkpoint` only considers ``step_<N>`` directories holding both
``COMPLETE`` and ``.snapshot_metadata``: a crash at any point leaves at most an ``.incomplete``
directory (removed by the next save of the same step), never a checkpoint that looks usable.
The checkpoint directory must be on a file system every rank sees (local disk for one host, a
shared mount for several); object stores (``s3://``) have no atomic rename and are not supported
here (pretrained loading does read them).

Asynchronous saves. ``save_checkpoint(..., asynchronous=True)`` returns a `PendingCheckpoint`
once the state is staged; training may continue, and every rank must later call ``wait()``
(collective), which commits the checkpoint as above and returns its path. torchsnapshot 0.1.0
stages CPU tensors of ``TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES`` (128 MiB) or more without a
copy (its ``_should_copy_cpu_tensor`` compares a string with an Enum), so a CPU table updated
while the snapshot is written would be saved with later values. Here every such CPU tensor (and
such local shards of ShardedTensors) is cloned at save time; smaller ones are copied by
torchsnapshot's batching. GPU tensors are copied to host by torchsnapshot while staging.

Restoring. `restore_checkpoint` does not use ``Snapshot.restore``: torchsnapshot reshards a
``ShardedTensor`` only when it sits at the top of a state dict, so optimizer state saved by 2
ranks cannot be restored on 1 (it raises "Reading a ShardedTensor without a runtime object"),
and plain-into-sharded reads fail silently. Instead the destination's own ``state_dict()``
defines what is restored: each tensor leaf (plain or ShardedTensor, any sharding) is filled in
place by the chunked copier of `recap_embed.io.pretrained` from the saved entry of the same
logical path (shards of all saving ranks merged, so any world size and any sharding restore from
any other; plain tensors from this rank's entry, else the lowest rank's, which is what a rank
that did not exist at save time gets), primitives come from the manifest, other objects from
``torch.load(weights_only=True)``; then ``load_state_dict`` is called with the result and the
tensors are verified against checksums of what was read. Everything (presence, shapes, dtypes,
coverage, file sizes) is checked on all ranks before the first write. The dtype and shape of
every tensor must match; a leaf the checkpoint lacks is an error; entries the state does not ask
for are ignored. Tensors are read in blocks of ``chunk_bytes`` straight into the live tensors (no
staging copy: peak extra memory is one block plus an 8 MiB checksum temporary); since files were
checked first, only an I/O error during the restore can leave the state partly restored, and
then every rank raises an error saying so.

Security: the manifest is safe YAML, tensors are raw bytes; ``ObjectEntry`` values (e.g. ``None``
or tuples in a scheduler's state) are read with ``torch.load(weights_only=True)``, torch's
restricted unpickler, whatever torch's default.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torchsnapshot import RNGState, Snapshot
from torchsnapshot.flatten import flatten, inflate
from torchsnapshot.knobs import get_slab_size_threshold_bytes, is_batching_disabled
from torchsnapshot.manifest import ChunkedTensorEntry, ObjectEntry, PrimitiveEntry, ShardedTensorEntry, TensorEntry

from recap_embed.distributed.collectives import agree, is_collective, rank0_then_all, rank_and_world
from recap_embed.errors import UserError
from recap_embed.units import format_bytes

from .shard_copy import DEFAULT_CHUNK_BYTES, CopyPlan, commit, global_shape, plan_copy, read_into, regions_of, verify
from .snapshot import SnapshotLoadError, SnapshotReader

__all__ = [
    "CheckpointError",
    "COMPLETE_MARKER",
    "PendingCheckpoint",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "restore_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(SnapshotLoadError, UserError):
    """A checkpoint cannot be written, found or restored (files, space, contents: reported as one line)."""


# --------------------------------------------------------------------------- paths


def _local_dir(directory: Union[str, os.PathLike]) -> Path:
    text = os.fspath(directory)
    if "://" in text:
        protocol, rest = text.split("://", 1)
        if protocol not in ("", "fs"):
            raise CheckpointError(
                f"checkpoint directory {text!r}: only local or shared file systems are supported "
                "(atomic rename); write to a mounted path"
            )
        text = rest
    return Path(text)


def checkpoint_step(path: Union[str, os.PathLike]) -> Optional[int]:
    """N for a complete ``step_<N>`` checkpoint directory, else None."""
    p = _local_dir(path)
    m = _STEP_DIR.fullmatch(p.name)
    if not m or not p.is_dir():
        return None
    if not (p / COMPLETE_MARKER).is_file() or not (p / ".snapshot_metadata").is_file():
        return None
    return int(m.group(1))


def list_checkpoints(directory: Union[str, os.PathLike]) -> List[Path]:
    """Complete checkpoints under `directory`, oldest step first (incomplete ones are skipped)."""
    d = _local_dir(directory)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        step = checkpoint_step(child)
        if step is not None:
            found.append((step, child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Union[str, os.PathLike]) -> Optional[Path]:
    """The complete checkpoint with the largest step under `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


# --------------------------------------------------------------------------- save


def save_checkpoint(
    directory: Union[str, os.PathLike],
    step: int,
    app_state: Dict[str, Any],
    *,
    asynchronous: bool = False,
    pg: Any = None,
    replicated: Optional[List[str]] = None,
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Union[Path, "PendingCheckpoint"]:
    """Save `app_state` as ``<directory>/step_<step>``; collective (call on every rank).

    Returns the checkpoint's path, or with ``asynchronous=True`` a `PendingCheckpoint` whose
    ``wait()`` (also collective) completes it and returns the path. An existing complete
    ``step_<step>`` is an error; a leftover incomplete one is replaced. `write_extra(dir)` runs on
    rank 0 before the checkpoint is marked complete (files that belong with it). A save that fails
    on any rank (a full disk, a file size limit) removes its partial directory and raises
    `CheckpointError` on every rank, naming the directory and the free space left.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = _local_dir(directory)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.incomplete"

    def prepare() -> None:
        if final.exists():
            state = "" if checkpoint_step(final) is not None else " (incomplete: remove it)"
            raise FileExistsError(f"checkpoint {final} already exists{state}")
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            logger.warning("removing the incomplete checkpoint %s left by an earlier attempt", tmp)
            shutil.rmtree(tmp)

    rank0_then_all(prepare, pg, error_type=CheckpointError)
    _, world = rank_and_world(pg)
    started = time.perf_counter()
    error: Optional[BaseException] = None
    pending = None
    try:
        if asynchronous:
            # torchsnapshot infers replication from DDP instances: do it before wrapping them
            inferred = Snapshot._infer_replicated(list(replicated or []), app_state)
            staged = {k: v if isinstance(v, RNGState) else _Frozen(v) for k, v in app_state.items()}
            pending = Snapshot.async_take(str(tmp), app_state=staged, pg=pg, replicated=inferred)
        else:
            Snapshot.take(str(tmp), app_state=app_state, pg=pg, replicated=replicated)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, and the partial dir must go
        error = e
    if error is not None or not asynchronous:
        _agree_or_clean(error, tmp, final, pg)
    if asynchronous:
        return PendingCheckpoint(pending, tmp, final, step, world, pg, started, write_extra)
    return _commit(tmp, final, step, world, pg, started, write_extra)


def _free_space(path: Path) -> str:
    """'12.0 MiB free of 1.0 GiB' on the file system holding `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"


def _agree_or_clean(error: Optional[BaseException], tmp: Path, final: Path, pg: Any) -> None:
    """When any rank failed to write: rank 0 removes the partial directory, every rank raises."""
    failed: Optional[BaseException] = None
    try:
        agree(error, pg, enabled=is_collective(pg), other_failed=CheckpointError)
    except Exception as e:  # noqa: BLE001
        failed = e
    if failed is None:
        return
    rank, _ = rank_and_world(pg)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    cause = " ".join(f"{type(failed).__name__}: {failed}".split())
    raise CheckpointError(
        f"saving checkpoint {final} failed ({cause}); its partial directory {tmp} was removed; "
        f"{_free_space(final.parent)} on that file system"
    ) from None


def _commit(tmp: Path, final: Path, step: int, world: int, pg: Any, started: float,
            write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    def rename() -> str:
        if not (tmp / ".snapshot_metadata").is_file():
            raise CheckpointError(f"{tmp}: the snapshot has no manifest after writing")
        if write_extra is not None:
            write_extra(tmp)
        marker = tmp / COMPLETE_MARKER
        with open(marker, "w") as f:
            json.dump({"step": step, "world_size": world, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        try:  # make the rename durable
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return str(final)

    try:
        path = Path(rank0_then_all(rename, pg, error_type=CheckpointError))
    except CheckpointError as e:
        if rank_and_world(pg)[0] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint {final} failed ({e}); its partial directory {tmp} was removed; "
            f"{_free_space(final.parent)} on that file system"
        ) from None
    logger.info("saved checkpoint %s in %.2f s", path, time.perf_counter() - started)
    return path


@dataclass
class PendingCheckpoint:
    """An asynchronous checkpoint being written; ``wait()`` on every rank completes it."""

    pending: Any  # torchsnapshot PendingSnapshot
    tmp: Path
    final: Path
    step: int
    world: int
    pg: Any
    started: float
    write_extra: Optional[Callable[[Path], None]] = None
    path: Optional[Path] = None  # set once committed

    def done(self) -> bool:
        """This rank's writes are finished (``wait()`` is still needed to commit)."""
        return bool(self.pending.done())

    def wait(self) -> Path:
        """Wait for all ranks' writes, commit ``step_<N>`` (collective) and return its path."""
        if self.path is not None:
            return self.path
        error = None
        try:
            self.pending.wait()
        except Exception as e:  # noqa: BLE001
            error = e
        _agree_or_clean(error, self.tmp, self.final, self.pg)
        self.path = _commit(self.tmp, self.final, self.step, self.world, self.pg, self.started, self.write_extra)
        return self.path


class _Frozen:
    """A Stateful whose ``state_dict()`` copies the live CPU tensors torchsnapshot would not copy."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> Any:
        threshold = 0 if is_batching_disabled() else get_slab_size_threshold_bytes()
        return _clone_large_cpu(self.obj.state_dict(), threshold)

    def load_state_dict(self, state_dict: Any) -> None:
        self.obj.load_state_dict(state_dict)


def _clone_large_cpu(obj: Any, threshold: int) -> Any:
    if isinstance(obj, ShardedTensor):
        shards = obj.local_shards()
        if not any(_live_cpu(s.tensor, threshold) for s in shards):
            return obj
        copies = [Shard(s.tensor.detach().clone() if _live_cpu(s.tensor, threshold) else s.tensor, s.metadata) for s in shards]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            copies, obj.metadata(), process_group=obj._process_group, sharding_spec=obj.sharding_spec()
        )
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if _live_cpu(obj, threshold) else obj
    if type(obj) in (dict, OrderedDict):  # the containers torchsnapshot flattens
        out = type(obj)()
        for k, v in obj.items():
            out[k] = _clone_large_cpu(v, threshold)
        return out
    if type(obj) is list:
        return [_clone_large_cpu(v, threshold) for v in obj]
    return obj


def _live_cpu(t: torch.Tensor, threshold: int) -> bool:
    return t.device.type == "cpu" and t.numel() * t.element_size() >= threshold


# --------------------------------------------------------------------------- restore


@dataclass
class _Leaf:
    key: str  # app_state key
    path: str  # logical path
    plan: Optional[CopyPlan] = None  # tensors: how to fill `value` in place
    value: Any = None  # the destination tensor, or the restored non-tensor value


def restore_checkpoint(
    path: Union[str, os.PathLike],
    app_state: Dict[str, Any],
    *,
    pg: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Restore `app_state` from checkpoint `path` (a ``step_<N>`` directory); returns N.

    Collective (call on every rank). Any world size and sharding restore from any other; see
    the module docstring. Raises `CheckpointError` for incomplete or mismatching checkpoints
    before writing anything, `SnapshotReadError` for missing or truncated files.
    """
    ckpt = _local_dir(path)
    rank, world = rank_and_world(pg)
    multi = is_collective(pg)
    started = time.perf_counter()
    error: Optional[BaseException] = None
    reader: Optional[SnapshotReader] = None
    leaves: Dict[str, List[_Leaf]] = {}
    containers: Dict[str, Any] = {}
    step = -1
    keys = sorted(app_state, key=lambda k: (isinstance(app_state[k], RNGState), k))  # RNG state last
    try:
        try:
            if checkpoint_step(ckpt) is None:
                raise CheckpointError(
                    f"{ckpt} is not a complete checkpoint (a step_<N> directory with {COMPLETE_MARKER} "
                    "and .snapshot_metadata); use latest_checkpoint() to find one"
                )
            step = int(json.loads((ckpt / COMPLETE_MARKER).read_text())["step"])
            reader = SnapshotReader(str(ckpt))
            if multi:
                all_keys: List[Any] = [None] * world
                dist.all_gather_object(all_keys, keys, group=pg)
                if any(k != keys for k in all_keys):
                    raise CheckpointError(f"ranks restore different app_state keys: {all_keys}")
            for key in keys:
                cman, flat = flatten(app_state[key].state_dict(), prefix=key)
                containers[key] = cman
                leaves[key] = [_plan_leaf(reader, key, lp, v, rank, str(ckpt)) for lp, v in flat.items()]
            reader.check_files(p for ls in leaves.values() for leaf in ls if leaf.plan for p in leaf.plan.pieces())
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
            error = e
        agree(error, pg, enabled=multi, other_failed=CheckpointError)
        assert reader is not None

        for key in keys:
            error = None
            try:
                for leaf in leaves[key]:
                    if leaf.plan is not None:
                        commit(read_into(reader, leaf.plan, chunk_bytes=chunk_bytes, staging=False))
                flat = {leaf.path: leaf.value for leaf in leaves[key]}
                app_state[key].load_state_dict(inflate(containers[key], flat, prefix=key))
                _verify_stateful(reader, key, app_state[key], leaves[key])
            except Exception as e:  # noqa: BLE001
                error = CheckpointError(f"restoring {key!r} from {ckpt} failed, the training state is now "
                                        f"partly restored and must not be used: {type(e).__name__}: {e}")
            agree(error, pg, enabled=multi, other_failed=CheckpointError)
    finally:
        if reader is not None:
            reader.close()
    logger.info("restored checkpoint %s (step %d) in %.2f s", ckpt, step, time.perf_counter() - started)
    return step


def _plan_leaf(reader: SnapshotReader, key: str, lp: str, value: Any, rank: int, where: str) -> _Leaf:
    entries = reader.entries(lp)
    if not entries:
        raise CheckpointError(f"checkpoint {where} has no entry {lp!r} (the state to restore has it)")
    if isinstance(value, torch.Tensor):  # ShardedTensor too
        source = reader.source(lp, rank)
        dest_shape = global_shape(value)
        if tuple(source.shape) != dest_shape or source.dtype != value.dtype:
            raise CheckpointError(
                f"checkpoint {where}: {lp!r} is {list(source.shape)} {source.dtype} in the checkpoint, "
                f"{list(dest_shape)} {value.dtype} in the state to restore"
            )
        plan = plan_copy(source, regions_of(value), f"checkpoint {where}: {lp!r}")
        return _Leaf(key, lp, plan=plan, value=value)
    r, entry = reader.entry_for_rank(lp, rank)
    if isinstance(entry, PrimitiveEntry):
        return _Leaf(key, lp, value=entry.get_value())
    if isinstance(entry, ObjectEntry):
        raw = reader.read_file(entry.location)
        try:
            obj = torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where}: object {r}/{lp} cannot be read with torch.load(weights_only=True): {e}") from None
        return _Leaf(key, lp, value=obj)
    if isinstance(entry, (TensorEntry, ChunkedTensorEntry, ShardedTensorEntry)):
        raise CheckpointError(f"checkpoint {where}: {lp!r} is a tensor in the checkpoint, a {type(value).__name__} in the state to restore")
    raise CheckpointError(f"checkpoint {where}: {lp!r} is a {entry.type} entry, expected a value")


def _verify_stateful(reader: SnapshotReader, key: str, obj: Any, leaves: List[_Leaf]) -> None:
    _, flat = flatten(obj.state_dict(), prefix=key)
    for leaf in leaves:
        if leaf.plan is None:
            continue
        value = flat.get(leaf.path)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{leaf.path!r} is gone from the state after load_state_dict")
        verify(None, leaf.plan, regions_of(value), f"{leaf.path!r}", sample_rows=False)
