"""FoCa, DMD and FreqCa against references computed another way: the line FoCa's forecast and
calibration reproduce, a scalar float64 loop of FoCa's recursion, a sequence of a known linear
map (exact for DMD), explicit DFT matrices for the low-pass split and a closed form of FreqCa's
forecast; and, where cache-dit is installed, its own FoCa and DMD calibrators step for step."""
from __future__ import annotations

import math

import pytest
import torch

from cachelab.core.spectral import low_pass
from cachelab.strategies.dmd import DMD
from cachelab.strategies.foca import FoCa
from cachelab.strategies.freqca import FreqCa

T = 24
IRREGULAR = [0, 1, 2, 5, 9, 10, 14, 20]  # full steps: warm-up, then gaps of 3, 4, 1, 4, 6


def run(predictor, full_steps, value_at, steps=range(T)):
    """Every step of a generation: full steps recorded, the others forecast; {step: forecast}."""
    state, out = predictor.new_state(), {}
    for s in steps:
        if s in full_steps:
            predictor.update(state, s, value_at(s))
        elif state.has_history:
            out[s] = predictor.predict(state, s)
    return out


# -- FoCa -----------------------------------------------------------------------------------
@pytest.mark.parametrize("full_steps", [list(range(0, T, 4)), IRREGULAR])
def test_foca_reproduces_a_line_on_any_grid(full_steps):
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    line = lambda s: a + b * s  # noqa: E731
    for s, forecast in run(FoCa(horizon=None), full_steps, line).items():
        if s > full_steps[1]:  # two anchors seen: forecast and calibration are both exact
            torch.testing.assert_close(forecast, line(s), rtol=0, atol=1e-12)


def test_foca_horizon_damps_toward_the_anchor_in_closed_form():
    # on a line: the line up to the horizon; one step beyond, both slopes are still b, so
    # F(s0) + (h^2 / 2e) 2b; after that the local slope is the damped forecasts' own
    a, b, h = 0.5, -1.25, 3
    full_steps = [0, 1, 2, 10]
    got = run(FoCa(horizon=h), full_steps, lambda s: torch.tensor([a + b * s], dtype=torch.float64))
    for s in range(3, 3 + h):
        assert got[s].item() == pytest.approx(a + b * s, abs=1e-12)
    e = h + 1
    assert got[2 + e].item() == pytest.approx(a + b * 2 + b * h * h / e, abs=1e-12)
    e = h + 2
    local = got[2 + e - 1].item() - got[2 + e - 2].item()
    assert got[2 + e].item() == pytest.approx(a + b * 2 + h * h / (2 * e) * (b + local), abs=1e-12)


def foca_reference(full_steps, values, horizon, divided):
    """FoCa's recursion written out on scalars: a dict of every value recorded by step (full or
    forecast) and the full steps, read back at each forecast step."""
    recorded, anchors, out = {}, [], {}
    for s in range(T):
        if s in full_steps:
            recorded[s] = values[s]
            anchors.append(s)
            continue
        if not anchors:
            continue
        s0 = anchors[-1]
        seen = [t for t in sorted(recorded) if t >= anchors[0]]
        if len(anchors) < 2:  # reuse, nothing recorded
            out[s] = recorded[s0]
            continue
        s1 = anchors[-2]
        a, b = seen[-1], seen[-2]
        g0 = (recorded[s0] - recorded[s1]) / ((s0 - s1) if divided else 1)
        ga = (recorded[a] - recorded[b]) / ((a - b) if divided else 1)
        e = s - s0
        weight = e / 2 if horizon is None or e <= horizon else horizon ** 2 / (2 * e)
        out[s] = recorded[s] = recorded[s0] + weight * (g0 + ga)
    return out


@pytest.mark.parametrize("horizon", [None, 3])
@pytest.mark.parametrize("slopes", ["per_step", "undivided"])
def test_foca_matches_its_scalar_loop(horizon, slopes):
    values = [math.sin(0.37 * s) + 0.02 * s * s for s in range(T)]
    got = run(FoCa(horizon, slopes), IRREGULAR, lambda s: torch.tensor([values[s]], dtype=torch.float64))
    expected = foca_reference(IRREGULAR, values, horizon, slopes == "per_step")
    assert got.keys() == expected.keys()
    for s in got:
        assert got[s].item() == pytest.approx(expected[s], abs=1e-12), s


def test_foca_undivided_is_cache_dit_step_for_step():
    calibrators = pytest.importorskip("cache_dit.caching.cache_contexts.calibrators.foca")
    torch.manual_seed(1)
    values = torch.randn(T, 2, 5, dtype=torch.float64)
    theirs = calibrators.FoCaState()
    predictor = FoCa(horizon=3, anchor_slope="undivided")
    state = predictor.new_state()
    for s in range(T):
        theirs.mark_step_begin()
        if s in IRREGULAR:
            theirs.update(values[s])
            predictor.update(state, s, values[s])
        else:
            torch.testing.assert_close(predictor.predict(state, s), theirs.approximate(), rtol=0, atol=1e-14)


