"""Drive a cache handle from inside a diffusers pipeline call, without editing the pipeline.

The step index comes from the scheduler: the ``timestep`` the pipeline passes to its
transformer is mapped back to its index in ``scheduler.timesteps`` (never a count of
transformer calls, so separate cond/uncond calls, extra calls and step-index-less schedulers
all work). Pipelines pass the scheduler's ``t`` as it is, as ``t / 1000`` (FLUX, SD3's
sigmas) or as ``1 - t / 1000`` (Lumina2-style); the first call tells which
(:class:`TimestepMap`), and a value that none of them gives is an error. A generation
starts at the first transformer call of a pipeline call (when the scheduler has its
timesteps) and ends after the scheduler's last step. The schedule decides at the first
transformer call of each step. The pipeline's own ``transformer.cache_context(name)`` blocks
select the handle's context, so cond and uncond calls keep separate caches.
``scheduler.step`` reports each new sample to the sampler callback
(``s, t, x, model_output, full``). Each generation begins with the scheduler's per-step
timestep, sigma and log-SNR (:func:`scheduler_grid`), for a predictor expanding in one of them.

Wan 2.2 A14B has two experts, ``transformer`` and ``transformer_2`` (:func:`experts`): both are
hooked, and a handle with ``experts`` (:class:`~cachelab.core.experts.ExpertHandles`) begins
each generation with the plan of which expert runs each step (:func:`expert_plan`, diffusers'
own rule); a call of the other expert at a step is an error.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from cachelab.core import hooks
from cachelab.core.controller import CacheHandle
from cachelab.core.schedules import Decision
from cachelab.core.sites import first_tensor
from cachelab.core.variables import StepGrid
from cachelab.models.samplers import Callback

# how pipelines hand the scheduler's timestep t to their transformer
TRANSFORMS = {"t": lambda t: t, "t / 1000": lambda t: t / 1000, "1 - t / 1000": lambda t: 1 - t / 1000}


EXPERTS = ("transformer", "transformer_2")  # a pipeline's denoisers, by attribute name
# diffusers' flow-matching schedulers, by class name (those a release lacks are left out)
FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")


def is_pipeline(target) -> bool:
    """Whether ``target`` is a diffusers pipeline with a transformer (what ``apply`` and ``plan`` drive)."""
    return isinstance(getattr(target, "transformer", None), nn.Module) and hasattr(target, "scheduler")


def experts(pipe) -> dict[str, nn.Module]:
    """The pipeline's denoisers by attribute: ``transformer`` and, for Wan 2.2 A14B, ``transformer_2``."""
    return {name: getattr(pipe, name) for name in EXPERTS if isinstance(getattr(pipe, name, None), nn.Module)}


def expert_plan(pipe, timesteps: torch.Tensor) -> list[str]:
    """The expert of each step, by diffusers' Wan 2.2 rule: ``transformer`` while
    ``t >= boundary_ratio * scheduler.config.num_train_timesteps``, ``transformer_2`` after
    (the comparison made as the pipeline makes it, on the scheduler's timestep tensors); without
    ``boundary_ratio`` or ``transformer_2``, ``transformer`` throughout."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None or "transformer_2" not in experts(pipe):
        return ["transformer"] * len(timesteps)
    boundary = ratio * pipe.scheduler.config.num_train_timesteps
    return ["transformer" if t >= boundary else "transformer_2" for t in timesteps]


def timestep_argument(signature: inspect.Signature, args: tuple, kwargs: dict):
    """The ``timestep`` a transformer call received, passed by keyword or by position."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    try:
        return signature.bind_partial(*args, **kwargs).arguments["timestep"]
    except (TypeError, KeyError):
        raise TypeError(f"the transformer was called without a timestep argument (its signature: {signature}); the "
                        f"driver takes each step's index from it") from None


