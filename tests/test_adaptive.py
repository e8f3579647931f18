"""Adaptive and per-kind schedules: each rule against a hand-written reference loop over a
synthetic signal sequence; probes decide once per step (CFG contexts too) and never after a
site has forecast; state resets between generations; all-full thresholds are bit-identical
to no caching; bad combinations fail before sampling; every preset runs end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from cachelab.core.adaptive import ErrorControlled, FirstBlockCache, MagCache, TeaCache
from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_config
from cachelab.core.controller import attach
from cachelab.jobs.runner import run
from cachelab.core.schedules import Decision, PerKindInterval, StepContext
from cachelab.core.sites import Site, select_sites
from cachelab.core.strategy import Strategy
from cachelab.strategies.hermite import HiCache
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter

REPO = Path(__file__).resolve().parent.parent
FLUX_COEFFICIENTS = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


def decisions(schedule, T, signals=None, ts=None):
    """FULL (True) / FORECAST (False) per step of ``schedule`` fed ``signals[s]``."""
    schedule.reset()
    out = []
    for s in range(T):
        ctx = StepContext(s=s, T=T, t=None if ts is None else ts[s], signals=signals[s] if signals else {})
        out.append(schedule.decide(ctx) is Decision.FULL)
    return out


def drifting(T, seed, shape=(2, 6, 4)):
    """A feature sequence whose per-step change varies (slow, then fast, with noise)."""
    rng = np.random.default_rng(seed)
    x, out = rng.standard_normal(shape).astype(np.float32) + 2, []
    for s in range(T):
        x = x + (0.002 + 0.03 * rng.random() * (s / T) ** 2) * rng.standard_normal(shape).astype(np.float32)
        out.append(x.copy())
    return out


# -- each rule against a reference loop ---------------------------------------------------
def teacache_reference(inputs, coefficients, threshold):
    """TeaCache4FLUX's loop: cnt 0 and T-1 compute; else accumulate poly1d(rel-L1)."""
    T, accumulated, previous, full = len(inputs), 0.0, None, []
    for cnt, m in enumerate(inputs):
        if cnt == 0 or cnt == T - 1:
            calc, accumulated = True, 0.0
        else:
            accumulated += np.polyval(coefficients, np.abs(m - previous).mean() / np.abs(previous).mean())
            calc = accumulated >= threshold
            if calc:
                accumulated = 0.0
        previous = m
        full.append(calc)
    return full


@pytest.mark.parametrize("coefficients, threshold", [(FLUX_COEFFICIENTS, 0.6), ([1.0, 0.0], 0.005)])
def test_teacache_matches_its_reference_loop(coefficients, threshold):
    inputs = drifting(30, seed=0)
    expected = teacache_reference(inputs, coefficients, threshold)
    got = decisions(TeaCache(threshold, coefficients), 30, [{"modulated_input": torch.from_numpy(m)} for m in inputs])
    assert got == expected
    assert 5 < expected.count(True) < 25  # the sequence exercises both outcomes


def fbcache_reference(residuals, threshold, cap=None):
    """ParaAttention's rule: compare with the residual of the last full step; optional cap."""
    reference, run_length, full = None, 0, []
    for r in residuals:
        close = reference is not None and np.abs(r - reference).mean() / np.abs(reference).mean() < threshold
        if close and (cap is None or run_length < cap):
            full.append(False)
            run_length += 1
        else:
            full.append(True)
            reference, run_length = r, 0
    return full


@pytest.mark.parametrize("cap", [None, 2])
def test_fbcache_matches_its_reference_loop(cap):
    residuals = drifting(30, seed=1)
    expected = fbcache_reference(residuals, 0.004, cap)
    schedule = FirstBlockCache(0.004, max_consecutive_forecasts=cap)
    got = decisions(schedule, 30, [{"first_block_residual": torch.from_numpy(r)} for r in residuals])
    assert got == expected
    assert 5 < expected.count(True) < 25


