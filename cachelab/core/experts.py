"""Several denoisers taking turns in one generation (Wan 2.2 A14B: a high-noise and a low-noise
expert), each cached with its own handle: its own caches, step counter and schedule state."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

from cachelab.core.controller import CacheStats, Generations
from cachelab.core.schedules import Decision
from cachelab.core.variables import StepGrid


class ExpertHandles(Generations):
    """One handle per expert (name -> a :class:`~cachelab.core.controller.CacheHandle` or anything
    driven alike), driven as one: ``begin(T, grid, plan)`` with ``plan[s]`` the expert that runs step
    ``s``, then ``step(s, t)`` with the global step index.

    Steps are counted per expert: an expert sees only its own steps, as a generation of
    ``plan.count(name)`` steps counted from 0 (its local index: how many of its steps came
    before). Its schedule therefore starts afresh at its first step (every schedule makes step 0
    full, and a site without history computes anyway), warm-up (``first_enhance``) and
    ``final_full`` apply to each expert's segment, and its predictor's history holds its own
    full steps only: no forecast ever mixes the experts' features. Within a contiguous segment
    (Wan 2.2's) local step differences equal the global ones, so the forecasts are those of the
    global index. Each expert keeps its CFG contexts apart as a single handle does. An expert's
    caches are freed after its last planned step. ``stats()`` reports global step indices, per
    expert in ``experts`` and merged; ``cache_bytes`` is the most held at once."""

    def __init__(self, handles: Mapping[str, object]):
        if not handles:
            raise ValueError("ExpertHandles needs at least one expert")
        self.handles = dict(handles)
        self._plan: list[str] | None = None
        self._grid: StepGrid | None = None
        self._steps: dict[str, list[int]] = {}  # expert -> its global steps, in order
        self._local: list[int] = []  # global step -> the expert's local index
        self._ran: set[str] = set()  # experts begun in this (or the last) generation
        self._open: set[str] = set()  # begun and not yet ended
        self._s: int | None = None
        self._current: str | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(self.handles)

    @contextmanager
    def generation(self, T: int, grid: StepGrid | None = None, plan: Sequence[str] | None = None):
        """``begin(T, grid, plan)`` on entry, ``end()`` on exit, even when sampling fails."""
        self.begin(T, grid, plan)
        try:
            yield self
        finally:
            self.end()

    def begin(self, T: int, grid: StepGrid | None = None, plan: Sequence[str] | None = None) -> None:
        """Start a generation of ``T`` steps; ``grid``: the sampler's per-step variables (each
        expert gets its own steps' part); ``plan[s]`` names the expert of step ``s`` (None: the
        first expert runs every step)."""
        plan = [next(iter(self.handles))] * T if plan is None else list(plan)
        unknown = sorted(set(plan) - set(self.handles))
        if len(plan) != T or unknown:
            raise ValueError(f"the plan must name one of {', '.join(self.handles)} for each of the {T} steps, got "
                             f"{len(plan)} entries" + (f" naming {', '.join(unknown)}" if unknown else ""))
        self.end()
        self._plan, self._grid, self._ran = plan, grid, set()
        self._steps = {name: [s for s, expert in enumerate(plan) if expert == name] for name in self.handles}
        self._local = [self._steps[expert].index(s) for s, expert in enumerate(plan)]

    def end(self) -> None:
        for name in sorted(self._open):
            self.handles[name].end()
        self._open.clear()
        self._s = self._current = None

    def step(self, s: int, t: float | None = None, **signals) -> Decision | None:
        """Enter global step ``s``: the planned expert's handle enters its local step (begun at the
        expert's first step); experts past their last step free their caches."""
        if self._plan is None:
            raise RuntimeError("handle.step(s) outside a generation: use `with handle.generation(T, grid, plan):`")
        if self._s is not None and s <= self._s:
            raise RuntimeError(f"step {s} after step {self._s}: steps count up within a generation; begin(T, grid, "
                               f"plan) starts a new one")
        expert = self._plan[s]
        for name in sorted(self._open):
            if self._steps[name][-1] < s:
                self.handles[name].end()
                self._open.discard(name)
        if expert not in self._ran:
            steps = self._steps[expert]
            self.handles[expert].begin(len(steps), None if self._grid is None else self._grid.subset(steps))
            self._ran.add(expert)
            self._open.add(expert)
        self._s, self._current = s, expert
        return self.handles[expert].step(self._local[s], t, **signals)

    def supply(self, **signals) -> Decision | None:
        """Signals of the current step for the current expert's handle (:meth:`CacheHandle.supply`)."""
        return None if self._current is None else self.handles[self._current].supply(**signals)

    @property
    def expert(self) -> str | None:
        """The expert of the current step (None outside a step)."""
        return self._current

    @property
    def decision(self) -> Decision | None:
        return None if self._current is None else self.handles[self._current].decision

    @contextmanager
    def context(self, name: str):
        """Route model calls inside the block to context ``name`` of every expert."""
        with ExitStack() as stack:
            for handle in self.handles.values():
                stack.enter_context(handle.context(name))
            yield self

    def stats(self) -> CacheStats:
        """The current (or last) generation's statistics in global steps: merged, and per expert in ``experts``."""
        per = {name: self._expert_stats(name) for name in self.handles}
        orders = [stats.order_reached for stats in per.values() if stats.order_reached]
        return CacheStats(
            full_steps=sorted(s for stats in per.values() for s in stats.full_steps),
            forecast_steps=sorted(s for stats in per.values() for s in stats.forecast_steps),
            fallbacks=sum(stats.fallbacks for stats in per.values()),
            guard_fallbacks=sum(stats.guard_fallbacks for stats in per.values()),
            cache_bytes=self._peak_bytes(per),
            host_bytes=self._peak_bytes(per, "host_bytes"),
            context_bytes={f"{name}/{context}": nbytes for name, stats in per.items()
                           for context, nbytes in stats.context_bytes.items()},
            site_bytes={f"{name}/{site}": nbytes for name, stats in per.items()
                        for site, nbytes in stats.site_bytes.items()},
            order_reached={"min": min(o["min"] for o in orders), "max": max(o["max"] for o in orders)} if orders
            else None,
            experts=per)

    def remove(self) -> None:
        """Detach every expert's handle."""
        self.end()
        for handle in self.handles.values():
            handle.remove()

    def _expert_stats(self, name: str) -> CacheStats:
        if name not in self._ran:
            return CacheStats()
        stats, steps = self.handles[name].stats(), self._steps[name]
        return replace(stats, full_steps=[steps[i] for i in stats.full_steps],
                       forecast_steps=[steps[i] for i in stats.forecast_steps])

    def _peak_bytes(self, per: dict[str, CacheStats], held: str = "cache_bytes") -> int:
        """The most cache bytes (``held``: or those in host memory) held at once: an expert holds its
        caches from its first to its last step."""
        spans = [(self._steps[name][0], self._steps[name][-1], getattr(per[name], held)) for name in self._ran]
        return max((sum(nbytes for first, last, nbytes in spans if first <= s <= last) for s, _, _ in spans),
                   default=0)
