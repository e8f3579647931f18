"""The predictor interface: pure numerics on the history of one cache site."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class PredictorState(ABC):
    """Per-site, per-context history of full-step values. Owned by the controller."""

    last_step: int | None = None
    # x(s) of the predictor's expansion variable at every step of the generation, set by the
    # controller (cachelab.core.variables); None: the variable is the step itself, x(s) = s
    positions: Sequence[float] | None = None

    def position(self, s: int) -> float:
        """``x(s)``, the expansion variable at step ``s`` (``s`` itself without positions)."""
        return s if self.positions is None else self.positions[s]

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (for memory accounting)."""

    @property
    def has_history(self) -> bool:
        return self.last_step is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def order_reached(self) -> int | None:
        """The order the history supports now (e.g. a Taylor state's number of factors - 1);
        None for a predictor without orders, or before any history."""
        return None


class Predictor(ABC):
    """Turns a site's full-step history into a forecast at a later step.

    A predictor is stateless: one instance serves every site and every context, and
    all history lives in the state object returned by :meth:`new_state`. Steps are the
    integer denoising-step indices, always counted up from 0. ``variable`` names the
    quantity it measures distances in (:data:`~cachelab.core.variables.VARIABLES`); for any
    other than ``step`` the controller sets each new state's ``positions`` from the sampler's
    per-step grid, and the predictor reads ``state.position(s)``. A predictor whose ``predict``
    changes the state sets ``forecasts_change_state``: the controller then counts the state's bytes
    after each forecast too (otherwise only after ``update``, which keeps forecast steps cheap).
    """

    variable: str = "step"
    forecasts_change_state: bool = False  # ``predict`` keeps what it makes (a fit, a forecast): its bytes read again

    @abstractmethod
    def new_state(self) -> PredictorState:
        """An empty history."""

    def new_state_for(self, site: str) -> PredictorState:
        """An empty history for the cache site named ``site`` (the same for every site unless the
        predictor has per-site settings)."""
        return self.new_state()

    def check_sites(self, names: Sequence[str]) -> None:
        """Refuse per-site settings that name none of the sites ``names`` (none by default)."""

    @abstractmethod
    def update(self, state: PredictorState, s: int, value: torch.Tensor) -> None:
        """Record the value computed for real at full step ``s``."""

    @abstractmethod
    def predict(self, state: PredictorState, s: int) -> torch.Tensor:
        """Forecast the value at step ``s`` (after the last full step)."""

    def refresh(self, state: PredictorState, index: torch.Tensor, values: torch.Tensor) -> None:
        """Tokens computed for real on a forecast step (token selection): ``values`` (B, k, ...)
        at ``index`` (B, k) of the token axis 1. The default keeps the full-step history as it
        is (the other tokens and later steps are forecast from the last full step)."""

    @staticmethod
    def gap(state: PredictorState, s: int) -> int:
        """Steps since the last recorded step; rejects zero and negative gaps."""
        if state.last_step is None:
            raise ValueError(f"no history: step {s} cannot be forecast before any full step")
        k = s - state.last_step
        if k <= 0:
            raise ValueError(f"step {s} is not after the last full step {state.last_step} (gap {k})")
        return k


def relative_norm(terms: torch.Tensor) -> torch.Tensor:
    """``||gap|| / ||scale||`` from ``terms[..., 0] = sum gap^2`` and ``terms[..., 1] = sum scale^2``
    (a predictor's ``error_terms``: sums, so they add up over shards of the same tensors)."""
    return terms[..., 0].sqrt() / terms[..., 1].sqrt().clamp_min(torch.finfo(torch.float32).tiny)
