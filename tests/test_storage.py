"""Factor storage (cachelab/core/storage.py) against float64: each codec's dequantization error
within the bound derived for it (docs/guides/memory.md, "Factor storage"), on random and adversarial tensors,
and a Taylor forecast through stored factors within the bound the per-factor bounds give."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cachelab.core.storage import CODECS, NON_FINITE, Scaled, decode
from cachelab.errors import ConfigError
from cachelab.strategies.hermite import HiCache
from cachelab.strategies.taylor import TaylorSeer

# the largest finite magnitude of each scaled codec, and (relative error of normal values, the
# smallest normal, the subnormal spacing) of the fp8 formats, all in units of the scale
LARGEST = {"int8_channel": 127.0, "int8_token": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8 = {"fp8_e4m3": (2.0**-4, 2.0**-6, 2.0**-9), "fp8_e5m2": (2.0**-3, 2.0**-14, 2.0**-16)}
# a float cast of float32 values (round to nearest): relative error 2^-p for p significand bits,
# and half the subnormal spacing below the normal range (fp32 and fp64 hold float32 values exactly)
FLOAT = {"fp32": (0.0, 0.0), "bf16": (2.0**-8, 2.0**-134), "fp16": (2.0**-11, 2.0**-25), "fp64": (0.0, 0.0)}
SCALED = list(LARGEST)


def reference_scales(x: np.ndarray, name: str) -> np.ndarray:
    """The scale of every element of ``x`` (B, N, C), by hand: the largest finite magnitude of its
    channel within its sample (``*_channel``, fp8) or of its token (``int8_token``), over the
    codec's largest code, at least float32's smallest normal."""
    x = np.where(np.isfinite(x), np.abs(x), 0.0)
    scales = np.empty_like(x)
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            for c in range(x.shape[2]):
                amax = x[b, n, :].max() if name == "int8_token" else x[b, :, c].max()
                scales[b, n, c] = max(amax / LARGEST[name], float(np.finfo(np.float32).tiny))
    return scales


def error_bound(x: np.ndarray, name: str) -> np.ndarray:
    """The derived bound on ``|x - decode(encode(x))|`` per element (float64), with slack for the
    float32 division by the scale and product with it (relative 2^-24 each, far below the bounds).

    - int8: round to nearest of ``x / s`` with ``|x / s| <= 127``: at most ``s / 2``.
    - fp8 with ``m`` mantissa bits: ``|x / s|`` normal (``>= 2^emin``) rounds to ``m`` bits,
      relative error ``<= 2^-(m+1)``; below, the subnormal spacing ``2^(emin - m)`` gives at most
      half of it, times ``s``.
    - a float dtype with ``p`` significand bits: relative ``2^-p``, or half its subnormal spacing."""
    if name in FLOAT:
        relative, subnormal = FLOAT[name]
        return np.maximum(relative * np.abs(x), subnormal)
    s = reference_scales(x, name)
    if name in FP8:
        relative, _, spacing = FP8[name]
        bound = np.maximum(relative * np.abs(x), spacing / 2 * s)
    else:
        bound = s / 2
    return bound * (1 + 2.0**-12) + 2.0**-20 * s


def roundtrip(x: torch.Tensor, name: str) -> np.ndarray:
    return decode(CODECS[name].encode(x)).double().numpy()


def adversarial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    random = torch.randn(3, 16, 8, generator=g) * torch.logspace(-4, 4, 8)  # channels 8 decades apart
    zero_channel = random.clone()
    zero_channel[:, :, 3] = 0
    zero_token = random.clone()
    zero_token[1, 5, :] = 0
    mixed = torch.randn(2, 6, 4, generator=g)
    mixed[0, 0, :] = 1e30  # huge and tiny in one channel and one token
    mixed[0, 1, :] = 1e-30
    return {"random": random, "zeros": torch.zeros(2, 4, 8), "zero channel": zero_channel,
            "zero token": zero_token, "huge": torch.randn(2, 4, 8, generator=g) * 3e37,
            "near float32's largest": torch.full((1, 2, 3), 3.0e38),
            "tiny (float32 subnormals)": torch.randn(2, 4, 8, generator=g) * 1e-42, "huge with tiny": mixed}


@pytest.mark.parametrize("name", SCALED + ["bf16", "fp16", "fp32", "fp64"])
@pytest.mark.parametrize("case", list(adversarial()))
def test_each_codec_stays_within_its_derived_bound(name, case):
    x = adversarial()[case]
    if name == "fp16" and case.startswith(("huge", "near")):
        pytest.skip("fp16 overflows at these magnitudes (a float cast: beyond 65504 is Inf)")
    exact = x.double().numpy()
    error = np.abs(roundtrip(x, name) - exact)
    assert np.isfinite(error).all()
    assert (error <= error_bound(exact, name)).all(), float((error / error_bound(exact, name)).max())
    if case in ("zeros", "zero channel", "zero token"):  # exact zeros stay exact zeros
        assert (roundtrip(x, name)[exact == 0] == 0).all()


@pytest.mark.parametrize("name", SCALED)
def test_the_bounds_are_nearly_reached_on_random_values(name):
    """The bounds are not loose: some element of a random tensor comes within 15 % of its bound
    (a codec with a larger scale, or fewer bits, would exceed them). fp8's relative bound
    ``2^-(m+1)`` is approached from below as ``2^-(m+1) / (1 + 2^-(m+1))`` (0.89 of it for e5m2)."""
    x = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(1))
    exact = x.double().numpy()
    ratio = np.abs(roundtrip(x, name) - exact) / error_bound(exact, name)
    assert 0.85 < ratio.max() <= 1


@pytest.mark.parametrize("name", SCALED)
def test_non_finite_elements_decode_as_nan_and_leave_the_others_bounded(name):
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    x[0, 1, 2], x[1, 3, 0], x[1, 4, 1] = math.inf, -math.inf, math.nan
    out = roundtrip(x, name)
    exact = x.double().numpy()
    finite = np.isfinite(exact)
    assert np.isnan(out[~finite]).all()
    # the scales come from the finite elements only: their bound holds as if the others were 0
    assert (np.abs(out - exact)[finite] <= error_bound(exact, name)[finite]).all()


def test_int8_keeps_its_codes_within_127_and_marks_non_finite_elements():
    x = torch.tensor([[[1.0, -3.0, math.nan, 0.5]]])
    stored = CODECS["int8_token"].encode(x)
    assert stored.data.dtype == torch.int8 and stored.data.tolist() == [[[42, -127, NON_FINITE, 21]]]
    assert stored.scale.item() == pytest.approx(3 / 127)


@pytest.mark.parametrize("name, per_element, scales", [
    ("int8_channel", 1, (2, 1, 8)), ("int8_token", 1, (2, 16, 1)), ("fp8_e4m3", 1, (2, 1, 8)),
    ("fp8_e5m2", 1, (2, 1, 8)), ("bf16", 2, None), ("fp32", 4, None)])
def test_stored_bytes_count_the_codes_and_the_scales(name, per_element, scales):
    p = TaylorSeer(order=1, factor_dtype=name)
    state = p.new_state()
    for s in (0, 1):
        p.update(state, s, torch.randn(2, 16, 8))
    expected = 2 * 2 * 16 * 8 * per_element + (2 * 4 * math.prod(scales) if scales else 0)
    assert state.nbytes == expected
    assert all(isinstance(f, Scaled) == (scales is not None) for f in state.factors)


def taylor_bound(factors: list[np.ndarray], names: list[str], k: float) -> np.ndarray:
    """``sum_i eps_i |k|^i / i!``: the bound on a forecast through stored factors, from each
    factor's own bound ``eps_i``, plus float32 Horner rounding (a few ulps of ``sum |D_i| |k|^i / i!``)."""
    weights = [abs(k) ** i / math.factorial(i) for i in range(len(factors))]
    stored = sum(w * error_bound(f, n) for w, f, n in zip(weights, factors, names))
    return stored + (len(factors) + 2) * 2.0**-24 * sum(w * np.abs(f) for w, f in zip(weights, factors))


