"""Statistics of a fair comparison: per-image errors, percentile-bootstrap intervals over images,
speed-quality frontiers, and the flags that keep nonsense points out of a comparison."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cachelab.evaluation.metrics import as_rgb


def per_image_mse(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Mean squared error of each image against its reference (images in [0, 1]), float64."""
    diff = as_rgb(images).double() - as_rgb(reference).double()
    return diff.flatten(1).pow(2).mean(1).numpy()


def psnr_of_mse(mse) -> float:
    """PSNR (dB, data range 1) of the mean of ``mse``: the batch PSNR that
    :func:`cachelab.evaluation.metrics.psnr` gives (inf when every image is identical)."""
    mean = float(np.mean(mse))
    if not math.isfinite(mean):
        return math.nan
    return math.inf if mean == 0 else -10.0 * math.log10(mean)


def resamples(n: int, draws: int, seed: int) -> np.ndarray:
    """``draws`` bootstrap resamples of ``n`` items (indices with replacement), seeded: (draws, n)."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of ``values`` (percentiles; NaNs ignored)."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(per_item, statistic: Callable[[np.ndarray], float], draws: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap ``level`` interval of ``statistic`` over the items of ``per_item``
    (resampled with replacement, ``draws`` times, seeded)."""
    values = np.asarray(per_item, dtype=float)
    return percentile_interval([statistic(values[idx]) for idx in resamples(len(values), draws, seed)], level)


def psnr_interval(mse, draws: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """The batch PSNR of per-image ``mse`` and its percentile-bootstrap interval over images."""
    low, high = bootstrap_interval(mse, psnr_of_mse, draws, seed, level)
    return psnr_of_mse(mse), low, high


# -- frontiers -----------------------------------------------------------------------------------
def frontier(points: Sequence[tuple[float, float]], higher_quality_better: bool = True) -> list[tuple[float, float]]:
    """The (quality, speed) points no other point beats on both axes, by quality from best to worst."""
    ordered = sorted(points, key=lambda p: (-p[0] if higher_quality_better else p[0], -p[1]))
    front, fastest = [], -math.inf
    for q, s in ordered:
        if s > fastest:
            front.append((q, s))
            fastest = s
    return front


def best_at(points: Sequence[tuple[float, float]], level: float) -> float | None:
    """The best speed among (quality, speed) points of quality at least ``level`` (None when none reaches it)."""
    speeds = [s for q, s in points if q >= level]
    return max(speeds) if speeds else None


def best_speed_at_levels(mse: np.ndarray, speeds: np.ndarray, levels: Sequence[float], idx: np.ndarray) -> np.ndarray:
    """For each resample of images (rows of ``idx``) and each level, the best of ``speeds``
    among the points (rows of ``mse``: points x images) whose PSNR on the resample reaches the
    level; full compute (speed 1, identical images) always does. Shape (resamples, levels)."""
    if not len(speeds):
        return np.ones((len(idx), len(levels)))
    mean = mse[:, idx].mean(axis=2)  # points x resamples
    with np.errstate(divide="ignore"):
        quality = -10.0 * np.log10(mean)
    reaches = quality[:, :, None] >= np.asarray(levels)[None, None, :]  # points x resamples x levels
    candidates = np.where(reaches, speeds[:, None, None], 1.0)
    return np.maximum(candidates.max(axis=0), 1.0)


def level_ratios(mse_a: np.ndarray, speeds_a, mse_b: np.ndarray, speeds_b, levels: Sequence[float],
                 draws: int = 2000, seed: int = 0, level: float = 0.95) -> list[tuple[float, float, float]]:
    """Per quality level: the ratio of A's best speed at that PSNR to B's (each the best of its
    points, rows of ``mse_*``, reaching the level; full compute counts as 1.0), on all images,
    and its percentile-bootstrap interval, the images resampled jointly for both (paired)."""
    mse_a, mse_b = np.atleast_2d(mse_a), np.atleast_2d(mse_b)
    speeds_a, speeds_b = np.asarray(speeds_a, dtype=float), np.asarray(speeds_b, dtype=float)
    n = mse_a.shape[1]
    everything = np.arange(n)[None, :]
    point = (best_speed_at_levels(mse_a, speeds_a, levels, everything)
             / best_speed_at_levels(mse_b, speeds_b, levels, everything))[0]
    idx = resamples(n, draws, seed)
    ratios = best_speed_at_levels(mse_a, speeds_a, levels, idx) / best_speed_at_levels(mse_b, speeds_b, levels, idx)
    return [(float(point[j]), *percentile_interval(ratios[:, j], level)) for j in range(len(levels))]


def verdict(low: float, high: float, a: str, noise: float = 0.0) -> str:
    """What a ratio interval A/B allows to say: A ahead (the interval above 1 + ``noise``), A
    behind (below 1 / (1 + ``noise``)), or parity; ``noise``: a relative measurement error the
    interval does not hold (the spread of repeated wall timings)."""
    if low > 1.0 + noise:
        return f"{a} ahead"
    if high < 1.0 / (1.0 + noise):
        return f"{a} behind"
    return "parity"


# -- nonsense ----------------------------------------------------------------------------------
def nonsense(flops_speedup: float | None, num_steps: int, output: torch.Tensor | None, baseline: torch.Tensor | None,
             wall_speedup: float | None = None) -> str:
    """Why a measured point is nonsense ('' if it is not): a non-finite output, a FLOPs (or wall)
    speedup above the number of steps (at least one step must compute), or an output identical
    to full compute while the FLOPs count claims skipped work (the tool changed nothing it
    counted). A point that skips nothing and changes nothing is no nonsense: it is full compute."""
    if output is not None and not bool(torch.isfinite(output).all()):
        return "non-finite output"
    if flops_speedup is not None and not math.isfinite(flops_speedup):
        return "non-finite FLOPs speedup"
    if flops_speedup is not None and flops_speedup > num_steps:
        return f"FLOPs speedup {flops_speedup:.2f} above the {num_steps} steps"
    if wall_speedup is not None and wall_speedup > num_steps:
        return f"wall speedup {wall_speedup:.2f} above the {num_steps} steps"
    if (flops_speedup is not None and flops_speedup > 1.0 + 1e-6 and output is not None and baseline is not None
            and torch.equal(output, baseline)):
        return f"output identical to full compute while claiming {flops_speedup:.2f}x fewer FLOPs"
    return ""
