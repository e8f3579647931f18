"""ClusCa (Zheng et al., 2025, "Compute Only 16 Tokens in One Timestep: Accelerating Diffusion
Transformers with Cluster-Driven Feature Caching"): the tokens are clustered by k-means at every
full step; each forecast step recomputes one token per cluster, drawn at random."""
from __future__ import annotations

import torch

from cachelab.core.tokens import TokenPolicy, TokenState, TokenView, gather_tokens


class ClusCa(TokenPolicy):
    """One token per cluster: at a site's full step its input tokens (B, N, D) are clustered
    (:func:`kmeans`, ``clusters`` clusters, ``iterations`` Lloyd steps, started from the last full
    step's centroids as ClusCa does); on each forecast step every cluster recomputes one of its
    tokens, uniformly at random (a cluster k-means left empty repeats token 0). Self-attention
    sites (``attention_kinds``) are only forecast, as in ClusCa's DiT code."""

    def __init__(self, clusters: int = 16, iterations: int = 10, attention_kinds: tuple[str, ...] = ("attn", "attn1"),
                 seed: int = 0):
        if clusters < 1 or iterations < 0:
            raise ValueError(f"clusters must be >= 1 and iterations >= 0, got {clusters} and {iterations}")
        self.clusters, self.iterations = clusters, iterations
        self.attention_kinds, self.seed = tuple(attention_kinds), seed
        self.generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def computes(self, kind: str) -> bool:
        return kind not in self.attention_kinds

    def full(self, state: TokenState, tokens: torch.Tensor) -> None:
        """Cluster the tokens; ``state.extra`` = (labels (B, N), centroids (B, C, D))."""
        centroids = state.extra[1] if state.extra is not None and state.extra[1].shape[0] == tokens.shape[0] else None
        state.extra = kmeans(tokens.float(), min(self.clusters, tokens.shape[1]), self.iterations, self.generator,
                             centroids)

    def select(self, view: TokenView) -> torch.Tensor:
        labels, centroids = view.state.extra
        draws = torch.rand(labels.shape, generator=self.generator).to(labels.device)
        members = labels.unsqueeze(1) == torch.arange(centroids.shape[1], device=labels.device).view(1, -1, 1)
        return torch.where(members, draws.unsqueeze(1), -1.0).argmax(dim=-1)


def kmeans(x: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator,
           centroids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of every sample's points ``x`` (B, N, D) under the Euclidean distance, from
    ``centroids`` (B, C, D) or from C distinct points drawn with ``generator``; a cluster left
    empty keeps its centroid. Returns the labels (B, N) of the final centroids and the centroids."""
    B, N, D = x.shape
    if centroids is None:
        first = torch.rand((B, N), generator=generator).argsort(dim=1)[:, :clusters].to(x.device)
        centroids = gather_tokens(x, first)
    for _ in range(iterations):
        labels = torch.cdist(x, centroids).argmin(dim=-1)
        sums = torch.zeros_like(centroids).scatter_add_(1, labels.unsqueeze(-1).expand(B, N, D), x)
        counts = torch.zeros(B, clusters, device=x.device).scatter_add_(1, labels, torch.ones(B, N, device=x.device))
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    return torch.cdist(x, centroids).argmin(dim=-1), centroids
