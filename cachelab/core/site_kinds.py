"""The kinds of cache site behind one small interface: a plain site, a skip site and a span site.

A kind is what one cache site does, given the handle that drives it (:class:`SiteRun`): it names
the callables it wraps (``hooks``), its calls pass through outside a step, record on full steps
and give the forecast on forecast steps, and it keeps its own small state per context
(``new_state``; the handle holds the states and makes a fresh one when the site's input shape
changes). Token selection decorates a plain or skip site (:mod:`cachelab.core.token_sites`).

Nothing the model gets from a site is a tensor a state holds: a full step's output is copied
where the predictor would keep it as it is, and a forecast in a state's memory (reuse) is
copied, so a caller changing an output in place never changes the cache. The copies also keep
the cache apart from a CUDA graph's outputs, which its next replay overwrites.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol

import torch

from cachelab.errors import ConfigError
from cachelab.core.outputs import Parts, split
from cachelab.core.predictor import Predictor, PredictorState
from cachelab.core.sites import Site, first_tensor

Wrap = Callable[[Callable], Callable]  # the computation beneath -> the callable that replaces it
# (state, forecast, compute, args, kwargs) -> the forecast changed (token selection's fresh tokens)
Refine = Callable[[object, Parts, Callable, tuple, dict], Parts]


class SiteObserver(Protocol):
    """Subscribes to what the sites see (``handle.observe``): analysis, never control.
    ``values`` are what the predictor records (residuals for residual sites), per output."""

    def full(self, site: str, context: str, s: int, values: Parts) -> None:
        """Site ``site`` computed ``values`` for real at step ``s``."""

    def forecast(self, site: str, context: str, s: int, forecast: Parts, true: Parts | None) -> None:
        """Site ``site`` returned ``forecast`` at step ``s``; ``true`` is what it would have
        computed from the same inputs (only when observed with ``audit=True``, else None)."""


class SiteRun(Protocol):
    """What a site kind reads from the handle that drives it (a
    :class:`~cachelab.core.controller.CacheHandle`)."""

    s: int | None  # the step running; None: outside a step (or bypassed), every call passes through
    T: int | None  # the generation's number of steps
    context_name: str  # the context of the model call (CFG's cond and uncond keep separate states)
    predictor: Predictor
    observers: list[SiteObserver]
    audit: bool  # a forecast step also computes each site for the observers

    def forecasts(self, site: Site) -> bool:
        """Whether the step's decision forecasts ``site`` (never before the decision)."""

    def state(self, kind: SiteKind, shape: torch.Size | None = None):
        """``kind``'s state in the current context for inputs of ``shape``: a fresh one when the
        shape changed; None: the state as it is (a span's later members)."""

    def new_state(self, site: str) -> PredictorState:
        """An empty predictor history of ``site`` (knowing the generation's positions)."""

    def finite(self, site: Site, forecast: Parts) -> bool:
        """Whether ``forecast`` may replace the site's computation (the non-finite guard)."""

    def fell_back(self) -> None:
        """A site without history computes on a forecast step (counted)."""

    def changed(self, name: str, state) -> None:
        """``state`` of site ``name`` (current context) changed (its size may have)."""

    @property
    def step_decision(self):
        """The step's decision (None: pending, a probe's signal is awaited)."""

    def signal(self, name: str, value: torch.Tensor) -> None:
        """A probe's value of the step's signal ``name``."""


@dataclass
class PlainState:
    """A site's history in one context: a predictor state per output tensor (None where the
    output is None), how to rebuild the output, and the input shape it was built for."""

    shape: torch.Size
    states: list[PredictorState | None] = field(default_factory=list)
    rebuild: Callable[[Parts], object] | None = None

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states if state is not None)


@dataclass
class SkipState:
    """A skip site's last outputs in one context: each one's (shape, dtype, device), no history."""

    shape: torch.Size
    specs: list[tuple | None] = field(default_factory=list)
    rebuild: Callable[[Parts], object] | None = None
    states = ()  # no predictor state
    nbytes = 0


@dataclass
class SpanState(PlainState):
    """A span's history in one context, and its current call: the inputs at its first member (a
    full step), the forecast passed from its first member to its last (a forecast step), or that
    it computes because its forecast was not finite (then nothing is recorded)."""

    entry: list[torch.Tensor | None] | None = None
    pending: Parts | None = None
    guarded: bool = False


class SiteKind(ABC):
    """What one cache site does at a step, driven by ``run``; ``hooks()`` lists the callables it
    wraps, each as (the site of that callable, its wrapper maker)."""

    def __init__(self, site: Site, run: SiteRun):
        self.site, self.run, self.name = site, run, site.name

    @abstractmethod
    def new_state(self, shape: torch.Size):
        """An empty state for inputs of ``shape``."""

    @abstractmethod
    def hooks(self) -> list[tuple[Site, Wrap]]:
        """(the site of each callable this kind wraps, its wrapper maker)."""


