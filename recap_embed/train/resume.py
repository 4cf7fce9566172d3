"""Never losing work: one run per run directory, periodic checkpoints, automatic resume.

* `RunDirLock`: an exclusive ``flock`` on ``<run dir>/.recap_embed.lock`` held for the life of the
  process (the kernel drops it when the process dies, even by SIGKILL). A second run into a
  directory in use is refused at start, naming the holder.
* `CheckpointPolicy`: a checkpoint every ``train.checkpoint_every`` steps (0: only the final one)
  and the final one; the newest ``train.keep_checkpoints`` are kept (older ones are removed once a
  newer one is complete). Each checkpoint carries ``progress`` (step, epoch, the eval
  curve so far, the running loss) and ``recap_embed.json`` (the vocab fingerprint of every table).
* `resume_point`: a rerun into the same run directory continues from the latest complete
  checkpoint (logged); ``train.resume=false`` starts afresh, moving the old checkpoints and
  metrics aside (``checkpoints.superseded-<time>``), never deleting them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from recap_embed.config import ConfigError
from recap_embed.io.checkpoint import checkpoint_step, list_checkpoints, save_checkpoint

from .fingerprint import CHECKPOINT_INFO
from .rundir import RunDirInUse, RunDirLock  # noqa: F401  (re-exported)

__all__ = ["CheckpointPolicy", "RunDirInUse", "RunDirLock", "check_resumable", "resume_point", "supersede"]

log = logging.getLogger("recap_embed.train")

def supersede(output_dir: Path) -> Optional[Path]:
    """Move the checkpoints and metrics of an earlier run aside (train.resume=false); returns where."""
    ckpts = Path(output_dir) / "checkpoints"
    metrics = Path(output_dir) / "metrics.json"
    if not ckpts.exists() and not metrics.exists():
        return None
    aside = Path(output_dir) / f"checkpoints.superseded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir(parents=True)
    if ckpts.exists():
        os.replace(ckpts, aside / "checkpoints")
    if metrics.exists():
        os.replace(metrics, aside / "metrics.json")
    log.info("train.resume=false: moved the earlier run's checkpoints and metrics to %s; starting afresh", aside)
    return aside


def resume_point(output_dir: Path, resume: bool) -> Optional[Path]:
    """The latest complete checkpoint under ``<output_dir>/checkpoints`` to continue from, or None."""
    found = list_checkpoints(Path(output_dir) / "checkpoints")
    if not found:
        return None
    if not resume:
        return None
    return found[-1]


def check_resumable(path: Path, info: Mapping[str, Any], vocabs: Mapping[str, Any], trajectory: Mapping[str, Any], rank: int) -> None:
    """May this run continue from checkpoint `path`, whose `recap_embed.json` is `info`? Its
    vocabularies must be this run's (`vocabs`: fingerprints by table), else its rows would get
    other ids; settings that decide the batches (`trajectory`) may differ, which is logged."""
    saved = info.get("vocabs")
    if saved is not None and saved != vocabs:
        differ = sorted(k for k in set(saved) | set(vocabs) if saved.get(k) != vocabs.get(k))
        raise ConfigError(
            f"train.resume: checkpoint {path} was trained with other vocabularies for table(s) {differ} than this run "
            f"has (another data.dir or vocab): resuming would give its rows other ids; set train.resume=false to start "
            f"afresh (the old checkpoints are kept aside), or use the data it was trained on"
        )
    changed = {k: (v, trajectory.get(k)) for k, v in (info.get("trajectory") or {}).items() if trajectory.get(k) != v}
    if changed and rank == 0:
        log.warning("resuming from %s with other settings than it was trained with (%s): training continues, "
                    "but not along the batches the original run would have seen", path,
                    ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items()))


def final_metrics(output_dir: Path, step: int) -> Optional[Dict[str, Any]]:
    """The metrics of a run in this directory that already finished at `step`, or None."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("steps") == step and metrics.get("checkpoint"):
        return metrics
    return None


class CheckpointPolicy:
    """When to save, what to keep, and the files that travel with each checkpoint."""

    def __init__(
        self,
        directory: Path,
        *,
        every: int,
        keep: int,
        asynchronous: bool,
        rank: int,
        info: Callable[[], Mapping[str, Any]],
    ) -> None:
        if every < 0 or keep < 1:
            raise ConfigError(f"train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1 (got {every}, {keep})")
        self.directory = Path(directory)
        self.every = int(every)
        self.keep = int(keep)
        self.asynchronous = asynchronous
        self.rank = rank
        self.info = info
        self.last_saved: Optional[int] = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def write_info(self, tmp: Path) -> None:
        """The files that travel with every checkpoint of this run (each table's vocab fingerprint)."""
        (tmp / CHECKPOINT_INFO).write_text(json.dumps(dict(self.info()), indent=2, sort_keys=True, default=str) + "\n")

    def save(self, step: int, app_state: Dict[str, Any], *, final: bool = False) -> Path:
        """Save step `step` (collective), then keep only the newest `keep` checkpoints."""
        if checkpoint_step(self.directory / f"step_{step}") == step:
            self.last_saved = step
            return self.directory / f"step_{step}"  # already saved at this step (periodic, then stop/final)
        result = save_checkpoint(self.directory, step, app_state, asynchronous=self.asynchronous and not final,
                                 write_extra=self.write_info)
        path = result.wait() if hasattr(result, "wait") else result  # the loop waits: the state moves on
        self.last_saved = step
        self._prune(step)
        return Path(path)

    def _prune(self, newest: int) -> None:
        if self.rank != 0:
            return
        periodic = [p for p in list_checkpoints(self.directory) if (checkpoint_step(p) or 0) <= newest]
        for old in periodic[: max(0, len(periodic) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed checkpoint %s (train.keep_checkpoints=%d)", old, self.keep)


def progress_state(step: int, epoch: int, running: Optional[float], curve: List[Dict[str, Any]]) -> Any:
    """The loop's own progress, as a torchsnapshot Stateful (primitives only: nothing unpickled)."""
    from torchsnapshot import StateDict

    return StateDict(step=int(step), epoch=int(epoch), running=float("nan") if running is None else float(running),
                     curve=json.dumps(curve, allow_nan=True))


def read_progress(state: Any) -> Tuple[int, int, Optional[float], List[Dict[str, Any]]]:
    running = float(state["running"])
    return int(state["step"]), int(state["epoch"]), (None if running != running else running), json.loads(state["curve"])


def materialize_dense_state(optimizer: Any) -> None:
    """Create the lazy state of the dense optimizer (torch's Adam has none before its first step),
    so that restoring a checkpoint fills it instead of skipping it: the restore is driven by the
    destination's own state_dict, and an empty state would silently restart Adam's moments.

    Runs the dense part once on zero gradients (torchrec's ``KeyedOptimizer.init_state``); the
    weights this may move (weight decay) are restored from the checkpoint right after.
    """
    parts = dict(getattr(optimizer, "optimizers", []) or [])
    dense = parts.get("dense")
    if dense is not None and hasattr(dense, "init_state") and any(p not in dense.state for p in dense.params.values()):
        dense.init_state()
        dense.zero_grad(set_to_none=True)
