"""The controller on the native DiT: exact restore, no leaked state, the paper's residual algebra."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cachelab.core.controller import attach
from cachelab.models.dit import modulate
from cachelab.core.strategy import Strategy
from cachelab.core.schedules import Always, Interval, Mask
from cachelab.core.sites import Site, SitePattern, select_sites
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter


def taylor(adapter, granularity="module", order=2, interval=3, first_enhance=2, schedule=None):
    strategy = Strategy("taylor", TaylorSeer(order, first_enhance), schedule or Interval(interval, first_enhance),
                        granularity)
    return strategy.attach(adapter)


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_remove_restores_the_model_exactly(adapter, granularity):
    inputs = adapter.make_inputs(3, seed=1)
    before = adapter.generate(inputs)
    modules_before = {name: dict(vars(m)) for name, m in adapter.model.named_modules()}
    handle = taylor(adapter, granularity)
    cached = adapter.generate(inputs, handle)
    assert not torch.equal(cached, before)  # the strategy really changed something
    handle.remove()
    assert torch.equal(adapter.generate(inputs), before)
    assert {name: dict(vars(m)) for name, m in adapter.model.named_modules()} == modules_before


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_all_full_steps_are_bit_identical_to_no_caching(adapter, granularity):
    inputs = adapter.make_inputs(2, seed=2)
    plain = adapter.generate(inputs)
    handle = taylor(adapter, granularity, schedule=Always())
    assert torch.equal(adapter.generate(inputs, handle), plain)
    assert handle.stats().full_steps == list(range(adapter.num_steps))


def test_attached_but_idle_handle_changes_nothing(adapter):
    inputs = adapter.make_inputs(2, seed=3)
    plain = adapter.generate(inputs)
    handle = taylor(adapter)
    adapter.generate(inputs, handle)
    assert torch.equal(adapter.generate(inputs), plain)  # outside a driven generation


def test_two_generations_in_a_row_are_identical(adapter):
    inputs = adapter.make_inputs(2, seed=4)
    handle = taylor(adapter)
    first = adapter.generate(inputs, handle)
    assert torch.equal(adapter.generate(inputs, handle), first)
    fresh = tiny_adapter()
    assert torch.equal(fresh.generate(inputs, taylor(fresh)), first)


def test_batch_size_and_resolution_changes_reset_state(adapter):
    handle = taylor(adapter)
    adapter.generate(adapter.make_inputs(2, seed=5), handle)
    three = adapter.make_inputs(3, seed=6)
    fresh = tiny_adapter()
    expected = fresh.generate(three, taylor(fresh))
    assert torch.equal(adapter.generate(three, handle), expected)
    # a batch-size change inside a generation: the site starts a new history instead of crashing
    model = adapter.model
    with handle.generation(4):
        for s, batch in enumerate([2, 2, 3, 3]):
            handle.step(s)
            model(torch.randn(batch, 1, 8, 8), torch.full((batch,), 500), torch.zeros(batch, dtype=torch.long))
    assert handle.stats().fallbacks > 0
    # a resolution change: a DiT built for 16x16 inputs through the same controller code
    big = tiny_adapter(input_size=16)
    big_handle = taylor(big)
    big.generate(big.make_inputs(1, seed=7), big_handle)
    assert big_handle.stats().cache_bytes > handle.stats().cache_bytes


@pytest.mark.parametrize("back", [0, 1])
def test_a_step_going_back_is_an_error_naming_it_and_begin_starts_a_new_generation(adapter, back):
    model, handle = adapter.model, taylor(adapter, interval=2, first_enhance=1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 500), torch.zeros(2, dtype=torch.long)
    with handle.generation(4):
        handle.step(0)
        model(x, t, y)
        handle.step(1)
        model(x, t, y)
        with pytest.raises(RuntimeError, match=f"step {back} after step 1: .*begin"):
            handle.step(back)
        assert handle.stats().full_steps == [0] and handle.stats().forecast_steps == [1]  # nothing was reset
        handle.begin(4)  # the caller says so: a new generation
        handle.step(0)
        assert handle.stats().full_steps == [0] and handle.stats().forecast_steps == []


def test_stats_and_cache_bytes(adapter):
    handle = taylor(adapter, order=2, interval=3, first_enhance=2)
    adapter.generate(adapter.make_inputs(2, seed=8), handle)
    stats = handle.stats()
    assert stats.full_steps == Interval(3, 2).full_steps(adapter.num_steps)
    assert stats.forecast_steps == [s for s in range(adapter.num_steps) if s not in stats.full_steps]
    # 2 blocks x (attn, mlp) x 3 factors x (batch 2 x CFG 2, 16 tokens, width 32) fp32
    assert stats.cache_bytes == 2 * 2 * 3 * (4 * 16 * 32) * 4
    assert stats.fallbacks == 0


def test_module_forecast_step_is_the_paper_residual_algebra(adapter):
    """On a forecast step the block output is x + gate_msa * F_attn then + gate_mlp * F_mlp,
    with the current step's gates; checked with a hand-written forward."""
    model = adapter.model
    predictor = TaylorSeer(order=1, first_enhance=1)
    sites = select_sites(model, adapter.site_patterns("module"))
    handle = attach(sites, predictor, Interval(2, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    y = torch.tensor([3, 7])
    with handle.generation(10):
        for s, t in [(0, 900), (1, 800), (2, 700)]:  # full, forecast, full
            handle.step(s)
            model(x + 0.1 * s, torch.full((2,), t), y)
        handle.step(3)  # forecast, k = 1 after the full step at 2
        t = torch.full((2,), 600)
        out = model(x, t, y)
        factors = {name: list(cache.states[0].factors) for name, cache in handle._caches["default"].items()}
    assert set(factors) == {f"blocks.{i}.{kind}" for i in range(2) for kind in ("attn", "mlp")}
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for i, block in enumerate(model.blocks):
        _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        f_attn = factors[f"blocks.{i}.attn"][0] + 1 * factors[f"blocks.{i}.attn"][1]
        f_mlp = factors[f"blocks.{i}.mlp"][0] + 1 * factors[f"blocks.{i}.mlp"][1]
        h = h + gate_msa.unsqueeze(1) * f_attn
        h = h + gate_mlp.unsqueeze(1) * f_mlp
    expected = model.unpatchify(model.final_layer(h, c))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # and the cached values are the pre-gate branch outputs of the last full step
    with torch.no_grad():
        xs = model.x_embedder(x + 0.2) + model.pos_embed
        c2 = model.t_embedder(torch.full((2,), 700)) + model.y_embedder(y, False)
        shift, scale = model.blocks[0].adaLN_modulation(c2).chunk(6, dim=1)[:2]
        attn = model.blocks[0].attn(modulate(model.blocks[0].norm1(xs), shift, scale))
    torch.testing.assert_close(factors["blocks.0.attn"][0], attn)


def test_block_and_output_sites_forecast_residual_and_output(adapter):
    model = adapter.model
    handle = taylor(adapter, "block", order=0, interval=2, first_enhance=1)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    t = torch.full((2,), 500)
    with handle.generation(2):
        handle.step(0)
        model(x, t, y)
        residuals = [c.states[0].factors[0] for c in handle._caches["default"].values()]
        handle.step(1)
        h_in = model.x_embedder(x * 2) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        out = model(x * 2, t, y)
    for r in residuals:
        h_in = h_in + r
    torch.testing.assert_close(out, model.unpatchify(model.final_layer(h_in, c)))
    handle.remove()
    out_handle = taylor(adapter, "output", order=0, interval=2, first_enhance=1)
    with out_handle.generation(2):
        out_handle.step(0)
        first = model(x, t, y)
        out_handle.step(1)
        assert torch.equal(model(x * 3, t, y), first)


def test_contexts_keep_separate_caches():
    """Separate CFG calls (cond / uncond) must not share a history."""
    layer = nn.Linear(4, 4)
    handle = attach([Site("layer", layer)], Reuse(), Interval(3, 1))
    cond, uncond = torch.ones(1, 4), -torch.ones(1, 4)
    with torch.no_grad(), handle.generation(3):
        handle.step(0)
        with handle.context("cond"):
            full_cond = layer(cond)
        with handle.context("uncond"):
            full_uncond = layer(uncond)
        handle.step(1)
        with handle.context("cond"):
            assert torch.equal(layer(torch.zeros(1, 4)), full_cond)
        with handle.context("uncond"):
            assert torch.equal(layer(torch.zeros(1, 4)), full_uncond)
    assert not torch.equal(full_cond, full_uncond)


def test_site_patterns():
    adapter = tiny_adapter()
    names = [s.name for s in select_sites(adapter.model, adapter.site_patterns("module"))]
    assert names == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert [s.name for s in select_sites(adapter.model, adapter.site_patterns("output"))] == ["output"]
    with pytest.raises(ValueError, match="no module"):
        select_sites(adapter.model, [SitePattern("nothing")])


def test_output_forecasts_do_not_alias_across_steps(adapter):
    """A sampler may keep earlier model outputs (multistep solvers): a later forecast must
    not change an output already returned."""
    model = adapter.model
    handle = taylor(adapter, "output", order=1, interval=10, first_enhance=2)
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 500), torch.tensor([1, 2])
    with handle.generation(10):
        outputs = []
        for s in range(4):  # full, full, forecast, forecast
            handle.step(s)
            outputs.append(model(x + s, t, y))
        kept = outputs[2].clone()
        handle.step(4)
        model(x, t, y)
    assert torch.equal(outputs[2], kept)
    assert not torch.equal(outputs[2], outputs[3])



@pytest.mark.parametrize("predictor", [Reuse(), TaylorSeer(1, first_enhance=1)])
def test_residual_forecasts_never_change_the_cache_or_an_earlier_output(predictor):
    """The residual base is added into a forecast's own memory, never into a cached factor
    (reuse returns the cached residual itself) nor into an output already returned."""
    layer = nn.Linear(4, 4)
    handle = attach([Site("layer", layer, residual=True)], predictor, Mask(full_steps=[0, 1]))
    x = torch.randn(3, 4)
    with torch.no_grad(), handle.generation(10):
        handle.step(0)
        r0 = layer(x) - x
        handle.step(1)
        r1 = layer(x + 1) - (x + 1)
        held = [f.clone() for f in handle._caches["default"]["layer"].states[0].factors]
        outputs = []
        for s in (2, 3, 4):
            handle.step(s)
            outputs.append(layer(x))
        kept = [o.clone() for o in outputs]
        handle.step(5)
        layer(x)
        factors = handle._caches["default"]["layer"].states[0].factors
    assert handle.stats().full_steps == [0, 1]
    assert all(torch.equal(f, h) for f, h in zip(factors, held, strict=True))
    assert all(torch.equal(o, k) for o, k in zip(outputs, kept))
    slope = (r1 - r0) * predictor.order  # reuse: order 0
    for k, out in enumerate(outputs, start=1):
        torch.testing.assert_close(out, x + r1 + k * slope)