@pytest.mark.parametrize("names", [["int8_channel"] * 3, ["int8_token"] * 3, ["fp8_e4m3"] * 3, ["fp8_e5m2"] * 3,
                                   ["bf16", "fp8_e4m3", "fp8_e4m3"], ["fp8_e4m3", "int8_token", "int8_token"],
                                   ["fp32", "int8_channel", "fp8_e5m2", "fp8_e5m2"]])
@pytest.mark.parametrize("k", [1, 3, 4.5])
def test_a_forecast_through_stored_factors_stays_within_the_bound_of_the_exact_one(names, k):
    g = torch.Generator().manual_seed(3)
    # factors of decreasing size, as finite differences of smooth features are
    factors = [torch.randn(2, 12, 8, generator=g) * 10.0**-i for i in range(len(names))]
    p = TaylorSeer(order=len(names) - 1, factor_dtype=names)
    state = p.new_state()
    state.factors = [p.encode(i, f) for i, f in enumerate(factors)]
    state.last_step, state.out_dtype = 0, torch.float32
    state.positions = [0.0, k]  # the forecast at step 1 is k away
    p.variable = "timestep"  # distances read from the positions: a fractional k too
    forecast = p.predict(state, 1).double().numpy()
    exact_factors = [f.double().numpy() for f in factors]
    exact = sum(f * k**i / math.factorial(i) for i, f in enumerate(exact_factors))
    error = np.abs(forecast - exact)
    bound = taylor_bound(exact_factors, names, k)
    assert (error <= bound).all(), float((error / bound).max())
    assert (error > 0).any()  # the storage did round


