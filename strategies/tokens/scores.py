"""Token scores and the top-k choice that token selection policies are made of (ToCa's s1-s4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cachelab.errors import ConfigError


def random_scores(shape: tuple[int, int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform scores (B, N), drawn on the CPU from ``generator`` (the same on every device)."""
    return torch.rand(shape, generator=generator).to(device)


def norm_score(tokens: torch.Tensor) -> torch.Tensor:
    """Each token's L2 norm, L2-normalised over the tokens of its sample: (B, N, D) -> (B, N)."""
    return F.normalize(tokens.float().norm(dim=-1), dim=-1)


def normalised(score: torch.Tensor) -> torch.Tensor:
    """A score the model gave (B, N) (ToCa's s1: the attention each token received; DuCa's value
    norm), L2-normalised over the tokens of each sample."""
    return F.normalize(score.float(), dim=-1)


def age_score(age: torch.Tensor, fresh_threshold: int) -> torch.Tensor:
    """ToCa's cache-frequency score s3: steps since a token was computed over the interval N."""
    return age.float() / fresh_threshold


def spatial_bonus(score: torch.Tensor, bonus_ratio: float, grid: int) -> torch.Tensor:
    """ToCa's spatial-uniformity score s4: in every ``grid`` x ``grid`` patch of the square token
    map, the highest score gains ``bonus_ratio`` times itself (ties: the first in the patch)."""
    B, N = score.shape
    side = round(N ** 0.5)
    if side * side != N or side % grid:
        raise ConfigError(f"strategy.tokens.bonus_ratio={bonus_ratio}: the spatial bonus needs a square token map "
                          f"whose side divides by grid={grid}, got {N} tokens; allowed: strategy.tokens.bonus_ratio=0")
    cells = side // grid
    patches = score.reshape(B, cells, grid, cells, grid).permute(0, 1, 3, 2, 4).reshape(B, cells * cells, grid * grid)
    best, where = patches.max(dim=-1, keepdim=True)
    patches = patches + torch.zeros_like(patches).scatter_(-1, where, best * bonus_ratio)
    return patches.reshape(B, cells, cells, grid, grid).permute(0, 1, 3, 2, 4).reshape(B, N)


def top_tokens(score: torch.Tensor, count: int) -> torch.Tensor:
    """The indices (B, count) of the ``count`` highest scores of each sample."""
    return score.topk(count, dim=-1).indices