def test_error_controlled_matches_its_reference_loop():
    rng = np.random.default_rng(2)
    errors = [None, None] + [float(e) for e in rng.uniform(0, 0.2, 38)]
    tolerance, first_enhance, cap, final_full = 0.12, 3, 3, 2
    run_length, expected = 0, []
    for s, e in enumerate(errors):
        full = s < first_enhance or s >= 40 - final_full or run_length >= cap or e is None or e > tolerance
        run_length = 0 if full else run_length + 1
        expected.append(full)
    schedule = ErrorControlled(tolerance, first_enhance, final_full, max_consecutive_forecasts=cap)
    assert decisions(schedule, 40, [{"error_estimate": e} for e in errors]) == expected
    assert any(not f for f in expected) and any(f and e is not None and e <= tolerance
                                                for f, e in zip(expected, errors))  # a cap hit


def magcache_reference(ratios, T, threshold, K, retention):
    """MagCache4FLUX's loop on ratios nearest-interpolated (numpy) to T."""
    ratios = np.asarray(ratios)
    mag = ratios[np.round(np.arange(T) * (len(ratios) - 1) / (T - 1)).astype(int)]
    accumulated_ratio, accumulated_steps, accumulated_err, full = 1.0, 0, 0.0, []
    for cnt in range(T):
        skip = False
        if cnt >= int(T * retention):
            accumulated_ratio *= mag[cnt]
            accumulated_steps += 1
            accumulated_err += np.abs(1 - accumulated_ratio)
            if accumulated_err <= threshold and accumulated_steps <= K:
                skip = True
            else:
                accumulated_ratio, accumulated_steps, accumulated_err = 1.0, 0, 0.0
        full.append(not skip)
    return full


@pytest.mark.parametrize("T", [28, 50, 13])
def test_magcache_matches_its_reference_loop(tmp_path, T):
    s = np.arange(28)
    ratios = [1.0] + list(1.1 - 0.004 * s[1:] - 0.25 * (s[1:] > 24) + 0.01 * np.sin(s[1:]))
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"model": "m", "num_steps": 28, "ratios": ratios}))
    for threshold, K, retention in [(0.24, 5, 0.1), (0.12, 2, 0.2)]:
        expected = magcache_reference(ratios, T, threshold, K, retention)
        schedule = MagCache(str(path), threshold, K, retention)
        assert schedule.mask(T) == expected
        assert decisions(schedule, T) == expected
        assert 1 < expected.count(True) < T


def test_pab_matches_the_videosys_rule():
    T, intervals, window = 30, {"attn1": 2, "attn2": 6, "ff": 4}, (300, 800)
    ts = list(np.linspace(999, 0, T))
    schedule = PerKindInterval(intervals, window)
    for s in range(T):
        got = schedule.decide(StepContext(s=s, T=T, t=ts[s]))
        for kind, n in intervals.items():  # broadcast when count % range != 0 and lo < t < hi
            broadcast = (s % n != 0) and window[0] < ts[s] < window[1]
            assert got[kind] is (Decision.FORECAST if broadcast else Decision.FULL), (s, kind)
    with pytest.raises(ValueError, match="integers >= 1"):
        PerKindInterval({"attn": 0})
    with pytest.raises(ValueError, match="lo < hi"):
        PerKindInterval({"attn": 2}, [800, 100])


def test_taylor_error_estimate_is_the_gap_between_orders():
    """Factors {64, 12, 2} (values s^2 at full steps 0, 4, 8; the test vectors of docs/library/taylorseer.md): the order-2 and
    order-1 forecasts at 9 are 77 and 76; reuse's estimate is its whole value."""
    p = TaylorSeer(order=2, first_enhance=1)
    state = p.new_state()
    for s in (0, 4, 8):
        p.update(state, s, torch.tensor([float(s * s), 2.0 * s * s]))
    assert p.error_estimate(state, 9) == pytest.approx(1 / 64, rel=1e-6)
    assert p.error_estimate(state, 10) == pytest.approx(4 / 64, rel=1e-6)  # k^2/2 * D_2 = 4
    r = Reuse()
    reuse_state = r.new_state()
    r.update(reuse_state, 0, torch.tensor([3.0, -4.0]))
    assert r.error_estimate(reuse_state, 5) == pytest.approx(1.0)
    h = HiCache(order=2, first_enhance=1, sigma=0.5)  # top term H_2(sigma k) sigma^2 / 2 * D_2
    h_state = h.new_state()
    for s in (0, 4, 8):
        h.update(h_state, s, torch.tensor([float(s * s), 2.0 * s * s]))
    x = 0.5 * 2
    assert h.error_estimate(h_state, 10) == pytest.approx(abs((4 * x * x - 2) * 0.25 / 2 * 2) / 64, rel=1e-6)


