"""``cachelab.apply``: a strategy on a diffusers pipeline, a diffusers transformer or any
``torch.nn.Module``, in one line, undone by ``handle.remove()``.

Importing this module imports no Hydra and no diffusers. A preset name is read from ``conf/``
through the jobs layer (the command line's own composition). The model's sites are those of its
family where the project describes it (:mod:`cachelab.models.families`: the same sites as
``python run.py model=<family>``), found by :mod:`cachelab.models.discovery` from one traced
call of the model at its first call inside a generation (one extra forward, once) for what no
family chooses, unless ``sites`` gives them.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from cachelab.core import hooks
from cachelab.core.controller import CacheHandle, CacheStats, Generations
from cachelab.core.experts import ExpertHandles
from cachelab.core.schedules import Decision
from cachelab.core.sites import SitePattern
from cachelab.core.strategy import SiteSource, Strategy
from cachelab.core.variables import StepGrid
from cachelab.errors import ConfigError

UNDRIVEN = ("warn", "raise", "ignore")
HANDLE_HOOK = "cachelab handle"  # the name of an applied handle's hook on its model's forward


class GivenSites:
    """Site patterns the caller gives per granularity (a ``SiteSource``)."""

    def __init__(self, model: nn.Module, patterns: dict[str, list[SitePattern]]):
        self.model, self.patterns = model, patterns

    def site_patterns(self, granularity: str) -> list[SitePattern]:
        if granularity not in self.patterns:
            raise ConfigError(f"granularity={granularity!r} has no site patterns; allowed: {', '.join(self.patterns)}")
        return self.patterns[granularity]


class Handle(Generations):
    """A strategy applied to a model: drive it (or let the pipeline drive it), read ``summary()``,
    ``remove()`` it (also on leaving ``with``). The driving calls go to its core handle,
    ``inner`` (a :class:`~cachelab.core.controller.CacheHandle`, which holds every generation's
    state); until the model's first call inside a generation the sites are not hooked. A call
    outside a generation runs the model untouched and warns once (``on_undriven="raise"``: an
    error) with how to drive it."""

    def __init__(self, model: nn.Module, strategy: Strategy, sites: SiteSource | None = None,
                 on_undriven: str = "warn"):
        if on_undriven not in UNDRIVEN:
            raise ConfigError(f"on_undriven={on_undriven!r} is not allowed; allowed: {', '.join(UNDRIVEN)}")
        self.model, self.strategy, self.sites, self.on_undriven = model, strategy, sites, on_undriven
        self.inner: CacheHandle = strategy.handle()  # its sites are hooked at the model's first call
        self.driver = None  # a PipelineDriver when applied to a pipeline
        self._warned = self._removed = False
        # per stack, the share of its blocks' FLOPs the sites hold (StackCoverage); None: not countable
        self.coverage: list | None = []
        hooks.install(model, "forward", HANDLE_HOOK, self._guarded_forward, hooks.HANDLE, by=self)

    def __repr__(self) -> str:
        return (f"<cachelab handle {self.strategy.name} ({self.strategy.granularity}) on {type(self.model).__name__} "
                f"at {id(self):#x}>")

    # -- driving: the core handle's calls ----------------------------------------------------
    def begin(self, T: int, grid: StepGrid | None = None, plan: Sequence[str] | None = None) -> None:
        """Start a generation of ``T`` steps (``plan``: the expert of each step, as a pipeline's driver gives it)."""
        self._check_live()
        self.inner.begin(T, grid, plan)

    def end(self) -> None:
        self.inner.end()

    def step(self, s: int, t: float | None = None, **signals) -> Decision | None:
        """Enter step ``s``; ``signals``: what the sampler gives (``latent=x``, SeaCache's input)."""
        self._check_live()
        return self.inner.step(s, t, **signals)

    def supply(self, **signals) -> Decision | None:
        """Signals of the current step given after ``step``."""
        return self.inner.supply(**signals)

    @property
    def decision(self) -> Decision | None:
        return self.inner.decision

    def context(self, name: str):
        """Route the model calls inside the block to the caches of context ``name`` (CFG cond/uncond)."""
        return self.inner.context(name)

    # -- reading ------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """The current (or last) generation's statistics."""
        return self.inner.stats()

    def summary(self) -> str:
        """Full and forecast steps, fallbacks, cache bytes (the peak, per context, per site) of the last generation."""
        return "\n".join(self.summary_lines(self.stats()))

    def summary_lines(self, stats: CacheStats) -> list[str]:
        """The lines of :meth:`summary` for ``stats``."""
        lines = [f"cachelab {self.strategy.name} ({self.strategy.granularity}) on {type(self.model).__name__}",
                 f"  sites: {len(self.inner.sites) if self.inner.hooked else 'not hooked yet (no generation ran)'}",
                 f"  full steps: {len(stats.full_steps)} {stats.full_steps}",
                 f"  forecast steps: {len(stats.forecast_steps)}, fallbacks: {stats.fallbacks}, "
                 f"non-finite forecasts computed instead: {stats.guard_fallbacks}",
                 f"  cache: {stats.cache_bytes / 2**20:.2f} MiB"
                 + (f" on the device, {stats.host_bytes / 2**20:.2f} MiB in host memory" if stats.host_bytes else "")]
        lines += [f"    context {name}: {nbytes / 2**20:.2f} MiB" for name, nbytes in stats.context_bytes.items()]
        lines += site_lines(stats.site_bytes)
        if self.coverage is None:
            lines += ["  coverage: the FLOPs of this model cannot be counted (torch.utils.flop_counter)"]
        if self.coverage:
            lines += ["  coverage (FLOPs of one call, torch.utils.flop_counter):"]
            lines += [f"    {c.line()}" for c in self.coverage]
            lines += [f"    warning: {c.warning()}" for c in self.coverage if c.warning()]
        if hasattr(self.sites, "describe"):  # the family's and discovered: what was found
            lines += ["  found:"] + [f"    {line}" for line in self.sites.describe().splitlines()]
        return lines

    # -- removing -----------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach everything: the model is bit for bit as before ``apply``; the handle is unusable."""
        if self._removed:
            return
        if self.driver is not None:
            self.driver.uninstall()
        self.inner.remove()
        hooks.remove(self.model, "forward", HANDLE_HOOK)
        self._removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- the model's forward ----------------------------------------------------------------
    def _guarded_forward(self, forward: Callable) -> Callable:
        """The model's forward (``forward``: the computation beneath this hook), guarded."""
        def guarded_forward(*args, **kwargs):
            if not self.inner.generating:
                self._undriven()
                return forward(*args, **kwargs)
            if not self.inner.hooked:
                self._hook_sites(lambda: forward(*args, **kwargs))
                return self.model.forward(*args, **kwargs)  # through the sites hooked just now
            return forward(*args, **kwargs)

        return guarded_forward

    def _hook_sites(self, call: Callable[[], object]) -> None:
        """Find the sites (the family's, or one traced call), hook them and count the share of each
        stack's FLOPs they hold (one more call; a warning when forecast steps would still run more than
        a tenth of a stack's FLOPs); under diffusers context parallelism the signals are reduced
        over the model's group."""
        from cachelab.models.families import model_sites, site_coverage
        from cachelab.models.parallel import context_parallel_group

        if self.sites is None:
            self.sites = model_sites(self.model, self.strategy.granularities, call)
        try:
            self.inner.hook(self.strategy.sites(self.sites), group=context_parallel_group(self.model))
        except ConfigError as err:  # e.g. a schedule reading a signal the model cannot give: name the model
            raise ConfigError(f"{type(self.model).__name__}: {err}") from None
        discovered = getattr(self.sites, "discovered", None)
        stacks = [stack.name for stack in discovered.stacks] if discovered is not None else None
        with self.inner.bypassed():  # the sites pass this call through
            self.coverage = site_coverage(self.model, self.inner.sites, call, stacks)
        for line in filter(None, (c.warning() for c in self.coverage or [])):
            warnings.warn(f"cachelab: {type(self.model).__name__} at granularity={self.strategy.granularity}: {line}",
                          stacklevel=2)

    def _undriven(self) -> None:
        if self.on_undriven == "ignore" or self._warned:
            return
        message = (f"cachelab: {type(self.model).__name__} was called outside a generation, so it ran without "
                   f"caching; drive it with `with handle.generation(num_steps):` and `handle.step(s, t)` before "
                   f"each step's model call(s), or apply the strategy to the pipeline")
        if self.on_undriven == "raise":
            raise RuntimeError(message)
        self._warned = True
        warnings.warn(message, stacklevel=5)  # the caller of model(...), past torch's call wrappers

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this cachelab handle was removed; apply the strategy again")


class ExpertsHandle(ExpertHandles):
    """A strategy applied to a pipeline with several experts (Wan 2.2's ``transformer`` and
    ``transformer_2``): one :class:`Handle` per expert, each with its own copy of the strategy
    (caches, step counter, schedule state), driven by the pipeline's calls; steps are counted per
    expert (:class:`~cachelab.core.experts.ExpertHandles`). ``summary()`` shows both experts in
    global steps; ``remove()`` restores both transformers."""

    driver = None  # the PipelineDriver of the pipeline

    def summary(self) -> str:
        stats = self.stats()
        lines = [f"cachelab on {len(self.handles)} experts: {', '.join(self.handles)}",
                 f"  full steps: {len(stats.full_steps)} {stats.full_steps}",
                 f"  forecast steps: {len(stats.forecast_steps)}",
                 f"  cache: {stats.cache_bytes / 2**20:.2f} MiB at most at once "
                 f"(an expert's caches are freed after its last step)"]
        for name, handle in self.handles.items():
            lines += [f"  expert {name}:"] + [f"    {line}" for line in handle.summary_lines(stats.experts[name])]
        return "\n".join(lines)

    def remove(self) -> None:
        """Detach everything: both transformers are bit for bit as before ``apply``."""
        if self.driver is not None:
            self.driver.uninstall()
            self.driver = None
        for handle in self.handles.values():
            handle.driver = None
        super().remove()

    def __enter__(self) -> ExpertsHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(target, strategy: str | Strategy = "taylor", *, sites: dict[str, list[SitePattern]] | None = None,
          on_undriven: str = "warn", budget=None, offload: bool = False, **overrides) -> Handle:
    """Apply ``strategy`` (a ``conf/strategy/`` preset name, with the command line's keys as
    ``overrides``: ``order``, ``interval``, ``first_enhance``, ``granularity``, ``schedule``,
    the schedule's own keys; or a :class:`Strategy`) to ``target``: a diffusers pipeline (its
    transformer, driven by the pipeline's own calls; both experts of a Wan 2.2 pipeline, each
    with its own state: an :class:`ExpertsHandle`), a diffusers transformer or any ``nn.Module``
    (driven by the caller: ``with handle.generation(T): handle.step(s, t)``). The sites are the
    model's family's where cachelab describes it (the same as ``run.py model=<family>``), else
    discovered; ``sites``: granularity -> site patterns instead (for every expert). ``budget`` (bytes
    or a size such as ``"4GiB"``): the strategy is planned first (:func:`cachelab.plan`, with the
    generation's keys among ``overrides``: ``num_inference_steps``, ``height``, ``width``, ...) and
    refused, before anything is hooked, when its cache would exceed the budget. ``offload``: the
    predictor states wait in host memory between their uses (docs/guides/memory.md, "Host offload")."""
    from cachelab.models.pipelines.driver import is_pipeline

    pipe = target if is_pipeline(target) else None
    model = target.transformer if pipe is not None else target
    if not isinstance(model, nn.Module):
        raise TypeError(f"cachelab.apply takes a diffusers pipeline, a diffusers transformer or a torch.nn.Module, "
                        f"got {type(target).__name__}")
    if budget is not None:
        from cachelab.planner import PLAN_KEYS
        plan_keys = {key: overrides.pop(key) for key in PLAN_KEYS if key in overrides}
    if isinstance(strategy, str):
        from cachelab.jobs.presets import preset

        strategy = preset(strategy, **overrides)
    elif overrides:
        raise ConfigError(f"keys {', '.join(overrides)} apply to preset names only; set them on the Strategy object")
    if strategy.predictor is None:
        raise ConfigError(f"strategy={strategy.name!r} caches nothing; allowed: any other preset")
    if offload:
        strategy = dataclasses.replace(strategy, offload=True)
    for each in (_experts(pipe) if pipe is not None else {"model": model}).values():
        refuse_a_second_handle(each)
    if budget is not None:
        from cachelab.planner import plan

        plan(target, strategy, budget=budget, **plan_keys)
    if pipe is None:
        return Handle(model, strategy, GivenSites(model, sites) if sites is not None else None, on_undriven)
    from cachelab.models.pipelines.driver import PipelineDriver

    models = _experts(pipe)
    handles = {name: Handle(expert, copy.deepcopy(strategy) if len(models) > 1 else strategy,
                            GivenSites(expert, sites) if sites is not None else None, on_undriven)
               for name, expert in models.items()}
    handle = handles["transformer"] if len(handles) == 1 else ExpertsHandle(handles)
    handle.driver = PipelineDriver(pipe, handle)
    for each in handles.values():
        each.driver = handle.driver
    handle.driver.install()
    return handle


def site_lines(site_bytes: dict[str, int], shown: int = 8) -> list[str]:
    """Each site's peak cache bytes, largest first (the ``shown - 3`` largest and the smallest
    when there are more than ``shown``)."""
    from cachelab.planner import size_text

    if not site_bytes:
        return []
    ordered = sorted(site_bytes.items(), key=lambda item: -item[1])
    kept = ordered if len(ordered) <= shown else ordered[: shown - 3]
    lines = [f"  cache per site (its peak, every context): {len(ordered)} sites"]
    lines += [f"    {name}: {size_text(nbytes)}" for name, nbytes in kept]
    if len(kept) < len(ordered):
        lines += [f"    ... {len(ordered) - len(kept)} more, down to {size_text(ordered[-1][1])} "
                  f"({ordered[-1][0]}; all in stats().site_bytes)"]
    return lines


def refuse_a_second_handle(model: nn.Module) -> None:
    """A ConfigError naming the handle that ``model`` (or a submodule) already has, and its ``remove()``."""
    held = next((hook.by for module in model.modules() for hook in hooks.hooks(module)
                 if isinstance(hook.by, (Handle, CacheHandle))), None)
    if held is not None:
        raise ConfigError(f"{type(model).__name__} already has a cachelab handle, {held!r}; call its remove() before "
                          f"applying another strategy")


def _experts(pipe) -> dict[str, nn.Module]:
    """The pipeline's denoisers (:func:`cachelab.models.pipelines.driver.experts`)."""
    from cachelab.models.pipelines.driver import experts

    return experts(pipe)
