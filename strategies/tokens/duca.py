"""DuCa (Zou et al., 2024, "Accelerating Diffusion Transformers with Dual Feature Caching"):
aggressive forecast steps (every token forecast) alternate with conservative ones (ToCa's token
recomputation); its final version selects the tokens at random."""
from __future__ import annotations

import torch

from cachelab.core.tokens import TokenView
from cachelab.strategies.tokens.toca import ToCa


class DuCa(ToCa):
    """ToCa's selection (its keys; ``score="random"`` by default) on the 1st, 3rd, ... forecast step
    after each full step (conservative), none on the 2nd, 4th, ... (aggressive: the predictor alone,
    cache ages unchanged)."""

    def __init__(self, score: str = "random", **keys):
        super().__init__(score=score, **keys)

    def select(self, view: TokenView) -> torch.Tensor | None:
        if view.state.forecasts % 2 == 0:
            return None
        return super().select(view)
