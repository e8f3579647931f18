"""Cache sites: which callables of a model are cached, chosen by granularity patterns."""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cachelab.core.tokens import FromSkipped

GRANULARITIES = ("module", "block", "stack", "output")


@dataclass(frozen=True)
class SitePattern:
    """Matches module names (``re.fullmatch``); ``method`` is the callable to cache on each.

    ``residual`` sites cache ``out - in`` and return ``in + forecast``: ``True`` takes ``in``
    from the first tensor argument; a string names the argument of a site that returns one
    tensor (``"hidden_states"``); a tuple names the argument for each output of a site
    that returns several (``("encoder_hidden_states", "hidden_states")``; ``None``: no
    residual for that output). Other sites cache their output itself. A ``skip`` site is
    not forecast: it names the kind of the one site that consumes its output (diffusers'
    "skip" modules: ``skip="proj_out"``), and whenever that kind is forecast it returns zeros
    shaped like its last output instead of computing (a per-kind schedule deciding for its
    own kind would starve a consumer that computes).
    ``label`` is appended to the module name to name the site (``blocks.3`` + ``attn``).
    ``span`` joins every module it matches, in order, into one residual site named ``stack``
    (FBCache / TeaCache / MagCache's "the remaining blocks"): one residual from the first
    member's inputs to the last member's outputs; on a forecast step every member passes its
    inputs through and the last adds the forecast. Members must return their ``residual``
    arguments, in that order (the blocks of one transformer stack do).
    ``tokens`` says how the site computes a subset of its tokens exactly (token selection,
    :mod:`cachelab.core.tokens`): ``"tokenwise"`` (its callable on the selected tokens of its
    first tensor argument), the name of an owner method taking the site's arguments and
    ``index`` (B, k) (self-attention: the selected queries against every key and value), or a
    :class:`~cachelab.core.tokens.FromSkipped` (a site fed by skip sites); None: it cannot.
    ``scores`` pairs score names with owner methods (or functions of the owner) giving that score
    of every token (B, N) from the site's arguments (``("attention", "attention_received")``:
    ToCa's s1), or a dict of them per site kind (joint attention: one per stream); each is
    computed at full steps only when a policy needs it, and serves the sites of its block
    (:attr:`Site.block`).
    """

    regex: str
    method: str = "forward"
    residual: bool | str | tuple[str | None, ...] = False
    label: str | None = None
    skip: str | None = None
    span: bool = False
    tokens: str | FromSkipped | None = None
    scores: tuple[tuple[str, str | Callable], ...] = ()

    def __post_init__(self):
        if self.span and (not self.residual or (isinstance(self.residual, tuple) and None in self.residual)):
            raise ValueError(f"a span pattern ({self.regex}) must name the input of every output (residual=True "
                             f"or a tuple of argument names), got residual={self.residual!r}")


class SitePatterns(list):
    """The site patterns of one granularity (the list) and the probes it offers.

    ``probes[signal]`` matches one callable that adaptive schedules read their ``signal``
    from: it runs for real on every step, before the step's decision, and its value
    (``out - in`` of its first output with a residual base for residual patterns; else its
    first output) is the signal. Offer a probe only at granularities where no cache site
    encloses it: a site around the probe would run before the decision, so never be skipped.
    """

    def __init__(self, patterns=(), probes: dict[str, SitePattern] | None = None):
        super().__init__(patterns)
        self.probes = dict(probes or {})


