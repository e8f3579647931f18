"""The controller: attaches a strategy to a model's sites from outside, reversibly."""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from cachelab.errors import ConfigError, NonFiniteError
from cachelab.core import hooks
from cachelab.core.distributed import GroupReduce, LocalGroup
from cachelab.core.outputs import Parts, split
from cachelab.core.predictor import Predictor, PredictorState, relative_norm
from cachelab.core.schedules import Decision, Schedule, StepContext, StepDecision, is_full
from cachelab.core.sites import Site, first_tensor
from cachelab.core.tokens import (TOKENWISE, FromSkipped, SiteTokens, TokenPolicy, TokenState, TokenView,
                                  gather_tokens, scatter_tokens, with_first_tensor)
from cachelab.core.variables import StepGrid, positions

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
# what a forecast holding NaN or Inf does: the site computes for real, an error, or nothing checked
GUARDS = ("fallback", "raise", "off")


@dataclass
class SiteCache:
    """A site's history in one context: a predictor state per output tensor (None where
    the output is None), how to rebuild the output, and the input shape it was built for.
    A skip site keeps only its outputs' (shape, dtype, device); a span site also what its
    first member was called with in the current call."""

    shape: torch.Size
    states: list[PredictorState | None] = field(default_factory=list)
    rebuild: Callable[[Parts], object] | None = None
    specs: list[tuple | None] = field(default_factory=list)
    entry: list[torch.Tensor | None] | None = None  # a span's inputs at its first member, this call
    passing: bool = False  # a span's members pass their inputs through in this call
    pending: Parts | None = None  # a passing span's forecast, from its first member to its last
    guarded: bool = False  # a span computes this call because its forecast was not finite (not recorded)
    tokens: TokenState | None = None  # token selection: the site's cache ages and policy data

    @property
    def nbytes(self) -> int:
        tokens = 0 if self.tokens is None else self.tokens.nbytes
        return tokens + sum(state.nbytes for state in self.states if state is not None)


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
    """What one generation did: full and forecast steps, fallbacks (a site without history
    computing on a forecast step), guard fallbacks (a site whose forecast held NaN or Inf
    computing instead), the most bytes held by caches at a step's end (the sites' predictor
    states, token selection's ages, clusters and scores, and the schedule's reference signals;
    ``context_bytes``: per context, at the last reading), and the order the
    predictor states reached (``{"min", "max"}`` over sites and contexts; None for a predictor
    without orders). Several experts (:class:`~cachelab.core.experts.ExpertHandles`): each one's
    own statistics in ``experts``, the fields above merged."""

    full_steps: list[int] = field(default_factory=list)
    forecast_steps: list[int] = field(default_factory=list)
    fallbacks: int = 0
    guard_fallbacks: int = 0
    cache_bytes: int = 0
    context_bytes: dict[str, int] = field(default_factory=dict)  # the sites' states per context
    order_reached: dict[str, int] | None = None
    experts: dict[str, CacheStats] = field(default_factory=dict)

    def as_dict(self) -> dict:
        experts = {"experts": {name: stats.as_dict() for name, stats in self.experts.items()}} if self.experts else {}
        return {
            "full_steps": self.full_steps,
            "num_full": len(self.full_steps),
            "num_forecast": len(self.forecast_steps),
            "fallbacks": self.fallbacks,
            "guard_fallbacks": self.guard_fallbacks,
            "cache_bytes": self.cache_bytes,
            "context_bytes": self.context_bytes,
            "order_reached": self.order_reached,
            **experts,
        }


def controller_signals(predictor) -> set[str]:
    """The signals the controller computes itself for ``predictor`` (an instance or a class):
    ``error_estimate`` when the predictor has ``error_terms(state, s)`` (the squared sums of its
    forecast's error and of the scale, :func:`~cachelab.core.predictor.relative_norm`)."""
    return {"error_estimate"} if callable(getattr(predictor, "error_terms", None)) else set()


def decision_code(decision: StepDecision) -> int:
    """A step's decision as one integer (bit i: the i-th site kind, in name order, forecasts)."""
    if isinstance(decision, Decision):
        return int(decision is Decision.FORECAST)
    return sum(1 << i for i, kind in enumerate(sorted(decision)) if decision[kind] is Decision.FORECAST)


