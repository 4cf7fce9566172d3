"""Learning rate as a function of the step, exactly as tml's ``compute_lr`` defines it.

Pure Python (no torch) so the schedule of a config can be printed or plotted without
building anything. A schedule is the `LearningRate` one-of: a dataclass, a DictConfig or a
plain dict with the same fields, at most one of them set.

=========================  ====================================================================
schedule                   learning rate at `step`
=========================  ====================================================================
constant                   ``constant``
piecewise_constant         ``values[bisect_right(boundaries, step)]``
linear_ramp_to_constant    ``min(lr, lr / num_ramp_steps * step)``
linear_ramp_to_cosine      ``lr / num_ramp_steps * step`` while ``step < num_ramp_steps``;
                           ``final + (lr - final) * 0.5 * (1 + cos(pi * (step - num_ramp_steps)
                           / (final_num_steps - num_ramp_steps)))`` while
                           ``step <= final_num_steps``; ``final`` after
(none set)                 ``init_learning_rate``
=========================  ====================================================================

Both ramps start from 0 at step 0, as in tml.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Mapping, Optional, Sequence

from omegaconf.errors import MissingMandatoryValue

from recap_embed.config.schema import SCHEDULE_NAMES

__all__ = ["lr_at", "schedule_name"]


def _get(node: Any, key: str) -> Any:
    """A field of a dataclass, DictConfig or dict (None when absent)."""
    if node is None:
        return None
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        try:
            return node.get(key)
        except MissingMandatoryValue:
            return "???"
    return getattr(node, key, None)


def _number(node: Any, key: str, schedule: str) -> float:
    """A numeric field, or a ValueError naming it (e.g. still '???' or an unresolved string)."""
    value = _get(node, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"learning_rate.{schedule}.{key} is {value!r}; expected a number")
    return value


def _numbers(node: Any, key: str, schedule: str) -> Sequence[float]:
    """A list of numbers, or a ValueError naming the field."""
    value = _get(node, key)
    items = list(value) if value is not None and not isinstance(value, str) else None
    if items is None or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise ValueError(f"learning_rate.{schedule}.{key} is {value!r}; expected a list of numbers")
    return items


def schedule_name(schedule: Any) -> Optional[str]:
    """The name of the schedule that is set ('constant', ...), or None when none is.

    Raises ValueError when more than one is set (the config is a one-of).
    """
    chosen = [name for name in SCHEDULE_NAMES if _get(schedule, name) is not None]
    if len(chosen) > 1:
        raise ValueError(f"learning_rate sets {len(chosen)} schedules ({', '.join(chosen)}); set at most one")
    return chosen[0] if chosen else None


def lr_at(schedule: Any, step: int, init_learning_rate: float) -> float:
    """The learning rate at `step` (0-based); `init_learning_rate` when no schedule is set."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    name = schedule_name(schedule)
    if name is None:
        return float(init_learning_rate)
    node = _get(schedule, name)
    if name == "constant":
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise ValueError(f"learning_rate.constant is {node!r}; expected a number")
        return float(node)
    if name == "piecewise_constant":
        boundaries = _numbers(node, "learning_rate_boundaries", name)
        values = _numbers(node, "learning_rate_values", name)
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"learning_rate.piecewise_constant has {len(values)} values for "
                f"{len(boundaries)} boundaries; expected {len(boundaries) + 1}"
            )
        return float(values[bisect.bisect_right(boundaries, step)])
    lr = _number(node, "learning_rate", name)
    ramp = _number(node, "num_ramp_steps", name)
    if ramp <= 0:
        raise ValueError(f"learning_rate.{name}.num_ramp_steps is {ramp!r}; expected a positive integer")
    if name == "linear_ramp_to_constant":
        return float(min(lr, lr / ramp * step))
    # linear_ramp_to_cosine
    final = _number(node, "final_learning_rate", name)
    final_steps = _number(node, "final_num_steps", name)
    if final_steps <= ramp:
        raise ValueError(
            f"learning_rate.{name}.final_num_steps ({final_steps!r}) must be above num_ramp_steps ({ramp!r})"
        )
    if step < ramp:
        return float(lr / ramp * step)
    if step <= final_steps:
        progress = (step - ramp) / (final_steps - ramp)
        return float(final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return float(final)
