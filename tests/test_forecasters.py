"""The forecasting predictors (Newton/damped Taylor, HiCache, Adams–Bashforth, least squares,
exponential) on the function classes they claim, against references computed another way
(float64 closed forms, numpy.polyfit / hermval / polyint, hand-written loops), on random
non-uniform step grids counting up."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from numpy.polynomial import hermite

from cachelab.strategies.adams_bashforth import AdamsBashforth
from cachelab.strategies.exponential import Exponential
from cachelab.strategies.hermite import HiCache
from cachelab.strategies.least_squares import LeastSquares
from cachelab.strategies.taylor import TaylorSeer


def scalar(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float64)


def feed(predictor, steps, values):
    state = predictor.new_state()
    for s, v in zip(steps, values):
        predictor.update(state, s, v if isinstance(v, torch.Tensor) else scalar(v))
    return state


def forecast(predictor, steps, values, s) -> float:
    return predictor.predict(feed(predictor, steps, values), s).item()


def grid(rng: random.Random, n: int, span: int = 40) -> list[int]:
    """``n`` distinct steps counting up, not uniformly spaced when ``n >= 3``."""
    while True:
        steps = sorted(rng.sample(range(span), n))
        if n < 3 or len({b - a for a, b in zip(steps, steps[1:])}) > 1:
            return steps


# ---------------------------------------------------------------- TaylorSeer: newton, damping

def test_newton_design_vector():
    for fe in (1, 2):
        official = TaylorSeer(order=2, first_enhance=fe)
        newton = TaylorSeer(order=2, first_enhance=fe, difference="newton")
        steps, values = [0, 4, 8], [0.0, 16.0, 64.0]
        assert [forecast(newton, steps, values, s) for s in (9, 10, 11)] == [81, 100, 121]
        assert [forecast(official, steps, values, s) for s in (9, 10, 11)] == [77, 92, 109]


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_newton_exact_on_polynomials(order):
    rng = random.Random(order)
    p = TaylorSeer(order=order, difference="newton")
    for _ in range(30):
        coeffs = [rng.uniform(-2, 2) for _ in range(order + 1)]  # degree <= order
        steps = grid(rng, order + 1 + rng.randint(0, 3))
        state = feed(p, steps, [float(np.polyval(coeffs, s)) for s in steps])
        for k in (1, 2, 5):
            s = steps[-1] + k
            assert p.predict(state, s).item() == pytest.approx(np.polyval(coeffs, s), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_newton_is_the_interpolating_polynomial_of_the_last_points(order):
    """Random data: equals numpy.polyfit of degree n-1 through the last n = min(order+1, history)
    points, so a short history truncates to a lower degree."""
    rng = random.Random(10 + order)
    p = TaylorSeer(order=order, difference="newton")
    for n in range(1, order + 4):
        steps = grid(rng, n)
        values = [rng.uniform(-5, 5) for _ in steps]
        last = min(order + 1, n)
        coeffs = np.polyfit(steps[-last:], values[-last:], last - 1)
        s = steps[-1] + rng.randint(1, 6)
        assert forecast(p, steps, values, s) == pytest.approx(np.polyval(coeffs, s), rel=1e-8, abs=1e-8)


def test_newton_factors_are_the_official_factors_on_a_uniform_grid():
    """``D_i = i! f[s_0..s_i]``: derivative estimates, equal to the official ones when the
    spacing is uniform, different (and forecasting differently) when it is not."""
    rng = random.Random(9)
    for _ in range(20):
        order, h, s0 = rng.randint(1, 4), rng.randint(1, 6), rng.randint(0, 9)
        steps = [s0 + h * j for j in range(order + 2)]
        values = [rng.uniform(-5, 5) for _ in steps]
        newton = feed(TaylorSeer(order=order, difference="newton"), steps, values).factors
        official = feed(TaylorSeer(order=order), steps, values).factors
        assert [f.item() for f in newton] == pytest.approx([f.item() for f in official], rel=1e-9, abs=1e-9)
    newton = feed(TaylorSeer(order=2, difference="newton"), [0, 1, 5], [2401.0, 2304.0, 1936.0]).factors
    assert [f.item() for f in newton] == pytest.approx([1936, -92, 2 * (-92 + 97) / 5])  # official: 1.25


def test_newton_restarts_where_derivatives_are_not_allowed():
    """first_enhance=3: the full step at s=1 keeps no history (as the official rule), so the
    forecast after {0, 1, 2, 8} is the quadratic through s = 1, 2, 8 only."""
    p = TaylorSeer(order=3, first_enhance=3, difference="newton")
    state = p.new_state()
    lengths = []
    values = {0: 5.0, 1: -1.0, 2: 3.0, 8: 2.0}
    for s, v in values.items():
        p.update(state, s, scalar(v))
        lengths.append(len(state.factors))
    assert lengths == [1, 1, 2, 3] and state.steps == [8, 2, 1]
    coeffs = np.polyfit([1, 2, 8], [-1.0, 3.0, 2.0], 2)
    assert p.predict(state, 11).item() == pytest.approx(np.polyval(coeffs, 11), rel=1e-12)


def test_damping_scales_terms_above_order_one():
    rng = random.Random(3)
    for difference in ("official", "newton"):
        for _ in range(20):
            order, damping = rng.randint(1, 4), rng.uniform(0, 1)
            steps = grid(rng, order + 2)
            values = [rng.uniform(-5, 5) for _ in steps]
            plain = TaylorSeer(order=order, difference=difference)
            damped = TaylorSeer(order=order, difference=difference, damping=damping)
            state = feed(plain, steps, values)
            d = [f.item() for f in state.factors]
            s = steps[-1] + rng.randint(1, 6)
            if difference == "official":
                basis = [(s - steps[-1]) ** i / math.factorial(i) for i in range(len(d))]
            else:  # Newton basis prod_{j<i} (s - s_j), newest step first
                basis = [math.prod(s - t for t in steps[::-1][:i]) / math.factorial(i) for i in range(len(d))]
            expected = sum(di * b * damping ** max(i - 1, 0) for i, (di, b) in enumerate(zip(d, basis)))
            assert damped.predict(feed(damped, steps, values), s).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert plain.predict(state, s).item() == pytest.approx(sum(di * b for di, b in zip(d, basis)), rel=1e-9,
                                                                    abs=1e-9)


def test_default_forecast_is_bit_identical_to_the_original_horner():
    """The pre-ablation evaluation ``D0 + k(D1 + k/2(D2 + ...))`` with alphas ``k / i``."""
    g = torch.Generator().manual_seed(0)
    for order in range(1, 5):
        p = TaylorSeer(order=order)
        state = feed(p, [0, 1, 3, 4, 9][: order + 1], [torch.randn(64, generator=g) for _ in range(order + 1)])
        f, top = state.factors, len(state.factors) - 1
        for k in (1, 2, 3):
            acc = torch.add(f[top - 1], f[top], alpha=k / top)
            for i in range(top - 2, -1, -1):
                acc = torch.add(f[i], acc, alpha=k / (i + 1))
            assert torch.equal(p.predict(state, state.last_step + k), acc)


# ---------------------------------------------------------------- HiCache

@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_hicache_against_numpy_hermite(order):
    rng = random.Random(20 + order)
    for _ in range(20):
        sigma = rng.uniform(0.2, 1.2)
        steps = grid(rng, rng.randint(1, order + 2))
        values = [rng.uniform(-5, 5) for _ in steps]
        p = HiCache(order=order, sigma=sigma)
        state = feed(p, steps, values)
        d = [f.item() for f in state.factors]  # TaylorSeer's factors (same update)
        assert d == [f.item() for f in feed(TaylorSeer(order=order), steps, values).factors]
        k = rng.randint(1, 6)
        expected = d[0] + sum(hermite.hermval(sigma * k, [0] * i + [1]) * sigma**i / math.factorial(i) * d[i]
                              for i in range(1, len(d)))
        assert p.predict(state, steps[-1] + k).item() == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_hicache_equals_taylor_at_sigma_one_over_root_two_for_order_one_only():
    rng = random.Random(5)
    sigma = 1 / math.sqrt(2)
    for _ in range(30):
        steps = grid(rng, 4)
        values = [rng.uniform(-5, 5) for _ in steps]
        s = steps[-1] + rng.randint(1, 6)
        taylor1 = forecast(TaylorSeer(order=1), steps, values, s)
        assert forecast(HiCache(order=1, sigma=sigma), steps, values, s) == pytest.approx(taylor1, rel=1e-12, abs=1e-12)
        assert forecast(HiCache(order=1, sigma=0.6), steps, values, s) != pytest.approx(taylor1, rel=1e-6)
        # order 2: H_2(x) = 4x^2 - 2 adds the constant -sigma^2 D_2 = -D_2 / 2
        d2 = feed(TaylorSeer(order=2), steps, values).factors[2].item()
        taylor2 = forecast(TaylorSeer(order=2), steps, values, s)
        assert forecast(HiCache(order=2, sigma=sigma), steps, values, s) == pytest.approx(taylor2 - d2 / 2, rel=1e-10,
                                                                                         abs=1e-10)


def test_hicache_on_lines_exact_at_root_half_and_half_slope_at_one_half():
    """HiCache (strategies/hermite.py): a rising line is reproduced (no sign bug) at sigma =
    1/sqrt(2); at sigma = 0.5 the forecast is reuse + 1/2 slope * k."""
    rng = random.Random(6)
    for _ in range(20):
        a, b = rng.uniform(-3, 3), rng.uniform(0.5, 3)
        steps = grid(rng, 3)
        values = [a + b * s for s in steps]
        k = rng.randint(1, 6)
        s = steps[-1] + k
        assert forecast(HiCache(order=1, sigma=2**-0.5), steps, values, s) == pytest.approx(a + b * s, rel=1e-12)
        assert forecast(HiCache(order=1, sigma=0.5), steps, values, s) == pytest.approx(values[-1] + b * k / 2,
                                                                                       rel=1e-12)


# ---------------------------------------------------------------- Adams–Bashforth

def ab_reference(order, midpoint, steps, values, s):
    """Hand-written: slopes of consecutive values, placed at midpoints or nodes, polynomial
    through them by numpy.polyfit, integrated by numpy.polyint from the last step to s."""
    p = min(order, len(steps) - 1)
    f0 = values[-1]
    if p == 0:
        return f0
    newest = list(zip(steps[::-1], values[::-1]))
    slopes, nodes = [], []
    for (s0, f_0), (s1, f_1) in list(zip(newest, newest[1:]))[:p]:
        slopes.append((f_0 - f_1) / (s0 - s1))
        nodes.append((s0 + s1) / 2 if midpoint else s0)
    antiderivative = np.polyint(np.polyfit(nodes, slopes, p - 1))
    return f0 + np.polyval(antiderivative, s) - np.polyval(antiderivative, steps[-1])


@pytest.mark.parametrize("slope_at", ["midpoint", "node"])
@pytest.mark.parametrize("order", [2, 3])
def test_adams_bashforth_against_hand_written_reference(order, slope_at):
    rng = random.Random(order * 2 + (slope_at == "node"))
    p = AdamsBashforth(order=order, slope_at=slope_at)
    for _ in range(30):
        steps = grid(rng, rng.randint(1, order + 3))
        values = [rng.uniform(-5, 5) for _ in steps]
        s = steps[-1] + rng.randint(1, 6)
        expected = ab_reference(order, slope_at == "midpoint", steps[-(order + 1):], values[-(order + 1):], s)
        assert forecast(p, steps, values, s) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("order", [2, 3])
def test_adams_bashforth_exactness(order):
    """Midpoint slopes are the exact derivative of a quadratic at the interval midpoints, so AB
    is exact on quadratics (but AB3 is not exact on cubics); node slopes only on lines."""
    rng = random.Random(30 + order)
    mid, node = AdamsBashforth(order, "midpoint"), AdamsBashforth(order, "node")
    for _ in range(30):
        steps = grid(rng, order + 1)
        a, b, c = (rng.uniform(-2, 2) for _ in range(3))
        s = steps[-1] + rng.randint(1, 6)
        quad = [a + b * t + c * t * t for t in steps]
        assert forecast(mid, steps, quad, s) == pytest.approx(a + b * s + c * s * s, rel=1e-9)
        assert forecast(node, steps, [a + b * t for t in steps], s) == pytest.approx(a + b * s, rel=1e-9)
    steps = [0, 1, 3, 6]
    assert forecast(AdamsBashforth(3), steps, [float(t**3) for t in steps], 8) != pytest.approx(512, rel=1e-6)
    assert forecast(node, [0, 1, 3], [0.0, 1.0, 9.0], 5) != pytest.approx(25, rel=1e-6)


def test_adams_bashforth_2_is_newton_2_with_midpoints_and_official_taylor_2_with_nodes():
    g = torch.Generator().manual_seed(1)
    rng = random.Random(7)
    for _ in range(10):
        steps = grid(rng, 5)
        values = [torch.randn(8, generator=g, dtype=torch.float64) for _ in steps]
        s = steps[-1] + rng.randint(1, 6)
        pairs = [(AdamsBashforth(2, "midpoint"), TaylorSeer(order=2, difference="newton")),
                 (AdamsBashforth(2, "node"), TaylorSeer(order=2))]
        for ab, taylor in pairs:
            torch.testing.assert_close(ab.predict(feed(ab, steps, values), s),
                                       taylor.predict(feed(taylor, steps, values), s), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- least squares

@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_least_squares_exact_on_polynomials(order):
    rng = random.Random(40 + order)
    for window in (order + 1, order + 3):
        p = LeastSquares(order=order, window=window)
        for _ in range(20):
            coeffs = [rng.uniform(-2, 2) for _ in range(order + 1)]
            steps = grid(rng, rng.randint(window, window + 3))
            s = steps[-1] + rng.randint(1, 6)
            got = forecast(p, steps, [float(np.polyval(coeffs, t)) for t in steps], s)
            assert got == pytest.approx(np.polyval(coeffs, s), rel=1e-8, abs=1e-8)


@pytest.mark.parametrize(("order", "window"), [(0, 3), (1, 4), (2, 4), (2, 6), (3, 5)])
def test_least_squares_equals_numpy_polyfit_on_noisy_data(order, window):
    rng = random.Random(order * 10 + window)
    p = LeastSquares(order=order, window=window)
    for n in range(1, window + 3):
        steps = grid(rng, n)
        values = [0.1 * t * t - t + rng.gauss(0, 1) for t in steps]
        last = min(window, n)
        coeffs = np.polyfit(steps[-last:], values[-last:], min(order, last - 1))
        s = steps[-1] + rng.randint(1, 6)
        assert forecast(p, steps, values, s) == pytest.approx(np.polyval(coeffs, s), rel=1e-8, abs=1e-8)


# ---------------------------------------------------------------- exponential

def test_exponential_exact_on_exponentials_elementwise():
    """Each element has its own a + b exp(c s) (|c| <= 0.9 < max_rate), on non-uniform grids."""
    rng = np.random.default_rng(0)
    p = Exponential()
    for trial in range(20):
        steps = grid(random.Random(trial), 3 + trial % 3, span=30)
        a, b, c = rng.uniform(-3, 3, 64), rng.uniform(-3, 3, 64), rng.uniform(-0.9, 0.9, 64)
        state = feed(p, steps, [torch.from_numpy(a + b * np.exp(c * t)) for t in steps])
        for k in (1, 3, 8):
            s = steps[-1] + k
            np.testing.assert_allclose(p.predict(state, s).numpy(), a + b * np.exp(c * s), rtol=1e-9, atol=1e-9)


def test_exponential_uniform_grid_is_prony():
    """Uniform gap 3: Prony's ratio of consecutive differences is r^3; then a and b by hand."""
    steps, values = [2, 5, 8], [1.0, 3.0, 3.5]
    r = ((3.5 - 3.0) / (3.0 - 1.0)) ** (1 / 3)
    b = (3.0 - 1.0) / (r**5 - r**2)
    a = 1.0 - b * r**2
    got = [forecast(Exponential(), steps, values, 8 + k) for k in (1, 2, 4)]
    assert got == pytest.approx([a + b * r ** (8 + k) for k in (1, 2, 4)], rel=1e-12)


