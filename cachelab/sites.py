"""Cache sites: which callables of a model are cached, chosen by granularity patterns."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

GRANULARITIES = ("module", "block", "output")


@dataclass(frozen=True)
class SitePattern:
    """Matches module names (``re.fullmatch``); ``method`` is the callable to cache on each.

    ``residual`` sites cache ``out - in`` and return ``in + forecast``: ``True`` takes ``in``
    from the first tensor argument; a tuple names the argument for each output of a site
    that returns several (``("encoder_hidden_states", "hidden_states")``; ``None``: no
    residual for that output). Other sites cache their output itself. ``skip`` sites are
    not forecast: on a forecast step they return zeros shaped like their last output
    (diffusers' "skip" modules: a branch whose only consumer is itself forecast).
    ``label`` is appended to the module name to name the site (``blocks.3`` + ``attn``).
    """

    regex: str
    method: str = "forward"
    residual: bool | tuple[str | None, ...] = False
    label: str | None = None
    skip: bool = False


@dataclass(frozen=True)
class Site:
    """One cached callable: ``getattr(owner, method)``."""

    name: str
    owner: nn.Module
    method: str = "forward"
    residual: bool | tuple[str | None, ...] = False
    skip: bool = False

    def residual_bases(self, signature: inspect.Signature, args: tuple, kwargs: dict,
                       num_outputs: int) -> list[torch.Tensor | None]:
        """The input subtracted from each output (None: the output is cached as it is)."""
        if not self.residual:
            return [None] * num_outputs
        if self.residual is True:
            return [first_tensor(args, kwargs)] + [None] * (num_outputs - 1)
        arguments = signature.bind(*args, **kwargs).arguments
        return [arguments.get(name) if name else None for name in self.residual]


def select_sites(model: nn.Module, patterns: list[SitePattern]) -> list[Site]:
    """Every (module, pattern) match, in module order then pattern order."""
    sites = []
    for module_name, module in model.named_modules():
        for p in patterns:
            if re.fullmatch(p.regex, module_name):
                parts = [part for part in (module_name, p.label) if part]
                sites.append(Site(".".join(parts) or "output", module, p.method, p.residual, p.skip))
    if not sites:
        raise ValueError(f"no module of {type(model).__name__} matches the site patterns {patterns}")
    return sites


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a site is called with: its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a cache site was called without any tensor argument")
