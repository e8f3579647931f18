"""The strategy space that ``job=tune job.search=space`` searches, on plain values: predictor
families from a registry (:class:`Family`: a preset and its orders; a new predictor joins with one
entry), granularities, warm-ups, final full steps, and three ways to place the full steps
(:class:`Candidate`): a uniform interval, the full steps placed by the measured sensitivity over
time (:func:`placed_full_steps`), or an adaptive schedule's threshold. Each candidate is a
``conf/strategy/`` preset and its command-line keys, so it runs as ``cachelab.apply`` and
``python run.py`` would run it, and as a benchmark point."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cachelab.core.schedules import Interval

INTERVAL, PLACED = "interval", "mask"  # the schedules of the static placements (conf/schedule/ names)


@dataclass(frozen=True)
class Family:
    """A predictor family: its ``preset`` (``conf/strategy/<preset>.yaml``) and the ``orders``
    searched (empty: the preset takes no order)."""

    name: str
    preset: str
    orders: tuple[int, ...] = ()

    def order_choices(self) -> tuple[int | None, ...]:
        return self.orders or (None,)


@dataclass(frozen=True)
class Frame:
    """Where and what forecasts: a granularity, a family and its order (None: it has none)."""

    granularity: str
    family: Family
    order: int | None

    def label(self) -> str:
        return f"{self.family.name}{'' if self.order is None else f' o{self.order}'} {self.granularity}"


@dataclass(frozen=True)
class Candidate:
    """A frame with its warm-up, final full steps and placement: ``schedule`` ``interval``
    (``value``: N), ``mask`` (``value``: the full steps) or an adaptive schedule's name
    (``value``: its threshold, under the key ``threshold_key``)."""

    frame: Frame
    first_enhance: int
    final_full: int
    schedule: str
    value: object
    threshold_key: str | None = None

    def knobs(self) -> dict:
        """The preset's command-line keys (``cachelab.presets.preset(preset, **knobs)``)."""
        knobs: dict = {"granularity": self.frame.granularity, "first_enhance": self.first_enhance}
        if self.frame.order is not None:
            knobs["order"] = self.frame.order
        if self.schedule == INTERVAL:
            return {**knobs, "interval": self.value, "final_full": self.final_full}
        if self.schedule == PLACED:  # the warm-up and final steps are in the list
            return {**knobs, "schedule": PLACED, "full_steps": list(self.value)}
        return {**knobs, "schedule": self.schedule, self.threshold_key: self.value, "final_full": self.final_full}

    @property
    def preset(self) -> str:
        return self.frame.family.preset

    def label(self) -> str:
        """``taylor o2 output D=2 F=0 N=5`` (``placed K=12``: 12 full steps placed;
        ``error_controlled tolerance=0.05``)."""
        if self.schedule == INTERVAL:
            how = f"N={self.value}"
        elif self.schedule == PLACED:
            how = f"placed K={len(self.value)}"
        else:
            how = f"{self.schedule} {self.threshold_key}={self.value:g}"
        return f"{self.frame.label()} D={self.first_enhance} F={self.final_full} {how}"

    def key(self) -> str:
        """A stable identity (the probe file's key)."""
        return f"{self.preset} {sorted(self.knobs().items())}"


@dataclass(frozen=True)
class Adaptive:
    """An adaptive schedule (``conf/schedule/<name>.yaml``) and its threshold values, gentle first."""

    name: str
    key: str
    values: tuple[float, ...]


