"""One run per run directory: an exclusive ``flock`` on ``<run dir>/.recap_embed.lock``, held for
the life of the process (the kernel drops it when the process ends, even by SIGKILL). No torch:
the console app takes it before Hydra writes the run's config into the directory."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Dict

from recap_embed.errors import UserError

__all__ = ["LOCK_FILE", "RunDirInUse", "RunDirLock"]

LOCK_FILE = ".recap_embed.lock"


class RunDirInUse(UserError):
    """Another live process trains into this run directory."""


class RunDirLock:
    """Exclusive lock of a run directory for this process (see the module doc)."""

    _held: Dict[str, Any] = {}  # real path -> open file, per process

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def acquire(self) -> None:
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.run_dir)
        if key in self._held:
            return
        path = self.run_dir / LOCK_FILE
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirInUse(
                f"run directory {str(self.run_dir)!r} is in use by a running job ({holder}); wait for it to finish, "
                f"or set another hydra.run.dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._held[key] = f

    def release(self) -> None:
        f = self._held.pop(os.path.realpath(self.run_dir), None)
        if f is not None:
            f.close()  # closing drops the flock
