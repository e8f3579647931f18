"""Token selection at the cache sites (ToCa, DuCa, ClusCa): decorators of a site kind.

A handle under token selection keeps one :class:`TokenSelection`: the policy, where each
selecting site lies among the sites of its kind, the scores sites gave at their module's last
full step, and the arguments skip sites keep for their consumer on a forecast step. It decorates
the kinds (:mod:`cachelab.core.site_kinds`): a plain site of a kind the policy ``computes`` is
:class:`Refreshing`, a skip site feeding a :class:`~cachelab.core.tokens.FromSkipped` consumer
is :class:`Feeding`, and a site giving a score the policy needs is also :class:`Scoring`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cachelab.errors import ConfigError
from cachelab.core.adaptive import tensor_bytes
from cachelab.core.outputs import Parts, split
from cachelab.core.site_kinds import Decorated, Plain, PlainState, Single
from cachelab.core.sites import Site, first_tensor
from cachelab.core.tokens import (TOKENWISE, FromSkipped, SiteTokens, TokenPolicy, TokenState, TokenView,
                                  gather_tokens, scatter_tokens, with_first_tensor)


class TokenSelection:
    """A handle's token selection: ``policy``, each selecting site's place among its kind
    (``places``, set by :meth:`place`), and per generation the scores given
    (``scores[context, block, score, site kind or None for every kind]``: (B, N)) and the skip
    sites' arguments of this forecast step (``skipped[context, consumer]``); ``nbytes``: the
    scores' bytes."""

    def __init__(self, policy: TokenPolicy):
        self.policy = policy
        self.places: dict[str, SiteTokens] = {}
        self.fed: set[str] = set()  # the token sites fed by skip sites
        self.reset()

    def place(self, sites: list[Site]) -> None:
        """Where the policy selects among ``sites`` (refused for sites that cannot compute a subset)."""
        self.places = token_sites(sites, self.policy)
        self.fed = {site.name for site in sites if site.name in self.places and isinstance(site.tokens, FromSkipped)}

    def reset(self) -> None:
        """A new generation: nothing kept, the policy restarted."""
        self.clear()
        self.policy.reset()

    def clear(self) -> None:
        """Free the scores and the skipped arguments (a generation's end)."""
        self.scores: dict[tuple[str, str, str, str | None], torch.Tensor] = {}
        self.skipped: dict[tuple[str, str], dict[str, tuple[tuple, dict]]] = {}
        self.nbytes = 0

    def decorate(self, kind):
        """``kind`` with what token selection adds at its site (itself where nothing)."""
        site = kind.site
        if site.name in self.places:
            kind = Refreshing(kind, self)
        elif site.skip and site.decision_name in self.fed:
            kind = Feeding(kind, self)
        if any(score in self.policy.needs for score, _ in site.scores):
            kind = Scoring(kind, self)
        return kind

    def keep(self, key: tuple[str, str, str, str | None], score: torch.Tensor) -> None:
        old = self.scores.get(key)
        self.nbytes += tensor_bytes(score) - (0 if old is None else tensor_bytes(old))
        self.scores[key] = score


@dataclass
class RefreshedState(PlainState):
    """A selecting site's history and its token bookkeeping (cache ages, a policy's own data)."""

    tokens: TokenState | None = None

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.tokens is None else self.tokens.nbytes)


class Selecting(Decorated):
    """A kind around ``inner`` that token selection (``selection``) changes."""

    def __init__(self, inner: Single, selection: TokenSelection):
        super().__init__(inner)
        self.selection = selection


