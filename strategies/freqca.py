"""FreqCa (Liu et al. 2025, "Accelerating Diffusion Models via Frequency-Aware Caching"): the low
spatial frequencies of a cached value are reused, the high ones forecast by HiCache's Hermite
predictor; its preset caches one cumulative residual (the whole stack's)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from cachelab.core.arguments import between, checked, in_range
from cachelab.core.predictor import Predictor, PredictorState
from cachelab.core.schedules import WarmUp
from cachelab.core.spectral import low_pass
from cachelab.strategies.hermite import HiCache
from cachelab.strategies.taylor import MAX_ORDER, TaylorState


@dataclass
class FreqCaState(PredictorState):
    """The low-frequency part of the last full-step value and the high part's Hermite state."""

    low: torch.Tensor | None = None
    high: TaylorState = field(default_factory=TaylorState)
    last_step: int | None = None

    def tensors(self) -> list[torch.Tensor]:
        return ([] if self.low is None else [self.low]) + self.high.factors

    @property
    def order_reached(self) -> int | None:
        return self.high.order_reached


class FreqCa(Predictor):
    """``F(s) = L(s_0) + Hermite_m[H](s)``: at each full step ``s_0`` the value splits into its low
    band ``L = low_pass(F, cutoff)`` (spatial frequencies of norm <= ``cutoff`` cycles per token
    on the token grid, :mod:`cachelab.core.spectral`) and the rest ``H = F - L``; ``L`` is reused
    as it is and ``H`` is forecast by HiCache of order ``order`` with scale ``sigma`` on the
    high parts of the full steps (TaylorSeer's factors, ``first_enhance`` included)."""

    @checked
    def __init__(self, order: Annotated[int, between(0, MAX_ORDER)] = 2, sigma: float = 0.5,
                 cutoff: Annotated[float, in_range(0, 1)] = 0.2, first_enhance: WarmUp = 1):
        self.high = HiCache(order, first_enhance, sigma)
        self.cutoff = cutoff

    def new_state(self) -> FreqCaState:
        return FreqCaState()

    def update(self, state: FreqCaState, s: int, value: torch.Tensor) -> None:
        low = low_pass(value, self.cutoff)
        self.high.update(state.high, s, value - low)
        state.low, state.last_step = low, s

    def predict(self, state: FreqCaState, s: int) -> torch.Tensor:
        self.gap(state, s)
        return state.low + self.high.predict(state.high, s)  # a new tensor: never the state's own
