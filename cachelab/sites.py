"""Cache sites: which callables of a model are cached, chosen by granularity patterns."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

GRANULARITIES = ("module", "block", "output")


@dataclass(frozen=True)
class SitePattern:
    """Matches module names (``re.fullmatch``); ``method`` is the callable to cache on each.

    ``residual`` sites cache ``out - in`` (``in`` = the first tensor argument) and return
    ``in + forecast``; others cache the output itself. ``label`` is appended to the module
    name to name the site (``blocks.3`` + ``attn`` -> ``blocks.3.attn``).
    """

    regex: str
    method: str = "forward"
    residual: bool = False
    label: str | None = None


@dataclass(frozen=True)
class Site:
    """One cached callable: ``getattr(owner, method)``."""

    name: str
    owner: nn.Module
    method: str = "forward"
    residual: bool = False


def select_sites(model: nn.Module, patterns: list[SitePattern]) -> list[Site]:
    """Every (module, pattern) match, in module order then pattern order."""
    sites = []
    for module_name, module in model.named_modules():
        for p in patterns:
            if re.fullmatch(p.regex, module_name):
                parts = [part for part in (module_name, p.label) if part]
                sites.append(Site(".".join(parts) or "output", module, p.method, p.residual))
    if not sites:
        raise ValueError(f"no module of {type(model).__name__} matches the site patterns {patterns}")
    return sites


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a site is called with: its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a cache site was called without any tensor argument")
