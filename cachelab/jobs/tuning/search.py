"""The search over a :class:`~cachelab.jobs.tuning.space.Space` for a
:class:`~cachelab.jobs.tuning.targets.Target`, on plain values: a caller's ``measure(candidate,
stage)`` runs a candidate (None: the candidate cannot run, e.g. an adaptive schedule that needs an
error estimate the predictor lacks) and ``sensitivity(frame)`` gives the output's squared error of
each step forecast alone. Coordinate search with successive halving (method: docs/guides/tuning.md, "Searching
the whole strategy space")."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachelab.jobs.tuning.space import Candidate, Frame, Space
from cachelab.jobs.tuning.targets import Target

log = logging.getLogger(__name__)

SCREEN, VERIFY = "screen", "verify"  # the stages: few tuning images, then more
Measure = Callable[[Candidate, str], "dict | None"]  # (candidate, stage) -> speedup, psnr_db, rel_l2 (wall_speedup)
Sensitivity = Callable[[Frame], Sequence[float]]  # frame -> per step, the output's squared error of that step alone


@dataclass
class Found:
    """A candidate the search kept (the best of one axis): the ``stage`` (which search step found
    it) and its screening measurement; ``verified``: its measurement on the verification images."""

    candidate: Candidate
    stage: str
    screened: dict
    verified: dict | None = None

    def as_dict(self) -> dict:
        return {"setting": self.candidate.label(), "preset": self.candidate.preset, "knobs": self.candidate.knobs(),
                "found_by": self.stage, "screened": self.screened, "verified": self.verified}


class SpaceSearch:
    """Coordinate search over ``space`` for ``target``: (1) every frame (granularity x family x
    order) on the uniform intervals at the default warm-up and final steps; (2) the ``keep`` best
    frames, one coordinate at a time: the warm-up, the final full steps, the full steps placed by
    the sensitivity over time, each adaptive schedule's threshold; (3) the ``verify`` best
    candidates on the verification images (and the next ones while none meets the target
    there); the best that meets the target there is chosen. Along
    each axis (gentle to aggressive) the best candidate meeting the target is found by bisection,
    assuming the measurement is monotone along it."""

    def __init__(self, target: Target, space: Space, measure: Measure, sensitivity: Sensitivity, keep: int = 3,
                 verify: int = 3):
        self.target, self.space, self.measure, self.sensitivity = target, space, measure, sensitivity
        self.keep, self.verify = keep, verify

    def rank(self, values: dict) -> tuple[float, float]:
        """Larger is better: the target's objective, then its slack."""
        return self.target.objective(values), self.target.slack(values)

    def better(self, a: Found | None, b: Found | None) -> Found | None:
        """The better of two on their screening (either may be None)."""
        if a is None or b is None:
            return a or b
        return a if self.rank(a.screened) >= self.rank(b.screened) else b

    def boundary(self, axis: list[Candidate], stage: str) -> Found | None:
        """The best candidate of ``axis`` that meets the target on the screening images: the most
        aggressive one for a quality target, the gentlest for a speed target (bisection over the
        prefix where gentle settings meet it, or do not); None if none does or the axis cannot run."""
        values: dict[int, dict] = {}

        def gentle_side(i: int) -> bool | None:  # True: i is on the gentle side of the boundary
            values[i] = self.measure(axis[i], SCREEN)
            return None if values[i] is None else self.target.met(values[i]) == self.target.gentle_meets

        lo, hi = 0, len(axis)
        while lo < hi:
            mid = (lo + hi) // 2
            side = gentle_side(mid)
            if side is None:
                return None
            lo, hi = (mid + 1, hi) if side else (lo, mid)
        index = lo - 1 if self.target.gentle_meets else lo
        if not 0 <= index < len(axis):
            return None
        found = values.get(index) or self.measure(axis[index], SCREEN)
        return Found(axis[index], stage, found) if found is not None and self.target.met(found) else None

    def run(self) -> tuple[Found | None, list[Found]]:
        """The chosen candidate (verified to meet the target; None if none did) and every axis's best."""
        space, d0, f0 = self.space, self.space.warm_ups[0], self.space.finals[0]
        first = {frame: self.boundary(space.interval_axis(frame, d0, f0), "uniform interval")
                 for frame in space.frames()}
        found = [f for f in first.values() if f is not None]
        ranked = sorted(found, key=lambda f: self.rank(f.screened), reverse=True)
        for start in ranked[:self.keep]:
            frame, best = start.candidate.frame, start
            for d in space.warm_ups[1:]:
                best = self.add(found, best, self.boundary(space.interval_axis(frame, d, f0), "warm-up"))
            d = best.candidate.first_enhance
            for f in space.finals[1:]:
                best = self.add(found, best, self.boundary(space.interval_axis(frame, d, f), "final full steps"))
            f = best.candidate.final_full
            sensitivity = self.sensitivity(frame)
            placed = space.placed_axis(frame, d, f, sensitivity)
            best = self.add(found, best, self.boundary(placed, "placed full steps"))
            for axis in space.adaptive_axes(frame, d, f):
                best = self.add(found, best, self.boundary(axis, f"adaptive {axis[0].schedule}"))
            log.info(f"tune: {frame.label()}: best {best.candidate.label()} ({best.screened})")
        return self.verified(found), found

    def add(self, found: list[Found], best: Found, new: Found | None) -> Found:
        """``new`` recorded in ``found``; the better of it and ``best``."""
        if new is not None and all(new.candidate != f.candidate for f in found):
            found.append(new)
        return self.better(best, new)

    def verified(self, found: list[Found]) -> Found | None:
        """The ``verify`` best of ``found`` measured on the verification images, and the next
        ones while none of them meets the target there; the best that meets it."""
        distinct = list({f.candidate: f for f in found}.values())
        chosen = None
        for i, f in enumerate(sorted(distinct, key=lambda f: self.rank(f.screened), reverse=True)):
            if i >= self.verify and chosen is not None:
                break
            f.verified = self.measure(f.candidate, VERIFY)
            if f.verified is not None and self.target.met(f.verified):
                if chosen is None or self.rank(f.verified) > self.rank(chosen.verified):
                    chosen = f
        return chosen
