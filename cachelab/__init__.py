"""cachelab: training-free feature caching for diffusion transformers.

The public Python API (it imports no Hydra): a :class:`Strategy` (predictor x schedule x
granularity) attached to a model's cache sites gives a :class:`CacheHandle` that the sampling
loop drives with ``with handle.generation(T):`` and ``handle.step(s, t)``; ``handle.remove()``
restores the model exactly.
"""
from cachelab.core.controller import CacheHandle, CacheStats, attach
from cachelab.core.predictor import Predictor, PredictorState
from cachelab.core.schedules import Decision, Schedule, StepContext
from cachelab.core.sites import SitePattern, select_sites
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError, UserError

__all__ = ["CacheHandle", "CacheStats", "ConfigError", "Decision", "Predictor", "PredictorState", "Schedule",
           "SitePattern", "StepContext", "Strategy", "UserError", "attach", "select_sites"]
