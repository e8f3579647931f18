"""The derivative-error atlas ("shadow mode"): from ONE full-compute run, what each candidate
(predictor x interval N) would have forecast at every site and step, from exactly the history
it would have had under its schedule, and how far that is from the true feature.

For Taylor-type candidates (states with ``factors``) it also measures, at each of the
candidate's full steps, the error of the finite-difference derivative estimate ``D_i``
against the derivative of the dense trajectory (the unit-spacing backward difference
``Δ^i F(s) = Σ_j (-1)^j C(i, j) F(s - j)`` of the full run's values).

Errors are relative L2 over the batch (and over a site's outputs and CFG contexts):
``sqrt(Σ ||forecast - true||²) / sqrt(Σ ||true||²)``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from math import comb

import numpy as np
import torch

from cachelab.core.outputs import Parts
from cachelab.core.predictor import Predictor
from cachelab.core.schedules import StaticSchedule


@dataclass(frozen=True)
class Candidate:
    """One predictor under one static schedule (e.g. Taylor order 2 at N = 5)."""

    name: str
    predictor: Predictor
    schedule: StaticSchedule


class SquaredErrors:
    """Accumulates ``Σ ||a - b||²`` and ``Σ ||b||²`` per (row key, step); reads out relative errors."""

    def __init__(self, T: int):
        self.T = T
        self.num: dict = {}
        self.den: dict = {}

    def add(self, key, s: int, estimate: torch.Tensor, true: torch.Tensor) -> None:
        estimate, true = estimate.double(), true.double()
        for table, value in ((self.num, (estimate - true).square().sum()), (self.den, true.square().sum())):
            table.setdefault(key, np.zeros(self.T))[s] += float(value)

    def relative(self, key) -> np.ndarray:
        """Relative errors over steps (NaN where nothing was measured)."""
        num, den = self.num.get(key), self.den.get(key)
        if num is None:
            return np.full(self.T, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.sqrt(num) / np.sqrt(den)
        out[den == 0] = np.nan
        return out


class Atlas:
    """A site observer (``handle.observe``) for a full-compute run that shadows ``candidates``.

    ``derivative_orders``: how many derivative orders to compare against the dense
    trajectory (0: none). Memory: one predictor state per candidate, site, output and
    context, plus the last ``derivative_orders + 1`` values per site output.
    """

    def __init__(self, candidates: list[Candidate], T: int, derivative_orders: int = 0):
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        self.candidates, self.T, self.K = candidates, T, derivative_orders
        self.masks = {c.name: c.schedule.mask(T) for c in candidates}
        self.sites: list[str] = []
        self.forecast_errors = SquaredErrors(T)    # key (candidate, site)
        self.derivative_errors = SquaredErrors(T)  # key (candidate, site, order)
        self._states: dict = {}
        self._windows: dict = {}

    def full(self, site: str, context: str, s: int, values: Parts) -> None:
        if site not in self.sites:
            self.sites.append(site)
        for part, value in enumerate(values):
            if value is None:
                continue
            window = self._windows.setdefault((site, context, part), deque(maxlen=self.K + 1))
            if window and window[-1][0] != s - 1:
                window.clear()  # a gap in the dense record (not a full run): no dense derivative
            window.append((s, value))
            for candidate in self.candidates:
                self._shadow(candidate, site, context, part, s, value, window)

    def forecast(self, site: str, context: str, s: int, forecast: Parts, true: Parts | None) -> None:
        raise RuntimeError("the atlas observes a full-compute run (schedule=always); this run forecast")

    def _shadow(self, candidate: Candidate, site, context, part, s, value, window) -> None:
        key = (candidate.name, site, context, part)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = candidate.predictor.new_state()
        if not self.masks[candidate.name][s]:
            if state.has_history:
                self.forecast_errors.add((candidate.name, site), s, candidate.predictor.predict(state, s), value)
            return
        candidate.predictor.update(state, s, value)
        factors = getattr(state, "factors", None)
        for order in range(1, min(self.K, len(factors or []) - 1) + 1):
            if len(window) > order:
                self.derivative_errors.add((candidate.name, site, order), s, factors[order],
                                           dense_difference(window, order))

    # -- read-out -------------------------------------------------------------------
    def error_map(self, candidate: str) -> np.ndarray:
        """(sites, T) relative forecast errors of ``candidate`` (NaN at its full steps)."""
        return np.stack([self.forecast_errors.relative((candidate, site)) for site in self.sites])

    def derivative_map(self, candidate: str, order: int) -> np.ndarray:
        """(sites, T) relative errors of ``D_order`` against the dense derivative (NaN elsewhere)."""
        return np.stack([self.derivative_errors.relative((candidate, site, order)) for site in self.sites])

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything, as named arrays (for ``np.savez``)."""
        out = {"sites": np.array(self.sites), "candidates": np.array([c.name for c in self.candidates])}
        for c in self.candidates:
            out[f"forecast_error/{c.name}"] = self.error_map(c.name)
            out[f"full_mask/{c.name}"] = np.array(self.masks[c.name])
            for order in range(1, self.K + 1):
                out[f"derivative_error/{c.name}/{order}"] = self.derivative_map(c.name, order)
        return out


def dense_difference(window: deque, order: int) -> torch.Tensor:
    """``Δ^order F(s)`` at the window's last step, unit spacing: ``Σ_j (-1)^j C(order, j) F(s - j)``."""
    values = [v.double() for _, v in list(window)[-(order + 1):]][::-1]  # F(s), F(s-1), ...
    total = torch.zeros_like(values[0])
    for j, value in enumerate(values):
        total.add_(value, alpha=(-1) ** j * comb(order, j))
    return total


class ForecastAudit:
    """A site observer for a cached run observed with ``audit=True``: the error of each
    forecast against what the site computes from the cached run's own inputs."""

    def __init__(self, T: int):
        self.errors = SquaredErrors(T)
        self.sites: list[str] = []

    def full(self, site: str, context: str, s: int, values: Parts) -> None:
        if site not in self.sites:
            self.sites.append(site)

    def forecast(self, site: str, context: str, s: int, forecast: Parts, true: Parts | None) -> None:
        if true is None:
            return
        for estimate, value in zip(forecast, true):
            if value is not None:
                self.errors.add(site, s, estimate, value)

    def error_map(self, sites: list[str]) -> np.ndarray:
        """(sites, T) measured relative errors, rows in the order of ``sites``."""
        return np.stack([self.errors.relative(site) for site in sites])


def nanmean(values) -> float:
    """The mean of the finite values (NaN where none is)."""
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
