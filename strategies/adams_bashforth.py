"""Adams–Bashforth forecast (AB-Cache, Yu et al. 2025) with slopes taken from the values."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from cachelab.strategies.least_squares import WindowPredictor

_SLOPE_AT = ("midpoint", "node")


@lru_cache(maxsize=1024)
def adams_bashforth_weights(offsets: tuple[int, ...], k: int, order: int, midpoint: bool) -> tuple[float, ...]:
    """Weights on the values at ``offsets`` (newest first, ``offsets[0] = 0``) of the
    variable-step Adams–Bashforth forecast at ``k`` (see :class:`AdamsBashforth`)."""
    x = np.asarray(offsets, dtype=np.float64)
    p = min(order, len(x) - 1)
    gaps = x[:p] - x[1 : p + 1]
    nodes = (x[:p] + x[1 : p + 1]) / 2 if midpoint else x[:p]
    powers = np.arange(p)
    # beta_j = integral over [0, k] of the Lagrange basis on `nodes`: sum_j beta_j t_j^q = k^(q+1) / (q+1)
    beta = np.linalg.solve(nodes[None, :] ** powers[:, None], k ** (powers + 1) / (powers + 1))
    per_slope = beta / gaps  # g_j = (F_j - F_{j+1}) / gap_j
    weights = np.zeros(len(x))
    weights[0] = 1.0
    weights[:p] += per_slope
    weights[1 : p + 1] -= per_slope
    return tuple(map(float, weights))


class AdamsBashforth(WindowPredictor):
    """Adams–Bashforth of order ``p`` (2 or 3) on the feature as the solution of ``F' = g``.

    The derivative is sampled from the last ``p + 1`` full-step values ``F_0, F_1, ...`` at
    steps ``s_0 > s_1 > ...``: ``g_j = (F_j - F_{j+1}) / (s_j - s_{j+1})`` for ``j < p``, placed
    at the interval midpoint ``(s_j + s_{j+1}) / 2`` (``slope_at="midpoint"``, where a secant is
    the exact derivative of a quadratic) or at the node ``s_j`` (``"node"``, a backward
    difference). The forecast is ``F_0 + integral_{s_0}^{s} P``, with ``P`` the polynomial of
    degree ``p - 1`` through the ``p`` slopes: the variable-step AB coefficients on the actual
    grid. Midpoint slopes make it exact on quadratics (AB2 then equals TaylorSeer ``newton``
    of order 2); node slopes make it exact on lines only (AB2 then equals official TaylorSeer
    of order 2). Shorter histories use ``p = n - 1`` (two values: linear; one: reuse).
    """

    def __init__(self, order: int = 2, slope_at: str = "midpoint"):
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order}")
        if slope_at not in _SLOPE_AT:
            raise ValueError(f"slope_at must be one of {list(_SLOPE_AT)}, got {slope_at!r}")
        self.order = order
        self.size = order + 1
        self.midpoint = slope_at == "midpoint"

    def weights(self, offsets: tuple[int, ...], k: int) -> tuple[float, ...]:
        return adams_bashforth_weights(offsets, k, self.order, self.midpoint)
