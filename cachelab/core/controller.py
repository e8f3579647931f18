"""The controller: attaches a strategy to a model's sites from outside, reversibly.

The handle keeps the step, its decision, the contexts and the statistics; what each site does
is its kind's (:mod:`cachelab.core.site_kinds`, token selection: :mod:`cachelab.core.token_sites`),
what a non-finite forecast does the guard's (:mod:`cachelab.core.guard`)."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from cachelab.errors import ConfigError
from cachelab.core import hooks
from cachelab.core.distributed import GroupReduce, LocalGroup
from cachelab.core.guard import Guard
from cachelab.core.offload import HostOffload
from cachelab.core.outputs import Parts
from cachelab.core.predictor import Predictor, PredictorState, relative_norm
from cachelab.core.schedules import Decision, Schedule, StepContext, StepDecision, is_full
from cachelab.core.site_kinds import Probe, SiteKind, SiteObserver, Wrap, site_kind, without_probes
from cachelab.core.sites import Site
from cachelab.core.token_sites import TokenSelection
from cachelab.core.tokens import TokenPolicy
from cachelab.core.variables import StepGrid, positions
from cachelab.core.verification import Checked, Verification


@dataclass
class CacheStats:
    """What one generation did: full and forecast steps, fallbacks (a site without history
    computing on a forecast step), guard fallbacks (a site whose forecast held NaN or Inf
    computing instead), the most bytes held by caches at a step's end (the sites' predictor
    states, token selection's ages, clusters and scores, and the schedule's reference signals;
    ``context_bytes``: per context, at the last reading; ``site_bytes``: per site, the most its
    states held, every context together; these two count the states wherever they wait), the most
    bytes of predictor states waiting in host memory at a step's end (``host_bytes``: with
    ``cache.offload`` the states wait there, and ``cache_bytes`` counts only what the device holds:
    the copies prefetched for the next site besides the schedule's and token selection's), and the order the
    predictor states reached (``{"min", "max"}`` over sites and contexts; None for a predictor
    without orders). Several experts (:class:`~cachelab.core.experts.ExpertHandles`): each one's
    own statistics in ``experts``, the fields above merged."""

    full_steps: list[int] = field(default_factory=list)
    forecast_steps: list[int] = field(default_factory=list)
    fallbacks: int = 0
    guard_fallbacks: int = 0
    cache_bytes: int = 0
    host_bytes: int = 0
    context_bytes: dict[str, int] = field(default_factory=dict)  # the sites' states per context
    site_bytes: dict[str, int] = field(default_factory=dict)  # each site's peak, every context together
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
            "host_bytes": self.host_bytes,
            "context_bytes": self.context_bytes,
            "site_bytes": self.site_bytes,
            "order_reached": self.order_reached,
            **experts,
        }


# signals the sampler gives at each step (``handle.step(s, t, latent=x)``): the model's input latent
SAMPLER_SIGNALS = ("latent",)


def controller_signals(predictor) -> set[str]:
    """The signals a schedule can read besides the probes', for ``predictor`` (an instance or a
    class): ``error_estimate`` when the predictor has ``error_terms(state, s)`` (the squared sums
    of its forecast's error and of the scale, :func:`~cachelab.core.predictor.relative_norm`);
    ``verification_error`` (the last forecast step's check: the model's last cache site computed
    for real, its relative L1 error per sample against its forecast, as ``(step, errors)``; None
    when that step was not checked); and the sampler's :data:`SAMPLER_SIGNALS`."""
    own = {"verification_error", *SAMPLER_SIGNALS}
    return own | ({"error_estimate"} if callable(getattr(predictor, "error_terms", None)) else set())


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


class SiteStates(dict):
    """A generation's site states, per context then site name, and what they hold: bytes per
    context, each site's most bytes (every context together) and the orders each site's
    predictor states reached, brought up to date from the states changed since (never summed
    again over every site), and the most bytes held at a step's end (:meth:`mark`) on the device
    and in host memory (``offload``: the :class:`~cachelab.core.offload.HostOffload` whose states
    wait there). Emptied at the generation's end, these figures kept."""

    def __init__(self, offload: HostOffload | None = None):
        super().__init__()
        self.offload = offload
        self.context_bytes: dict[str, int] = {}
        self.orders: dict[tuple[str, str], list[int]] = {}
        self.site_peaks: dict[str, int] = {}  # each site's most bytes, every context together
        self.peak = self.host_peak = 0
        self.host = 0  # the bytes of the predictor states in host memory now
        self._site_sizes: dict[str, int] = {}
        self._sizes: dict[tuple[str, str], tuple[int, int]] = {}  # each site's bytes, those on the host
        self._changed: dict[tuple[str, str], object] = {}

    def state(self, context: str, kind: SiteKind, shape: torch.Size | None):
        """``kind``'s state in ``context`` for inputs of ``shape`` (fresh when the shape changed;
        None: as it is)."""
        states = self.setdefault(context, {})
        state = states.get(kind.name)
        if shape is not None and (state is None or state.shape != shape):
            state = states[kind.name] = self._changed[context, kind.name] = kind.new_state(shape)
        return state

    def change(self, context: str, name: str, state) -> None:
        """``state`` of site ``name`` in ``context`` changed (its size is read when next needed)."""
        self._changed[context, name] = state

    def held(self, extra: int) -> int:
        """The bytes held on the device now: the sites' states but those in host memory, the copies
        prefetched for the next site, and ``extra`` (the schedule's, the token scores)."""
        self._update()
        prefetched = 0 if self.offload is None else self.offload.prefetched_nbytes
        return sum(self.context_bytes.values()) - self.host + prefetched + extra

    def order_reached(self) -> dict[str, int] | None:
        self._update()
        orders = [order for reached in self.orders.values() for order in reached]
        return {"min": min(orders), "max": max(orders)} if orders else None

    def mark(self, extra: int) -> None:
        """A step ends: what is held now counts toward the peaks."""
        self.peak = max(self.peak, self.held(extra))
        self.host_peak = max(self.host_peak, self.host)

    def _update(self) -> None:
        """Bring the figures up to date with the states changed since (whenever it runs, they are the same)."""
        for (context, name), state in self._changed.items():
            nbytes, (before, host_before) = state.nbytes, self._sizes.get((context, name), (0, 0))
            host = 0 if self.offload is None else sum(self.offload.host_nbytes(held) for held in state.states
                                                      if held is not None)
            self.context_bytes[context] = self.context_bytes.get(context, 0) + nbytes - before
            self.host += host - host_before
            self._sizes[context, name] = nbytes, host
            self._site_sizes[name] = self._site_sizes.get(name, 0) + nbytes - before
            reached = (held.order_reached for held in state.states if held is not None)
            self.orders[context, name] = [order for order in reached if order is not None]
        for name in {name for _, name in self._changed}:  # after every context's size is read
            self.site_peaks[name] = max(self.site_peaks.get(name, 0), self._site_sizes[name])
        self._changed.clear()


class CacheHandle(Generations):
    """A strategy attached to a model (:func:`attach`): it keeps the step, the decision, the
    contexts and the statistics; what each site does is its kind's (:mod:`~cachelab.core.site_kinds`).

    The sampler drives it inside ``with handle.generation(T, grid):``, calling ``step(s, t)``
    before the model call(s) of step ``s``; ``grid`` (a :class:`~cachelab.core.variables.StepGrid`)
    gives the per-step variables a predictor expanding in one of them needs. Outside a generation
    the model runs untouched. The schedule decides once per step; every site then runs and records,
    or returns the predictor's forecast. Separate model calls in one step (CFG cond/uncond) keep
    separate caches via ``with handle.context(name)``. A site whose input shape changed starts afresh.

    Signals: a schedule reading a probe's signal decides when the probe first runs in the step;
    until then every site called computes and records. A site on a probe's callable is dropped.
    ``error_estimate`` is the mean over sites with history of the predictor's. A per-kind decision
    (PAB) maps each site by ``site.kind`` (per site, ``decides_for == "site"``: ``site.decision_name``);
    kinds or sites it does not name compute.

    ``group`` (context parallelism): the caches hold each rank's shards, every signal is reduced
    over the group before the schedule reads it, the ranks check after every decision that they
    agree (:class:`~cachelab.core.distributed.DivergentDecisions`), and the sites are hooked beneath
    the engine's own hooks (``group.lifted()``). ``guard``: what a forecast holding NaN or Inf does
    (:class:`~cachelab.core.guard.Guard`). ``tokens``: token selection (:mod:`~cachelab.core.token_sites`).
    """

    def __init__(self, sites: list[Site] | None, predictor: Predictor, schedule: Schedule,
                 probes: dict[str, Site] | None = None, guard: str = "fallback", group: GroupReduce | None = None,
                 tokens: TokenPolicy | None = None):
        self._guard = Guard(guard, type(predictor).__name__)
        self.guard = self._guard.policy  # what a forecast holding NaN or Inf does
        self.group = group or LocalGroup()
        self.predictor, self.schedule, self.tokens = predictor, schedule, tokens
        self._selection = None if tokens is None else TokenSelection(tokens)
        self.sites: list[Site] = []
        self.probes: dict[str, Site] = {}
        self.hooked = False
        self._decision_keys: dict[str, str] = {}
        self._installed: list[tuple[Site, str, Wrap]] = []  # site, its hook's name, its wrapper maker
        self.observers: list[SiteObserver] = []
        self.audit = False
        self.context_name = "default"
        self.T: int | None = None
        self._positions: tuple[float, ...] | None = None  # x(s) of the predictor's variable
        self._grid: StepGrid | None = None
        self._verification: Verification | None = None  # a verifying schedule's check (SpeCa)
        self.reset()
        if sites is not None:
            self.hook(sites, probes)

    def hook(self, sites: list[Site], probes: dict[str, Site] | None = None, group: GroupReduce | None = None) -> None:
        """Hook the cache sites and probes (once; a handle made without sites is driven alike
        until then, and its model runs untouched). ``probes`` defaults to ``sites.probes``;
        ``group``: the ranks sharing each generation, when known only now."""
        if self.hooked:
            raise RuntimeError(f"{self!r} is hooked already")
        sites, probes, keys = hooked_sites(sites, probes, self.schedule, self.predictor)
        if self._selection is not None:
            self._selection.place(sites)
        self._verification = (Verification(sites, self.schedule, self.group)
                              if "verification_error" in self.schedule.signals else None)
        kinds = [self._kind(site) for site in sites]
        self.sites, self.probes, self._decision_keys = sites, probes, keys
        self.group, self.hooked = group or self.group, True
        with self.group.lifted():
            for kind in kinds + [Probe(signal, probe, self) for signal, probe in self.probes.items()]:
                for site, wrap in kind.hooks():
                    self._hook(site, wrap)

    @property
    def generating(self) -> bool:
        """Whether a generation is open (between ``begin`` and ``end``)."""
        return self.T is not None

    def __repr__(self) -> str:
        return (f"<CacheHandle {type(self.predictor).__name__} x {type(self.schedule).__name__} on "
                f"{len(self.sites)} sites at {id(self):#x}>")

    def begin(self, T: int, grid: StepGrid | None = None, plan: Sequence[str] | None = None) -> None:
        """Start a generation of ``T`` steps: every cache is cleared. ``grid``: the sampler's
        per-step variables; a ConfigError if the predictor's ``variable`` is not among them.
        ``plan``: the expert of each step (a pipeline's driver gives it); this one handle serves
        whichever runs, so only its length is checked."""
        if plan is not None and len(plan) != T:
            raise ValueError(f"the plan must name an expert for each of the {T} steps, got {len(plan)} entries")
        self._positions = positions(getattr(self.predictor, "variable", "step"), T, grid)
        self.reset()
        self._grid = grid
        self.T = T

    def end(self) -> None:
        """End the generation: what the caches hold counts toward the peak, they are freed (the
        statistics keep their sizes) and the model runs untouched until the next ``begin``."""
        if self._caches:
            self._caches.mark(self._extra_bytes())
        self._caches.clear()
        self._signals = {}
        if self._selection is not None:
            self._selection.clear()
        self.s = self._t = self._decision = self.T = self._positions = self._grid = None

    def step(self, s: int, t: float | None = None, **signals) -> Decision | None:
        """Enter step ``s`` (counted up); the schedule decides once for every site and context,
        now or, if it reads a probe's signal, when the probe runs. Returns FULL if every site
        computes, FORECAST if some are forecast, None while the decision waits for a probe."""
        if self.T is None:
            raise RuntimeError("handle.step(s) outside a generation: use `with handle.generation(T):`")
        if self.s is not None and s <= self.s:
            raise RuntimeError(f"step {s} after step {self.s}: steps count up within a generation; begin(T) starts "
                               f"a new one")
        if self._caches:  # the bytes the last step left held count toward the peak
            self._caches.mark(self._extra_bytes())
        if self.s is not None and self._decision is None:
            raise RuntimeError(f"step {self.s} ended undecided: {self._awaited()}")
        self.s, self._t, self._decision, self._signals = s, t, None, dict(signals)
        if "error_estimate" in self.schedule.signals and "error_estimate" not in signals:
            self._signals["error_estimate"] = error_estimate(self.predictor, self._caches, self.group, s)
        if self._verification is not None:
            self._signals["verification_error"] = self._verification.take()
        self._try_decide()
        return self.decision

    def supply(self, **signals) -> Decision | None:
        """Signals of the current step given after ``step`` (the sampler's latent, when only the
        model call sees it); the schedule decides as soon as it has every signal it reads."""
        if self.s is not None and self._decision is None:
            self._signals.update(signals)
            self._try_decide()
        return self.decision

    @property
    def decision(self) -> Decision | None:
        """The current step's decision: FULL (every site computes), FORECAST, None (pending)."""
        if self._decision is None:
            return None
        return Decision.FULL if is_full(self._decision) else Decision.FORECAST

    @property
    def step_decision(self) -> StepDecision | None:
        """The current step's decision as the schedule made it: one for every site, or one per
        site kind (or site); None while pending."""
        return self._decision

    @property
    def caches(self) -> dict[str, dict[str, object]]:
        """The sites' states now, per context then site name (read them only): each has ``shape``,
        ``states`` (its predictor states) and ``nbytes``."""
        return {context: dict(states) for context, states in self._caches.items()}

    @contextmanager
    def context(self, name: str):
        """Route site calls inside the block to the caches of context ``name``."""
        previous, self.context_name = self.context_name, name
        try:
            yield self
        finally:
            self.context_name = previous

    @contextmanager
    def bypassed(self):
        """Every site and probe passes its calls through inside the block (a measuring call inside
        a generation): nothing is recorded, forecast or decided."""
        s, self.s = self.s, None
        try:
            yield self
        finally:
            self.s = s

    def observe(self, observer: SiteObserver, audit: bool = False) -> None:
        """Send every site's full-step values and forecasts to ``observer``. With ``audit``
        a forecast step also computes each site for real (analysis only: no speedup) so the
        observer sees the forecast error; the forecast is still what the model gets."""
        self.observers.append(observer)
        self.audit = self.audit or audit

    def reset(self) -> None:
        """Drop every cache and statistic; until the next ``step`` the model runs as usual."""
        self._caches = SiteStates(self.predictor if isinstance(self.predictor, HostOffload) else None)
        self._stats = CacheStats()
        self.s: int | None = None
        self._t: float | None = None
        self._decision: StepDecision | None = None
        self._signals: dict = {}
        self._guard.reset()
        if self._verification is not None:
            self._verification.reset()
        self.schedule.reset()
        if self._selection is not None:
            self._selection.reset()

    def stats(self) -> CacheStats:
        """Statistics of the current (or last) generation; ``cache_bytes`` is the peak held at a
        step's end so far (while caches are held, or what they hold now if more)."""
        caches = self._caches
        peak = max(caches.peak, caches.held(self._extra_bytes())) if caches else caches.peak
        orders = caches.order_reached()
        return replace(self._stats, cache_bytes=peak, host_bytes=max(caches.host_peak, caches.host),
                       context_bytes=dict(caches.context_bytes),
                       site_bytes=dict(caches.site_peaks), order_reached=orders)

    def remove(self) -> None:
        """Detach from the model; it is then exactly as before :func:`attach`."""
        with self.group.lifted():
            for site, name, _ in reversed(self._installed):
                hooks.remove(site.owner, site.method, name)
        self._installed.clear()
        self.end()  # the caches are freed, the statistics kept

    def compile(self, **options) -> None:
        """Compile every site's and probe's own computation with ``torch.compile(**options)``.
        The decisions, forecasts and bookkeeping stay eager, outside every compiled region
        (the wrappers are excluded from tracing), so no graph depends on the schedule and
        switching between full and forecast steps never recompiles. What the caches keep of an
        output is a copy whatever the mode, so CUDA graphs' replays cannot overwrite it."""
        with self.group.lifted():
            for site, name, wrap in self._installed:
                hooks.rewrap(site.owner, site.method, name,
                             lambda compute, wrap=wrap: torch.compiler.disable(wrap(torch.compile(compute, **options))))

    def forecasts(self, site: Site) -> bool:
        """Whether ``site`` returns a forecast at this step (never before the decision)."""
        decision = self._decision
        if decision is not None and not isinstance(decision, Decision):
            decision = decision.get(self._decision_keys[site.name], Decision.FULL)
        return decision is Decision.FORECAST

    def state(self, kind: SiteKind, shape: torch.Size | None = None):
        return self._caches.state(self.context_name, kind, shape)

    def new_state(self, site: str) -> PredictorState:
        """An empty history of ``site`` that knows the generation's positions of the predictor's variable."""
        state = self.predictor.new_state_for(site)
        if self._positions is not None:
            state.positions = self._positions
        return state

    def finite(self, site: Site, forecast: Parts) -> bool:
        """Whether ``forecast`` may replace ``site``'s computation (the guard; fallbacks counted)."""
        if self._guard.passes(forecast, self.group, self.s, site.name, self.context_name):
            return True
        self._stats.guard_fallbacks += 1
        return False

    def fell_back(self) -> None:
        self._stats.fallbacks += 1

    def changed(self, name: str, state) -> None:
        self._caches.change(self.context_name, name, state)

    def signal(self, name: str, value: torch.Tensor) -> None:
        """A probe gives the step's signal ``name`` (before the decision): decide once all are there."""
        self._signals[name] = value
        self._try_decide()

    def _hook(self, site: Site, wrap: Wrap) -> None:
        """Replace ``site``'s callable by ``wrap(its computation)``, excluded from tracing
        so that a compiled model graph-breaks at the site instead of guarding on our state."""
        name = f"cachelab site {site.name} of {self!r}"
        hooks.install(site.owner, site.method, name, lambda compute: torch.compiler.disable(wrap(compute)),
                      hooks.SITE, by=self)
        self._installed.append((site, name, wrap))

    def _try_decide(self) -> None:
        """Decide the step once every signal the schedule reads is there."""
        if self._decision is not None or any(signal not in self._signals for signal in self.schedule.signals):
            return
        logsnr = None if self._grid is None or self._grid.logsnr is None else self._grid.logsnr[self.s]
        self._decision = self.schedule.decide(StepContext(s=self.s, T=self.T, t=self._t, signals=self._signals,
                                                          reduce=self.group, logsnr=logsnr))
        self._signals = {}
        self.group.agree(decision_code(self._decision), f"step {self.s}")
        steps = self._stats.full_steps if is_full(self._decision) else self._stats.forecast_steps
        steps.append(self.s)

    def _awaited(self) -> str:
        """What the pending decision waits for: the probes the model never ran, else the sampler's signals."""
        if self.probes:
            return f"the model never ran the probe(s) of {', '.join(self.probes)}"
        missing = ", ".join(signal for signal in self.schedule.signals if signal not in self._signals)
        return f"the sampler never gave the signal(s) {missing} (handle.step(s, t, latent=x) or handle.supply(latent=x))"

    def _kind(self, site: Site) -> SiteKind:
        """``site``'s kind, with token selection's decorators and, at the checked site, the check."""
        kind = site_kind(site, self, self._selection)
        checked = self._verification is not None and site.name == self._verification.site
        return Checked(kind, self._verification) if checked else kind

    def _extra_bytes(self) -> int:
        """Bytes held besides the sites' states: the schedule's reference signals, the token scores."""
        return self.schedule.held_bytes() + (0 if self._selection is None else self._selection.nbytes)


def hooked_sites(sites: list[Site], probes: dict[str, Site] | None, schedule: Schedule, predictor: Predictor
                 ) -> tuple[list[Site], dict[str, Site], dict[str, str]]:
    """The cache sites a handle of ``predictor`` x ``schedule`` hooks (none on a probe's callable;
    spans without their leading members holding a probe), the probes of the signals the schedule
    reads (``probes`` defaults to ``sites.probes``), and the key each site's decision is looked up
    by; a ConfigError for a signal nobody gives or a site kind the schedule names that no site has."""
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
    return sites, probes, keys


def error_estimate(predictor: Predictor, caches: dict, group: GroupReduce | LocalGroup, s: int) -> float | None:
    """The predictor's error estimate for step ``s``, averaged over every site with a history in
    ``caches`` (each site's sums reduced over the group first); None without history."""
    terms = [predictor.error_terms(state, s) for states in caches.values()
             for site in states.values() for state in site.states if state is not None and state.has_history]
    if not terms:
        return None
    return float(relative_norm(group(torch.stack(terms))).mean())


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