def test_hicache_forecasts_through_the_same_stored_factors():
    values = [torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    exact, stored = HiCache(order=2), HiCache(order=2, factor_dtype="int8_token")
    states = [p.new_state() for p in (exact, stored)]
    for p, state in zip((exact, stored), states):
        for s, v in enumerate(values):
            p.update(state, s, v)
    assert isinstance(states[1].factors[2], Scaled)
    # the stored run equals the exact predictor on the decoded factors
    states[0].factors = [decode(f) for f in states[1].factors]
    torch.testing.assert_close(stored.predict(states[1], 6), exact.predict(states[0], 6), rtol=0, atol=0)


def test_the_differences_are_taken_between_stored_factors():
    """``D_{i+1} = (D_i - old D_i) / gap`` of the decoded stored factors: on a line the order-1
    forecast passes exactly through the two stored values (their decoded D_0)."""
    p = TaylorSeer(order=1, factor_dtype="int8_channel")
    state = p.new_state()
    line = [torch.linspace(-1, 1, 24).reshape(2, 3, 4) * (1 + s) + s for s in range(3)]
    stored_d0 = []
    for s in (0, 2):
        p.update(state, s, line[s])
        stored_d0.append(decode(state.factors[0]))
    slope = (stored_d0[1] - stored_d0[0]) / 2
    bound = torch.from_numpy(error_bound(slope.double().numpy(), "int8_channel")).float()
    assert ((decode(state.factors[1]) - slope).abs() <= bound).all()
    forecast = p.predict(state, 4)
    expected = stored_d0[1] + 2 * decode(state.factors[1])
    torch.testing.assert_close(forecast, expected)


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32", "fp64"])
def test_a_float_storage_computes_in_its_dtype_as_a_list_or_a_name(name):
    """A float storage keeps plain tensors and computes in their dtype: the forecast is the
    official rule evaluated by hand in that dtype, and ``[name]`` or ``[name] * 3`` is ``name``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]
    values = [torch.randn(3, 5, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    steps = [0, 1, 3, 4]
    outs = []
    for storage in (name, [name], [name] * 3):
        p = TaylorSeer(order=2, factor_dtype=storage)
        state = p.new_state()
        for s, v in zip(steps, values):
            p.update(state, s, v)
        assert all(f.dtype == dtype for f in state.factors)
        outs.append(p.predict(state, 6))
    # by hand: D_0 = F in dtype; D_{i+1} = (D_i - old D_i) / gap in dtype
    d: list[torch.Tensor] = []
    last = None
    for s, v in zip(steps, values):
        new = [v.to(dtype)]
        for i in range(min(len(d), 2)):
            new.append((new[i] - d[i]) / (s - last))
        d, last = new, s
    k = 6 - last
    by_hand = (d[0] + k * (d[1] + k / 2 * d[2])).float()
    for out in outs:
        assert torch.equal(out, outs[0])
    torch.testing.assert_close(outs[0], by_hand, rtol=16 * FLOAT[name][0] + 1e-7, atol=1e-6)


def test_bad_storage_names_are_one_line_with_the_allowed_ones():
    for bad in ("int8", ["bf16", "int4"], [], 8):
        with pytest.raises(ConfigError, match=r"factor_dtype=.*allowed: null, one of fp32 \| bf16 .* int8_token"):
            TaylorSeer(order=2, factor_dtype=bad)


def test_the_config_takes_a_storage_per_order():
    from cachelab.jobs.presets import preset

    strategy = preset("taylor", order=2, factor_dtype=["bf16", "fp8_e4m3", "fp8_e4m3"])
    assert strategy.predictor.factor_dtype == ("bf16", "fp8_e4m3", "fp8_e4m3")
    assert [strategy.predictor.codec(i).name for i in range(4)] == ["bf16", "fp8_e4m3", "fp8_e4m3", "fp8_e4m3"]
    assert preset("hicache", factor_dtype="int8_token").predictor.codec(2).name == "int8_token"
    with pytest.raises(ConfigError, match="factor_dtype"):
        preset("taylor", factor_dtype="fp4")


def test_a_token_refresh_stores_the_fresh_tokens_of_d0():
    """ToCa's refresh on stored factors: ``D_0`` decoded, the fresh tokens written, stored again (with
    per-token scales each fresh token is within its own bound)."""
    p = TaylorSeer(order=1, factor_dtype="int8_token")
    state = p.new_state()
    p.update(state, 0, torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(4)))
    fresh = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(5)) * 100
    index = torch.tensor([[1, 4], [0, 5]])
    p.refresh(state, index, fresh)
    assert isinstance(state.factors[0], Scaled)
    got = decode(state.factors[0]).gather(1, index[..., None].expand(-1, -1, 4)).double().numpy()
    exact = fresh.double().numpy()
    assert (np.abs(got - exact) <= error_bound(exact, "int8_token")).all()
