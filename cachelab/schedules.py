"""Schedules: decide once per step whether the model runs for real or is forecast."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Sequence
from typing import Any


class Decision(Enum):
    """What every cache site does at one step."""

    FULL = "full"
    FORECAST = "forecast"


@dataclass(frozen=True)
class StepContext:
    """What a schedule may look at: step ``s`` of ``T`` (counted up), the timestep, signals."""

    s: int
    T: int
    t: float | None = None
    signals: dict[str, Any] = field(default_factory=dict)


class Schedule(ABC):
    """Decides FULL or FORECAST once per denoising step."""

    @abstractmethod
    def decide(self, ctx: StepContext) -> Decision:
        """The decision for step ``ctx.s``."""

    def mask(self, T: int) -> list[bool] | None:
        """For static schedules, ``mask[s]`` is True at full steps; None if adaptive."""
        return None


class StaticSchedule(Schedule):
    """A schedule fixed in advance: ``decide`` reads the mask, so it holds no state."""

    @abstractmethod
    def mask(self, T: int) -> list[bool]:
        """``mask[s]`` is True at full steps."""

    def decide(self, ctx: StepContext) -> Decision:
        return Decision.FULL if self.mask(ctx.T)[ctx.s] else Decision.FORECAST

    def full_steps(self, T: int) -> list[int]:
        return [s for s, full in enumerate(self.mask(T)) if full]


class Always(StaticSchedule):
    """Every step is a full step (no acceleration; for analysis and sanity checks)."""

    def mask(self, T: int) -> list[bool]:
        return [True] * T


class Interval(StaticSchedule):
    """TaylorSeer/FORA rule: ``first_enhance`` warm-up full steps, then ``interval - 1``
    forecast steps and one full step, repeated; optionally the last ``final_full`` steps
    are full too (0 in the paper, so the last steps may be forecast)."""

    def __init__(self, interval: int, first_enhance: int = 1, final_full: int = 0):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if first_enhance < 1:
            raise ValueError(f"first_enhance must be >= 1, got {first_enhance}")
        if final_full < 0:
            raise ValueError(f"final_full must be >= 0, got {final_full}")
        self.interval = interval
        self.first_enhance = first_enhance
        self.final_full = final_full

    def mask(self, T: int) -> list[bool]:
        mask, counter = [], 0
        for s in range(T):
            full = s < self.first_enhance or counter == self.interval - 1 or s >= T - self.final_full
            counter = 0 if full else counter + 1
            mask.append(full)
        return mask


class Mask(StaticSchedule):
    """An explicit schedule: ``full_steps`` (step indices) or ``mask`` (one bool per step,
    its length must equal the number of steps) says which steps are full."""

    def __init__(self, full_steps: Sequence[int] | None = None, mask: Sequence[bool] | None = None):
        if (full_steps is None) == (mask is None):
            raise ValueError("give exactly one of full_steps (step indices) and mask (one bool per step)")
        if full_steps is not None and any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in full_steps):
            raise ValueError(f"full_steps must be step indices >= 0, got {list(full_steps)}")
        self.full_steps_given = None if full_steps is None else sorted(set(full_steps))
        self.mask_given = None if mask is None else [bool(m) for m in mask]

    def mask(self, T: int) -> list[bool]:
        if self.mask_given is not None:
            if len(self.mask_given) != T:
                raise ValueError(f"the mask has {len(self.mask_given)} entries but the generation has {T} steps")
            return list(self.mask_given)
        beyond = [s for s in self.full_steps_given if s >= T]
        if beyond:
            raise ValueError(f"full_steps {beyond} are beyond the last step {T - 1}")
        full = set(self.full_steps_given)
        return [s in full for s in range(T)]
