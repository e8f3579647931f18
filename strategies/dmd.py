"""DMD (dynamic mode decomposition, Schmid 2010) as cache-dit 1.5 defines its DMD calibrator:
a linear propagator fitted to the last few full-step values of a site, advanced by its
eigenvalues' powers; a Taylor forecast while the window is too short."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from cachelab.core.arguments import at_least, checked, in_range
from cachelab.core.predictor import Predictor, PredictorState
from cachelab.strategies.taylor import TaylorSeer, TaylorState

MIN_SNAPSHOTS = 4  # cache-dit's identifiability floor: one oscillatory mode needs three snapshot pairs
# one batch item's fit: modes Phi (d, r), eigenvalues (r,), amplitudes (r,), complex128; None: degenerate
ItemFit = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


@dataclass
class DMDState(PredictorState):
    """The last ``history`` full-step values of one site with their steps (newest first), the
    Taylor fallback's state, and the fit of the current window (``key``: what it was fitted on)."""

    steps: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    taylor: TaylorState = field(default_factory=TaylorState)
    fit: list[ItemFit] | None = None
    key: tuple | None = None
    last_step: int | None = None

    def tensors(self) -> list[torch.Tensor]:
        fitted = [t for item in self.fit or () if item is not None for t in item]
        held = {id(t): t for t in (*self.values, *self.taylor.factors, *fitted)}
        return list(held.values())

    def uniform_tail(self) -> tuple[list[torch.Tensor], int]:
        """The longest run of the newest values at one spacing (oldest first) and that spacing."""
        if len(self.steps) < 2:
            return [], 0
        spacing = self.steps[0] - self.steps[1]
        count = 2
        while count < len(self.steps) and self.steps[count - 1] - self.steps[count] == spacing:
            count += 1
        return self.values[:count][::-1], spacing


def fit_item(trajectory: torch.Tensor, rank: int, ridge: float, cutoff: float) -> ItemFit:
    """Exact DMD of one ``(d, n)`` float64 trajectory (columns oldest to newest): with
    ``X = [y_0 .. y_{n-2}]``, ``X' = [y_1 .. y_{n-1}]`` and the economy SVD ``X = U S V^H``
    truncated to ``rank`` modes (0: those with ``S_i > cutoff S_0``), the reduced propagator
    ``A~ = U^H X' V S^-1`` (``S^-1 = 1 / (S + ridge)``) has eigenpairs ``(lambda, W)``; the modes
    are ``Phi = X' V S^-1 W`` and the amplitudes ``b`` fit ``Phi b = y_{n-1}`` by least squares."""
    X, Xp = trajectory[:, :-1], trajectory[:, 1:]
    if trajectory.is_meta:  # the planner's meta tensors hold no values: the fit at its most modes
        r = min(rank or X.shape[1], *X.shape)
        return tuple(trajectory.new_empty(shape, dtype=torch.complex128) for shape in ((len(X), r), (r,), (r,)))
    try:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        r = rank if rank > 0 else int((S > S[0] * cutoff).sum().clamp(min=1))
        r = max(1, min(r, S.numel()))
        inverse = (1.0 / (S[:r] + ridge)).to(torch.complex128)
        projected = (Xp @ Vh[:r].mH).to(torch.complex128) * inverse
        eigenvalues, W = torch.linalg.eig(U[:, :r].mH.to(torch.complex128) @ projected)
        modes = projected @ W
        amplitudes = torch.linalg.lstsq(modes, trajectory[:, -1:].to(torch.complex128)).solution[:, 0]
    except RuntimeError:  # a degenerate window (the linear algebra failed): reuse
        return None
    return modes, eigenvalues, amplitudes


class DMD(Predictor):
    """cache-dit's DMD calibrator (``DMDCalibratorConfig``: ``dmd_history``, ``dmd_rank``,
    ``dmd_ridge``) as a predictor of any site.

    The last ``history`` full-step values are kept. Of them, the newest run at one spacing
    ``h`` (a warm-up or a change of interval breaks it) is used when it holds at least four: each
    batch item (axis 0) is flattened to a vector and fitted on its own (:func:`fit_item`, once per
    window, in float64), and the forecast ``k`` steps after the newest value is
    ``Re(Phi (lambda^(k/h) * b))`` (fractional powers on the principal branch): a sum of damped or
    oscillating exponentials shared by all elements of the item, exact when the values follow a
    linear map ``y -> A y`` on the span of the window. A degenerate fit or a forecast that is not
    finite in the site's dtype reuses the newest value. With fewer uniform values the forecast is
    cache-dit's fallback, TaylorSeer of order 1 (its first derivative from the second full step
    after step 1: ``first_enhance=3``).
    """

    forecasts_change_state = True  # the fit of the window, made at its first forecast

    @checked
    def __init__(self, history: Annotated[int, at_least(MIN_SNAPSHOTS)] = 6, rank: Annotated[int, at_least(0)] = 0,
                 ridge: Annotated[float, in_range(0, 1)] = 1e-8, cutoff: Annotated[float, in_range(0, 1)] = 1e-4):
        self.history, self.rank, self.ridge, self.cutoff = history, rank, ridge, cutoff
        self.fallback = TaylorSeer(order=1, first_enhance=3)

    def new_state(self) -> DMDState:
        return DMDState()

    def update(self, state: DMDState, s: int, value: torch.Tensor) -> None:
        if state.has_history:
            self.gap(state, s)
        self.fallback.update(state.taylor, s, value)
        state.fit = state.key = None  # a new window: the old fit is not held until the next forecast refits
        state.steps = [s, *state.steps][: self.history]
        state.values = [value, *state.values][: self.history]
        state.last_step = s

    def predict(self, state: DMDState, s: int) -> torch.Tensor:
        k = self.gap(state, s)
        tail, spacing = state.uniform_tail()
        if len(tail) < MIN_SNAPSHOTS:
            return self.fallback.predict(state.taylor, s)
        newest = state.values[0]
        key = (state.steps[0], len(tail), spacing)
        if state.key != key:
            state.fit = None  # freed before the new fit is made
            trajectories = torch.stack([v.reshape(len(v), -1) for v in tail], dim=-1).to(torch.float64)
            state.fit = [fit_item(t, self.rank, self.ridge, self.cutoff) for t in trajectories]
            state.key = key
        if any(item is None for item in state.fit):
            return newest
        rows = [(modes @ (eigenvalues.pow(k / spacing) * amplitudes)).real for modes, eigenvalues, amplitudes in state.fit]
        forecast = torch.stack(rows).reshape(newest.shape).to(newest.dtype)
        return torch.where(torch.isfinite(forecast).all(), forecast, newest)  # no device sync per forecast