class TimestepMap:
    """The step index of the timestep value a transformer call received, under whichever of
    :data:`TRANSFORMS` the pipeline uses: every transform that maps some scheduler timestep to
    the value stays a candidate, so the first call (step 0) already settles which one it is."""

    def __init__(self, timesteps: torch.Tensor, names=tuple(TRANSFORMS)):
        self.timesteps = timesteps.double().cpu()
        self.candidates = {name: TRANSFORMS[name](self.timesteps) for name in names}

    def step_of(self, timestep) -> int:
        value = float(torch.as_tensor(timestep).flatten().max())
        steps = {}
        for name, mapped in list(self.candidates.items()):
            s = int((mapped - value).abs().argmin())
            if abs(float(mapped[s]) - value) <= 1e-3 * (1 + abs(value)):
                steps[name] = s
            else:
                del self.candidates[name]
        if not steps:
            raise RuntimeError(
                f"the transformer was called at timestep {value:g}, which none of {', '.join(TRANSFORMS)} gives for "
                f"the scheduler's timesteps ({float(self.timesteps[0]):g} .. {float(self.timesteps[-1]):g}); "
                f"the pipeline feeds values that are not the scheduler's")
        if len(set(steps.values())) > 1:
            raise RuntimeError(f"timestep {value:g} is step {steps} depending on how the pipeline maps timesteps; "
                               f"cannot tell the step index")
        return next(iter(steps.values()))


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` samples a flow (``x = (1 - sigma) x0 + sigma noise``): diffusers'
    flow-matching schedulers (:data:`FLOW_MATCH_SCHEDULERS`, subclasses too), and multistep ones
    configured with flow sigmas."""
    import diffusers

    flow_classes = tuple(getattr(diffusers, name) for name in FLOW_MATCH_SCHEDULERS if hasattr(diffusers, name))
    config = getattr(scheduler, "config", {})
    return (isinstance(scheduler, flow_classes) or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def scheduler_grid(scheduler) -> StepGrid:
    """The timestep, sigma and log-SNR of every step of ``scheduler`` (its timesteps set): flow
    matching from ``scheduler.sigmas``; a variance-preserving scheduler from ``alphas_cumprod`` at
    integer timesteps (DDIM, DPM-Solver), else from its own sigmas ``sqrt((1 - a) / a)`` (Euler,
    Karras sigmas); any other gives its timesteps alone."""
    timesteps = scheduler.timesteps.double().cpu()
    T, name = len(timesteps), type(scheduler).__name__
    sigmas = getattr(scheduler, "sigmas", None)
    sigmas = None if sigmas is None or len(sigmas) < T else torch.as_tensor(sigmas).double().cpu()[:T]
    if is_flow_matching(scheduler) and sigmas is not None:
        return StepGrid.from_flow_sigmas(timesteps.tolist(), sigmas.tolist(), source=name)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None and not is_flow_matching(scheduler):
        if bool((timesteps == timesteps.round()).all()) and 0 <= timesteps.min() and timesteps.max() < len(alphas):
            return StepGrid.from_alpha_bar(timesteps.tolist(), alphas.double().cpu()[timesteps.long()].tolist(),
                                           source=name)
        if sigmas is not None:
            return StepGrid.from_alpha_bar(timesteps.tolist(), (1 / (1 + sigmas.square())).tolist(), source=name)
    return StepGrid(timestep=tuple(timesteps.tolist()), source=name)


class PipelineDriver:
    """Installs the step, context and callback hooks on a pipeline's transformer and scheduler
    (outermost, :data:`~cachelab.core.hooks.DRIVER`; removed by :meth:`uninstall`). As a context
    manager it drives one pipeline call; :func:`cachelab.apply` keeps it installed until ``remove()``.
    The handle is begun with the plan of which expert runs each step (:func:`expert_plan`; a
    single transformer runs them all)."""

    def __init__(self, pipe, handle: CacheHandle | None, callback: Callback | None = None):
        self.pipe, self.handle, self.callback = pipe, handle, callback
        self.s: int | None = None
        self.name = f"cachelab driver at {id(self):#x}"
        self._patched: list[tuple[object, str]] = []
        self._map: TimestepMap | None = None
        self._source: torch.Tensor | None = None  # the scheduler's timesteps the map was made for
        self._plan: list[str] | None = None  # the expert of each step, for a handle with experts

    def __enter__(self) -> PipelineDriver:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self) -> None:
        for name, transformer in experts(self.pipe).items():
            signature = inspect.signature(hooks.base(transformer, "forward"))
            self._patch(transformer, "forward", lambda forward, name=name, signature=signature:
                        self._forward(name, forward, signature))
            if self.handle is not None and hasattr(transformer, "cache_context"):
                self._patch(transformer, "cache_context", self._cache_context)
        self._patch(self.pipe.scheduler, "step", self._scheduler_step)

    def uninstall(self) -> None:
        """Remove the hooks; a generation still open (an interrupted call) is ended."""
        for owner, method in reversed(self._patched):
            hooks.remove(owner, method, self.name)
        self._patched.clear()
        self._end()

    def step_of(self, timestep) -> int:
        """The index in ``scheduler.timesteps`` of the timestep a transformer call received;
        a new ``scheduler.timesteps`` (a new pipeline call) starts a new generation."""
        timesteps = self.pipe.scheduler.timesteps
        if timesteps is not self._source:  # set by the pipeline before its first transformer call
            self._end()  # the previous call's transform still holds: keep what it ruled out
            self._map = TimestepMap(timesteps, *([tuple(self._map.candidates)] if self._map else []))
            self._source = timesteps
        return self._map.step_of(timestep)

    def _end(self) -> None:
        if self.s is not None and self.handle is not None:
            self.handle.end()
        self.s = self._plan = None

    def _patch(self, owner, method: str, wrap) -> None:
        """Hook ``owner.method`` by ``wrap`` (outside every other cachelab hook)."""
        hooks.install(owner, method, self.name, wrap, hooks.DRIVER, by=self)
        self._patched.append((owner, method))

    def _forward(self, name: str, forward, signature: inspect.Signature):
        def driven_forward(*args, **kwargs):
            s = self.step_of(timestep_argument(signature, args, kwargs))
            if s != self.s:
                if self.handle is not None:
                    if self.s is None or s < self.s:  # the first call of a pipeline call: T is known now
                        self._begin()
                    self.handle.step(s, float(self._map.timesteps[s]), latent=first_tensor(args, kwargs))
                self.s = s
            if self._plan is not None and self._plan[s] != name:
                raise RuntimeError(f"the pipeline ran {name} at step {s}, but its boundary_ratio gives {self._plan[s]}"
                                   f" (diffusers' rule, expert_plan); the experts' caches would mix")
            return forward(*args, **kwargs)

        return driven_forward

    def _begin(self) -> None:
        """Begin the handle's generation with the plan of which expert runs each step."""
        self._plan = expert_plan(self.pipe, self.pipe.scheduler.timesteps)
        self.handle.begin(len(self._map.timesteps), scheduler_grid(self.pipe.scheduler), self._plan)

    def _cache_context(self, cache_context):
        @contextmanager
        def driven_cache_context(name: str, **kwargs):
            with cache_context(name, **kwargs), self.handle.context(name):
                yield

        return driven_cache_context

    def _scheduler_step(self, step):
        def reporting_step(model_output, timestep, sample, *args, **kwargs):
            out = step(model_output, timestep, sample, *args, **kwargs)
            if self.callback is not None:
                x = out[0] if isinstance(out, tuple) else out.prev_sample
                full = self.handle is None or self.handle.decision is Decision.FULL  # decided by now
                self.callback({"s": self.s, "t": float(timestep), "x": x, "model_output": model_output,
                               "full": full})
            if self.s is not None and self._map is not None and self.s == len(self._map.timesteps) - 1:
                self._end()  # the last step: the generation is over, its caches are freed
            return out

        return reporting_step
