"""Per-site Taylor order (``predictor.site_orders``) and per-site granularity
(``strategy.whole_blocks``) on the tiny DiT, against a hand-written loop: the DiT's forward
written out, each site's value computed or forecast by the closed form of the official factors
on a uniform grid (``D_i = Delta^i v / N^i`` over the last ``i + 1`` full values, in float64)."""
from __future__ import annotations

import math

import pytest
import torch

from cachelab.core.controller import attach
from cachelab.core.schedules import Interval
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter

T, N = 10, 3  # full steps 0, 3, 6, 9 (first_enhance 1)


def step_inputs(model, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each step's model inputs: latents drifting smoothly, a falling timestep, fixed labels."""
    g = torch.Generator().manual_seed(seed)
    x0, dx = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    y = torch.tensor([3, 7])
    return [(x0 + 0.1 * s * dx, torch.full((2,), 900.0 - 80 * s), y) for s in range(T)]


def closed_form(history: list[torch.Tensor], k: int, order: int) -> torch.Tensor:
    """The official order-``order`` forecast ``k`` steps after the newest of ``history`` (newest
    first, spaced ``N``), the order capped by the values there are."""
    m = min(order, len(history) - 1)
    total = torch.zeros_like(history[0], dtype=torch.float64)
    for i in range(m + 1):
        delta = sum((-1) ** j * math.comb(i, j) * history[j].double() for j in range(i + 1))
        total += delta / N**i * k**i / math.factorial(i)
    return total.float()


def hand_loop(model, steps, whole: set[int], orders: dict[str, int]) -> list[torch.Tensor]:
    """The DiT's forward per step with the sites of ``whole`` blocks cached as whole blocks
    (residuals) and the others as their attention and MLP branches, at their ``orders``."""
    history: dict[str, list[torch.Tensor]] = {}
    outputs = []
    for s, (x, t, y) in enumerate(steps):
        full, k = s % N == 0, s % N

        def site(name, compute):
            if full:
                value = compute()
                history[name] = [value, *history.get(name, [])][: orders[name] + 1]
                return value
            return closed_form(history[name], k, orders[name])

        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for b, block in enumerate(model.blocks):
            if b in whole:
                h = h + site(f"blocks.{b}", lambda: block(h, c) - h)
                continue
            shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
            h = h + gate1.unsqueeze(1) * site(f"blocks.{b}.attn", lambda: block.attn_branch(h, shift1, scale1))
            h = h + gate2.unsqueeze(1) * site(f"blocks.{b}.mlp", lambda: block.mlp_branch(h, shift2, scale2))
        outputs.append(model.unpatchify(model.final_layer(h, c)))
    return outputs


def cached_run(adapter, steps, strategy: Strategy) -> tuple[list[torch.Tensor], list[str]]:
    handle = strategy.attach(adapter)
    try:
        with torch.no_grad(), handle.generation(T):
            outputs = []
            for s, (x, t, y) in enumerate(steps):
                handle.step(s)
                outputs.append(adapter.model(x, t, y))
        return outputs, [site.name for site in handle.sites]
    finally:
        handle.remove()


def taylor(order: int, **keys) -> TaylorSeer:
    return TaylorSeer(order=order, first_enhance=1, **keys)


@pytest.mark.parametrize("whole, site_orders, orders", [
    ((), {3: [r"blocks\.0\..*"], 0: [r"blocks\.1\.mlp"]},
     {"blocks.0.attn": 3, "blocks.0.mlp": 3, "blocks.1.attn": 2, "blocks.1.mlp": 0}),
    ((r"blocks\.1",), {}, {"blocks.0.attn": 2, "blocks.0.mlp": 2, "blocks.1": 2}),
    ((r"blocks\.0",), {1: [r"blocks\.0"], 3: [r"blocks\.1\.attn"]}, {"blocks.0": 1, "blocks.1.attn": 3, "blocks.1.mlp": 2}),
])
def test_mixed_orders_and_granularity_forecast_as_the_hand_written_loop(whole, site_orders, orders):
    adapter = tiny_adapter()
    steps = step_inputs(adapter.model)
    strategy = Strategy("mixed", taylor(2, site_orders=site_orders), Interval(N, 1), "module", guard="off",
                        whole_blocks=whole)
    cached, names = cached_run(adapter, steps, strategy)
    assert names == list(orders)
    with torch.no_grad():
        expected = hand_loop(adapter.model, steps, {int(p[-1]) for p in whole}, orders)
    for s, (got, want) in enumerate(zip(cached, expected)):
        scale = want.abs().max()
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * scale), f"step {s}"
    # the per-site orders change the forecasts (step 8: forecast two steps after the full step 6)
    with torch.no_grad():
        uniform = hand_loop(adapter.model, steps, {int(p[-1]) for p in whole}, dict.fromkeys(orders, 2))
    if set(orders.values()) != {2}:
        assert not torch.allclose(uniform[-2], expected[-2], rtol=0, atol=1e-4 * expected[-2].abs().max())


