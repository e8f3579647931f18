"""TaylorSeer and reuse against the official test vectors and independent references."""
from __future__ import annotations

import math
import random

import pytest
import torch

from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer


def scalar(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float64)


def feed(predictor, steps_values):
    state = predictor.new_state()
    for s, v in steps_values:
        predictor.update(state, s, scalar(v) if isinstance(v, float | int) else v)
    return state


def test_official_vector_squares():
    p = TaylorSeer(order=2, first_enhance=2)
    state = feed(p, [(s, s * s) for s in (0, 4, 8)])
    assert [f.item() for f in state.factors] == [64, 12, 2]
    assert [p.predict(state, s).item() for s in (9, 10, 11)] == [77, 92, 109]


def test_official_vector_dit_warmup():
    p = TaylorSeer(order=2, first_enhance=2)
    state = feed(p, [(0, 2401), (1, 2304), (5, 1936)])
    assert [f.item() for f in state.factors] == [1936, -92, 1.25]
    assert [p.predict(state, s).item() for s in (6, 7, 8)] == [1844.625, 1754.5, 1665.625]


def official_reference(order, first_enhance, full_steps, values, descending):
    """The official ``derivative_approximation`` / ``taylor_formula`` on python floats, with
    the DiT (counting down) or FLUX (counting up) step convention."""
    T = full_steps[-1] + 10
    to_code_step = (lambda s: T - 1 - s) if descending else (lambda s: s)
    factors, activated = {}, []
    for s, value in zip(full_steps, values):
        step = to_code_step(s)
        activated.append(step)
        allowed = (step < T - first_enhance + 1) if descending else (step > first_enhance - 2)
        new = {0: value}
        for i in range(order):
            if i in factors and allowed and len(activated) > 1:
                new[i + 1] = (new[i] - factors[i]) / (activated[-1] - activated[-2])
            else:
                break
        factors = new

    def forecast(s):
        x = to_code_step(s) - activated[-1]
        return sum(factors[i] * x**i / math.factorial(i) for i in factors)

    return factors, forecast


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_matches_official_code_on_random_histories(order, descending):
    rng = random.Random(order * 10 + descending)
    for _ in range(20):
        steps = sorted(rng.sample(range(1, 40), rng.randint(1, 6)))
        steps = [0] + steps
        values = [rng.uniform(-5, 5) for _ in steps]
        fe = rng.randint(1, 4)  # DiT's `step < T - fe + 1` counting down is `s > fe - 2` counting up
        ref_factors, ref_forecast = official_reference(order, fe, steps, values, descending)
        p = TaylorSeer(order=order, first_enhance=fe)
        state = feed(p, list(zip(steps, values)))
        ours = [f.item() for f in state.factors]
        sign = -1 if descending else 1  # counting down, factor i carries (-1)^i
        assert ours == pytest.approx([ref_factors[i] * sign**i for i in sorted(ref_factors)], rel=1e-12, abs=1e-12)
        for k in (1, 2, 5):
            assert p.predict(state, steps[-1] + k).item() == pytest.approx(ref_forecast(steps[-1] + k), rel=1e-10,
                                                                        abs=1e-10)


def test_order_one_exact_on_lines_and_order_two_error_closed_form():
    """Taylor weights on backward differences: exact for lines; on s^2 with spacing N the
    order-2 forecast is (s+k)^2 - N k (not exact extrapolation)."""
    rng = random.Random(0)
    for _ in range(50):
        a, b = rng.uniform(-3, 3), rng.uniform(-3, 3)
        n, s0, k = rng.randint(1, 7), rng.randint(0, 10), rng.randint(1, 9)
        steps = [s0, s0 + n, s0 + 2 * n]
        line = TaylorSeer(order=1)
        assert line.predict(feed(line, [(s, a * s + b) for s in steps]), steps[-1] + k).item() == pytest.approx(
            a * (steps[-1] + k) + b, rel=1e-12)
        quad = TaylorSeer(order=2)
        s = steps[-1]
        assert quad.predict(feed(quad, [(t, t * t) for t in steps]), s + k).item() == pytest.approx(
            (s + k) ** 2 - n * k, rel=1e-12)


