"""Least-squares polynomial over a window of full steps, and the window history that the
window-based forecasters share."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from cachelab.core.predictor import Predictor, PredictorState


@dataclass
class WindowState(PredictorState):
    """The last few full-step values of one site and their steps, newest first."""

    steps: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    last_step: int | None = None

    def tensors(self) -> list[torch.Tensor]:
        return self.values

    def push(self, s: int, value: torch.Tensor, size: int) -> None:
        """Record full step ``s``, keeping the newest ``size`` values."""
        if self.has_history:
            Predictor.gap(self, s)
        self.steps = [s, *self.steps][:size]
        self.values = [value, *self.values][:size]
        self.last_step = s


class WindowPredictor(Predictor):
    """A forecast that is a linear combination of the last ``size`` full-step values.

    The weights depend only on the step grid: :meth:`weights` computes them in float64 from the
    offsets of the window's steps to the newest one (``0, s_1 - s_0, ...``) and the forecast
    offset ``k = s - s_0``; the values are then summed once, in float32 or wider.
    """

    size: int

    def new_state(self) -> WindowState:
        return WindowState()

    def update(self, state: WindowState, s: int, value: torch.Tensor) -> None:
        state.push(s, value, self.size)

    @abstractmethod
    def weights(self, offsets: tuple[int, ...], k: int) -> tuple[float, ...]:
        """One weight per value of the window (newest first)."""

    def predict(self, state: WindowState, s: int) -> torch.Tensor:
        k = self.gap(state, s)
        offsets = tuple(t - state.steps[0] for t in state.steps)
        values = state.values
        dtype = torch.promote_types(values[0].dtype, torch.float32)
        weights = self.weights(offsets, k)
        acc = values[0].to(dtype) * weights[0]
        for value, w in zip(values[1:], weights[1:]):
            acc.add_(value, alpha=w)
        return acc.to(values[0].dtype)


@lru_cache(maxsize=1024)
def least_squares_weights(offsets: tuple[int, ...], k: int, degree: int) -> tuple[float, ...]:
    """Weights that evaluate at ``k`` the least-squares polynomial of degree ``degree``
    (at most ``len(offsets) - 1``) through the values at ``offsets``."""
    scale = max(-offsets[-1], 1)  # conditioning: the grid mapped into [-1, 0]
    x = np.asarray(offsets, dtype=np.float64) / scale
    degree = min(degree, len(offsets) - 1)
    powers = np.arange(degree + 1)
    vandermonde = x[:, None] ** powers
    return tuple(map(float, np.linalg.pinv(vandermonde).T @ (k / scale) ** powers))


class LeastSquares(WindowPredictor):
    """The polynomial of degree ``order`` fitted by least squares to the last ``window``
    full-step values (on their actual steps), evaluated at the forecast step.

    Exact on polynomials of degree <= ``order``; with ``window = order + 1`` it interpolates
    (TaylorSeer's ``newton`` extrapolation). Shorter histories fit degree ``n - 1`` to the ``n``
    values they have (one value: reuse).
    """

    def __init__(self, order: int, window: int = 4):
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        if window < order + 1:
            raise ValueError(f"window must be >= order + 1 = {order + 1}, got {window}")
        self.order = order
        self.size = window

    def weights(self, offsets: tuple[int, ...], k: int) -> tuple[float, ...]:
        return least_squares_weights(offsets, k, self.order)
