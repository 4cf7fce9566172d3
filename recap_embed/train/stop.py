"""Stopping cleanly: SIGTERM (what a cluster sends before preempting a job) and SIGINT (Ctrl-C)
ask the loop to stop; every rank learns of it at the same step, a checkpoint is saved, and the
job exits with 128 + the signal's number (143, 130) and one line saying how to resume.

The handlers only set a flag; the loop calls `StepAgreement.step` once per step, which (with
several ranks) all-reduces the loss and the flag in one small collective, so a signal that
reached one rank stops all of them at the same step, and a loss that is nan on one rank is seen
by every rank. A second SIGINT while stopping interrupts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from recap_embed.distributed.collectives import rank_and_world
from recap_embed.errors import UserError

__all__ = ["StepAgreement", "StopRequested", "StopSignals"]

log = logging.getLogger("recap_embed.train")


class StopRequested(UserError):
    """The run was stopped by a signal after saving a checkpoint; ``exit_code`` is 128 + its number."""

    rank0_only = True  # every rank stops at the same step: one line for the job

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT set ``stop.signum`` instead of
    killing the process (main thread only; elsewhere nothing is installed)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            log.warning("received %s: stopping after this step, saving a checkpoint", signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


class StepAgreement:
    """What every rank knows after each step: the mean loss over ranks and whether any rank was asked to stop."""

    def __init__(self, device: torch.device) -> None:
        _, self.world = rank_and_world()
        self.multi = self.world > 1
        self.device = device

    def step(self, loss: torch.Tensor, signum: Optional[int]) -> Tuple[float, Optional[int]]:
        """(mean loss over ranks, the signal any rank received or None); one all_reduce with ranks."""
        if not self.multi:
            return float(loss.detach()), signum
        term, intr = float(signum == signal.SIGTERM), float(signum == signal.SIGINT)
        buf = torch.tensor([float(loss.detach()), term, intr], dtype=torch.float64, device=self.device)
        dist.all_reduce(buf)  # sums: a nan loss anywhere is nan everywhere; a flag anywhere is > 0
        total, term, intr = buf.tolist()
        agreed = signal.SIGTERM if term > 0 else signal.SIGINT if intr > 0 else None
        return total / self.world, (int(agreed) if agreed is not None else None)
