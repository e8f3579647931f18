"""Each site kind alone, driven by a hand-written run (no handle, no hook registry): a plain
site, a skip site, a span, a probe, and token refresh decorating a plain site, each against
values computed by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cachelab.core.controller import attach
from cachelab.core.schedules import Interval
from cachelab.core.site_kinds import Plain, Probe, Skip, Span, site_kind
from cachelab.core.sites import Site
from cachelab.core.token_sites import Refreshing, TokenSelection
from cachelab.core.tokens import TokenPolicy
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


class Run:
    """A SiteRun by hand: one context, the decision set by the test, states in a dict."""

    def __init__(self, predictor, T: int = 10):
        self.s, self.T, self.context_name, self.predictor = None, T, "default", predictor
        self.observers, self.audit = [], False
        self.forecast, self.step_decision = False, None
        self.states, self.fallbacks, self.changed_states, self.signals = {}, 0, [], {}

    def at(self, s: int, forecast: bool = False) -> None:
        self.s, self.forecast = s, forecast

    def forecasts(self, site):
        return self.forecast

    def state(self, kind, shape=None):
        state = self.states.get(kind.name)
        if shape is not None and (state is None or state.shape != shape):
            state = self.states[kind.name] = kind.new_state(shape)
        return state

    def new_state(self, site):
        return self.predictor.new_state_for(site)

    def finite(self, site, forecast):
        return all(bool(torch.isfinite(f).all()) for f in forecast if f is not None)

    def fell_back(self):
        self.fallbacks += 1

    def changed(self, name, state):
        self.changed_states.append(state)

    def signal(self, name, value):
        self.signals[name] = value


class Counted(nn.Module):
    """A module counting its calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def linear(seed: int = 0) -> Counted:
    torch.manual_seed(seed)
    return Counted(nn.Linear(4, 4)).double()


def wrapped(kind):
    """The callables of ``kind`` as its hooks would install them, over each owner's own forward."""
    return [wrap(site.owner.forward) for site, wrap in kind.hooks()]


def test_a_plain_site_passes_through_outside_a_step_records_on_full_steps_and_forecasts():
    module, v = linear(), torch.randn(2, 4, dtype=torch.float64)
    run = Run(TaylorSeer(1, first_enhance=1))
    (call,) = wrapped(Plain(Site("lin", module), run))
    assert torch.equal(call(v), module.inner(v)) and run.states == {}  # outside a step
    for s in (0, 1):
        run.at(s)
        out = call(s * v)
        assert torch.equal(out, module.inner(s * v))
    state = run.states["lin"]
    assert state.states[0].factors[0] is not out  # a copy: the caller may change its output in place
    assert run.changed_states == [state, state] and state.nbytes == 2 * out.numel() * out.element_size()  # D0, D1
    calls = module.calls
    run.at(3, forecast=True)
    forecast = call(torch.zeros_like(v))  # the input does not matter
    # a linear map of a linear trajectory: order 1 extrapolates it exactly
    torch.testing.assert_close(forecast, module.inner(3 * v))
    assert module.calls == calls and run.fallbacks == 0


def test_a_plain_residual_site_forecasts_its_residual_plus_the_current_input():
    module, x0, x3 = linear(1), torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    run = Run(Reuse())
    (call,) = wrapped(Plain(Site("lin", module, residual=True), run))
    run.at(0)
    call(x0)
    torch.testing.assert_close(run.states["lin"].states[0].factors[0], module.inner(x0) - x0)
    run.at(3, forecast=True)
    torch.testing.assert_close(call(x3), x3 + module.inner(x0) - x0)


def test_a_plain_site_without_history_or_with_a_non_finite_forecast_computes():
    module, x = linear(2), torch.randn(2, 4, dtype=torch.float64)
    run = Run(Reuse())
    (call,) = wrapped(Plain(Site("lin", module), run))
    run.at(0, forecast=True)
    assert torch.equal(call(x), module.inner(x)) and run.fallbacks == 1
    poisoned = x.clone()
    poisoned[0, 0] = float("nan")
    run.at(1)
    call(poisoned)  # a full step records what the model computed, NaN too
    kept = run.states["lin"].states[0].factors[0].clone()
    run.at(2, forecast=True)
    assert torch.equal(call(x), module.inner(x))  # the guard: computed for real
    assert torch.allclose(run.states["lin"].states[0].factors[0], kept, equal_nan=True)  # not recorded


def test_a_skip_site_gives_zeros_plus_its_residual_base_and_holds_no_history():
    module, x0, x1 = linear(3), torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    for residual, expected in ((False, torch.zeros(2, 4, dtype=torch.float64)), (True, x1)):
        run = Run(TaylorSeer(2))
        kind = site_kind(Site("block.attn", module, residual=residual, skip="proj_out"), run)
        assert isinstance(kind, Skip)
        (call,) = wrapped(kind)
        run.at(0)
        assert torch.equal(call(x0), module.inner(x0))
        assert run.states["block.attn"].states == () and run.changed_states == []
        calls = module.calls
        run.at(1, forecast=True)
        assert torch.equal(call(x1), expected)  # its input passed through
        assert module.calls == calls


