"""A strategy: predictor x schedule x granularity (x token selection), attached to a model's sites of that granularity."""
from __future__ import annotations

import copy
import re
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
from cachelab.errors import ConfigError


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
    (:class:`~cachelab.core.offload.HostOffload`); ``whole_blocks``: regexes of block names (as ``granularity=block`` names its sites) whose
    blocks are cached whole, as one block site each, in place of the sites of ``granularity``
    inside them (a per-site choice of granularity: coarser where finer caching does not pay)."""

    name: str
    predictor: Predictor | None
    schedule: Schedule
    granularity: str
    guard: str = "fallback"
    tokens: TokenPolicy | None = None
    offload: bool = False
    whole_blocks: tuple[str, ...] = ()

    def __post_init__(self):
        self.whole_blocks = tuple(self.whole_blocks or ())
        if self.whole_blocks and self.granularity not in ("module", "block"):
            raise ConfigError(f"strategy.whole_blocks needs strategy.granularity=module (or block); got "
                              f"{self.granularity!r}; allowed: module, block")

    @property
    def granularities(self) -> tuple[str, ...]:
        """Every granularity whose sites :meth:`sites` reads."""
        return (self.granularity, "block") if self.whole_blocks and self.granularity != "block" else (self.granularity,)

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
        """``adapter``'s cache sites (and probes) of this granularity, the ``whole_blocks`` as
        block sites in place of the sites inside them, in module order; a ConfigError where a
        pattern matches no block, a chosen block holds a probe the schedule reads, or the
        predictor's per-site settings match no site."""
        sites = select_sites(adapter.model, adapter.site_patterns(self.granularity))
        if self.whole_blocks:
            sites = self._with_whole_blocks(adapter.model, sites,
                                            select_sites(adapter.model, adapter.site_patterns("block")))
        if self.predictor is not None:
            self.predictor.check_sites([site.name for site in sites])
        return sites

    def _with_whole_blocks(self, model, sites: Sites, blocks: Sites) -> Sites:
        idle = [p for p in self.whole_blocks if not any(re.fullmatch(p, b.name) for b in blocks)]
        if idle:
            raise ConfigError(f"strategy.whole_blocks: {', '.join(map(repr, idle))} match(es) no block; allowed: "
                              f"regexes matching {', '.join(b.name for b in blocks)}")
        chosen = [b for b in blocks if any(re.fullmatch(p, b.name) for p in self.whole_blocks)]
        inner = {id(m) for b in chosen for m in b.owner.modules()}
        held = [signal for signal, probe in sites.probes.items()
                if signal in self.schedule.signals and id(probe.owner) in inner]
        if held:
            raise ConfigError(f"strategy.whole_blocks: a whole block would hold the probe of the schedule's signal(s) "
                              f"{', '.join(held)}, which must run every step; allowed: patterns sparing that block")
        rank = {id(m): i for i, m in enumerate(model.modules())}
        kept = [*chosen, *(s for s in sites if id(s.owner) not in inner)]
        return Sites(sorted(kept, key=lambda s: rank[id(s.owner)]), sites.probes)