class Refreshing(Selecting):
    """A plain site where the policy selects: on a full step every token is fresh (age 0) and the
    policy sees the site's input; on a forecast step the tokens it selects are computed for real
    (sorted by index), placed into the forecast and handed to the predictor's ``refresh``, and
    the other tokens' cache ages grow by one."""

    inner: Plain

    def new_state(self, shape: torch.Size) -> RefreshedState:
        return RefreshedState(shape)

    def full(self, state: RefreshedState, compute: Callable, args: tuple, kwargs: dict):
        out = self.inner.full(state, compute, args, kwargs)
        x = first_tensor(args, kwargs)
        previous = None if state.tokens is None else state.tokens.extra  # a policy's own data (ClusCa's centroids)
        state.tokens = TokenState(torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device), extra=previous)
        self.selection.policy.full(state.tokens, x)
        self.run.changed(self.name, state)
        return out

    def forecast(self, state: RefreshedState, compute: Callable, args: tuple, kwargs: dict):
        return self.inner.forecast(state, compute, args, kwargs, refine=self.refresh)

    def refresh(self, state: RefreshedState, forecast: Parts, compute: Callable, args: tuple, kwargs: dict) -> Parts:
        run, site, selection = self.run, self.site, self.selection
        fed = site.name in selection.fed
        if fed:
            inputs = selection.skipped.pop((run.context_name, site.name), None)
            if inputs is None:
                raise RuntimeError(f"token selection at {site.name}: the skip sites that feed it did not run first")
            x = first_tensor(*next(iter(inputs.values())))
        else:
            x = first_tensor(args, kwargs)
        tokens = state.tokens
        tokens.forecasts += 1
        scores = {score: selection.scores.get((run.context_name, site.block, score, site.kind),
                                              selection.scores.get((run.context_name, site.block, score, None)))
                  for score in selection.policy.needs}
        place = selection.places[site.name]
        view = TokenView(run.s, run.T, site.kind, place.depth, place.depths, x, tokens, scores)
        index = selection.policy.select(view)
        if index is None:
            return forecast
        tokens.age += 1
        if index.shape[1] == 0:
            return forecast
        index = index.sort(dim=1).values
        tokens.age.scatter_(1, index, 0)
        if site.tokens == TOKENWISE:
            selected_args, selected_kwargs = with_first_tensor(args, kwargs, gather_tokens(x, index))
            fresh = compute(*selected_args, **selected_kwargs)
        elif fed:
            fresh = site.tokens.compute(site.parent, inputs, index)
        else:
            fresh = getattr(site.owner, site.tokens)(*args, index=index, **kwargs)
        parts = split(fresh)[0]
        if len(parts) != 1 or len(forecast) != 1:
            raise ConfigError(f"strategy.tokens: the site {site.name} returns {len(forecast)} tensors; token selection "
                              f"needs sites that return one (allowed: strategy.tokens=null for this model)")
        run.predictor.refresh(state.states[0], index, parts[0])
        run.changed(self.name, state)
        return [scatter_tokens(forecast[0], index, parts[0])]


class Feeding(Selecting):
    """A skip site feeding a consumer that computes selected tokens from its arguments
    (:class:`~cachelab.core.tokens.FromSkipped`): on a forecast step it keeps them for it."""

    def forecast(self, state, compute: Callable, args: tuple, kwargs: dict):
        consumer = self.selection.skipped.setdefault((self.run.context_name, self.site.decision_name), {})
        consumer[self.name.rpartition(".")[2]] = (args, kwargs)
        return self.inner.forecast(state, compute, args, kwargs)


class Scoring(Selecting):
    """A site giving scores the policy needs: computed at its full steps from its arguments and
    kept per context and block (serving the block's other sites) until its next full step."""

    def full(self, state, compute: Callable, args: tuple, kwargs: dict):
        out = self.inner.full(state, compute, args, kwargs)
        site, owner = self.site, self.site.owner
        for score, method in site.scores:
            if score in self.selection.policy.needs:
                given = getattr(owner, method)(*args, **kwargs) if isinstance(method, str) else \
                    method(owner, *args, **kwargs)
                for kind, value in (given.items() if isinstance(given, dict) else [(None, given)]):
                    self.selection.keep((self.run.context_name, site.block, score, kind), value)
        return out


def token_sites(sites: list[Site], tokens: TokenPolicy) -> dict[str, SiteTokens]:
    """The sites where ``tokens`` selects (those of a kind it ``computes``; skip sites follow their
    consumer), with their depth among their kind; a ConfigError for such a site that cannot compute
    a subset of its tokens exactly, or when the policy needs a score that no site of the same
    module gives."""
    chosen = [site for site in sites if not site.skip and tokens.computes(site.kind)]
    policy = type(tokens).__name__
    unable = [site for site in chosen if not site.tokens or site.residual or site.members]
    if unable:
        kinds = sorted({site.kind for site in unable})
        raise ConfigError(f"strategy.tokens ({policy}) recomputes tokens at site(s) "
                          f"{', '.join(site.name for site in unable[:3])}{' ...' if len(unable) > 3 else ''}, which "
                          f"cannot compute a subset of their tokens exactly; allowed: strategy.tokens=null, module "
                          f"granularity, or a policy that only forecasts site kind(s) {', '.join(kinds)} (ToCa, DuCa, "
                          f"ClusCa: strategy.tokens.attention_kinds=[attn,attn1,{','.join(kinds)}])")
    for score in tokens.needs:
        given = {site.block for site in sites if score in dict(site.scores)}
        blind = [site.name for site in chosen if site.block not in given]
        if blind:
            raise ConfigError(f"strategy.tokens ({policy}) scores tokens by {score}, which the module of "
                              f"{', '.join(blind[:3])}{' ...' if len(blind) > 3 else ''} cannot give (attention maps "
                              f"and value vectors stay inside fused attention); allowed: strategy.tokens.score=random "
                              f"or norm")
    kinds: dict[str, list[str]] = {}
    for site in chosen:
        kinds.setdefault(site.kind, []).append(site.name)
    return {name: SiteTokens(depth, len(names)) for names in kinds.values() for depth, name in enumerate(names)}
