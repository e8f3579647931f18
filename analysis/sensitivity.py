"""The tuner's error model and search (``job=tune``, :mod:`cachelab.jobs.tune`).

Every group ``g`` of cache sites (a site, or the sites of one block) is measured alone at every
interval ``n``: one real cached run forecasting only ``g`` (every other site computes) gives the
output's squared error ``q[g][n]`` (the latents' rel-L2 squared, or the images' mean squared
error). A configuration ``{g: n_g}`` is predicted at :func:`additive` ``sum_g q[g][n_g]``
(independent errors add in squares; interval 1, always computed, adds nothing). Forecasting every
group at once with one shared interval is measured too (the groups' errors there are not
independent: their full steps coincide), and a configuration reached from a uniform one is
predicted by :func:`anchored`: the uniform one's measured error plus the groups' changes.
:class:`Calibration` maps that to the value measured on a few full-configuration runs.
:func:`greedy_path` searches the per-group intervals: from a start, it lengthens the interval of
the group whose added error per FLOP saved is lowest."""
from __future__ import annotations

import math

import numpy as np

TINY = 1e-30  # a zero squared error, for the logarithms
Table = dict[str, dict[int, float]]  # group -> interval -> value (squared error, or FLOPs share saved)


def own_error(table: Table, group: str, interval: int) -> float:
    """``group``'s measured squared error at ``interval``: 0 at interval 1 (always computed)."""
    return 0.0 if interval == 1 else table[group][interval]


def additive(table: Table, choice: dict[str, int]) -> float:
    """The predicted squared error of ``choice`` (group -> interval): the sum of its groups'
    measured squared errors; a group at interval 1 (or absent) adds nothing."""
    return sum(own_error(table, g, n) for g, n in choice.items())


def anchored(table: Table, uniform: dict[int, float], base: int, choice: dict[str, int]) -> float:
    """The predicted squared error of ``choice`` reached from the uniform interval ``base``:
    the measured squared error of the uniform configuration (``uniform[base]``; 0 at 1, all
    computed), plus the change of the groups' own errors from ``base`` to their intervals
    (at base 1 this is :func:`additive`); at least 0."""
    start = 0.0 if base == 1 else uniform[base]
    return max(start + sum(own_error(table, g, n) - own_error(table, g, base) for g, n in choice.items()), 0.0)


def greedy_path(errors: Table, savings: Table, start: dict[str, int]) -> list[dict[str, int]]:
    """From ``start``, lengthen one group's interval at a time, always the move (a group to any
    longer interval it has) with the lowest added error per FLOPs share saved, until no move
    saves more; every configuration on the way, ``start`` first. From all-ones this walks the
    lower convex hull of the (saving, error) configurations: each point minimises error minus
    lambda x saving for some lambda (tests/test_tune.py checks it against brute force)."""
    choice, path = dict(start), [dict(start)]

    def cost(g: str, n: int) -> tuple[float, float]:
        return own_error(errors, g, n), own_error(savings, g, n)

    while True:
        best = None
        for g, n in choice.items():
            e0, s0 = cost(g, n)
            for m in errors[g]:
                e1, s1 = cost(g, m)
                if m > n and s1 > s0:
                    key = ((e1 - e0) / (s1 - s0), -(s1 - s0))
                    if best is None or key < best[0]:
                        best = (key, g, m)
        if best is None:
            return path
        choice[best[1]] = best[2]
        path.append(dict(choice))


class Calibration:
    """``log10 measured = a + b log10 predicted``, least squares over (predicted, measured)
    points; one distinct prediction fits the offset alone (b = 1), none is the identity."""

    def __init__(self, points: list[tuple[float, float]]):
        x = np.log10([max(p, TINY) for p, _ in points]) if points else np.zeros(0)
        y = np.log10([m for _, m in points]) if points else np.zeros(0)
        if len(points) and np.ptp(x) > 0:
            self.slope, self.intercept = (float(v) for v in np.polyfit(x, y, 1))
        else:
            self.slope, self.intercept = 1.0, float(np.mean(y - x)) if len(points) else 0.0
        self.points = [(float(p), float(m)) for p, m in points]

    def __call__(self, predicted: float) -> float:
        return 10 ** (self.intercept + self.slope * math.log10(max(predicted, TINY)))

    def as_dict(self) -> dict:
        return {"intercept": self.intercept, "slope": self.slope,
                "points": [{"additive": p, "measured": m} for p, m in self.points]}


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [0, 1] at mean squared error ``mse`` (inf at 0)."""
    return math.inf if mse <= 0 else -10 * math.log10(mse)


def mse_from_psnr(psnr_db: float) -> float:
    """The mean squared error of images in [0, 1] at ``psnr_db``."""
    return 10 ** (-psnr_db / 10)
