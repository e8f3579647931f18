"""FoCa (Zheng et al., AAAI 2026, "Forecast then Calibrate: Feature Caching as ODE"): the feature
as the solution of ``dF/ds = g(F, s)``, integrated from cached values by a predictor-corrector."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from cachelab.core.arguments import at_least, checked
from cachelab.core.predictor import Predictor, PredictorState
from cachelab.core.tokens import scatter_tokens

_SLOPES = ("per_step", "undivided")


@dataclass
class FoCaState(PredictorState):
    """The last two full steps (the anchors) and the last two values of every step seen, full or
    forecast (the local window), each ``(step, value)``, newest first; ``slope``: the anchor slope,
    where it is kept from the first forecast after a full step on (in place of the older anchor)."""

    anchors: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    window: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    last_step: int | None = None
    slope: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        held = {id(v): v for _, v in (*self.anchors, *self.window)}
        return [*held.values(), *([] if self.slope is None else [self.slope])]


class FoCa(Predictor):
    """FoCa's forecast-then-calibrate step, as cache-dit 1.5 implements it (its
    ``calibrators/foca.py``; FoCa's own code is not released), on the actual step grid.

    With the anchors ``F_0, F_1`` at the last two full steps ``s_0 > s_1`` and the local window
    ``F_a, F_b`` (the last two values recorded, full or forecast, at steps ``a > b``):

    - the anchor slope ``g_0 = (F_0 - F_1) / (s_0 - s_1)``;
    - the forecast (the BDF2-style predictor, linear extrapolation of the window)
      ``P = F_a + (s - a) g_a`` with the local slope ``g_a = (F_a - F_b) / (a - b)``;
    - the calibration (Heun's trapezoid from the anchor, with the predictor's slope at the
      new point): ``F(s) = F_0 + (e / 2) (g_0 + g_a)``, ``e = s - s_0``.

    For ``e > horizon`` the step is damped toward the anchor: ``F_0 + (horizon / e) (horizon / 2)
    (g_0 + g_a)`` (cache-dit's blend of the horizon-3 forecast and the anchor). Each forecast
    enters the window, so the next forecast step extrapolates from it (recursive prediction).
    Before two full steps, or while the window holds fewer than two values, it reuses ``F_0``.

    Exact for ``F`` linear in the step (every slope is the line's) up to the horizon, on any
    grid. ``anchor_slope="undivided"`` takes cache-dit's literal slopes ``F_0 - F_1`` and
    ``F_a - F_b`` (not divided by their gaps): equal on consecutive full steps, larger by the
    gap otherwise. The arithmetic is in float32 or wider. Under token selection (ToCa, ClusCa) the
    tokens computed on a forecast step replace theirs in that step's forecast, the window's newest
    value, so the next forecasts extrapolate from them.
    """

    forecasts_change_state = True  # each forecast enters the window (and the anchor slope is kept)

    @checked
    def __init__(self, horizon: Annotated[int, at_least(1)] | None = 3, anchor_slope: str = "per_step"):
        if anchor_slope not in _SLOPES:
            raise ValueError(f"anchor_slope must be one of {list(_SLOPES)}, got {anchor_slope!r}")
        self.horizon = horizon
        self.divided = anchor_slope == "per_step"

    def new_state(self) -> FoCaState:
        return FoCaState()

    def update(self, state: FoCaState, s: int, value: torch.Tensor) -> None:
        if state.has_history:
            self.gap(state, s)
        state.anchors = [(s, value), *state.anchors[:1]]
        state.window = [(s, value), *state.window[:1]]
        state.last_step, state.slope = s, None

    def slope(self, newer: tuple[int, torch.Tensor], older: tuple[int, torch.Tensor], dtype) -> torch.Tensor:
        difference = newer[1].to(dtype) - older[1].to(dtype)
        return difference.div_(newer[0] - older[0]) if self.divided else difference

    def predict(self, state: FoCaState, s: int) -> torch.Tensor:
        e = self.gap(state, s)
        if state.window[0][0] == s:  # asked again at the same step: the forecast already made
            return state.window[0][1]
        newest = state.anchors[0][1]
        if (len(state.anchors) < 2 and state.slope is None) or len(state.window) < 2:
            return newest
        dtype = torch.promote_types(newest.dtype, torch.float32)
        h = self.horizon
        weight = e / 2 if h is None or e <= h else h * h / (2 * e)
        anchor = state.slope
        if anchor is None:
            anchor = self.slope(*state.anchors, dtype)
            if dtype == newest.dtype:  # as wide as the values: kept instead of the older anchor, no more bytes
                state.slope, state.anchors = anchor, state.anchors[:1]
        # in place on the fresh local slope (and the cast back)
        slopes = self.slope(*state.window, dtype).add_(anchor)
        forecast = slopes.mul_(weight).add_(newest).to(newest.dtype)
        state.window = [(s, forecast), state.window[0]]
        return forecast

    def refresh(self, state: FoCaState, index: torch.Tensor, values: torch.Tensor) -> None:
        step, forecast = state.window[0]
        state.window[0] = (step, scatter_tokens(forecast, index, values))