class Generations:
    """``with handle.generation(T, grid):`` for whatever has ``begin(T, grid)`` and ``end()``."""

    @contextmanager
    def generation(self, T: int, grid: StepGrid | None = None):
        """``begin(T, grid)`` on entry, ``end()`` on exit, even when sampling fails."""
        self.begin(T, grid)
        try:
            yield self
        finally:
            self.end()


class CacheHandle(Generations):
    """A strategy attached to a model; created by :func:`attach`.

    The sampler drives it inside ``with handle.generation(T, grid):`` (or ``begin(T, grid)`` ...
    ``end()``), calling ``step(s, t)`` before the model call(s) of step ``s``; ``grid`` (a
    :class:`~cachelab.core.variables.StepGrid`, optional) gives the timestep, sigma and log-SNR
    of every step, which a predictor expanding in one of them (``predictor.variable``) needs;
    outside a generation the model runs untouched. The schedule decides once per step; every site then either
    runs and records its value, or returns the predictor's forecast. Separate model calls in
    one step (e.g. CFG cond/uncond) keep separate caches via ``with handle.context(name)``.
    A site whose input shape changed (batch size, resolution) starts a fresh history.

    Signals: a schedule that reads a probe's signal decides when the probe first runs in
    the step (in whichever context calls the model first); until then the decision is
    pending and every site called computes and records (it ran for real), so the probe's
    own block always computes. The probes are not cache sites: a site on a probe's callable
    is dropped. ``error_estimate`` is computed at ``step`` from the caches (mean over sites of
    ``predictor.error_estimate``; None before any history). A per-kind decision (PAB) maps
    each site by ``site.kind`` (a per-site one, ``schedule.decides_for == "site"``, by
    ``site.decision_name``); kinds or sites it does not name compute.

    ``group`` (context parallelism: each rank of a process group holds a shard of the same
    activations): the caches hold each rank's shards, every signal is reduced over the group
    before the schedule reads it, and after every decision the ranks check that they agree
    (:class:`~cachelab.core.distributed.DivergentDecisions` on every rank otherwise); the sites
    are hooked beneath the engine's own split and gather hooks (``group.lifted()``).

    Nothing the model gets from a site is a tensor the cache holds: a full step's output is
    copied where the predictor would keep it as is, and a forecast in a state's memory (reuse)
    is copied, so a caller changing an output in place never changes the cache.

    ``guard`` checks every forecast tensor for NaN and Inf: ``fallback`` (default) lets such a
    site compute for real at that step instead (its history is kept as it was; counted in
    ``stats().guard_fallbacks``, one warning per generation), ``raise`` raises
    :class:`~cachelab.errors.NonFiniteError` naming the step, site and context, ``off`` checks
    nothing. A full step's value is recorded as the model computed it, finite or not.

    ``tokens`` (token selection, :mod:`cachelab.core.tokens`): on a forecast step every site
    where the policy ``computes`` asks it for token indices, computes those tokens for real
    (the site's ``tokens`` mode), returns the forecast with them in place, and hands them to
    the predictor's ``refresh``; sites that cannot compute a subset exactly are refused.
    """

    def __init__(self, sites: list[Site] | None, predictor: Predictor, schedule: Schedule,
                 probes: dict[str, Site] | None = None, guard: str = "fallback", group: GroupReduce | None = None,
                 tokens: TokenPolicy | None = None):
        self.guard = guard_policy(guard)
        self.group = group or LocalGroup()
        self.predictor = predictor
        self.schedule = schedule
        self.tokens = tokens
        self.sites: list[Site] = []
        self.probes: dict[str, Site] = {}
        self.hooked = False
        self._decision_keys: dict[str, str] = {}
        self._token_sites: dict[str, SiteTokens] = {}
        # (context, block, score, site kind or None for every kind) -> (B, N)
        self._scores: dict[tuple[str, str, str, str | None], torch.Tensor] = {}
        # token sites fed by skip sites (FromSkipped): the skip sites' arguments of this forecast step
        self._fed: set[str] = set()
        self._skipped: dict[tuple[str, str], dict[str, tuple[tuple, dict]]] = {}  # (context, consumer) -> inputs
        self._installed: list[tuple[Site, str, Callable]] = []  # site, its hook's name, its wrapper maker
        # compiled for CUDA graphs (set by compile): an output's memory is overwritten at the graph's
        # next replay, so every value the caches keep is a copy
        self.graph_replays = False
        self._observers: list[SiteObserver] = []
        self._audit = False
        self._context = "default"
        self._T: int | None = None
        self._grid: StepGrid | None = None
        self._positions: tuple[float, ...] | None = None  # x(s) of the predictor's variable
        self.reset()
        if sites is not None:
            self.hook(sites, probes)

    def hook(self, sites: list[Site], probes: dict[str, Site] | None = None, group: GroupReduce | None = None) -> None:
        """Hook the cache sites and probes (once; a handle made without sites is driven alike
        until then, and its model runs untouched). ``probes`` defaults to ``sites.probes``;
        ``group``: the ranks sharing each generation, when known only now."""
        if self.hooked:
            raise RuntimeError(f"{self!r} is hooked already")
        schedule, predictor = self.schedule, self.predictor
        probes = dict(getattr(sites, "probes", {}) if probes is None else probes)
        own = controller_signals(predictor)
        missing = [signal for signal in schedule.signals if signal not in probes and signal not in own]
        if missing:
            raise ConfigError(
                f"the schedule {type(schedule).__name__} reads the signal(s) {', '.join(missing)}, which these "
                f"sites cannot provide (the model's probes at this granularity: {', '.join(sorted(probes)) or 'none'};"
                f" the predictor {type(predictor).__name__}: {', '.join(sorted(own)) or 'none'}); "
                f"choose another strategy.granularity, strategy or schedule")
        probes = {signal: probes[signal] for signal in schedule.signals if signal in probes}
        probed = {(id(probe.owner), probe.method) for probe in probes.values()}
        sites = [without_probes(site, probes.values()) if site.members else site for site in sites]
        sites = [site for site in sites if site is not None and (id(site.owner), site.method) not in probed]
        keys = {site.name: site.decision_name if schedule.decides_for == "site" else site.kind for site in sites}
        unknown = [kind for kind in schedule.kinds if kind not in set(keys.values())]
        if unknown:
            what = "site(s)" if schedule.decides_for == "site" else "site kind(s)"
            raise ConfigError(f"the schedule {type(schedule).__name__} names {what} {', '.join(unknown)} that no "
                              f"cache site has; allowed at this granularity: {', '.join(sorted(set(keys.values())))}")
        token_state = token_sites(sites, self.tokens)
        self.sites, self.probes, self._decision_keys, self._token_sites = sites, probes, keys, token_state
        self._fed = {site.name for site in sites if site.name in token_state and isinstance(site.tokens, FromSkipped)}
        self.group = group or self.group
        self.hooked = True
        with self._lifted():
            for site in self.sites:
                if site.members:
                    self._install_span(site)
                else:
                    self._install(site)
            for signal, probe in self.probes.items():
                self._install_probe(signal, probe)

    @property
    def generating(self) -> bool:
        """Whether a generation is open (between ``begin`` and ``end``)."""
        return self._T is not None

    def __repr__(self) -> str:
        return (f"<CacheHandle {type(self.predictor).__name__} x {type(self.schedule).__name__} on "
                f"{len(self.sites)} sites at {id(self):#x}>")

    # -- driving -------------------------------------------------------------------
    def begin(self, T: int, grid: StepGrid | None = None, plan: Sequence[str] | None = None) -> None:
        """Start a generation of ``T`` steps: every cache is cleared. ``grid``: the sampler's
        per-step variables; a ConfigError if the predictor's ``variable`` is not among them.
        ``plan``: the expert of each step (a pipeline's driver gives it); this one handle serves
        whichever runs, so only its length is checked."""
        if plan is not None and len(plan) != T:
            raise ValueError(f"the plan must name an expert for each of the {T} steps, got {len(plan)} entries")
        self._positions = positions(getattr(self.predictor, "variable", "step"), T, grid)
        self.reset()
        self._T, self._grid = T, grid

    def end(self) -> None:
        """End the generation: caches are freed (their size is kept in the stats) and
        the model runs untouched until the next ``begin``."""
        self._stats = self.stats()  # with the sizes held at the end
        self._caches, self._signals, self._scores, self._skipped = {}, {}, {}, {}
        self._s = self._t = self._decision = self._T = self._grid = self._positions = None

    def step(self, s: int, t: float | None = None, **signals) -> Decision | None:
        """Enter step ``s`` (counted up); the schedule decides once for every site and context,
        now or, if it reads a probe's signal, when the probe runs. Returns FULL if every site
        computes, FORECAST if some are forecast, None while the decision waits for a probe."""
        if self._T is None:
            raise RuntimeError("handle.step(s) outside a generation: use `with handle.generation(T):`")
        if self._s is not None and s <= self._s:
            raise RuntimeError(f"step {s} after step {self._s}: steps count up within a generation; begin(T) starts "
                               f"a new one")
        self._stats = self.stats()  # the bytes the last step left held count toward the peak
        if self._s is not None and self._decision is None and self.probes:
            raise RuntimeError(f"step {self._s} ended undecided: the model never ran the probe(s) of "
                               f"{', '.join(self.probes)}")
        self._s, self._t, self._decision, self._signals = s, t, None, dict(signals)
        if "error_estimate" in self.schedule.signals and "error_estimate" not in signals:
            self._signals["error_estimate"] = self._error_estimate(s)
        self._try_decide()
        return self.decision

    @property
    def decision(self) -> Decision | None:
        """The current step's decision: FULL (every site computes), FORECAST, None (pending)."""
        if self._decision is None:
            return None
        return Decision.FULL if is_full(self._decision) else Decision.FORECAST

    @contextmanager
    def context(self, name: str):
        """Route site calls inside the block to the caches of context ``name``."""
        previous, self._context = self._context, name
        try:
            yield self
        finally:
            self._context = previous

    @contextmanager
    def bypassed(self):
        """Every site and probe passes its calls through inside the block (a measuring call inside
        a generation): nothing is recorded, forecast or decided."""
        s, self._s = self._s, None
        try:
            yield self
        finally:
            self._s = s

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
        self._t: float | None = None
        self._decision: StepDecision | None = None
        self._signals: dict = {}
        self._guard_warned = False
        self.schedule.reset()
        self._scores, self._skipped = {}, {}
        if self.tokens is not None:
            self.tokens.reset()

    def stats(self) -> CacheStats:
        """Statistics of the current (or last) generation: while caches are held, with their sizes now;
        ``cache_bytes`` is the peak held so far (the sizes read at every step and at the end)."""
        if not self._caches:
            return self._stats
        context_bytes = {context: sum(c.nbytes for c in caches.values()) for context, caches in self._caches.items()}
        scores = sum(score.numel() * score.element_size() for score in self._scores.values())
        orders = [state.order_reached for caches in self._caches.values() for cache in caches.values()
                  for state in cache.states if state is not None]
        orders = [order for order in orders if order is not None]
        held = self.schedule.held_bytes() + sum(context_bytes.values()) + scores
        return replace(self._stats, context_bytes=context_bytes, cache_bytes=max(self._stats.cache_bytes, held),
                       order_reached={"min": min(orders), "max": max(orders)} if orders else None)

    def remove(self) -> None:
        """Detach from the model; it is then exactly as before :func:`attach`."""
        with self._lifted():
            for site, name, _ in reversed(self._installed):
                hooks.remove(site.owner, site.method, name)
        self._installed.clear()
        self.end()  # the caches are freed, the statistics kept

    # -- the site wrapper ----------------------------------------------------------
    def compile(self, **options) -> None:
        """Compile every site's and probe's own computation with ``torch.compile(**options)``.
        The decisions, forecasts and bookkeeping stay eager, outside every compiled region
        (the wrappers are excluded from tracing), so no graph depends on the schedule and
        switching between full and forecast steps never recompiles. ``mode="reduce-overhead"``
        (CUDA graphs) also sets ``graph_replays``: the caches then copy what they keep of an
        output, whose memory the next graph replay would overwrite."""
        self.graph_replays = options.get("mode") in CUDA_GRAPH_MODES
        with self._lifted():
            for site, name, wrap in self._installed:
                hooks.rewrap(site.owner, site.method, name,
                             lambda compute, wrap=wrap: torch.compiler.disable(wrap(torch.compile(compute, **options))))

    def _lifted(self):
        """The group's own hooks lifted while sites are (un)hooked (:meth:`GroupReduce.lifted`)."""
        return self.group.lifted()

    def _hook(self, site: Site, wrap: Callable) -> None:
        """Replace ``site``'s callable by ``wrap(its computation)``, excluded from tracing
        so that a compiled model graph-breaks at the site instead of guarding on our state."""
        name = f"cachelab site {site.name} of {self!r}"
        hooks.install(site.owner, site.method, name, lambda compute: torch.compiler.disable(wrap(compute)),
                      hooks.SITE, by=self)
        self._installed.append((site, name, wrap))

    def _install_span(self, site: Site) -> None:
        """A span site: the first member decides (and records the span's inputs on full
        steps), the members in between pass through on forecast steps, the last adds the
        forecast (or, on full steps, records its outputs minus the span's inputs)."""
        last = len(site.members) - 1
        for position, member in enumerate(site.members):
            hooked = replace(site, owner=member, members=())
            signature = inspect.signature(getattr(member, site.method))

            def wrap(compute, position=position, hooked=hooked, signature=signature):
                def span_call(*args, **kwargs):
                    if self._s is None:
                        return compute(*args, **kwargs)
                    if position == 0:
                        cache = self._site_cache(site.name, first_tensor(args, kwargs).shape)
                        cache.pending, cache.guarded = None, False
                        if self._forecasts(site):
                            if cache.rebuild is None:  # no history yet: the span computes
                                self._stats.fallbacks += 1
                            else:  # forecast now: a non-finite one makes the whole span compute
                                forecast = self._forecast(site, cache)
                                cache.guarded = not self._guard_passes(site, forecast)
                                cache.pending = None if cache.guarded else forecast
                        cache.passing = cache.pending is not None
                        cache.entry = None if cache.passing or cache.guarded else hooked.residual_bases(
                            signature, args, kwargs, site.num_residuals)
                        if cache.entry and self.graph_replays:  # kept across the members' graph replays
                            cache.entry = [None if base is None else base.clone() for base in cache.entry]
                    else:
                        cache = self._caches[self._context][site.name]
                    if cache.passing and position < last:
                        return hooked.passthrough(signature, args, kwargs)
                    if cache.passing:
                        forecast, cache.pending = cache.pending, None
                        if self._observers:
                            self._notify_forecast(site, forecast, None)
                        return self._rebuild(cache, forecast, split(hooked.passthrough(signature, args, kwargs))[0])
                    out = compute(*args, **kwargs)
                    if position == last:
                        if not cache.guarded:
                            self._record(site, cache, out, cache.entry)
                        cache.entry = None
                    return out
                return span_call

            self._hook(hooked, wrap)

    def _install(self, site: Site) -> None:
        signature = inspect.signature(getattr(site.owner, site.method))

        def wrap(compute):
            def cached_call(*args, **kwargs):
                if self._s is None:
                    return compute(*args, **kwargs)
                cache = self._site_cache(site.name, first_tensor(args, kwargs).shape)
                if self._forecasts(site):
                    if cache.rebuild is not None:
                        forecast = self._forecast(site, cache)
                        if not self._guard_passes(site, forecast):  # computed for real, not recorded
                            return compute(*args, **kwargs)
                        bases = site.residual_bases(signature, args, kwargs, len(forecast))
                        if site.skip and site.decision_name in self._fed:  # its consumer computes tokens from them
                            consumer = self._skipped.setdefault((self._context, site.decision_name), {})
                            consumer[site.name.rpartition(".")[2]] = (args, kwargs)
                        if site.name in self._token_sites:
                            forecast = self._refresh_tokens(site, cache, forecast, compute, args, kwargs)
                        if self._observers:
                            true = None
                            if self._audit and not site.skip:  # what the site would have computed
                                true = cached_values(split(compute(*args, **kwargs))[0], bases)
                            self._notify_forecast(site, forecast, true)
                        return self._rebuild(cache, forecast, bases)
                    self._stats.fallbacks += 1
                out = compute(*args, **kwargs)
                parts = split(out)[0]
                self._record(site, cache, out, site.residual_bases(signature, args, kwargs, len(parts)))
                if self.tokens is not None:
                    self._tokens_full(site, cache, args, kwargs)
                return out
            return cached_call

        self._hook(site, wrap)

    def _tokens_full(self, site: Site, cache: SiteCache, args: tuple, kwargs: dict) -> None:
        """A full step under token selection: every token of the site is fresh (age 0), the policy
        sees its input (and its own data of the last full step), and a site that gives scores
        the policy needs gives them (kept per context and owner module until its next full step)."""
        x = first_tensor(args, kwargs)
        for score, method in site.scores:
            if score in self.tokens.needs:
                given = getattr(site.owner, method)(*args, **kwargs) if isinstance(method, str) else \
                    method(site.owner, *args, **kwargs)
                for kind, value in (given.items() if isinstance(given, dict) else [(None, given)]):
                    self._scores[self._context, site.block, score, kind] = value
        if site.name in self._token_sites:  # a policy's own data (ClusCa's centroids) carries over
            previous = None if cache.tokens is None else cache.tokens.extra
            cache.tokens = TokenState(torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device), extra=previous)
            self.tokens.full(cache.tokens, x)

    def _refresh_tokens(self, site: Site, cache: SiteCache, forecast: Parts, compute: Callable,
                        args: tuple, kwargs: dict) -> Parts:
        """The forecast with the tokens the policy selects computed for real (sorted by index), and
        those tokens handed to the predictor (``refresh``); the others' cache ages grow by one."""
        spec, state = self._token_sites[site.name], cache.tokens
        if site.name in self._fed:
            inputs = self._skipped.pop((self._context, site.name), None)
            if inputs is None:
                raise RuntimeError(f"token selection at {site.name}: the skip sites that feed it did not run first")
            x = first_tensor(*next(iter(inputs.values())))
        else:
            x = first_tensor(args, kwargs)
        state.forecasts += 1
        scores = {score: self._scores.get((self._context, site.block, score, site.kind),
                                          self._scores.get((self._context, site.block, score, None)))
                  for score in self.tokens.needs}
        view = TokenView(self._s, self._T, site.kind, spec.depth, spec.depths, x, state, scores)
        index = self.tokens.select(view)
        if index is None:
            return forecast
        state.age += 1
        if index.shape[1] == 0:
            return forecast
        index = index.sort(dim=1).values
        state.age.scatter_(1, index, 0)
        if site.tokens == TOKENWISE:
            selected_args, selected_kwargs = with_first_tensor(args, kwargs, gather_tokens(x, index))
            fresh = compute(*selected_args, **selected_kwargs)
        elif site.name in self._fed:
            fresh = site.tokens.compute(site.parent, inputs, index)
        else:
            fresh = getattr(site.owner, site.tokens)(*args, index=index, **kwargs)
        parts = split(fresh)[0]
        if len(parts) != 1 or len(forecast) != 1:
            raise ConfigError(f"strategy.tokens: the site {site.name} returns {len(forecast)} tensors; token selection "
                              f"needs sites that return one (allowed: strategy.tokens=null for this model)")
        self.predictor.refresh(cache.states[0], index, parts[0])
        return [scatter_tokens(forecast[0], index, parts[0])]

    def _install_probe(self, signal: str, probe: Site) -> None:
        signature = inspect.signature(getattr(probe.owner, probe.method))

        def wrap(compute):
            def probed_call(*args, **kwargs):
                out = compute(*args, **kwargs)
                if self._s is not None and self._decision is None:
                    parts = split(out)[0]
                    bases = probe.residual_bases(signature, args, kwargs, len(parts))
                    self._signals[signal] = signal_value(probe, parts, bases)
                    self._try_decide()
                return out
            return probed_call

        self._hook(probe, wrap)

    def _try_decide(self) -> None:
        """Decide the step once every signal the schedule reads is there."""
        if self._decision is not None or any(signal not in self._signals for signal in self.schedule.signals):
            return
        self._decision = self.schedule.decide(StepContext(s=self._s, T=self._T, t=self._t, signals=self._signals,
                                                          reduce=self.group))
        self._signals = {}
        self.group.agree(decision_code(self._decision), f"step {self._s}")
        steps = self._stats.full_steps if is_full(self._decision) else self._stats.forecast_steps
        steps.append(self._s)

    def _forecasts(self, site: Site) -> bool:
        """Whether ``site`` returns a forecast at this step (never before the decision)."""
        decision = self._decision
        if decision is not None and not isinstance(decision, Decision):
            decision = decision.get(self._decision_keys[site.name], Decision.FULL)
        return decision is Decision.FORECAST

    def _error_estimate(self, s: int) -> float | None:
        """The predictor's error estimate for step ``s``, averaged over every site with a history
        (each site's sums reduced over the group first)."""
        terms = [self.predictor.error_terms(state, s) for caches in self._caches.values()
                 for cache in caches.values() for state in cache.states if state is not None and state.has_history]
        if not terms:
            return None
        terms = torch.stack(terms)
        return float(relative_norm(self.group(terms)).mean())

    def _record(self, site: Site, cache: SiteCache, out, bases: list[torch.Tensor | None]) -> None:
        """Record a full-step output: each part minus its residual base (``bases``)."""
        parts, cache.rebuild = split(out)
        if site.skip:
            cache.specs = [None if p is None else (p.shape, p.dtype, p.device) for p in parts]
            return
        if len(cache.states) != len(parts):
            cache.states = [None if p is None else self._new_state(site.name) for p in parts]
        values = cached_values(parts, bases)
        if self.graph_replays:  # a CUDA graph's outputs are overwritten at its next replay
            values = [None if value is None else value.clone() for value in values]
        else:  # the caller gets these tensors in `out` and may change them in place: keep a copy
            values = [value.clone() if value is not None and value is part else value
                      for value, part in zip(values, parts)]
        for state, value in zip(cache.states, values):
            if state is not None:
                self.predictor.update(state, self._s, value)
        for observer in self._observers:
            observer.full(site.name, self._context, self._s, values)

    def _new_state(self, site: str) -> PredictorState:
        """An empty history of ``site`` that knows the generation's positions of the predictor's variable."""
        state = self.predictor.new_state_for(site)
        if self._positions is not None:
            state.positions = self._positions
        return state

    def _rebuild(self, cache: SiteCache, forecast: Parts, bases: list[torch.Tensor | None]):
        """The site's output on a forecast step: each forecast plus its residual base, in the
        structure the site returns. In place unless an observer holds the forecast it was shown."""
        states = cache.states or [None] * len(forecast)  # skip sites hold no state
        in_place = not self._observers
        return cache.rebuild([add_base(f, b, state, in_place) for f, b, state in zip(forecast, bases, states)])

    def _guard_passes(self, site: Site, forecast: Parts) -> bool:
        """Whether ``forecast`` may replace the site's computation: every tensor finite (or
        ``guard=off``; a skip site's zeros always are). Otherwise ``guard=raise`` raises, and
        ``fallback`` counts it, warns once per generation and returns False (the site computes).
        Under a group the ranks decide together: the site computes on every rank or on none."""
        if self.guard == "off" or site.skip:
            return True
        finite = all(f is None or all_finite(f) for f in forecast)
        # a site computing on one rank only would wait for the others' collectives
        finite = self.group.everywhere(finite)
        if finite:
            return True
        where = f"step {self._s}, site {site.name}, context {self._context!r}"
        if self.guard == "raise":
            raise NonFiniteError(f"the {type(self.predictor).__name__} forecast at {where} holds NaN or Inf "
                                 f"(guard=raise); allowed: guard=fallback (such a site computes for real) or guard=off")
        self._stats.guard_fallbacks += 1
        if not self._guard_warned:
            self._guard_warned = True
            warnings.warn(f"cachelab: the {type(self.predictor).__name__} forecast at {where} holds NaN or Inf; the "
                          f"site computed for real instead (guard=fallback); further ones in this generation are only "
                          f"counted (stats: guard_fallbacks)", RuntimeWarning, stacklevel=2)
        return False

    def _notify_forecast(self, site: Site, forecast: Parts, true: Parts | None) -> None:
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