def line(v0: float, v1: float, h: int, k: int) -> float:
    """Linear extrapolation ``k`` steps past ``v1``, from ``v0`` taken ``h`` steps before it."""
    return v1 + (v1 - v0) * k / h


def test_exponential_fallbacks():
    p = Exponential(max_rate=0.5)
    # one full step: reuse; two: linear
    assert forecast(p, [3], [2.0], 7) == 2.0
    assert forecast(p, [1, 4], [2.0, 5.0], 6) == pytest.approx(7.0)
    # constant input: no fit, finite and constant
    state = feed(p, [0, 1, 5], [torch.full((4,), 2.5)] * 3)
    for s in (6, 20, 200):
        assert torch.equal(p.predict(state, s), torch.full((4,), 2.5))
    # slopes of opposite sign or a zero slope: linear through the last two values
    assert forecast(p, [0, 1, 3], [0.0, 1.0, 0.0], 5) == pytest.approx(line(1.0, 0.0, 2, 2))
    assert forecast(p, [0, 1, 3], [1.0, 1.0, 4.0], 5) == pytest.approx(line(1.0, 4.0, 2, 2))
    # a rate above max_rate (c = 1): linear; below it: exact
    steps = [0, 2, 3]
    grow = [math.exp(t) for t in steps]
    assert forecast(p, steps, grow, 5) == pytest.approx(line(grow[1], grow[2], 1, 2))
    assert forecast(Exponential(max_rate=1.5), steps, grow, 5) == pytest.approx(math.exp(5), rel=1e-10)