@dataclass(frozen=True)
class Space:
    """The space: ``families`` (the registry), ``granularities``, uniform ``intervals`` (gentle
    first), ``warm_ups`` (the first is the frames' default), ``finals`` (the first is the
    default), ``adaptive`` schedules, for generations of ``num_steps`` steps."""

    families: tuple[Family, ...]
    granularities: tuple[str, ...]
    intervals: tuple[int, ...]
    warm_ups: tuple[int, ...]
    finals: tuple[int, ...]
    num_steps: int
    adaptive: tuple[Adaptive, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, families: Mapping[str, Mapping], granularities: Sequence[str], intervals: Sequence[int],
           warm_ups: Sequence[int], finals: Sequence[int], num_steps: int,
           adaptive: Mapping[str, Mapping] | None = None) -> Space:
        """From the config's plain values: ``families`` name -> {preset, orders}, ``adaptive``
        schedule -> {key, values}; intervals sorted, 1 (always computing) left out."""
        registry = tuple(Family(name, spec["preset"], tuple(spec.get("orders") or ())) for name, spec in families.items())
        thresholds = tuple(Adaptive(name, spec["key"], tuple(sorted(spec["values"])))
                           for name, spec in (adaptive or {}).items())
        return cls(registry, tuple(granularities), tuple(sorted(set(intervals) - {1})), tuple(warm_ups), tuple(finals),
                   num_steps, thresholds)

    def frames(self) -> list[Frame]:
        """Every granularity x family x order."""
        return [Frame(g, family, order) for g in self.granularities for family in self.families
                for order in family.order_choices()]

    def interval_axis(self, frame: Frame, first_enhance: int, final_full: int) -> list[Candidate]:
        """The uniform intervals, gentle (N=2) first."""
        return [Candidate(frame, first_enhance, final_full, INTERVAL, n) for n in self.intervals]

    def placed_axis(self, frame: Frame, first_enhance: int, final_full: int,
                    sensitivity: Sequence[float]) -> list[Candidate]:
        """The full steps placed by ``sensitivity`` (:func:`placed_full_steps`): every count from
        the gentlest uniform interval's down to the warm-up and final steps and one more (the
        counts of the uniform intervals among them, each at its interval's FLOPs), most first."""
        most = sum(Interval(self.intervals[0], first_enhance, final_full).mask(self.num_steps))
        fewest = len(set(range(first_enhance)) | set(range(self.num_steps - final_full, self.num_steps))) + 1
        counts = range(most, min(fewest, most) - 1, -1)
        growth = 1 + (frame.order if frame.order is not None else 1)
        return [Candidate(frame, first_enhance, final_full, PLACED,
                          tuple(placed_full_steps(sensitivity, k, first_enhance, final_full, growth)))
                for k in counts]

    def adaptive_axes(self, frame: Frame, first_enhance: int, final_full: int) -> list[list[Candidate]]:
        """One axis per adaptive schedule: its thresholds, gentle (smallest) first."""
        return [[Candidate(frame, first_enhance, final_full, a.name, v, a.key) for v in a.values]
                for a in self.adaptive]


def placed_full_steps(sensitivity: Sequence[float], count: int, first_enhance: int, final_full: int,
                      growth: int) -> list[int]:
    """The ``count`` full steps that minimise the predicted output error, a global schedule found
    as a shortest path with ``count`` nodes through the steps (LeMiCa's formulation): the first
    ``first_enhance`` and last ``final_full`` steps are full; a step ``t`` forecast ``k`` steps
    after the last full one adds ``sensitivity[t] * k**(2 growth)`` (``sensitivity[t]``: the
    output's squared error when step ``t`` alone is forecast one step ahead; an order-``m``
    forecast's error grows as ``k**(m+1)``, its square as ``k**(2(m+1))``, ``growth = m + 1``).
    Ties go to the earliest full steps."""
    T = len(sensitivity)
    forced = sorted(set(range(min(first_enhance, T))) | set(range(T - final_full, T)))
    if not 1 <= count <= T or len(forced) > count:
        raise ValueError(f"count={count}: allowed: {len(forced)}..{T} full steps (the warm-up and final ones are full)")

    # gap[i][j]: the added error of forecasting the steps strictly between full steps i and j (j = T: to the end)
    gap = [[sum(sensitivity[t] * (t - i) ** (2 * growth) for t in range(i + 1, j)) for j in range(T + 1)]
           for i in range(T)]

    # best[j][c]: the least error of the steps before j with c full steps among 0..j, j full.
    best = [[math.inf] * (count + 1) for _ in range(T)]
    back = [[-1] * (count + 1) for _ in range(T)]
    best[0][1] = 0.0  # step 0 is always full
    for j in range(1, T):
        for i in range(j):
            if any(i < f < j for f in forced):  # a forced full step cannot be skipped over
                continue
            for c in range(1, count):
                if best[i][c] + gap[i][j] < best[j][c + 1]:
                    best[j][c + 1], back[j][c + 1] = best[i][c] + gap[i][j], i
    last = min((j for j in range(T) if not any(f > j for f in forced)),
               key=lambda j: (best[j][count] + gap[j][T], j))
    steps, c = [last], count
    while steps[-1] != 0:
        steps.append(back[steps[-1]][c])
        c -= 1
    return sorted(steps)