def test_all_full_steps_with_whole_blocks_are_the_bare_model_bit_for_bit():
    adapter = tiny_adapter()
    steps = step_inputs(adapter.model, seed=1)
    with torch.no_grad():
        bare = [adapter.model(x, t, y) for x, t, y in steps]
    strategy = Strategy("mixed", taylor(2, site_orders={1: [r"blocks\.1\.mlp"]}), Interval(1, 1), "module",
                        whole_blocks=(r"blocks\.0",))
    cached, names = cached_run(adapter, steps, strategy)
    assert names == ["blocks.0", "blocks.1.attn", "blocks.1.mlp"]
    assert all(torch.equal(a, b) for a, b in zip(cached, bare))


def test_per_site_orders_set_each_state_and_orders_reached():
    predictor = taylor(2, site_orders={0: [r"blocks\.0\..*"], 4: [r"blocks\.1\..*", "x"]})
    assert [predictor.new_state_for(n).order for n in ("blocks.0.attn", "blocks.1.mlp", "output")] == [0, 4, 2]
    handle = attach(None, predictor, Interval(1, 1))
    state = predictor.new_state_for("blocks.0.attn")
    for s in range(4):
        predictor.update(state, s, torch.full((3,), float(s * s)))
    assert state.order_reached == 0  # capped at the site's order, not the predictor's
    assert handle.stats().cache_bytes == 0


def test_bad_site_choices_are_refused_in_one_line():
    adapter = tiny_adapter()
    with pytest.raises(ValueError, match=r"site_orders: the order 17 is not allowed; allowed: integers 0..16"):
        taylor(2, site_orders={17: ["x"]})
    with pytest.raises(ValueError, match="is not a regex"):
        taylor(2, site_orders={1: ["blocks.("]})
    typo = Strategy("s", taylor(2, site_orders={1: [r"block\.0\..*"]}), Interval(2, 1), "module")
    with pytest.raises(ConfigError, match=r"match no cache site; allowed: .*blocks\.0\.attn"):
        typo.attach(adapter)
    twice = Strategy("s", taylor(2, site_orders={1: [r"blocks\.0\..*"], 0: [r".*\.mlp"]}), Interval(2, 1), "module")
    with pytest.raises(ConfigError, match=r"site blocks\.0\.mlp is matched under orders \[0, 1\]"):
        twice.attach(adapter)
    with pytest.raises(ConfigError, match=r"match\(es\) no block; allowed: .*blocks\.0, blocks\.1"):
        Strategy("s", taylor(2), Interval(2, 1), "module", whole_blocks=(r"blocks\.7",)).attach(adapter)
    with pytest.raises(ConfigError, match="allowed: module, block"):
        Strategy("s", taylor(2), Interval(2, 1), "output", whole_blocks=(r"blocks\.0",))
    from cachelab.core.adaptive import FirstBlockCache  # reads the first block's residual (a probe in blocks.0)

    reading = Strategy("s", taylor(1), FirstBlockCache(0.1), "module", whole_blocks=(r"blocks\.0",))
    with pytest.raises(ConfigError, match="would hold the probe"):
        reading.attach(adapter)
    assert "forward" not in vars(adapter.model.blocks[0])  # nothing was hooked