# ---------------------------------------------------------------- every forecaster

FORECASTERS = {
    "taylor_newton": (lambda: TaylorSeer(order=3, difference="newton", damping=0.5), 4),
    "hicache": (lambda: HiCache(order=2, sigma=0.6), 3),
    "adams_bashforth": (lambda: AdamsBashforth(order=3), 4),
    "least_squares": (lambda: LeastSquares(order=2, window=5), 5),
    "exponential": (lambda: Exponential(), 3),  # two values and the rate
}


@pytest.mark.parametrize("name", FORECASTERS)
def test_one_full_step_is_reused(name):
    p = FORECASTERS[name][0]()
    x = torch.randn(2, 3)
    out = p.predict(feed(p, [4], [x]), 9)
    assert torch.equal(out, x) and out.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", FORECASTERS)
def test_forecast_keeps_dtype(name, dtype):
    p = FORECASTERS[name][0]()
    g = torch.Generator().manual_seed(0)
    steps = [0, 1, 2, 7, 12]
    state = feed(p, steps, [(1 + 0.1 * s + 0.01 * torch.randn(16, generator=g)).to(dtype) for s in steps])
    out = p.predict(state, 15)
    assert out.dtype == dtype and out.shape == (16,)
    assert torch.isfinite(out).all()
    assert (out.float() - (1 + 0.1 * 15)).abs().max() < 0.3  # a sane forecast of a gentle line


