"""The derivative-error atlas against closed forms, and against a real cached run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cachelab.analysis.atlas import Atlas, Candidate, ForecastAudit
from cachelab.core.controller import attach
from cachelab.core.schedules import Always, Interval, Mask
from cachelab.core.sites import Site, select_sites
from cachelab.core.strategy import Strategy
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer


class StepSquared(nn.Module):
    """A 'site' whose output at step s is s² everywhere (the step is read from the input)."""

    def forward(self, x):
        return x.square()


def full_run(atlas: Atlas, T: int) -> None:
    module = StepSquared()
    handle = attach([Site("square", module)], Reuse(), Always())
    handle.observe(atlas)
    with handle.generation(T):
        for s in range(T):
            handle.step(s)
            module(torch.full((2, 3), float(s)))
    handle.remove()


def test_forecast_and_derivative_errors_match_closed_forms():
    T = 12
    atlas = Atlas([Candidate("taylor2", TaylorSeer(2), Mask(full_steps=[0, 4, 8])),
                   Candidate("reuse", Reuse(), Mask(full_steps=[0, 4, 8]))], T, derivative_orders=2)
    full_run(atlas, T)
    errors = atlas.error_map("taylor2")[0]
    # the test vectors of docs/library/taylorseer.md: factors {64, 12, 2} at step 8 forecast 77, 92, 109 for 81, 100, 121
    expected = {9: 4 / 81, 10: 8 / 100, 11: 12 / 121}
    # steps 1-3 reuse F(0) = 0 (error 1); steps 5-7 use order 1 from {16, 4}: 16 + 4k
    expected.update({s: 1.0 for s in (1, 2, 3)})
    expected.update({s: abs(16 + 4 * (s - 4) - s * s) / (s * s) for s in (5, 6, 7)})
    for s in range(T):
        if s in expected:
            assert errors[s] == pytest.approx(expected[s], rel=1e-12), s
        else:
            assert math.isnan(errors[s]), s  # full steps: nothing forecast
    reuse = atlas.error_map("reuse")[0]
    assert reuse[10] == pytest.approx(abs(64 - 100) / 100)
    # derivatives at full step 8: D1 = (64 - 16) / 4 = 12 vs dense 64 - 49 = 15; D2 = (12 - 4) / 4 = 2 vs 2
    assert atlas.derivative_map("taylor2", 1)[0][8] == pytest.approx(3 / 15)
    assert atlas.derivative_map("taylor2", 2)[0][8] == pytest.approx(0, abs=1e-12)
    # at step 4, D1 = (16 - 0) / 4 = 4 against the dense 16 - 9 = 7; no D2 yet
    assert atlas.derivative_map("taylor2", 1)[0][4] == pytest.approx(3 / 7)
    assert math.isnan(atlas.derivative_map("taylor2", 2)[0][4])
    arrays = atlas.arrays()
    assert arrays["forecast_error/taylor2"].shape == (1, T) and list(arrays["sites"]) == ["square"]


def test_atlas_equals_the_error_measured_in_a_cached_run_at_its_first_forecast_step(adapter):
    """Up to the first forecast step the cached run's inputs are the full run's, so there the
    first site's forecast error is the atlas's exactly; afterwards the two drift apart."""
    T, schedule = adapter.num_steps, Interval(3, first_enhance=2)
    inputs = adapter.make_inputs(2, seed=0)
    sites = select_sites(adapter.model, adapter.site_patterns("module"))

    atlas = Atlas([Candidate("taylor2_N3", TaylorSeer(2, first_enhance=2), schedule)], T)
    shadow = attach(sites, Reuse(), Always())
    shadow.observe(atlas)
    full = adapter.generate(inputs, shadow)
    shadow.remove()
    assert torch.equal(full, adapter.generate(inputs))  # observing changes nothing

    audit = ForecastAudit(T)
    strategy = Strategy("taylor", TaylorSeer(2, first_enhance=2), schedule, "module")
    handle = strategy.attach(adapter)
    plain = adapter.generate(inputs, handle)
    handle.observe(audit, audit=True)
    audited = adapter.generate(inputs, handle)
    handle.remove()
    assert torch.equal(audited, plain)  # auditing computes the truth but returns the forecast

    predicted, measured = atlas.error_map("taylor2_N3"), audit.error_map(atlas.sites)
    first = schedule.mask(T).index(False)
    assert predicted[0, first] == pytest.approx(measured[0, first], rel=1e-9)
    forecast_steps = [s for s, full in enumerate(schedule.mask(T)) if not full]
    assert np.isfinite(predicted[:, forecast_steps]).all() and np.isfinite(measured[:, forecast_steps]).all()
    assert not np.allclose(predicted[:, forecast_steps[-1]], measured[:, forecast_steps[-1]])  # drifted
