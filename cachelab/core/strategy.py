"""A strategy: predictor x schedule x granularity (x token selection), attached to a model's sites of that granularity."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from cachelab.core.controller import CacheHandle, attach
from cachelab.core.distributed import GroupReduce
from cachelab.core.experts import ExpertHandles
from cachelab.core.offload import HostOffload
from cachelab.core.predictor import Predictor
from cachelab.core.schedules import Schedule
from cachelab.core.sites import SitePattern, Sites, select_sites
from cachelab.core.tokens import TokenPolicy


class SiteSource(Protocol):
    """What a strategy attaches to: a model and its site patterns per granularity (a model adapter).
    A source whose ``experts`` attribute is a mapping (name -> source: Wan 2.2's two
    transformers) gets one handle per expert."""

    model: nn.Module

    def site_patterns(self, granularity: str) -> list[SitePattern]:
        """The cache sites of ``granularity``."""


@dataclass
class Strategy:
    """predictor x schedule x granularity (x token selection); ``predictor`` None means no caching.
    ``guard``: what a forecast holding NaN or Inf does (``fallback | raise | off``, see
    :class:`CacheHandle`); ``tokens``: the tokens a site recomputes on forecast steps (None: none);
    ``offload``: the predictor states wait in host memory between their uses
    (:class:`~cachelab.core.offload.HostOffload`)."""

    name: str
    predictor: Predictor | None
    schedule: Schedule
    granularity: str
    guard: str = "fallback"
    tokens: TokenPolicy | None = None
    offload: bool = False

    def attach(self, adapter: SiteSource, guard: str | None = None, group: GroupReduce | None = None
               ) -> CacheHandle | ExpertHandles | None:
        """The handle on ``adapter``'s sites of this granularity (None without caching);
        ``guard`` overrides the strategy's own; ``group``: the ranks sharing each generation
        under context parallelism (see :class:`CacheHandle`). Several experts: an
        :class:`ExpertHandles` whose experts each hold a copy of this strategy (their own
        schedule and predictor state)."""
        if self.predictor is None:
            return None
        experts = getattr(adapter, "experts", None)
        if experts:
            return ExpertHandles({name: copy.deepcopy(self).attach(source, guard, group)
                                  for name, source in experts.items()})
        handle = self.handle(guard, group)
        handle.hook(self.sites(adapter))
        return handle

    def handle(self, guard: str | None = None, group: GroupReduce | None = None) -> CacheHandle:
        """A handle of this strategy whose sites are hooked later (:meth:`CacheHandle.hook`)."""
        predictor = HostOffload(self.predictor) if self.offload else self.predictor
        return attach(None, predictor, self.schedule, guard=self.guard if guard is None else guard, group=group,
                      tokens=self.tokens)

    def sites(self, adapter: SiteSource) -> Sites:
        """``adapter``'s cache sites (and probes) of this granularity."""
        return select_sites(adapter.model, adapter.site_patterns(self.granularity))
