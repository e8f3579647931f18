"""Reuse (FORA, order-0 caching): a skipped step returns the last full-step value."""
from __future__ import annotations

from cachelab.strategies.taylor import TaylorSeer


class Reuse(TaylorSeer):
    """FORA-style reuse: TaylorSeer of order 0."""

    def __init__(self, factor_dtype: str | None = None):
        super().__init__(order=0, factor_dtype=factor_dtype)