# -- the controller: probes, per-kind decisions, resets ------------------------------------
class Spy:
    """Wraps a schedule: records every context it decided on."""

    def __init__(self, schedule):
        self.schedule, self.seen = schedule, []
        self.signals, self.kinds, self.decides_for = schedule.signals, schedule.kinds, schedule.decides_for

    def decide(self, ctx):
        self.seen.append(ctx)
        return self.schedule.decide(ctx)

    def reset(self):
        self.schedule.reset()

    def held_bytes(self):
        return self.schedule.held_bytes()


class SiteLog:
    """Observer: (site, context, step, full?) of every site call."""

    def __init__(self):
        self.calls = []

    def full(self, site, context, s, values):
        self.calls.append((site, context, s, True))

    def forecast(self, site, context, s, forecast, true):
        self.calls.append((site, context, s, False))


def test_probe_decides_once_per_step_from_the_first_context():
    """Two model calls per step (cond, uncond): one decision per step, from the cond call's
    block-0 residual; block 0 is not a cache site; no site forecasts before the decision."""
    adapter = tiny_adapter(arch=dict(hidden_size=32, depth=3, num_heads=2, patch_size=2))
    model = adapter.model
    spy = Spy(FirstBlockCache(threshold=10.0))  # always forecast after step 0
    handle = attach(select_sites(model, adapter.site_patterns("block")), Reuse(), spy)
    assert [site.name for site in handle.sites] == ["blocks.1", "blocks.2"]
    log = SiteLog()
    handle.observe(log)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([1, 2])
    residuals = []
    with torch.no_grad(), handle.generation(4):
        for s in range(4):
            assert handle.step(s, 900 - 100 * s) is None  # pending until the probe runs
            t = torch.full((2,), 900 - 100 * s)
            h = model.x_embedder(x + s) + model.pos_embed
            residuals.append(model.blocks[0](h, model.t_embedder(t) + model.y_embedder(y, False)) - h)
            for context, sign in (("cond", 1), ("uncond", -1)):
                with handle.context(context):
                    model(sign * (x + s), t, y)
            assert handle.decision is (Decision.FULL if s == 0 else Decision.FORECAST)
    assert [ctx.s for ctx in spy.seen] == [0, 1, 2, 3]
    for ctx, expected in zip(spy.seen, residuals):
        torch.testing.assert_close(ctx.signals["first_block_residual"], expected)
    assert handle.stats().full_steps == [0] and handle.stats().forecast_steps == [1, 2, 3]
    assert {(c, s, full) for site, c, s, full in log.calls if site == "blocks.1"} == \
        {(c, 0, True) for c in ("cond", "uncond")} | {(c, s, False) for c in ("cond", "uncond") for s in (1, 2, 3)}


