"""The controller: attaches a strategy to a model's sites from outside, reversibly."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cachelab.predictor import Predictor, PredictorState
from cachelab.schedules import Decision, Schedule, StepContext
from cachelab.sites import Site, first_tensor

_MISSING = object()


@dataclass
class SiteCache:
    """A site's predictor state in one context, and the input shape it was built for."""

    state: PredictorState
    shape: torch.Size


@dataclass
class CacheStats:
    """What one generation did: full and forecast steps, fallbacks, bytes held by caches."""

    full_steps: list[int] = field(default_factory=list)
    forecast_steps: list[int] = field(default_factory=list)
    fallbacks: int = 0
    cache_bytes: int = 0

    def as_dict(self) -> dict:
        return {
            "full_steps": self.full_steps,
            "num_full": len(self.full_steps),
            "num_forecast": len(self.forecast_steps),
            "fallbacks": self.fallbacks,
            "cache_bytes": self.cache_bytes,
        }


class CacheHandle:
    """A strategy attached to a model; created by :func:`attach`.

    The sampler drives it inside ``with handle.generation(T):`` (or ``begin(T)`` ... ``end()``),
    calling ``step(s, t)`` before the model call(s) of step ``s``; outside a generation the
    model runs untouched. The schedule decides once per step; every site then either
    runs and records its value, or returns the predictor's forecast. Separate model calls in
    one step (e.g. CFG cond/uncond) keep separate caches via ``with handle.context(name)``.
    A site whose input shape changed (batch size, resolution) starts a fresh history.
    """

    def __init__(self, sites: list[Site], predictor: Predictor, schedule: Schedule):
        self.sites = sites
        self.predictor = predictor
        self.schedule = schedule
        self._originals: list[tuple[Site, object]] = []
        self._context = "default"
        self._T: int | None = None
        self.reset()
        for site in sites:
            self._install(site)

    # -- driving -------------------------------------------------------------------
    def begin(self, T: int) -> None:
        """Start a generation of ``T`` steps: every cache is cleared."""
        self.reset()
        self._T = T

    def end(self) -> None:
        """End the generation: caches are freed (their size is kept in the stats) and
        the model runs untouched until the next ``begin``."""
        self.stats()
        self._caches = {}
        self._s = self._decision = self._T = None

    @contextmanager
    def generation(self, T: int):
        """``begin(T)`` on entry, ``end()`` on exit, even when sampling fails."""
        self.begin(T)
        try:
            yield self
        finally:
            self.end()

    def step(self, s: int, t: float | None = None, **signals) -> Decision:
        """Enter step ``s`` (counted up); the schedule decides for every site and context."""
        if self._T is None:
            raise RuntimeError("handle.step(s) outside a generation: use `with handle.generation(T):`")
        if self._s is not None and s <= self._s:  # the step went back: a new generation, no leak
            self.begin(self._T)
        self._s = s
        self._decision = self.schedule.decide(StepContext(s=s, T=self._T, t=t, signals=signals))
        steps = self._stats.full_steps if self._decision is Decision.FULL else self._stats.forecast_steps
        steps.append(s)
        return self._decision

    @contextmanager
    def context(self, name: str):
        """Route site calls inside the block to the caches of context ``name``."""
        previous, self._context = self._context, name
        try:
            yield self
        finally:
            self._context = previous

    def reset(self) -> None:
        """Drop every cache and statistic; until the next ``step`` the model runs as usual."""
        self._caches: dict[str, dict[str, SiteCache]] = {}
        self._stats = CacheStats()
        self._s: int | None = None
        self._decision: Decision | None = None

    def stats(self) -> CacheStats:
        """Statistics of the current (or last) generation."""
        if self._caches:
            self._stats.cache_bytes = sum(
                c.state.nbytes for caches in self._caches.values() for c in caches.values()
            )
        return self._stats

    def remove(self) -> None:
        """Detach from the model; it is then exactly as before :func:`attach`."""
        for site, original in reversed(self._originals):
            if original is _MISSING:
                delattr(site.owner, site.method)
            else:
                setattr(site.owner, site.method, original)
        self._originals.clear()
        self.reset()

    # -- the site wrapper ----------------------------------------------------------
    def _install(self, site: Site) -> None:
        self._originals.append((site, vars(site.owner).get(site.method, _MISSING)))
        compute = getattr(site.owner, site.method)

        def cached_call(*args, **kwargs):
            if self._decision is None:
                return compute(*args, **kwargs)
            x = first_tensor(args, kwargs)
            cache = self._site_cache(site.name, x.shape)
            if self._decision is Decision.FORECAST:
                if cache.state.has_history:
                    forecast = self.predictor.predict(cache.state, self._s)
                    return x + forecast if site.residual else forecast
                self._stats.fallbacks += 1
            out = compute(*args, **kwargs)
            self.predictor.update(cache.state, self._s, out - x if site.residual else out)
            return out

        setattr(site.owner, site.method, cached_call)

    def _site_cache(self, name: str, shape: torch.Size) -> SiteCache:
        caches = self._caches.setdefault(self._context, {})
        cache = caches.get(name)
        if cache is None or cache.shape != shape:
            cache = caches[name] = SiteCache(self.predictor.new_state(), shape)
        return cache


def attach(sites: list[Site], predictor: Predictor, schedule: Schedule) -> CacheHandle:
    """Hook ``predictor`` x ``schedule`` onto ``sites``; ``handle.remove()`` undoes it."""
    return CacheHandle(sites, predictor, schedule)