class Single(SiteKind):
    """A site on one callable: outside a step its calls pass through; on a forecast step a site
    with history gives ``forecast``, one without computes (a fallback); else ``full``."""

    def __init__(self, site: Site, run: SiteRun):
        super().__init__(site, run)
        self.signature = inspect.signature(getattr(site.owner, site.method))

    def hooks(self) -> list[tuple[Site, Wrap]]:
        return [(self.site, self.wrap)]

    def wrap(self, compute: Callable) -> Callable:
        run, site = self.run, self.site

        def cached_call(*args, **kwargs):
            if run.s is None:
                return compute(*args, **kwargs)
            state = run.state(self, first_tensor(args, kwargs).shape)
            if run.forecasts(site):
                if state.rebuild is not None:
                    return self.forecast(state, compute, args, kwargs)
                run.fell_back()
            return self.full(state, compute, args, kwargs)
        return cached_call

    @abstractmethod
    def full(self, state, compute: Callable, args: tuple, kwargs: dict):
        """The output of a call that computes for real (recorded)."""

    @abstractmethod
    def forecast(self, state, compute: Callable, args: tuple, kwargs: dict):
        """The output of a call on a forecast step, the state holding history."""


class Decorated(Single):
    """A single-callable kind around ``inner``, doing what it does where not overridden."""

    def __init__(self, inner: Single):
        super().__init__(inner.site, inner.run)
        self.inner = inner

    def new_state(self, shape: torch.Size):
        return self.inner.new_state(shape)

    def full(self, state, compute: Callable, args: tuple, kwargs: dict):
        return self.inner.full(state, compute, args, kwargs)

    def forecast(self, state, compute: Callable, args: tuple, kwargs: dict):
        return self.inner.forecast(state, compute, args, kwargs)


class Plain(Single):
    """A site recording its outputs (minus their residual bases) on full steps and giving the
    predictor's forecast (plus the bases) on forecast steps; a forecast that the guard refuses
    computes for real instead, without recording."""

    def new_state(self, shape: torch.Size) -> PlainState:
        return PlainState(shape)

    def full(self, state: PlainState, compute: Callable, args: tuple, kwargs: dict):
        out = compute(*args, **kwargs)
        parts, state.rebuild = split(out)
        record(self.run, self.name, state, parts, self.site.residual_bases(self.signature, args, kwargs, len(parts)))
        return out

    def forecast(self, state: PlainState, compute: Callable, args: tuple, kwargs: dict, refine: Refine | None = None):
        """The forecast plus the residual bases (``refine``: a decorator's change of the forecast
        first), shown to the observers (with the true values when auditing)."""
        run = self.run
        forecast = predict(run, self.name, state)
        if not run.finite(self.site, forecast):  # computed for real, not recorded
            return compute(*args, **kwargs)
        bases = self.site.residual_bases(self.signature, args, kwargs, len(forecast))
        if refine is not None:
            forecast = refine(state, forecast, compute, args, kwargs)
        if run.observers:
            true = cached_values(split(compute(*args, **kwargs))[0], bases) if run.audit else None
            notify(run, self.name, forecast, true)
        return rebuild(run, state, forecast, bases)


class Skip(Single):
    """A site whose consumer's kind is forecast gives zeros shaped like its last outputs (plus its
    residual bases) instead of computing: it is never forecast itself, so it holds no history."""

    def new_state(self, shape: torch.Size) -> SkipState:
        return SkipState(shape)

    def full(self, state: SkipState, compute: Callable, args: tuple, kwargs: dict):
        out = compute(*args, **kwargs)
        parts, state.rebuild = split(out)
        state.specs = [None if p is None else (p.shape, p.dtype, p.device) for p in parts]
        return out

    def forecast(self, state: SkipState, compute: Callable, args: tuple, kwargs: dict):
        zeros = [None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=spec[2]) for spec in state.specs]
        bases = self.site.residual_bases(self.signature, args, kwargs, len(zeros))
        if self.run.observers:
            notify(self.run, self.name, zeros, None)
        return state.rebuild([add_base(z, b, None, False) for z, b in zip(zeros, bases)])