def test_a_span_records_from_its_entry_to_its_exit_and_passes_through_on_forecast_steps():
    torch.manual_seed(4)
    first, last = Counted(nn.Linear(4, 4)).double(), Counted(nn.Linear(4, 4)).double()
    run = Run(Reuse())
    kind = site_kind(Site("stack", first, residual=True, members=(first, last)), run)
    assert isinstance(kind, Span)
    enter, leave = wrapped(kind)
    x0, x1 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    run.at(0)
    out = leave(enter(x0))
    torch.testing.assert_close(out, last.inner(first.inner(x0)))
    state = run.states["stack"]
    torch.testing.assert_close(state.states[0].factors[0], out - x0)  # exit minus entry
    assert state.entry is None  # the entry is not kept past the call
    calls = first.calls, last.calls
    run.at(1, forecast=True)
    inside = enter(x1)
    assert torch.equal(inside, x1)  # the first member passes its input through
    torch.testing.assert_close(leave(inside), x1 + out - x0)  # the last adds the forecast
    assert (first.calls, last.calls) == calls


def test_a_span_whose_forecast_is_not_finite_computes_whole_and_records_nothing():
    torch.manual_seed(5)
    first, last = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    run = Run(Reuse())
    enter, leave = wrapped(Span(Site("stack", first, residual=True, members=(first, last)), run))
    bad = torch.full((2, 4), float("inf"), dtype=torch.float64)
    run.at(0)
    leave(enter(bad))
    kept = run.states["stack"].states[0].factors[0].clone()
    x = torch.randn(2, 4, dtype=torch.float64)
    run.at(1, forecast=True)
    assert torch.equal(leave(enter(x)), last(first(x)))
    assert torch.allclose(run.states["stack"].states[0].factors[0], kept, equal_nan=True)


def test_a_probe_gives_its_signal_until_the_step_is_decided():
    module, x = linear(6), torch.randn(2, 4, dtype=torch.float64)
    run = Run(Reuse())
    (call,) = wrapped(Probe("first_block_residual", Site("blocks.0", module, residual=True), run))
    run.at(0)
    call(x)
    torch.testing.assert_close(run.signals["first_block_residual"], module.inner(x) - x)
    run.signals.clear()
    run.step_decision = "decided"
    call(x)
    assert run.signals == {}


class FixedTokens(TokenPolicy):
    """Selects the same tokens at every forecast step."""

    def __init__(self, index):
        self.index = index

    def select(self, view):
        return self.index.expand(view.tokens.shape[0], -1)


def test_token_refresh_decorates_a_plain_site_computing_the_selected_tokens():
    torch.manual_seed(7)
    mlp = Counted(nn.Linear(3, 3)).double()
    site = Site("blocks.0.mlp", mlp, tokens="tokenwise")
    selection = TokenSelection(FixedTokens(torch.tensor([[0, 2]])))
    selection.place([site])
    run = Run(Reuse())
    kind = site_kind(site, run, selection)
    assert isinstance(kind, Refreshing) and isinstance(kind.inner, Plain)
    (call,) = wrapped(kind)
    x0, x1 = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    run.at(0)
    call(x0)
    tokens = run.states["blocks.0.mlp"].tokens
    assert torch.equal(tokens.age, torch.zeros(2, 5, dtype=torch.int32))
    run.at(1, forecast=True)
    out = call(x1)
    expected = mlp.inner(x0).clone()
    expected[:, [0, 2]] = mlp.inner(x1)[:, [0, 2]]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(run.states["blocks.0.mlp"].states[0].factors[0], expected)  # reuse's refresh
    assert tokens.age.tolist() == [[0, 1, 0, 1, 1]] * 2


def test_the_bytes_held_follow_the_states_as_they_change():
    """The handle keeps the held bytes as the kinds change their states (never summed again at a
    step): at every step they equal the states' sizes summed anew, through shape changes."""
    layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    handle = attach([Site(f"{i}", layer) for i, layer in enumerate(layers)], TaylorSeer(2), Interval(2))
    with torch.no_grad(), handle.generation(8):
        for s in range(8):
            handle.step(s)
            for context in ("cond", "uncond"):
                with handle.context(context):
                    layers(torch.randn(1 + (s > 4) + (context == "cond" and s > 5), 4))
            held = {context: sum(state.nbytes for state in states.values())
                    for context, states in handle.caches.items()}
            assert handle.stats().context_bytes == held
        orders = [held.order_reached for states in handle.caches.values() for state in states.values()
                  for held in state.states]
    assert handle.stats().order_reached == {"min": min(orders), "max": max(orders)} and max(orders) >= 1
    handle.remove()
