"""Span ("stack") sites: the blocks after the probe's as one residual, as FBCache, TeaCache
and MagCache cache it. Checked against a hand-written forward, against per-block residuals
(their sum; Taylor is linear in the values, so its forecasts sum too), and on a diffusers
stack whose blocks return two streams."""
from __future__ import annotations

import pytest
import torch

from cachelab.core.adaptive import FirstBlockCache
from cachelab.errors import ConfigError
from cachelab.core.controller import attach
from cachelab.evaluation.metrics import relative_l2
from cachelab.core.schedules import Interval, Mask
from cachelab.core.sites import Site, SitePattern, SitePatterns, select_sites
from cachelab.core.strategy import Strategy
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter
from tests.test_pipelines import tiny


def test_forecast_step_is_the_stack_residual_algebra():
    adapter = tiny_adapter(arch=dict(hidden_size=32, depth=3, num_heads=2, patch_size=2))
    model = adapter.model
    x, y, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.full((2,), 500)
    with torch.no_grad():  # the bare model, by hand: the stack's residual and a forecast from it
        c = model.t_embedder(t) + model.y_embedder(y, False)
        h = model.x_embedder(x) + model.pos_embed
        out = h
        for block in model.blocks:
            out = block(out, c)
        residual = out - h
        h2 = model.x_embedder(x * 2) + model.pos_embed
        expected = model.unpatchify(model.final_layer(h2 + residual, c))
        full, full2 = model(x, t, y), model(x * 2, t, y)
    handle = Strategy("reuse", Reuse(), Mask(full_steps=[0]), "stack").attach(adapter)
    assert [site.name for site in handle.sites] == ["stack"] and len(handle.sites[0].members) == 3
    with torch.no_grad(), handle.generation(2):
        handle.step(0)
        assert torch.equal(model(x, t, y), full)
        handle.step(1)
        forecast = model(x * 2, t, y)
    torch.testing.assert_close(forecast, expected)
    assert handle.stats().cache_bytes == residual.numel() * residual.element_size()
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x * 2, t, y), full2) and not torch.equal(full2, forecast)


@pytest.mark.parametrize("predictor", [Reuse(), TaylorSeer(2, first_enhance=2)])
def test_stack_equals_the_sum_of_block_residuals_at_a_fraction_of_the_memory(predictor):
    adapter = tiny_adapter(arch=dict(hidden_size=32, depth=4, num_heads=2, patch_size=2), num_steps=12)
    inputs = adapter.make_inputs(2, seed=5)
    results = {}
    for granularity in ("block", "stack"):
        handle = Strategy("s", predictor, Interval(4, 2), granularity).attach(adapter)
        results[granularity] = adapter.generate(inputs, handle), handle.stats()
        handle.remove()
    (block, block_stats), (stack, stack_stats) = results["block"], results["stack"]
    assert stack_stats.full_steps == block_stats.full_steps and stack_stats.forecast_steps
    assert relative_l2(stack, block) < 1e-5
    assert stack_stats.cache_bytes * 4 == block_stats.cache_bytes  # one residual instead of one per block


def test_fbcache_probe_block_runs_every_step_and_the_stack_starts_after_it():
    adapter = tiny_adapter(arch=dict(hidden_size=32, depth=3, num_heads=2, patch_size=2), num_steps=12)
    inputs = adapter.make_inputs(2, seed=2)
    handle = Strategy("fb", Reuse(), FirstBlockCache(0.5), "stack").attach(adapter)
    assert handle.sites[0].members == tuple(adapter.model.blocks[1:])
    calls = []
    hook = adapter.model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    stack = adapter.generate(inputs, handle)
    stats = handle.stats()
    handle.remove()
    assert 0 < len(stats.forecast_steps) and len(calls) == 12  # block 0 ran at every step, skipped or not
    block_handle = Strategy("fb", Reuse(), FirstBlockCache(0.5), "block").attach(adapter)
    block = adapter.generate(inputs, block_handle)
    hook.remove()
    assert block_handle.stats().full_steps == stats.full_steps
    assert relative_l2(stack, block) < 1e-5
    # memory in residuals of one block's size: the stack's one plus the schedule's reference
    # residual of block 0, against one per cached block (2) plus the reference
    assert stats.cache_bytes * 3 == block_handle.stats().cache_bytes * 2


def test_a_probe_inside_the_span_is_refused():
    adapter = tiny_adapter(arch=dict(hidden_size=32, depth=3, num_heads=2, patch_size=2))
    sites = select_sites(adapter.model, SitePatterns([SitePattern(r"blocks\.\d+", residual=True, span=True)]))
    probe = Site("blocks.1", adapter.model.blocks[1], residual=True)
    with pytest.raises(ConfigError, match="probe lies inside the span site stack"):
        attach(sites, Reuse(), FirstBlockCache(0.1), {"first_block_residual": probe})


def test_span_patterns_must_name_every_output_input():
    with pytest.raises(ValueError, match="must name the input of every output"):
        SitePattern(r"blocks\.\d+", residual=(None, "hidden_states"), span=True)


def test_two_stream_diffusers_stack_matches_per_block_residuals(tmp_path):
    adapter = tiny("tiny_flux", tmp_path / "pipe", num_steps=8)
    inputs = adapter.make_inputs(1, seed=0)
    results = {}
    for granularity in ("block", "stack"):
        handle = Strategy("s", TaylorSeer(1, 2), Interval(3, 2), granularity).attach(adapter)
        results[granularity] = adapter.generate(inputs, handle), handle.stats()
        handle.remove()
    (block, block_stats), (stack, stack_stats) = results["block"], results["stack"]
    assert stack_stats.full_steps == block_stats.full_steps and stack_stats.forecast_steps
    assert relative_l2(stack, block) < 1e-4
    assert stack_stats.cache_bytes * 4 == block_stats.cache_bytes  # 2 double + 2 single blocks