def cached_values(parts: Parts, bases: list[torch.Tensor | None]) -> Parts:
    """What the predictor records of an output: each part, minus its residual base."""
    return [part if base is None or part is None else part - base for part, base in zip(parts, bases)]


def without_probes(site: Site, probes) -> Site | None:
    """A span site without its leading members that hold a probe (they compute every step,
    before the decision); None if no member is left. A probe after the first free member
    would run inside the skipped span: refused."""
    holds = [any(probe.owner is module for probe in probes for module in member.modules())
             for member in site.members]
    free = holds.index(False) if False in holds else len(holds)
    if any(holds[free:]):
        raise ConfigError(f"a probe lies inside the span site {site.name} after its first member; allowed: "
                          f"probes in the span's leading blocks only")
    if free == len(holds):
        return None
    return replace(site, owner=site.members[free], members=site.members[free:])


def add_base(forecast: torch.Tensor | None, base: torch.Tensor | None, state: PredictorState | None,
             in_place: bool) -> torch.Tensor | None:
    """A residual site's output ``base + forecast`` (the forecast alone without a base), never
    in a tensor that ``state`` holds: a forecast in a state's memory (a tensor or a view of one,
    as reuse returns) is copied when it has no base, so the caller may change it in place. With
    a base, added into the forecast's memory when allowed and the forecast owns it and the sum
    keeps its shape and dtype: no extra allocation. ``state`` None: a skip site's own zeros."""
    if forecast is None:
        return None
    if base is None:
        return forecast.clone() if state is not None and shares_memory(forecast, state) else forecast
    if (in_place and base.shape == forecast.shape and base.dtype == forecast.dtype
            and not shares_memory(forecast, state)):
        return forecast.add_(base)
    return base + forecast


