"""What a predictor's forecasts add to its state (DMD's fits, FoCa's forecast window) counts in the
cache bytes at once, in the controller's statistics and in the planner's plan, against the
tensors the states hold, counted here from their fields."""
from __future__ import annotations

import pytest
import torch

import cachelab
from tests.conftest import tiny_adapter

KEYS = dict(interval=2, first_enhance=1)  # full steps 0, 2, 4, ...: four uniform values at step 6


def held_bytes(handle) -> int:
    """The bytes the states hold, from their fields (DMD: values, Taylor factors, fits; FoCa:
    anchors, window and anchor slope), each tensor once."""
    tensors = {}
    for sites in handle.inner.caches.values():
        for cache in sites.values():
            for state in cache.states:
                if hasattr(state, "fit"):
                    fitted = [t for item in state.fit or () if item is not None for t in item]
                    held = [*state.values, *state.taylor.factors, *fitted]
                else:
                    slope = [] if state.slope is None else [state.slope]
                    held = [value for _, value in (*state.anchors, *state.window)] + slope
                tensors.update({id(t): t for t in held})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("name", ["dmd", "foca"])
def test_the_bytes_read_after_each_step_are_what_the_states_hold(name):
    adapter = tiny_adapter()
    model = adapter.model
    with cachelab.apply(model, name, granularity="block", **KEYS) as handle:
        adapter.generate(adapter.make_inputs(3, seed=0), handle)  # finds the sites
        fitted = 0
        with handle.generation(12):
            for s in range(12):
                handle.step(s)
                torch.manual_seed(s)
                model(torch.randn(3, 1, 8, 8), torch.full((3,), 900 - 70 * s), torch.zeros(3, dtype=torch.long))
                assert sum(handle.stats().context_bytes.values()) == held_bytes(handle), s
                fitted += sum(bool(getattr(state, "fit", None)) for sites in handle.inner.caches.values()
                              for cache in sites.values() for state in cache.states)
        assert name != "dmd" or fitted  # some step held a fit


@pytest.mark.parametrize("name", ["dmd", "foca"])
def test_the_plan_is_the_measured_peak_of_a_forecasting_state(name):
    adapter = tiny_adapter(num_steps=12)
    keys = dict(num_inference_steps=12, batch_size=3, guidance=adapter.guidance_scale)
    planned = cachelab.plan(model := adapter.model, name, granularity="block", **keys, **KEYS)
    with cachelab.apply(model, name, granularity="block", **KEYS) as handle:
        adapter.generate(adapter.make_inputs(3, seed=0), handle)
        stats = handle.stats()
    assert planned.cache_bytes == stats.cache_bytes
    # by hand, per block site (2) of (6 x 16 x 32) fp32 = 12288 B per value
    value = 6 * 16 * 32 * 4
    if name == "foca":  # the newest anchor, the anchor slope (fp32: for the older anchor), the window's forecast
        assert planned.cache_bytes == 2 * 3 * value
    else:  # at step 11: the values of full steps 0..10, the Taylor fallback's derivative (its other factor is
        # the newest value) and the fit of those 6 values: 5 modes of d = 16 x 32 per item (6) in complex128
        # (16 B), with their eigenvalues and amplitudes
        fit = 6 * (16 * 32 * 5 + 2 * 5) * 16
        assert planned.cache_bytes == 2 * (7 * value + fit)


def test_every_predictor_whose_forecasts_change_its_state_says_so():
    """The controller reads a state's bytes after a forecast only where ``forecasts_change_state``:
    every shipped predictor whose ``predict`` replaces or adds a tensor of the state sets it."""
    from pathlib import Path

    from cachelab.errors import ConfigError
    from cachelab.jobs.presets import preset

    names = sorted(path.stem for path in (Path(cachelab.__file__).parent / "conf" / "strategy").glob("*.yaml"))
    changing, seen = set(), set()
    for name in names:
        try:
            predictor = preset(name).predictor
        except ConfigError:  # a preset needing a model's calibration
            continue
        if predictor is None or type(predictor) in seen:
            continue
        seen.add(type(predictor))
        state, changed = predictor.new_state_for("site"), False
        for s in range(12):
            if s % 2 == 0 or s < 5:
                predictor.update(state, s, torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(s)))
            else:
                before = [id(t) for t in state.tensors()]
                predictor.predict(state, s)
                changed |= [id(t) for t in state.tensors()] != before
        if changed:
            changing.add(type(predictor).__name__)
        assert changed == type(predictor).forecasts_change_state, name
    assert changing == {"DMD", "FoCa"} and len(seen) >= 6