def test_foca_asked_twice_at_a_step_does_not_advance():
    predictor = FoCa()
    state = predictor.new_state()
    for s in (0, 1):
        predictor.update(state, s, torch.tensor([float(s * s)]))
    first = predictor.predict(state, 2).clone()
    torch.testing.assert_close(predictor.predict(state, 2), first)
    assert [s for s, _ in state.window] == [2, 1]



@pytest.mark.parametrize("dtype, slopes", [(torch.float32, 2), (torch.float64, 2), (torch.bfloat16, 4)])
def test_foca_takes_its_anchor_slope_once_per_full_step_where_it_costs_no_bytes(dtype, slopes, monkeypatch):
    """Float32 or wider: the anchor slope is taken at the first forecast after a full step and kept in
    place of the older anchor (the same bytes); narrower values recompute it (kept in float32 it would
    hold more). The forecasts are the same either way (checked against the scalar loop elsewhere)."""
    taken = []
    slope = FoCa.slope
    monkeypatch.setattr(FoCa, "slope", lambda self, newer, older, d: taken.append((newer[0], older[0])) or
                        slope(self, newer, older, d))
    predictor = FoCa()
    state = predictor.new_state()
    for s in (0, 2):
        predictor.update(state, s, torch.randn(2, 3).to(dtype))
    held = state.nbytes
    for s in (3, 4, 5):
        predictor.predict(state, s)
    # steps 2 and 0: the window's at the first forecast, the anchors' once more or at every forecast
    assert [pair for pair in taken if pair == (2, 0)] == [(2, 0)] * slopes
    assert state.nbytes == held + 2 * 2 * 3 * state.window[0][1].element_size()  # the window's two forecasts


# -- DMD ------------------------------------------------------------------------------------
def linear_map_sequence(batch: int, d: int = 12):
    """``y_s = Q M^s c_b``: a real map with eigenvalues 0.9 e^{+-0.3 i}, 0.8 and 1.02 acting on the
    4-dimensional span of ``Q`` (d x 4), one ``c_b`` per batch item; shape (batch, 3, d / 3)."""
    g = torch.Generator().manual_seed(3)
    Q = torch.randn(d, 4, generator=g, dtype=torch.float64)
    r, theta = 0.9, 0.3
    M = torch.zeros(4, 4, dtype=torch.float64)
    M[:2, :2] = r * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    M[2, 2], M[3, 3] = 0.8, 1.02
    c = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    return lambda s: torch.stack([Q @ torch.linalg.matrix_power(M, s) @ c[i] for i in range(batch)]).reshape(batch, 3, -1)


@pytest.mark.parametrize("spacing", [2, 3, 4])
def test_dmd_reproduces_a_linear_map_exactly(spacing):
    y = linear_map_sequence(batch=2)
    full_steps = list(range(0, T, spacing))
    # no ridge (it shifts 1/S by ~1e-8) and no truncation of the decaying modes
    got = run(DMD(history=6, ridge=0.0, cutoff=1e-12), full_steps, y)
    checked = [s for s in got if s > full_steps[4]]  # five snapshots: four pairs span the map's 4 modes
    assert checked
    for s in checked:
        torch.testing.assert_close(got[s], y(s), rtol=0, atol=1e-10)


def test_dmd_batch_items_are_fitted_alone():
    y = linear_map_sequence(batch=2)
    full_steps = list(range(0, 12, 2))
    both = run(DMD(), full_steps, y, steps=range(12))[11]
    alone = run(DMD(), full_steps, lambda s: y(s)[1:], steps=range(12))[11]
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-12)


def test_dmd_falls_back_to_taylor_order_one_until_four_uniform_values():
    values = {0: 1.0, 1: 2.0, 2: 4.5, 4: 7.0, 7: 9.0}
    got = run(DMD(), values, lambda s: torch.tensor([values[s]], dtype=torch.float64), steps=range(9))
    assert got[3].item() == pytest.approx(4.5 + (4.5 - 2.0) * 1)     # steps 1, 2 (derivatives from step 2 on)
    assert got[5].item() == pytest.approx(7.0 + (7.0 - 4.5) / 2 * 1)  # a gap of 2: the slope per step
    assert got[8].item() == pytest.approx(9.0 + (9.0 - 7.0) / 3 * 1)  # spacings 3, 2: no uniform run of 4


def test_dmd_is_cache_dit_on_its_uniform_windows():
    calibrators = pytest.importorskip("cache_dit.caching.cache_contexts.calibrators.dmd")
    theirs = calibrators.DMDState(history=6)
    predictor = DMD(history=6)
    state = predictor.new_state()
    A = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full_steps = {0, 1, 2, 4, 6, 8, 10, 12, 15, 18, 21}
    compared = 0
    for s in range(T):
        value = torch.sin(0.3 * s + A) + 0.1 * s * A
        theirs.mark_step_begin()
        if s in full_steps:
            theirs.update(value)
            predictor.update(state, s, value)
        elif len(state.uniform_tail()[0]) >= 4:
            torch.testing.assert_close(predictor.predict(state, s), theirs.approximate(), rtol=0, atol=1e-10)
            compared += 1
    assert compared >= 5