@dataclass(frozen=True)
class Site:
    """One cached callable: ``getattr(owner, method)``; a span site (``members``: the modules
    of a stack, ``owner`` the first) is cached across all of their ``method`` calls. ``tokens``
    and ``scores``: its pattern's (token selection); ``parent``: the module holding the owner
    (a :class:`~cachelab.core.tokens.FromSkipped` site's computation runs on it)."""

    name: str
    owner: nn.Module
    method: str = "forward"
    residual: bool | str | tuple[str | None, ...] = False
    skip: str | None = None
    members: tuple[nn.Module, ...] = ()
    tokens: str | FromSkipped | None = None
    scores: tuple[tuple[str, str | Callable], ...] = ()
    parent: nn.Module | None = None

    def passthrough(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        """A span member's output when it is skipped: its residual inputs, as it returns them."""
        if self.residual is True:
            return first_tensor(args, kwargs)
        if isinstance(self.residual, str):
            return named_arguments(signature, args, kwargs, (self.residual,))[self.residual]
        arguments = named_arguments(signature, args, kwargs, self.residual)
        return tuple(arguments[name] for name in self.residual)

    @property
    def num_residuals(self) -> int:
        """How many outputs have a residual base slot (one for ``True`` and a name)."""
        return len(self.residual) if isinstance(self.residual, tuple) else 1

    @property
    def kind(self) -> str:
        """The site's type, which per-kind schedules (PAB) decide by: the last non-numeric
        component of its name (``blocks.3.attn`` -> ``attn``, ``blocks.3`` -> ``blocks``); a
        skip site's is its consumer's (``skip``)."""
        if self.skip:
            return self.skip
        return next((part for part in reversed(self.name.split(".")) if not part.isdigit()), self.name)

    @property
    def block(self) -> str:
        """The block the site lies in, its name without the last part (``blocks.3.mlp`` ->
        ``blocks.3``): a score one site of a block gives serves the others."""
        return self.name.rpartition(".")[0]

    @property
    def decision_name(self) -> str:
        """The site name a per-site schedule decides by: its own; a skip site's is its consumer's
        (``single_blocks.0.attn`` with ``skip="proj_out"`` -> ``single_blocks.0.proj_out``)."""
        if self.skip:
            return f"{self.name.rpartition('.')[0]}.{self.skip}".lstrip(".")
        return self.name

    def residual_bases(self, signature: inspect.Signature, args: tuple, kwargs: dict,
                       num_outputs: int) -> list[torch.Tensor | None]:
        """The input subtracted from each output (None: the output is cached as it is)."""
        if not self.residual:
            return [None] * num_outputs
        if self.residual is True:
            return [first_tensor(args, kwargs)] + [None] * (num_outputs - 1)
        if isinstance(self.residual, str):
            return [named_arguments(signature, args, kwargs, (self.residual,))[self.residual]] + [None] * (num_outputs - 1)
        arguments = named_arguments(signature, args, kwargs, self.residual)
        return [arguments.get(name) if name else None for name in self.residual]


def named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict, names) -> dict:
    """The call's arguments by name: ``kwargs`` itself when it has every one of ``names``
    (diffusers calls its blocks by keyword; no binding on the hot path), else bound."""
    if all(name in kwargs for name in names if name):
        return kwargs
    return signature.bind(*args, **kwargs).arguments


class Sites(list):
    """The cache sites of a model (the list) and its probes (signal -> :class:`Site`)."""

    def __init__(self, sites=(), probes: dict[str, Site] | None = None):
        super().__init__(sites)
        self.probes = dict(probes or {})


def select_sites(model: nn.Module, patterns: list[SitePattern]) -> Sites:
    """Every (module, pattern) match, in module order then pattern order; with
    :class:`SitePatterns`, also the probe each of its probe patterns matches."""
    sites = _matches(model, patterns)
    if not sites:
        raise ValueError(f"no module of {type(model).__name__} matches the site patterns {patterns}")
    probes = {}
    for signal, pattern in getattr(patterns, "probes", {}).items():
        matched = _matches(model, [pattern])
        if len(matched) != 1:
            raise ValueError(f"the probe of signal {signal!r} ({pattern}) matches {len(matched)} callables of "
                             f"{type(model).__name__}, not one")
        probes[signal] = matched[0]
    return Sites(sites, probes)


def _matches(model: nn.Module, patterns: list[SitePattern]) -> list[Site]:
    sites, spans = [], {}
    for module_name, module in model.named_modules():
        for p in patterns:
            if re.fullmatch(p.regex, module_name):
                if p.span:
                    spans.setdefault(p, []).append(module)
                    continue
                parts = [part for part in (module_name, p.label) if part]
                parent = model.get_submodule(module_name.rpartition(".")[0]) if isinstance(p.tokens, FromSkipped) else None
                sites.append(Site(".".join(parts) or "output", module, p.method, p.residual, p.skip,
                                  tokens=p.tokens, scores=p.scores, parent=parent))
    for p, members in spans.items():
        sites.append(Site(p.label or "stack", members[0], p.method, p.residual, members=tuple(members)))
    return sites


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a site is called with: its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a cache site was called without any tensor argument")
