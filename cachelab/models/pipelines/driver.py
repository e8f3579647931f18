"""Drive a cache handle from inside a diffusers pipeline call, without editing the pipeline.

The step index comes from the scheduler: the ``timestep`` the pipeline passes to its
transformer is looked up in ``scheduler.timesteps`` (never a count of transformer calls,
so separate cond/uncond calls, extra calls and step-index-less schedulers all work).
The schedule decides at the first transformer call of each step. The pipeline's own
``transformer.cache_context(name)`` blocks select the handle's context, so cond and
uncond calls keep separate caches. ``scheduler.step`` reports each new sample to the
sampler callback (``s, t, x, model_output, full``).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from cachelab.core.controller import CacheHandle
from cachelab.models.samplers import Callback
from cachelab.core.schedules import Decision

_MISSING = object()


class PipelineDriver:
    """Context manager around one pipeline call: installs the step, context and callback
    hooks as instance attributes on entry and removes them (in reverse) on exit."""

    def __init__(self, pipe, handle: CacheHandle | None, timestep_scale: float = 1.0,
                 callback: Callback | None = None):
        self.pipe, self.handle, self.timestep_scale, self.callback = pipe, handle, timestep_scale, callback
        self.s: int | None = None
        self._patched: list[tuple[object, str, object]] = []
        self._generation = ExitStack()  # the handle's generation, ended on exit
        self._begun = False
        self._timesteps: torch.Tensor | None = None  # the scheduler's, on the CPU, read once per call

    def __enter__(self) -> PipelineDriver:
        transformer, scheduler = self.pipe.transformer, self.pipe.scheduler
        self._patch(transformer, "forward", self._forward(transformer.forward))
        if self.handle is not None and hasattr(transformer, "cache_context"):
            self._patch(transformer, "cache_context", self._cache_context(transformer.cache_context))
        self._patch(scheduler, "step", self._scheduler_step(scheduler.step))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, previous in reversed(self._patched):
            if previous is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)
        self._patched.clear()
        self._generation.close()

    def step_of(self, timestep) -> int:
        """The index in ``scheduler.timesteps`` of the timestep a transformer call received."""
        if self._timesteps is None:  # set by the pipeline before its first transformer call
            self._timesteps = self.pipe.scheduler.timesteps.float().cpu()
        timesteps = self._timesteps
        value = float(torch.as_tensor(timestep).flatten().max()) * self.timestep_scale
        s = int((timesteps - value).abs().argmin())
        if abs(float(timesteps[s]) - value) > 1e-3 * (1 + abs(value)):
            raise RuntimeError(f"the transformer was called at timestep {value:g}, which is not one of the "
                               f"scheduler's timesteps; is the adapter's timestep_scale "
                               f"({self.timestep_scale:g}) right?")
        return s

    def _patch(self, owner, name: str, replacement) -> None:
        """Set ``owner.name``, remembering what the instance had (e.g. a cache site's wrapper)."""
        self._patched.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, replacement)

    def _forward(self, forward):
        def driven_forward(*args, **kwargs):
            s = self.step_of(kwargs["timestep"])
            if s != self.s:
                self.s = s
                if self.handle is not None:
                    if not self._begun:  # the first call: the scheduler's T is known now
                        self._begun = True
                        self._generation.enter_context(self.handle.generation(len(self.pipe.scheduler.timesteps)))
                    self.handle.step(s, float(self.pipe.scheduler.timesteps[s]))
            return forward(*args, **kwargs)

        return driven_forward

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
            return out

        return reporting_step