class Span(SiteKind):
    """One residual site across the modules of a stack (``site.members``): the first member
    decides (and keeps the span's inputs on full steps), the members in between pass their
    inputs through on forecast steps, the last adds the forecast (or, on full steps, records its
    outputs minus the span's inputs). A non-finite forecast makes the whole span compute."""

    def new_state(self, shape: torch.Size) -> SpanState:
        return SpanState(shape)

    def hooks(self) -> list[tuple[Site, Wrap]]:
        members = [replace(self.site, owner=member, members=()) for member in self.site.members]
        return [(member, partial(self.wrap, member=member, first=position == 0, last=position == len(members) - 1))
                for position, member in enumerate(members)]

    def wrap(self, compute: Callable, member: Site, first: bool, last: bool) -> Callable:
        run, signature = self.run, inspect.signature(getattr(member.owner, member.method))

        def span_call(*args, **kwargs):
            if run.s is None:
                return compute(*args, **kwargs)
            state = self.enter(member, signature, args, kwargs) if first else run.state(self)
            if state.pending is not None and not last:
                return member.passthrough(signature, args, kwargs)
            if state.pending is not None:
                forecast, state.pending = state.pending, None
                if run.observers:
                    notify(run, self.name, forecast, None)
                return rebuild(run, state, forecast, split(member.passthrough(signature, args, kwargs))[0])
            out = compute(*args, **kwargs)
            if last:
                if not state.guarded:
                    parts, state.rebuild = split(out)
                    record(run, self.name, state, parts, state.entry)
                state.entry = None
            return out
        return span_call

    def enter(self, member: Site, signature: inspect.Signature, args: tuple, kwargs: dict) -> SpanState:
        """The first member's call: forecast now (pending until the last member), or keep a copy
        of the span's inputs for the last member to record against."""
        run = self.run
        state = run.state(self, first_tensor(args, kwargs).shape)
        state.pending, state.guarded = None, False
        if run.forecasts(self.site):
            if state.rebuild is None:  # no history yet: the span computes
                run.fell_back()
            else:
                forecast = predict(run, self.name, state)
                state.guarded = not run.finite(self.site, forecast)
                state.pending = None if state.guarded else forecast
        if state.pending is None and not state.guarded:
            bases = member.residual_bases(signature, args, kwargs, self.site.num_residuals)
            state.entry = [None if base is None else base.clone() for base in bases]
        return state


class Probe:
    """A probe: its callable computes at every step, and until the step is decided its value
    (:func:`signal_value`) is the step's signal ``signal`` (``run.signal``)."""

    def __init__(self, signal: str, probe: Site, run: SiteRun):
        self.signal, self.site, self.run = signal, probe, run

    def hooks(self) -> list[tuple[Site, Wrap]]:
        return [(self.site, self.wrap)]

    def wrap(self, compute: Callable) -> Callable:
        run, probe, signature = self.run, self.site, inspect.signature(getattr(self.site.owner, self.site.method))

        def probed_call(*args, **kwargs):
            out = compute(*args, **kwargs)
            if run.s is not None and run.step_decision is None:
                parts = split(out)[0]
                bases = probe.residual_bases(signature, args, kwargs, len(parts))
                run.signal(self.signal, signal_value(probe, parts, bases))
            return out
        return probed_call


def signal_value(probe: Site, parts: Parts, bases: list[torch.Tensor | None]) -> torch.Tensor:
    """A probe's signal: its first output with a residual base, minus that base (residual
    probes), else its first output."""
    for part, base in zip(parts, bases):
        if part is not None and (base is not None or not probe.residual):
            return part if base is None else part - base
    raise ValueError(f"the probe {probe.name} returned no output to read its signal from")


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


def site_kind(site: Site, run: SiteRun, tokens=None) -> SiteKind:
    """The kind of ``site``: a span (``members``), a skip site (``skip``) or a plain one; decorated
    by ``tokens`` (a :class:`~cachelab.core.token_sites.TokenSelection`) where it selects."""
    kind = Span(site, run) if site.members else Skip(site, run) if site.skip else Plain(site, run)
    return kind if tokens is None else tokens.decorate(kind)


def predict(run: SiteRun, name: str, state: PlainState) -> Parts:
    """The predictor's forecast of every output at the current step (None where the output is None);
    where its forecasts change the states, the state of site ``name`` is marked changed (what a
    forecast fits or keeps counts at once)."""
    forecast = [None if held is None else run.predictor.predict(held, run.s) for held in state.states]
    if run.predictor.forecasts_change_state:
        run.changed(name, state)
    return forecast


def record(run: SiteRun, name: str, state: PlainState, parts: Parts, bases: list[torch.Tensor | None]) -> None:
    """Record a full step's outputs: each part minus its residual base, a copy where that is the
    part itself (the caller gets it and may change it in place)."""
    if len(state.states) != len(parts):
        state.states = [None if p is None else run.new_state(name) for p in parts]
    values = [value.clone() if value is not None and value is part else value
              for value, part in zip(cached_values(parts, bases), parts)]
    for held, value in zip(state.states, values):
        if held is not None:
            run.predictor.update(held, run.s, value)
    run.changed(name, state)
    for observer in run.observers:
        observer.full(name, run.context_name, run.s, values)


def rebuild(run: SiteRun, state: PlainState, forecast: Parts, bases: list[torch.Tensor | None]):
    """The site's output on a forecast step: each forecast plus its residual base, in the structure
    the site returns. In place unless an observer holds the forecast it was shown."""
    in_place = not run.observers
    return state.rebuild([add_base(f, b, held, in_place) for f, b, held in zip(forecast, bases, state.states)])


def notify(run: SiteRun, name: str, forecast: Parts, true: Parts | None) -> None:
    for observer in run.observers:
        observer.forecast(name, run.context_name, run.s, forecast, true)


def cached_values(parts: Parts, bases: list[torch.Tensor | None]) -> Parts:
    """What the predictor records of an output: each part, minus its residual base."""
    return [part if base is None or part is None else part - base for part, base in zip(parts, bases)]


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
