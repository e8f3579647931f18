"""Schedules: decide once per step whether the model runs for real or is forecast."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from cachelab.core.arguments import at_least, checked, in_range
from cachelab.core.distributed import Reduce, local

# the arguments schedules share, with what they allow (checked when a schedule is built)
StepInterval = Annotated[int, at_least(1)]  # an interval in steps (1: every step full)
WarmUp = Annotated[int, at_least(1)]  # full steps at the start (step 0 at least)
FinalFull = Annotated[int, at_least(0)]  # full steps at the end


class Decision(Enum):
    """What every cache site does at one step."""

    FULL = "full"
    FORECAST = "forecast"


# A step's decision: one for every site, or one per site kind (sites of other kinds are FULL).
StepDecision = Decision | Mapping[str, Decision]


def is_full(decision: StepDecision) -> bool:
    """Whether every site computes at a step with this decision."""
    if isinstance(decision, Decision):
        return decision is Decision.FULL
    return all(d is Decision.FULL for d in decision.values())


@dataclass(frozen=True)
class StepContext:
    """What a schedule may look at: step ``s`` of ``T`` (counted up), the timestep, signals,
    ``reduce``, which sums a tensor of sums over the ranks sharing the generation (the identity
    in one process): a schedule reduces sums and divides afterwards, so every rank decides alike;
    and ``logsnr``, the step's log signal-to-noise ratio when the sampler gave its grid."""

    s: int
    T: int
    t: float | None = None
    signals: dict[str, Any] = field(default_factory=dict)
    reduce: Reduce = local
    logsnr: float | None = None


class Schedule(ABC):
    """Decides FULL or FORECAST once per denoising step.

    ``signals`` names what ``decide`` reads from ``ctx.signals`` (a probe's value, the
    predictor's error estimate): the controller decides as soon as they are all there.
    ``kinds`` names the site kinds (``Site.kind``) a per-kind schedule decides for; its
    ``decide`` returns kind -> Decision. With ``decides_for = "site"`` the names in ``kinds``
    and the decision's keys are site names (``Site.decision_name``) instead. A schedule with
    per-generation state clears it in ``reset``, which the controller calls at the start of
    every generation.
    """

    signals: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    decides_for: str = "kind"  # what the keys of a per-kind decision name: "kind" or "site"

    @abstractmethod
    def decide(self, ctx: StepContext) -> StepDecision:
        """The decision for step ``ctx.s``."""

    def reset(self) -> None:
        """Forget the previous generation (no-op for stateless schedules)."""

    def mask(self, T: int) -> list[bool] | None:
        """For static schedules, ``mask[s]`` is True at full steps; None if adaptive."""
        return None

    def held_bytes(self) -> int:
        """Bytes of the tensors kept between steps (an adaptive schedule's reference signal);
        they count in the cache memory."""
        return 0

    def verifies(self, s: int, T: int) -> bool:
        """After a forecast decision at step ``s``, whether the step's ``verification_error``
        (a schedule that reads it) will be read: the controller computes its check site for real
        only then."""
        return True


class StaticSchedule(Schedule):
    """A schedule fixed in advance: ``decide`` reads the mask, so it holds no state."""

    @abstractmethod
    def mask(self, T: int) -> list[bool]:
        """``mask[s]`` is True at full steps."""

    def decide(self, ctx: StepContext) -> Decision:
        return Decision.FULL if self.mask_for(ctx.T)[ctx.s] else Decision.FORECAST

    def mask_for(self, T: int) -> list[bool]:
        """``mask(T)``, computed once per ``T`` (``decide`` runs every step)."""
        cached = self.__dict__.get("_mask_for")
        if cached is None or cached[0] != T:
            cached = self._mask_for = (T, self.mask(T))
        return cached[1]

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

    @checked
    def __init__(self, interval: StepInterval, first_enhance: WarmUp = 1, final_full: FinalFull = 0):
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


class ToCaInterval(StaticSchedule):
    """ToCa's full steps (its DiT code's force scheduler and ``cal_type``): counting steps down,
    ``d = T - 1 - s``, step 0 and every step with ``d`` divisible by
    ``round(interval / (1 + w - 2 w d / T))`` are full (``w = weight``, 0.4 in ToCa): the interval
    grows from about ``interval / (1 - w)`` early to ``interval / (1 + w)`` late; the last step is full."""

    @checked
    def __init__(self, interval: StepInterval, weight: Annotated[float, in_range(0, 1, closed=False)] = 0.4):
        self.interval, self.weight = interval, weight

    def mask(self, T: int) -> list[bool]:
        w = self.weight
        return [s == 0 or (T - 1 - s) % max(round(self.interval / (1 + w - 2 * w * (T - 1 - s) / T)), 1) == 0
                for s in range(T)]


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


class PerKindInterval(Schedule):
    """PAB (pyramid attention broadcast): site kind ``k`` computes every ``intervals[k]``
    steps (``s % intervals[k] == 0``) and is forecast in between while the timestep ``t`` is
    inside ``window`` (``lo < t < hi``; null: every step); outside the window, and for kinds
    not listed, sites compute."""

    def __init__(self, intervals: Mapping[str, int], window: Sequence[float] | None = None):
        if not intervals:
            raise ValueError("intervals must name at least one site kind, e.g. {attn: 2}")
        bad = {k: n for k, n in intervals.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"intervals must be integers >= 1, got {bad}")
        if window is not None and (len(window) != 2 or not window[0] < window[1]):
            raise ValueError(f"window must be [lo, hi] with lo < hi (timesteps) or null, got {list(window)}")
        self.intervals = dict(intervals)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.kinds = tuple(self.intervals)

    def decide(self, ctx: StepContext) -> dict[str, Decision]:
        if self.window is not None and ctx.t is None:
            raise ValueError("a PAB window needs the timestep: call handle.step(s, t)")
        inside = self.window is None or self.window[0] < ctx.t < self.window[1]
        return {kind: Decision.FORECAST if inside and ctx.s % n else Decision.FULL
                for kind, n in self.intervals.items()}


class PerSiteInterval(Schedule):
    """One interval per cache site: site ``name`` follows ``Interval(intervals[name],
    first_enhance, final_full)``, so deeper or steadier sites can refresh less often (what
    ``job=tune`` writes); sites not named compute on every step (with none named, every site
    does: ``schedule=per_site`` alone forecasts nothing)."""

    decides_for = "site"

    def __init__(self, intervals: Mapping[str, int], first_enhance: WarmUp = 1, final_full: FinalFull = 0):
        bad = {k: n for k, n in intervals.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"intervals must be integers >= 1, got {bad}")
        self.intervals = dict(intervals)
        self.schedules = {name: Interval(n, first_enhance, final_full) for name, n in self.intervals.items()}
        self.kinds = tuple(self.intervals)

    def site_masks(self, T: int) -> dict[str, list[bool]]:
        """Site name -> ``mask[s]``, True at that site's full steps."""
        return {name: schedule.mask(T) for name, schedule in self.schedules.items()}

    def decide(self, ctx: StepContext) -> dict[str, Decision]:
        return {name: schedule.decide(ctx) for name, schedule in self.schedules.items()}
