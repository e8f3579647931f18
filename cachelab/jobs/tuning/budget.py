"""The tuner's cache budget (``cache.budget``): which predictor families and orders may be
tuned at all, decided by the planner (:func:`cachelab.plan`) before any cached run."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError
from cachelab.jobs.tuning.records import Setting


@dataclass(frozen=True)
class CacheBudget:
    """At most ``limit`` bytes of cache; ``planned(strategy)``: the bytes the planner says
    ``strategy`` holds on the tuned model and generation (exact on the tiny models)."""

    limit: int
    planned: Callable[[Strategy], int]

    def fitting(self, strategy: Callable[[Setting], Strategy], pairs: Sequence[tuple[str, int]],
                sites: Sequence[str]) -> tuple[list[tuple[str, int]], dict]:
        """The (family, order) ``pairs`` whose every candidate fits, and what was planned. Each pair
        is planned with every site at interval 1: a site that records at every step holds the most
        factors any interval gives it, so a pair that fits so fits at every interval, and one that
        does not is dropped before its sensitivity runs (``strategy``: a setting's strategy)."""
        planned = {pair: self.planned(strategy(Setting(*pair, {}, dict.fromkeys(sites, 1), 1.0, 0.0, 0.0)))
                   for pair in pairs}
        fitting = [pair for pair, nbytes in planned.items() if nbytes <= self.limit]
        record = {"budget": self.limit, "planned": {f"{f}_o{o}": nbytes for (f, o), nbytes in planned.items()},
                  "excluded": [f"{f}_o{o}" for (f, o), nbytes in planned.items() if nbytes > self.limit]}
        if not fitting:
            (family, order), least = min(planned.items(), key=lambda item: item[1])
            raise ConfigError(f"cache budget {self.limit} B: no candidate fits (the least, {family} order {order}, "
                              f"plans {least} B); allowed: a larger cache.budget, lower job.orders, or "
                              f"job.predictors.{family}.factor_dtype=bf16")
        return fitting, record
