"""Exponential forecast (Prony / DMD-style): each element follows ``a + b exp(c s)``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cachelab.core.predictor import Predictor
from cachelab.strategies.least_squares import WindowState

_NEWTON_ITERATIONS = 8  # |c| <= 1 and gap ratios up to 50 converge in 6 (float64)


def log_secant(x: torch.Tensor) -> torch.Tensor:
    """``L(x) = log((e^x - 1) / x)``, ``L(0) = 0``, without overflow."""
    ax = x.abs()
    safe = torch.where(ax == 0, 1.0, ax)
    return torch.where(ax == 0, 0.0, x.clamp(min=0) + torch.log(-torch.expm1(-safe) / safe))


def log_secant_slope(x: torch.Tensor) -> torch.Tensor:
    """``L'(x) = 1 / (1 - e^-x) - 1 / x``; near 0 its series ``1/2 + x/12``."""
    small = x.abs() < 1e-2
    safe = torch.where(small, 1.0, x)
    return torch.where(small, 0.5 + x / 12, 1 / -torch.expm1(-safe) - 1 / safe)


def fit_rate(values: list[torch.Tensor], steps: list[int], max_rate: float) -> torch.Tensor:
    """Per element, the rate ``c`` of ``a + b exp(c s)`` through three values (newest first).

    With gaps ``h1 = s0 - s1``, ``h2 = s1 - s2`` and secant slopes ``m1``, ``m2`` of the two
    intervals, ``log(m1 / m2) = G(c) = c h2 + L(c h1) - L(c h2)``; ``G`` increases strictly, so
    ``c`` is unique: ``log(m1 / m2) / h`` on a uniform grid, else Newton's method from the
    midpoint-rule guess ``2 log(m1 / m2) / (h1 + h2)``. Where ``m1 m2 <= 0`` (no monotone
    exponential fits, constant values included) or ``|c| > max_rate`` the rate is 0.
    """
    f0, f1, f2 = values
    h1, h2 = steps[0] - steps[1], steps[1] - steps[2]

    def log_ratio(c):
        return c * h2 + log_secant(c * h1) - log_secant(c * h2)

    lo, hi = log_ratio(torch.tensor([-max_rate, max_rate], dtype=torch.float64)).tolist()
    ratio = (f0 - f1) * h2 / ((f1 - f2) * h1)
    target = torch.log(torch.where(ratio > 0, ratio, 1.0))  # ratio <= 0 or NaN: rate 0
    valid = (target >= lo) & (target <= hi)  # inf fails
    target = torch.where(valid, target, 0.0)
    c = target * (2 / (h1 + h2))
    if h1 != h2:
        for _ in range(_NEWTON_ITERATIONS):
            slope = h2 + h1 * log_secant_slope(c * h1) - h2 * log_secant_slope(c * h2)
            c = (c - (log_ratio(c) - target) / slope).clamp_(-max_rate, max_rate)
    return c


@dataclass
class ExponentialState(WindowState):
    """The last two full-step values and steps, and the per-element rate fitted through the
    last three (None until three full steps are seen)."""

    rate: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return self.values + ([] if self.rate is None else [self.rate])


class Exponential(Predictor):
    """Forecast each element as ``a + b exp(c s)`` through the last three full steps.

    With the newest values ``F0, F1`` at steps ``s0 > s1`` and the rate ``c`` of
    :func:`fit_rate` (on the actual, possibly non-uniform grid), the forecast ``k`` steps after
    ``s0`` is ``F0 + (F0 - F1) (e^{ck} - 1) / (1 - e^{-c (s0 - s1)})``. Its ``c -> 0`` limit,
    used wherever the fit is ill-conditioned (the two secant slopes differ in sign or one is
    zero, or ``|c| > max_rate`` per step), is linear extrapolation through ``F0, F1``. Two full
    steps: linear; one: reuse. The fit is computed in float32 (float64 for float64 values).
    """

    def __init__(self, max_rate: float = 1.0):
        if not (math.isfinite(max_rate) and max_rate > 0):
            raise ValueError(f"max_rate must be a finite number > 0, got {max_rate!r}")
        self.max_rate = max_rate

    def new_state(self) -> ExponentialState:
        return ExponentialState()

    def update(self, state: ExponentialState, s: int, value: torch.Tensor) -> None:
        state.push(s, value, 3)
        if len(state.values) == 3:
            dtype = torch.promote_types(value.dtype, torch.float32)
            state.rate = fit_rate([v.to(dtype) for v in state.values], state.steps, self.max_rate)
            del state.values[2], state.steps[2]

    def predict(self, state: ExponentialState, s: int) -> torch.Tensor:
        k = self.gap(state, s)
        f0 = state.values[0]
        if len(state.values) == 1:
            return f0
        h1 = state.steps[0] - state.steps[1]
        dtype = torch.promote_types(f0.dtype, torch.float32)
        increment = f0.to(dtype) - state.values[1].to(dtype)
        c = state.rate
        weight = k / h1 if c is None else torch.where(c == 0, k / h1, torch.expm1(c * k) / -torch.expm1(-c * h1))
        return (f0.to(dtype) + increment * weight).to(f0.dtype)