# -- FreqCa ---------------------------------------------------------------------------------
def dft_low_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The low band of a (B, h, w, D) float64 grid by explicit DFT matrices."""
    def dft(n):
        k = torch.arange(n, dtype=torch.float64)
        return torch.exp(-2j * math.pi * torch.outer(k, k) / n)

    h, w = x.shape[1], x.shape[2]
    fh = torch.tensor([k / h if k <= (h - 1) // 2 else k / h - 1 for k in range(h)], dtype=torch.float64)
    fw = torch.tensor([k / w if k <= (w - 1) // 2 else k / w - 1 for k in range(w)], dtype=torch.float64)
    mask = ((fh[:, None] ** 2 + fw[None, :] ** 2) <= cutoff ** 2).to(torch.complex128)
    Fh, Fw = dft(h), dft(w)
    xc = x.to(torch.complex128)
    spectrum = torch.einsum("ab,nbcd,ec->naed", Fh, xc, Fw)
    back = torch.einsum("ab,nbcd,ec->naed", Fh.conj(), spectrum * mask[None, :, :, None], Fw.conj()) / (h * w)
    return back.real


@pytest.mark.parametrize(("side", "cutoff"), [(6, 0.2), (8, 0.3), (7, 0.45)])
def test_low_pass_on_the_token_grid_is_the_dft_mask(side, cutoff):
    x = torch.randn(2, side * side, 3, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    expected = dft_low_pass(x.reshape(2, side, side, 3), cutoff).reshape(x.shape)
    torch.testing.assert_close(low_pass(x, cutoff), expected, rtol=0, atol=1e-12)
    image = x.reshape(2, side, side, 3).permute(0, 3, 1, 2)  # (B, C, H, W): the same grid
    torch.testing.assert_close(low_pass(image, cutoff), expected.reshape(2, side, side, 3).permute(0, 3, 1, 2),
                               rtol=0, atol=1e-12)


def test_freqca_reuses_the_low_band_and_hermite_forecasts_the_high_band():
    side, sigma, N = 8, 0.5, 3
    i, j = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    low_pattern = torch.cos(2 * math.pi * (i + 2 * j) / side).to(torch.float64)  # |f| = 0.28 <= 0.3
    high_pattern = torch.cos(2 * math.pi * (3 * i + 2 * j) / side).to(torch.float64)  # |f| = 0.45
    p = lambda s: 0.3 - 0.2 * s + 0.05 * s * s  # noqa: E731
    value = lambda s: ((1 + 0.1 * s) * low_pattern + p(s) * high_pattern).reshape(1, side * side, 1)  # noqa: E731
    full_steps = [0, 3, 6]
    got = run(FreqCa(order=2, sigma=sigma, cutoff=0.3), full_steps, value, steps=range(9))
    for k in (1, 2):
        s = 6 + k
        d1 = (p(6) - p(3)) / N  # TaylorSeer's factors of the high band's amplitude
        d2 = (d1 - (p(3) - p(0)) / N) / N
        x = sigma * k
        hermite = p(6) + 2 * x * sigma * d1 + (4 * x * x - 2) * sigma ** 2 / 2 * d2
        expected = (1 + 0.1 * 6) * low_pattern + hermite * high_pattern
        torch.testing.assert_close(got[s].reshape(side, side), expected, rtol=0, atol=1e-12)


def test_foca_fresh_tokens_enter_the_window():
    predictor = FoCa(horizon=None)
    state = predictor.new_state()
    line = lambda s: torch.arange(6, dtype=torch.float64).reshape(1, 3, 2) * s  # noqa: E731
    for s in (0, 1):
        predictor.update(state, s, line(s))
    forecast = predictor.predict(state, 2)
    torch.testing.assert_close(forecast, line(2))
    fresh = torch.full((1, 1, 2), 100.0, dtype=torch.float64)
    predictor.refresh(state, torch.tensor([[1]]), fresh)
    held = state.window[0][1]
    torch.testing.assert_close(held[:, 1], fresh[:, 0])
    torch.testing.assert_close(held[:, [0, 2]], line(2)[:, [0, 2]])
    torch.testing.assert_close(forecast, line(2))  # the forecast handed out is not changed in place
    # the next step's local slope on token 1 is 100 - F_1(1): F(3) = F_0 + (2 / 2) (g_0 + g_a)
    nxt = predictor.predict(state, 3)
    g0, ga = line(1)[0, 1] - line(0)[0, 1], fresh[0, 0] - line(1)[0, 1]
    torch.testing.assert_close(nxt[0, 1], line(1)[0, 1] + 1.0 * (g0 + ga))