def test_sites_inside_the_probe_compute_and_record():
    """Module granularity: block 0's attention and MLP run before the decision (inside the
    probe), so they compute and record at every step while block 1's are forecast."""
    adapter = tiny_adapter()
    handle = Strategy("fb", TaylorSeer(1, 1), FirstBlockCache(threshold=10.0), "module").attach(adapter)
    log = SiteLog()
    handle.observe(log)
    adapter.generate(adapter.make_inputs(2, seed=1), handle)
    T = adapter.num_steps
    by_site = {name: [full for site, _, s, full in sorted(log.calls, key=lambda c: c[2]) if site == name]
               for name in ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")}
    assert by_site["blocks.0.attn"] == by_site["blocks.0.mlp"] == [True] * T
    assert by_site["blocks.1.attn"] == by_site["blocks.1.mlp"] == [True] + [False] * (T - 1)


def test_per_kind_decisions_reach_the_sites_of_that_kind():
    adapter = tiny_adapter()
    handle = Strategy("pab", Reuse(), PerKindInterval({"attn": 3}), "module").attach(adapter)
    log = SiteLog()
    handle.observe(log)
    adapter.generate(adapter.make_inputs(2, seed=2), handle)
    for site, _, s, full in log.calls:
        assert full == (site.endswith("mlp") or s % 3 == 0), (site, s)
    assert handle.stats().full_steps == [0, 3, 6, 9]  # a step is full when every site computes


def test_controller_error_estimate_is_the_mean_over_sites():
    layers = [nn.Linear(3, 3), nn.Linear(3, 3)]
    predictor = TaylorSeer(order=1, first_enhance=1)
    spy = Spy(ErrorControlled(tolerance=1e9, max_consecutive_forecasts=None))
    handle = attach([Site(f"l{i}", layer) for i, layer in enumerate(layers)], predictor, spy)
    x = torch.randn(2, 3)
    with torch.no_grad(), handle.generation(4):
        for s in range(4):
            handle.step(s)
            if s == 2:
                states = [c.states[0] for c in handle._caches["default"].values()]
                expected = np.mean([predictor.error_estimate(state, 2) for state in states])
            for layer in layers:
                layer(x * (s + 1))
    assert spy.seen[0].signals["error_estimate"] is None  # no history yet
    assert spy.seen[2].signals["error_estimate"] == pytest.approx(expected)


def test_a_probe_that_never_runs_is_an_error():
    adapter = tiny_adapter()
    handle = Strategy("fb", Reuse(), FirstBlockCache(0.1), "block").attach(adapter)
    with handle.generation(3):
        handle.step(0)
        with pytest.raises(RuntimeError, match="step 0 ended undecided"):
            handle.step(1)


ADAPTIVE = {
    "teacache": lambda: TeaCache(0.05),
    "fbcache": lambda: FirstBlockCache(0.2),
    "error": lambda: ErrorControlled(0.5, first_enhance=2, max_consecutive_forecasts=3),
}


@pytest.mark.parametrize("granularity", ["block", "stack"])
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_state_resets_between_generations(name, granularity):
    adapter = tiny_adapter(num_steps=12)
    inputs = adapter.make_inputs(2, seed=3)
    spy = Spy(ADAPTIVE[name]())
    handle = Strategy(name, TaylorSeer(1, 2), spy, granularity).attach(adapter)
    first = adapter.generate(inputs, handle)
    first_steps, first_seen = handle.stats().full_steps, len(spy.seen)
    second = adapter.generate(inputs, handle)
    assert torch.equal(first, second)
    assert handle.stats().full_steps == first_steps
    assert 0 < len(first_steps) < 12  # the schedule really skipped and really refreshed
    assert len(spy.seen) == 2 * first_seen == 24
    fresh = tiny_adapter(num_steps=12)
    assert torch.equal(fresh.generate(inputs, Strategy(name, TaylorSeer(1, 2), ADAPTIVE[name](), granularity)
                                      .attach(fresh)), first)


def all_full(tmp_path):
    curve = tmp_path / "flat.json"
    curve.write_text(json.dumps({"model": "tiny", "ratios": [1.0] + [2.0] * 9}))
    return {
        "teacache": TeaCache(1e-12), "fbcache": FirstBlockCache(1e-12),
        "error_controlled": ErrorControlled(1e-12), "magcache": MagCache(str(curve), threshold=1e-12),
        "pab": PerKindInterval({"attn": 1, "mlp": 1}),
    }


@pytest.mark.parametrize("granularity", ["module", "block", "stack"])
def test_all_full_thresholds_are_bit_identical_to_no_caching(tmp_path, granularity):
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(2, seed=4)
    plain = adapter.generate(inputs)
    modules_before = {name: dict(vars(m)) for name, m in adapter.model.named_modules()}
    for name, schedule in all_full(tmp_path).items():
        if name == "pab" and granularity != "module":
            continue
        handle = Strategy(name, TaylorSeer(2, 2), schedule, granularity).attach(adapter)
        try:
            assert torch.equal(adapter.generate(inputs, handle), plain), name
            assert handle.stats().full_steps == list(range(adapter.num_steps)), name
        finally:
            handle.remove()
    assert torch.equal(adapter.generate(inputs), plain)
    assert {name: dict(vars(m)) for name, m in adapter.model.named_modules()} == modules_before  # probes removed


# -- bad input fails before sampling --------------------------------------------------------
CONF_DIR = REPO / "conf"


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


BAD = [  # (overrides, what the message must name)
    (["schedule=teacache", "schedule.threshold=0"], ["schedule.threshold=0", "> 0"]),
    (["schedule=fbcache", "schedule.threshold=-0.1"], ["schedule.threshold=-0.1"]),
    (["schedule=error_controlled", "schedule.tolerance=0"], ["schedule.tolerance=0"]),
    (["schedule=mask", "num_steps=10", "schedule.full_steps=null", "schedule.mask=[1,0,1]"],
     ["schedule.mask", "3 entries", "num_steps=10"]),
    (["schedule=mask", "num_steps=10"], ["schedule.full_steps", "num_steps=10", "0..9"]),
    (["strategy=taylorseer_lite", "schedule=teacache"],
     ["modulated_input", "strategy.granularity='output'", "allowed: strategy.granularity in module, block"]),
    (["strategy=taylorseer_lite", "schedule=fbcache"], ["first_block_residual", "strategy.granularity='output'"]),
    (["strategy=adams_bashforth", "schedule=error_controlled"],
     ["error_estimate", "cachelab.strategies.adams_bashforth"]),
    (["strategy=teacache", "schedule=interval"], ["strategy='teacache'", "cachelab.core.adaptive.TeaCache",
                                                  "schedule=teacache"]),
    (["strategy=magcache", "schedule=magcache", "model=tiny_dit_random"],
     ["schedule.calibration='tiny_dit_random'", "python run.py job=calibrate"]),
]


@pytest.mark.parametrize("overrides, names", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_combinations_fail_before_sampling(overrides, names):
    with pytest.raises(ConfigError) as info:
        check_config(make_cfg(*overrides))
    message = str(info.value)
    for name in names:
        assert name in message, message
    assert "\n" not in message and "allowed" in message


def test_a_calibration_of_another_model_is_rejected(tmp_path):
    curve = tmp_path / "other.json"
    curve.write_text(json.dumps({"model": "flux_dev", "ratios": [1.0, 0.9]}))
    with pytest.raises(ConfigError, match="recorded for model 'flux_dev', not model.name='tiny_dit'"):
        check_config(make_cfg("strategy=magcache", "schedule=magcache", f"schedule.calibration={curve}"))


def test_unknown_kinds_and_unprovided_signals_fail_at_attach():
    adapter = tiny_adapter()
    with pytest.raises(ConfigError, match="kind.*cross.*allowed at this granularity: attn, mlp"):
        Strategy("pab", Reuse(), PerKindInterval({"attn": 2, "cross": 6}), "module").attach(adapter)
    with pytest.raises(ConfigError, match="modulated_input.*strategy.granularity"):
        Strategy("tea", Reuse(), TeaCache(0.1), "output").attach(adapter)


def test_presets_with_their_schedules_pass_the_checks():
    for strategy in ("teacache", "fbcache", "magcache", "pab"):  # a preset picks its own schedule
        cfg = make_cfg(f"strategy={strategy}")
        assert cfg.schedule._target_ == cfg.strategy.needs_schedule
        check_config(cfg)
    for strategy in ("fora", "taylorseer", "taylorseer_lite", "teacache", "fbcache", "magcache", "pab"):
        check_config(make_cfg(f"strategy={strategy}", f"schedule={strategy}" if strategy in
                              ("teacache", "fbcache", "magcache", "pab") else "schedule=interval"))
    check_config(make_cfg("strategy=taylor", "schedule=error_controlled"))
    check_config(make_cfg("strategy=hicache", "schedule=error_controlled"))
    check_config(make_cfg("strategy=taylor", "schedule=mask"))


# -- every preset end to end on the tiny random model -------------------------------------
PAIRED = {"fora": "interval", "taylorseer": "interval", "taylorseer_lite": "interval", "teacache": "teacache",
          "fbcache": "fbcache", "magcache": "magcache", "pab": "pab"}
FAST = ["model=tiny_dit_random", "num_images=2", "num_steps=8", "measure.flops=false", "logger=none",
        "progress=false"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("cal")
    returned = run(make_cfg("job=calibrate", "model=tiny_dit_random", "num_steps=8", "logger=none"), out_dir)
    out = out_dir / "calibration.json"
    record = json.loads(out.read_text())
    assert record == json.loads(json.dumps(returned))  # what the job returned is what it wrote
    assert record["model"] == "tiny_dit_random" and len(record["ratios"]) == 8 and record["ratios"][0] == 1.0
    assert all(r > 0 for r in record["ratios"])
    return out


def test_magnitude_ratios_match_hooks_on_the_first_and_last_block():
    """MagCache's ratios against the stack residual taken by plain forward hooks: the first
    block's input, the last block's output, per-token norms, mean ratio per step."""
    from cachelab.jobs.calibrate import magnitude_ratios

    adapter = tiny_adapter(arch=dict(hidden_size=32, depth=3, num_heads=2, patch_size=2), num_steps=8)
    inputs = adapter.make_inputs(2, seed=7)
    ratios = magnitude_ratios(adapter, inputs)
    blocks, entries, norms = adapter.model.blocks, [], []
    hooks = [blocks[0].register_forward_pre_hook(lambda module, args: entries.append(args[0])),
             blocks[-1].register_forward_hook(lambda module, args, out: norms.append(
                 torch.linalg.vector_norm((out - entries[-1]).double(), dim=-1)))]
    adapter.generate(inputs)
    for hook in hooks:
        hook.remove()
    expected = [1.0] + [float((b / a).mean()) for a, b in zip(norms, norms[1:])]
    np.testing.assert_allclose(ratios, expected, rtol=1e-5)
    assert np.ptp(expected) > 1e-3


def test_teacache_fit_matches_an_independent_fit():
    """The fitted polynomial against numpy's Polynomial.fit on pairs recorded by hand: block 0's
    modulated input (the method wrapped directly) and the sampler's model output per step."""
    from cachelab.jobs.calibrate import teacache_fit

    adapter = tiny_adapter(num_steps=12)
    inputs = adapter.make_inputs(2, seed=6)
    fit = teacache_fit(adapter, inputs, degree=3)
    block = adapter.model.blocks[0]
    signals, outputs = [], []
    method = block.modulated_input
    block.modulated_input = lambda *a: signals.append(method(*a).double().numpy()) or method(*a)
    adapter.generate(inputs, callback=lambda step: outputs.append(step["model_output"].double().numpy()))
    del block.modulated_input

    def change(new, old):
        return np.abs(new - old).mean() / np.abs(old).mean()

    x = [change(b, a) for a, b in zip(signals, signals[1:])]
    y = [change(b, a) for a, b in zip(outputs, outputs[1:])]
    np.testing.assert_allclose(np.array(fit["pairs"]), np.array([x, y]).T, rtol=1e-5)
    reference = np.polynomial.Polynomial.fit(x, y, 3).convert().coef[::-1]
    np.testing.assert_allclose(fit["coefficients"], reference, rtol=1e-4, atol=1e-8)
    assert len(x) == 11 and np.ptp(x) > 0


def test_teacache_takes_the_fitted_polynomial_from_a_calibration(calibration, tmp_path):
    record = json.loads(calibration.read_text())
    assert TeaCache(0.1, calibration=str(calibration)).coefficients == record["teacache_coefficients"]
    old = tmp_path / "ratios_only.json"
    old.write_text(json.dumps({"model": "tiny_dit_random", "ratios": record["ratios"]}))
    with pytest.raises(ValueError, match="no TeaCache polynomial"):
        TeaCache(0.1, calibration=str(old))


@pytest.mark.parametrize("preset", sorted(PAIRED))
def test_every_preset_runs(preset, calibration, tmp_path):
    extra = [f"schedule.calibration={calibration}"] if preset in ("magcache", "teacache") else []
    cfg = make_cfg(f"strategy={preset}", f"schedule={PAIRED[preset]}", *FAST, *extra)
    metrics = run(cfg, tmp_path)
    assert metrics["strategy"] == preset
    assert sorted(metrics["full_steps"] + [s for s in range(8) if s not in metrics["full_steps"]]) == list(range(8))
    assert metrics["num_full"] + metrics["num_forecast"] == 8
    assert metrics["full_steps"][0] == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_full"] == metrics["num_full"]


def test_run_py_refuses_a_preset_with_another_schedule(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "strategy=fbcache", "schedule=interval", *FAST,
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "schedule=fbcache" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_callback_full_flag_is_the_adaptive_decision(adapter):
    """An adaptive schedule decides inside the model call; the callback reads it afterwards."""
    strategy = Strategy("fb", Reuse(), FirstBlockCache(threshold=0.5), "block")
    handle = strategy.attach(adapter)
    seen = []
    try:
        adapter.generate(adapter.make_inputs(2, seed=0), handle, callback=lambda step: seen.append(step["full"]))
        stats = handle.stats()
    finally:
        handle.remove()
    assert [s for s, full in enumerate(seen) if full] == stats.full_steps
    assert stats.forecast_steps  # the threshold really skipped some steps
