"""Random token selection: the ablation of ToCa and DuCa (a fixed fraction, uniformly at random)."""
from __future__ import annotations

import torch

from cachelab.core.tokens import TokenPolicy, TokenView
from cachelab.strategies.tokens.scores import random_scores, top_tokens


class RandomTokens(TokenPolicy):
    """Recomputes ``int(fresh_ratio * N)`` tokens of every sample, drawn uniformly at every forecast
    step of every site (seeded by ``seed`` once per generation)."""

    def __init__(self, fresh_ratio: float = 0.07, seed: int = 0):
        check_ratio(fresh_ratio)
        self.fresh_ratio, self.seed = fresh_ratio, seed
        self.generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def select(self, view: TokenView) -> torch.Tensor:
        B, N = view.tokens.shape[:2]
        return top_tokens(random_scores((B, N), self.generator, view.tokens.device), int(self.fresh_ratio * N))


def check_ratio(fresh_ratio: float) -> None:
    """A fraction of the tokens: in [0, 1]."""
    if not 0.0 <= fresh_ratio <= 1.0:
        raise ValueError(f"fresh_ratio must be a number in [0, 1], got {fresh_ratio!r}")
