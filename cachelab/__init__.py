"""cachelab: training-free feature caching for diffusion transformers.

The public Python API (importing it imports no Hydra)::

    handle = cachelab.apply(pipe, "taylor", order=2, interval=5, first_enhance=3)
    images = pipe(prompt, num_inference_steps=50).images   # the pipeline drives the cache
    print(handle.summary())
    handle.remove()                                        # the model as it was, bit for bit

``cachelab.plan(target, strategy, **keys)`` tells before a run what the strategy will hold and
save (cache bytes, weights, FLOPs), on the meta device, for a shipped config such as
``"flux.1-dev"`` too; ``budget=`` in either refuses a strategy whose cache would not fit.

``apply`` takes a diffusers pipeline, a diffusers transformer or any ``torch.nn.Module`` (drive
those with ``with handle.generation(T):`` and ``handle.step(s, t)``). Below it: a
:class:`Strategy` (predictor x schedule x granularity) attached to sites (:func:`attach`).
"""
from __future__ import annotations

import importlib

# public name -> the module defining it; imported on first use, so that ``cachelab --help``
# and the light modules (cachelab.errors, the command line) do not wait for torch
_EXPORTS = {"Handle": "cachelab.api", "apply": "cachelab.api",
            "plan": "cachelab.planner", "Plan": "cachelab.planner", "CacheHandle": "cachelab.core.controller",
            "CacheStats": "cachelab.core.controller", "attach": "cachelab.core.controller",
            "Predictor": "cachelab.core.predictor", "PredictorState": "cachelab.core.predictor",
            "Decision": "cachelab.core.schedules", "Schedule": "cachelab.core.schedules",
            "StepContext": "cachelab.core.schedules", "SitePattern": "cachelab.core.sites",
            "select_sites": "cachelab.core.sites", "Strategy": "cachelab.core.strategy",
            "StepGrid": "cachelab.core.variables",
            "ConfigError": "cachelab.errors", "UserError": "cachelab.errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cachelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
