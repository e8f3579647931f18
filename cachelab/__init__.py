"""cachelab: training-free feature caching for diffusion transformers.

The public Python API (importing it imports no Hydra)::

    handle = cachelab.apply(pipe, "taylor", order=2, interval=5, first_enhance=3)
    images = pipe(prompt, num_inference_steps=50).images   # the pipeline drives the cache
    print(handle.summary())
    handle.remove()                                        # the model as it was, bit for bit

``apply`` takes a diffusers pipeline, a diffusers transformer or any ``torch.nn.Module`` (drive
those with ``with handle.generation(T):`` and ``handle.step(s, t)``). Below it: a
:class:`Strategy` (predictor x schedule x granularity) attached to sites (:func:`attach`).
"""
from cachelab.api import Handle, apply
from cachelab.core.controller import CacheHandle, CacheStats, attach
from cachelab.core.predictor import Predictor, PredictorState
from cachelab.core.schedules import Decision, Schedule, StepContext
from cachelab.core.sites import SitePattern, select_sites
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError, UserError

__all__ = ["Handle", "apply", "CacheHandle", "CacheStats", "ConfigError", "Decision", "Predictor", "PredictorState", "Schedule",
           "SitePattern", "StepContext", "Strategy", "UserError", "attach", "select_sites"]
