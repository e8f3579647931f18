"""The controller: attaches a strategy to a model's sites from outside, reversibly."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cachelab.outputs import Parts, split
from cachelab.predictor import Predictor, PredictorState
from cachelab.schedules import Decision, Schedule, StepContext
from cachelab.sites import Site, first_tensor

_MISSING = object()


@dataclass
class SiteCache:
    """A site's history in one context: a predictor state per output tensor (None where
    the output is None), how to rebuild the output, and the input shape it was built for.
    A skip site keeps only its outputs' (shape, dtype, device)."""

    shape: torch.Size
    states: list[PredictorState | None] = field(default_factory=list)
    rebuild: Callable[[Parts], object] | None = None
    specs: list[tuple | None] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states if state is not None)


class SiteObserver(Protocol):
    """Subscribes to what the sites see (``handle.observe``): analysis, never control.
    ``values`` are what the predictor records (residuals for residual sites), per output."""

    def full(self, site: str, context: str, s: int, values: Parts) -> None:
        """Site ``site`` computed ``values`` for real at step ``s``."""

    def forecast(self, site: str, context: str, s: int, forecast: Parts, true: Parts | None) -> None:
        """Site ``site`` returned ``forecast`` at step ``s``; ``true`` is what it would have
        computed from the same inputs (only when observed with ``audit=True``, else None)."""


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
        self._observers: list[SiteObserver] = []
        self._audit = False
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

    def observe(self, observer: SiteObserver, audit: bool = False) -> None:
        """Send every site's full-step values and forecasts to ``observer``. With ``audit``
        a forecast step also computes each site for real (analysis only: no speedup) so the
        observer sees the forecast error; the forecast is still what the model gets."""
        self._observers.append(observer)
        self._audit = self._audit or audit

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
                c.nbytes for caches in self._caches.values() for c in caches.values()
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
        signature = inspect.signature(compute)

        def cached_call(*args, **kwargs):
            if self._decision is None:
                return compute(*args, **kwargs)
            cache = self._site_cache(site.name, first_tensor(args, kwargs).shape)
            if self._decision is Decision.FORECAST:
                if cache.rebuild is not None:
                    forecast = self._forecast(site, cache)
                    if self._observers:
                        self._notify_forecast(site, forecast, compute, signature, args, kwargs)
                    bases = site.residual_bases(signature, args, kwargs, len(forecast))
                    return cache.rebuild([f if b is None or f is None else b + f for f, b in zip(forecast, bases)])
                self._stats.fallbacks += 1
            out = compute(*args, **kwargs)
            self._record(site, cache, out, signature, args, kwargs)
            return out

        setattr(site.owner, site.method, cached_call)

    def _record(self, site: Site, cache: SiteCache, out, signature, args, kwargs) -> None:
        parts, cache.rebuild = split(out)
        if site.skip:
            cache.specs = [None if p is None else (p.shape, p.dtype, p.device) for p in parts]
            return
        if len(cache.states) != len(parts):
            cache.states = [None if p is None else self.predictor.new_state() for p in parts]
        values = self._cached_values(site, parts, signature, args, kwargs)
        for state, value in zip(cache.states, values):
            if state is not None:
                self.predictor.update(state, self._s, value)
        for observer in self._observers:
            observer.full(site.name, self._context, self._s, values)

    @staticmethod
    def _cached_values(site: Site, parts: Parts, signature, args, kwargs) -> Parts:
        """What the predictor records of an output: each part, minus its residual base."""
        bases = site.residual_bases(signature, args, kwargs, len(parts))
        return [part if base is None or part is None else part - base for part, base in zip(parts, bases)]

    def _notify_forecast(self, site: Site, forecast: Parts, compute, signature, args, kwargs) -> None:
        true = None
        if self._audit and not site.skip:
            true = self._cached_values(site, split(compute(*args, **kwargs))[0], signature, args, kwargs)
        for observer in self._observers:
            observer.forecast(site.name, self._context, self._s, forecast, true)

    def _forecast(self, site: Site, cache: SiteCache) -> Parts:
        """The predicted cached values (residuals for residual sites; zeros for skip sites)."""
        if site.skip:
            return [None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=spec[2])
                    for spec in cache.specs]
        return [None if state is None else self.predictor.predict(state, self._s) for state in cache.states]

    def _site_cache(self, name: str, shape: torch.Size) -> SiteCache:
        caches = self._caches.setdefault(self._context, {})
        cache = caches.get(name)
        if cache is None or cache.shape != shape:
            cache = caches[name] = SiteCache(shape)
        return cache


def attach(sites: list[Site], predictor: Predictor, schedule: Schedule) -> CacheHandle:
    """Hook ``predictor`` x ``schedule`` onto ``sites``; ``handle.remove()`` undoes it."""
    return CacheHandle(sites, predictor, schedule)
