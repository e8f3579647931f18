"""Token selection, the fourth axis (ToCa, DuCa, ClusCa): on a forecast step a site recomputes a
chosen subset of its tokens and takes the others from its predictor.

A :class:`TokenPolicy` picks the tokens (``select``: indices ``(B, k)`` into the token axis 1 of
the site's hidden states); the controller computes them for real and places them into the
forecast; the predictor's ``refresh`` writes them into its history. Which sites can compute a
subset exactly is the site pattern's ``tokens`` (:data:`TOKENWISE`, or the name of a method on the
owner); a site without it is refused when the policy would select tokens there.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# A site pattern's ``tokens="tokenwise"``: its callable, given the selected tokens of its first tensor
# argument (token axis 1), returns exactly those tokens' outputs (MLP, per-token projections, and
# cross-attention, whose queries are the tokens and whose keys and values come from the text).
TOKENWISE = "tokenwise"


@dataclass(frozen=True)
class FromSkipped:
    """A site pattern's ``tokens`` for a site whose inputs come from skip sites (FLUX's single
    blocks: ``proj_out`` of attention and MLP, both skipped on forecast steps, so its own input is
    zeros). Under token selection the skip sites keep their call's arguments on forecast steps,
    and ``compute(parent, inputs, index)`` gives the selected tokens' outputs (B, k, D) from them:
    ``parent`` is the module holding the site, ``inputs`` maps each skip site's last name part
    (``attn``, ``proj_mlp``) to its ``(args, kwargs)``. The policy sees the first skip site's
    first tensor argument as the tokens."""

    compute: Callable[[Any, dict[str, tuple[tuple, dict]], torch.Tensor], torch.Tensor]


@dataclass
class TokenState:
    """A site's token bookkeeping in one context: each token's cache age (forecast steps at which
    the policy chose tokens since this token was last computed; ToCa's "cache frequency" s3), the
    forecast steps since the site's last full step, and a policy's own data (ClusCa's clusters)."""

    age: torch.Tensor
    forecasts: int = 0
    extra: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes of the ages and of the tensors in ``extra`` (a tensor or a tuple of them)."""
        extra = self.extra if isinstance(self.extra, (tuple, list)) else (self.extra,)
        return sum(x.numel() * x.element_size() for x in (self.age, *extra) if isinstance(x, torch.Tensor))


@dataclass(frozen=True)
class TokenView:
    """What a policy sees when it selects at one site on one forecast step: step ``s`` of ``T``
    (counted up), the site's kind and its depth among the sites of that kind (``0..depths-1``),
    its input hidden states ``tokens`` (B, N, D), its :class:`TokenState`, and the scores the
    model gave on request at the site module's last full step (``scores[name]`` (B, N) for every
    name the policy ``needs``: ``attention``, each token's attention received; ``value_norm``,
    the norm of its value vector)."""

    s: int
    T: int
    kind: str
    depth: int
    depths: int
    tokens: torch.Tensor
    state: TokenState
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


class TokenPolicy(ABC):
    """Chooses the tokens a site recomputes on a forecast step (one instance serves every site;
    per-site data lives in :class:`TokenState`). ``needs`` names scores the model must give on
    request (``"attention"``, ``"value_norm"``); ``computes(kind)`` says whether the policy may select tokens at
    sites of ``kind`` at all (sites where it never does need no partial computation)."""

    needs: tuple[str, ...] = ()

    def computes(self, kind: str) -> bool:
        """Whether sites of ``kind`` may recompute tokens under this policy (default: all)."""
        return True

    def full(self, state: TokenState, tokens: torch.Tensor) -> None:
        """Called at the site's full steps with its input ``tokens`` (B, N, D) (no-op by default)."""

    @abstractmethod
    def select(self, view: TokenView) -> torch.Tensor | None:
        """The token indices to recompute, (B, k) int64 (k may be 0); None: this step takes every
        token from the predictor and leaves the cache ages alone (DuCa's aggressive steps)."""

    def reset(self) -> None:
        """Start a generation (a seeded policy restarts its random numbers)."""


@dataclass(frozen=True)
class SiteTokens:
    """Where a site under token selection lies: its depth among the sites of its kind."""

    depth: int
    depths: int


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` along the token axis 1: (B, N, ...) -> (B, k, ...)."""
    return x.gather(1, expand_index(index, x))


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (B, N, ...) with ``values`` (B, k, ...) at ``index`` (B, k) of the token axis."""
    return x.scatter(1, expand_index(index, x), values.to(x.dtype))


def expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, k) token indices broadcast over the trailing axes of ``like`` (B, N, ...)."""
    return index.reshape(*index.shape, *(1,) * (like.dim() - 2)).expand(*index.shape, *like.shape[2:])


def with_first_tensor(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their first tensor replaced by ``value``."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            return (*args[:i], value, *args[i + 1:]), kwargs
    for key, arg in kwargs.items():
        if isinstance(arg, torch.Tensor):
            return args, {**kwargs, key: value}
    raise TypeError("a cache site was called without any tensor argument")