def test_order_grows_by_one_per_full_step_and_truncates():
    p = TaylorSeer(order=3)
    state = p.new_state()
    for j, s in enumerate([0, 2, 4, 6, 8], start=1):
        p.update(state, s, scalar(float(s) ** 3))
        assert len(state.factors) == min(j, 4)
    short = feed(TaylorSeer(order=3), [(0, 1.0), (2, 5.0)])
    linear = feed(TaylorSeer(order=1), [(0, 1.0), (2, 5.0)])
    assert TaylorSeer(order=3).predict(short, 5).item() == TaylorSeer(order=1).predict(linear, 5).item() == 11.0


def test_no_derivatives_before_first_enhance_minus_one():
    """FLUX setting first_enhance=3: the full step at s=1 stores order 0 only."""
    p = TaylorSeer(order=2, first_enhance=3)
    state = p.new_state()
    lengths = []
    for s in (0, 1, 2, 8):
        p.update(state, s, scalar(float(s)))
        lengths.append(len(state.factors))
    assert lengths == [1, 1, 2, 3]


def test_order_zero_is_reuse():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for predictor in (TaylorSeer(order=0), Reuse()):
        state = feed(predictor, [(0, torch.randn_like(x)), (3, x)])
        assert torch.equal(predictor.predict(state, 7), x)


def test_horner_equals_direct_sum():
    g = torch.Generator().manual_seed(0)
    for order in range(6):
        p = TaylorSeer(order=order)
        state = p.new_state()
        state.factors = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(order + 1)]
        state.last_step, state.out_dtype = 10, torch.float64
        for k in (1, 2, 3, 7):
            direct = sum(d * k**i / math.factorial(i) for i, d in enumerate(state.factors))
            torch.testing.assert_close(p.predict(state, 10 + k), direct, rtol=1e-12, atol=1e-12)


def test_gaps_must_be_positive():
    p = TaylorSeer(order=2)
    state = feed(p, [(0, 1.0), (3, 2.0)])
    with pytest.raises(ValueError, match="not after"):
        p.update(state, 3, scalar(1.0))
    with pytest.raises(ValueError, match="not after"):
        p.update(state, 1, scalar(1.0))
    with pytest.raises(ValueError, match="not after"):
        p.predict(state, 3)
    with pytest.raises(ValueError, match="no history"):
        p.predict(p.new_state(), 1)
    with pytest.raises(ValueError, match="order"):
        TaylorSeer(order=-1)


@pytest.mark.parametrize("factor_dtype, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                 ("fp64", torch.float64)])
def test_factor_dtype_is_storage_only(factor_dtype, dtype):
    p = TaylorSeer(order=1, factor_dtype=factor_dtype)
    values = [torch.full((4,), float(v)) for v in (1, 3)]
    state = feed(p, [(0, values[0]), (2, values[1])])
    assert all(f.dtype == dtype for f in state.factors)
    out = p.predict(state, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((4,), 4.0))
    with pytest.raises(ValueError, match="factor_dtype"):
        TaylorSeer(order=1, factor_dtype="int8")


def test_state_bytes():
    p = TaylorSeer(order=2)
    state = feed(p, [(s, torch.zeros(10, 3)) for s in (0, 1, 2)])
    assert state.nbytes == 3 * 10 * 3 * 4


@pytest.mark.parametrize("difference", ["official", "newton"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_updates_reuse_the_dropped_factors_memory_and_never_write_the_callers_value(order, difference):
    """Once the order is reached an update allocates nothing (the new derivatives live in the
    old derivatives' memory), the values handed in are never modified, and the factors equal
    the ones from fresh tensors (a copy of the state's history replayed into a new state)."""
    p = TaylorSeer(order, first_enhance=1, difference=difference)
    state, values, kept = p.new_state(), [], []
    for s in (0, 3, 5, 9, 12, 14, 18):
        value = torch.randn(4, 3, dtype=torch.float64)
        values.append(value)
        kept.append(value.clone())
        before = {f.data_ptr() for f in state.factors[1:]}
        p.update(state, s, value)
        after = {f.data_ptr() for f in state.factors[1:]}
        if len(before) == order:  # the order was reached before this update
            assert after == before
        assert state.factors[0] is value
    assert all(torch.equal(v, k) for v, k in zip(values, kept))
    replay = p.new_state()
    for s, value in zip((0, 3, 5, 9, 12, 14, 18), kept):
        p.update(replay, s, value.clone())
    for got, want in zip(state.factors, replay.factors, strict=True):
        assert torch.equal(got, want)