def shares_memory(tensor: torch.Tensor, state: PredictorState | None) -> bool:
    """Whether ``tensor`` lives in the memory of one of ``state``'s tensors (no state: yes)."""
    if state is None:
        return True
    pointer = tensor.untyped_storage().data_ptr()
    return any(held.untyped_storage().data_ptr() == pointer for held in state.tensors())


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite. A sum is finite only if every term is (NaN
    and Inf propagate through additions), so one reduction settles the usual case (fp16 summed
    in fp32, whose range its sums cannot leave); a non-finite sum (a NaN or Inf element, or
    finite elements overflowing) is decided element by element. On this CPU the sum costs a
    fraction of ``torch.isfinite(tensor).all()`` (40 us against 1.2 ms for 3 MB of fp32)."""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
    return math.isfinite(total.item()) or bool(torch.isfinite(tensor).all())


def guard_policy(guard) -> str:
    """``guard`` checked against :data:`GUARDS` (YAML's ``off`` is False: read as "off")."""
    guard = "off" if guard is False else guard
    if guard not in GUARDS:
        raise ConfigError(f"guard={guard!r} is not allowed; allowed: {', '.join(GUARDS)}")
    return guard


def signal_value(probe: Site, parts: Parts, bases: list[torch.Tensor | None]) -> torch.Tensor:
    """A probe's signal: its first output with a residual base, minus that base (residual
    probes), else its first output."""
    for part, base in zip(parts, bases):
        if part is not None and (base is not None or not probe.residual):
            return part if base is None else part - base
    raise ValueError(f"the probe {probe.name} returned no output to read its signal from")


def token_sites(sites: list[Site], tokens: TokenPolicy | None) -> dict[str, SiteTokens]:
    """The sites where ``tokens`` selects (those of a kind it ``computes``; skip sites follow their
    consumer), with their depth among their kind; a ConfigError for such a site that cannot compute
    a subset of its tokens exactly, or when the policy needs a score that no site of the same
    module gives."""
    if tokens is None:
        return {}
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


def attach(sites: list[Site] | None, predictor: Predictor, schedule: Schedule,
           probes: dict[str, Site] | None = None, guard: str = "fallback", group: GroupReduce | None = None,
           tokens: TokenPolicy | None = None) -> CacheHandle:
    """Hook ``predictor`` x ``schedule`` onto ``sites`` (None: later, :meth:`CacheHandle.hook`);
    ``handle.remove()`` undoes it.
    ``probes`` (signal -> site) defaults to ``sites.probes`` (:func:`select_sites`); ``guard``:
    what a non-finite forecast does (:data:`GUARDS`, see :class:`CacheHandle`); ``group``: the
    ranks sharing each generation under context parallelism (None: this process alone);
    ``tokens``: a token selection policy (None: every site is forecast whole)."""
    return CacheHandle(sites, predictor, schedule, probes, guard, group, tokens)
