"""TaylorSeer (Liu et al., ICCV 2025): Taylor forecast on recursive finite differences."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cachelab.predictor import Predictor, PredictorState

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class TaylorState(PredictorState):
    """Taylor factors ``D_0..D_j`` of one site at its last full step."""

    factors: list[torch.Tensor] = field(default_factory=list)
    last_step: int | None = None
    out_dtype: torch.dtype | None = None

    def tensors(self) -> list[torch.Tensor]:
        return self.factors


class TaylorSeer(Predictor):
    """TaylorSeer of any order ``m >= 0``, the official rule (DESIGN.md §4).

    At a full step ``s`` the new factors are ``D_0 = F`` and
    ``D_{i+1} = (new D_i - old D_i) / (s - s_last)`` for as long as the old factor
    exists (the order grows by at most one per full step) and derivatives are allowed
    (``s > first_enhance - 2``). A forecast ``k`` steps later is ``sum_i D_i k^i / i!``,
    evaluated by Horner's rule. Order 0 is reuse (FORA).
    """

    def __init__(self, order: int, first_enhance: int = 1, factor_dtype: str | None = None):
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        if factor_dtype is not None and factor_dtype not in _DTYPES:
            raise ValueError(f"factor_dtype must be one of {sorted(_DTYPES)} or null, got {factor_dtype!r}")
        self.order = order
        self.first_enhance = first_enhance
        self.factor_dtype = _DTYPES[factor_dtype] if factor_dtype else None

    def new_state(self) -> TaylorState:
        return TaylorState()

    def derivatives_allowed(self, s: int) -> bool:
        return s > self.first_enhance - 2

    def update(self, state: TaylorState, s: int, value: torch.Tensor) -> None:
        new = [value if self.factor_dtype is None else value.to(self.factor_dtype)]
        if state.has_history:
            gap = self.gap(state, s)
            if self.derivatives_allowed(s):
                for old in state.factors[: self.order]:
                    new.append((new[-1] - old).div_(gap))
        state.factors = new
        state.last_step = s
        state.out_dtype = value.dtype

    def predict(self, state: TaylorState, s: int) -> torch.Tensor:
        k = self.gap(state, s)
        factors = state.factors
        if len(factors) == 1:
            return factors[0].to(state.out_dtype)
        # Horner: D0 + k(D1 + k/2(D2 + k/3(...))); one fused op per order, one allocation.
        top = len(factors) - 1
        acc = torch.add(factors[top - 1], factors[top], alpha=k / top)
        for i in range(top - 2, -1, -1):
            torch.add(factors[i], acc, alpha=k / (i + 1), out=acc)
        return acc.to(state.out_dtype)