@pytest.mark.parametrize("name", FORECASTERS)
def test_state_memory_is_bounded(name):
    make, tensors = FORECASTERS[name]
    p = make()
    state = p.new_state()
    for j in range(60):
        p.update(state, 3 * j + j % 3, torch.full((10, 3), float(j)).exp_().mul_(1e-20))
    assert state.nbytes == tensors * 10 * 3 * 4
    assert len(state.tensors()) == tensors


@pytest.mark.parametrize("name", FORECASTERS)
def test_steps_must_count_up(name):
    p = FORECASTERS[name][0]()
    state = feed(p, [0, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="not after"):
        p.update(state, 3, scalar(1.0))
    with pytest.raises(ValueError, match="not after"):
        p.predict(state, 3)
    with pytest.raises(ValueError, match="no history"):
        p.predict(p.new_state(), 1)


BAD_ARGUMENTS = [
    (lambda: TaylorSeer(order=2, difference="forward"), "difference", "official"),
    (lambda: TaylorSeer(order=2, damping=1.5), "damping", "[0, 1]"),
    (lambda: TaylorSeer(order=2, damping=float("nan")), "damping", "[0, 1]"),
    (lambda: HiCache(order=2, sigma=0.0), "sigma", "> 0"),
    (lambda: HiCache(order=2, sigma=float("inf")), "sigma", "> 0"),
    (lambda: HiCache(order=-1), "order", "0..16"),
    (lambda: AdamsBashforth(order=1), "order", "2 or 3"),
    (lambda: AdamsBashforth(order=4), "order", "2 or 3"),
    (lambda: AdamsBashforth(order=2, slope_at="end"), "slope_at", "midpoint"),
    (lambda: LeastSquares(order=2, window=2), "window", ">= order + 1"),
    (lambda: LeastSquares(order=-1), "order", ">= 0"),
    (lambda: Exponential(max_rate=0.0), "max_rate", "> 0"),
    (lambda: Exponential(max_rate=float("nan")), "max_rate", "> 0"),
]


@pytest.mark.parametrize(("make", "argument", "allowed"), BAD_ARGUMENTS,
                         ids=[f"{a}-{i}" for i, (_, a, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_name_the_argument(make, argument, allowed):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value).startswith(argument) and allowed in str(info.value)
