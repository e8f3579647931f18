"""HiCache (Feng et al., ICLR 2026): TaylorSeer's factors on a scaled Hermite basis."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cachelab.strategies.taylor import TaylorSeer, TaylorState


def hermite_coefficients(sigma: float, k: int, top: int) -> list[float]:
    """``H_i(sigma k) sigma^i / i!`` for ``i = 1..top``, with the physicists' Hermite
    polynomials ``H_0 = 1, H_1(x) = 2x, H_{n+1}(x) = 2x H_n(x) - 2n H_{n-1}(x)``."""
    x = sigma * k
    prev, cur, out = 1.0, 2.0 * x, []
    for i in range(1, top + 1):
        out.append(cur * sigma**i / math.factorial(i))
        prev, cur = cur, 2.0 * x * cur - 2.0 * i * prev
    return out


class HiCache(TaylorSeer):
    """HiCache of order ``m``: ``F = D_0 + sum_{i=1..m} H_i(sigma k) sigma^i / i! D_i``.

    ``D_i`` are TaylorSeer's factors (the official update, ``first_enhance`` included) and
    ``k`` the steps since the last full step; ``sigma`` scales both the argument and the
    coefficient (official code ``_hicache_prediction_formula``; there the coefficient is
    computed in the feature dtype, here in float64). The leading term of ``H_i(sigma k)
    sigma^i / i!`` is ``(2 sigma^2)^i k^i / i!``, so at ``sigma = 1/sqrt(2)`` every order's
    leading term is TaylorSeer's: order <= 1 equals TaylorSeer there, while ``H_2`` adds the
    constant ``-sigma^2 D_2`` (so no sigma makes order >= 2 equal to TaylorSeer). At the paper's
    default ``sigma = 0.5`` order 1 is reuse plus half the Taylor slope term.
    """

    def __init__(self, order: int, first_enhance: int = 1, sigma: float = 0.5,
                 factor_dtype: str | Sequence[str] | None = None):
        super().__init__(order, first_enhance, factor_dtype)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = sigma

    def predict(self, state: TaylorState, s: int) -> torch.Tensor:
        k = self.gap(state, s)
        factors = self.decoded(state)
        if len(factors) == 1:
            return factors[0].to(state.out_dtype)
        coefficients = hermite_coefficients(self.sigma, k, len(factors) - 1)
        acc = torch.add(factors[0], factors[1], alpha=coefficients[0])
        for factor, c in zip(factors[2:], coefficients[1:]):
            acc.add_(factor, alpha=c)
        return acc.to(state.out_dtype)
