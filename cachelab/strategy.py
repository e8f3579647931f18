"""A strategy: predictor x schedule x granularity, attached to a model through its adapter."""
from __future__ import annotations

from dataclasses import dataclass

from cachelab.controller import CacheHandle, attach
from cachelab.models.adapter import ModelAdapter
from cachelab.predictor import Predictor
from cachelab.schedules import Schedule
from cachelab.sites import select_sites


@dataclass
class Strategy:
    """predictor x schedule x granularity; ``predictor`` None means no caching."""

    name: str
    predictor: Predictor | None
    schedule: Schedule
    granularity: str

    def attach(self, adapter: ModelAdapter) -> CacheHandle | None:
        if self.predictor is None:
            return None
        sites = select_sites(adapter.model, adapter.site_patterns(self.granularity))
        return attach(sites, self.predictor, self.schedule)
