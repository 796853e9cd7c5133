"""Schedules of TRP's targets: a constant, or ``step -> value`` such as a linear :class:`Ramp`.

TRP's energy, MACs speed-up and measured-time speed-up may each tighten over training
(``--energy-ramp``); a :class:`Ramp` states where it ends, so a target can be checked against the
model's reach once, at the start.

Example:
    >>> ramp(2.0, 4)(2)
    1.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from trp.validate import number, whole

__all__ = ["Schedule", "Ramp", "ramp", "checked_schedule"]

#: A constant, or a schedule ``step -> value`` (a :class:`Ramp`, or any callable).
Schedule = Union[float, Callable[[int], float]]


@dataclass(frozen=True)
class Ramp:
    """A linear schedule from ``start`` to ``end`` over ``steps`` steps, then ``end`` for good.

    Being an object rather than a closure, it knows where it ends: TRP checks a speed-up target
    against the model's reach once, at the start, from :attr:`end`.

    Example:
        >>> r = Ramp(2.0, 4)
        >>> r(0), r(2), r(4), r.end
        (1.0, 1.5, 2.0, 2.0)
    """

    end: float
    steps: int
    start: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", number(self.end, "ramp end"))
        object.__setattr__(self, "steps", whole(self.steps, "ramp length", low=0))
        object.__setattr__(self, "start", number(self.start, "ramp start"))

    def __call__(self, step: int) -> float:
        if self.steps == 0 or step >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.steps


def ramp(end: float, steps: int, start: float = 1.0) -> Ramp:
    """Energy or speed-up schedule: linear from ``start`` (1.0: dense) to ``end`` over ``steps`` steps.

    On short schedules a constant e = 0.9 projected every 20 steps costs accuracy before the
    network has learned anything worth keeping; ramping lets early training run nearly dense.
    The same schedule serves ``speedup``: from 1× (no truncation) up to the target.

    Example:
        >>> f = ramp(0.9, 100)
        >>> f(0), round(f(50), 3), f(100), f(1000)
        (1.0, 0.95, 0.9, 0.9)
    """
    return Ramp(end, steps, start)


def checked_schedule(value: Any, what: str, **bounds: Any) -> Schedule:
    """A constant checked now; a schedule's ``end`` (if it states one) checked now, the rest at use.

    Example:
        >>> checked_schedule(2, "speed-up", low=1.0), checked_schedule(Ramp(3.0, 10), "speed-up", low=1.0).end
        (2.0, 3.0)
    """
    if callable(value):
        end = getattr(value, "end", None)
        if end is not None:
            number(end, f"{what} at the end of its schedule", **bounds)
        return value
    return number(value, what, **bounds)
