"""Numeric faults must never cost a run: a non-finite forecast is caught by the guard (fallback,
raise or off), nothing a site returns aliases the cache, metrics.json is strict JSON with every
NaN/Inf as null and named, metrics on non-finite data do not crash, and the order a predictor
really reached is reported."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from cachelab.core.controller import attach
from cachelab.core.schedules import Interval, Mask
from cachelab.core.sites import Site
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError, NonFiniteError
from cachelab.evaluation.judge import DigitJudge, classify, frechet_distance, gaussian_stats
from cachelab.evaluation.metrics import psnr, relative_l2, ssim
from cachelab.io import finite_json, write_json_atomic
from cachelab.jobs.base import build_strategy
from cachelab.jobs.checks import check_config
from cachelab.jobs.runner import run
from cachelab.strategies.exponential import Exponential
from cachelab.strategies.hermite import HiCache
from cachelab.strategies.least_squares import LeastSquares
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter

REPO = Path(__file__).resolve().parent.parent
TINY = ["model=tiny_dit", "num_images=4", "num_steps=6", "measure.flops=false", "logger=none", "progress=false",
        "threads=1"]


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def strict_json(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as jq and JavaScript do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# -- the guard -------------------------------------------------------------------------------
class Scale(nn.Module):
    """x -> weight * x, all NaN at the steps in ``nan_at`` (the test loop sets ``step``)."""

    def __init__(self, weight: float, nan_at=()):
        super().__init__()
        self.weight, self.nan_at, self.step = weight, set(nan_at), None

    def forward(self, x):
        out = x * self.weight
        return out.fill_(math.nan) if self.step in self.nan_at else out


class TwoSites(nn.Module):
    """a(x) + b(x): two independent sites; ``a`` returns NaN at full step 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Scale(2.0, nan_at={1}), Scale(3.0)

    def forward(self, x):
        return self.a(x) + self.b(x)


def drive(guard: str, T: int = 6, full=(0, 1, 4)):
    """Steps 0..T-1 of the toy with input s + 1 (Taylor order 1: exact on b's line): the outputs,
    the handle, and a's history step after step 3."""
    model = TwoSites()
    handle = attach([Site("a", model.a), Site("b", model.b)], TaylorSeer(1, first_enhance=1),
                    Mask(full_steps=list(full)), guard=guard)
    outputs, a_last = [], None
    with torch.no_grad(), handle.generation(T):
        for s in range(T):
            model.a.step = s
            handle.step(s)
            outputs.append(model(torch.full((3,), s + 1.0)))
            if s == 3:
                a_last = handle._caches["default"]["a"].states[0].last_step
    return outputs, handle, a_last


def test_guard_fallback_computes_a_site_whose_forecast_is_not_finite():
    """Full step 1 of site a is NaN (the model's own output: recorded as is). Its forecasts at
    2 and 3 are NaN, and so is the one at 5 (D_1 = finite - NaN after full step 4): a computes
    there instead, b still forecasts, every forecast step's output is the exact 5 (s + 1);
    a's history stays at its last full step; one warning for the generation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs, handle, a_last = drive("fallback")
    for s in (2, 3, 5):
        assert torch.equal(outputs[s], torch.full((3,), 5.0 * (s + 1)))
    assert outputs[1].isnan().all()  # the full step itself: what the model computed
    stats = handle.stats()
    assert stats.guard_fallbacks == 3 and stats.fallbacks == 0
    assert stats.forecast_steps == [2, 3, 5]
    assert stats.as_dict()["guard_fallbacks"] == 3
    assert a_last == 1  # the fallback's value was not recorded
    ours = [w for w in caught if "non-finite" in str(w.message) or "NaN" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "step 2" in str(ours[0].message) and "site a" in str(ours[0].message)


def test_guard_warns_once_per_generation():
    model = TwoSites()
    handle = attach([Site("a", model.a), Site("b", model.b)], Reuse(), Mask(full_steps=[0, 1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.no_grad(), handle.generation(4):
                for s in range(4):
                    model.a.step = s
                    handle.step(s)
                    model(torch.ones(3))
    assert len([w for w in caught if "guard=fallback" in str(w.message)]) == 2
    assert handle.stats().guard_fallbacks == 2  # steps 2 and 3 of the last generation


def test_guard_raise_names_step_site_and_context_in_one_line():
    with pytest.raises(NonFiniteError) as err:
        drive("raise")
    message = str(err.value)
    assert "\n" not in message
    assert "step 2" in message and "site a" in message and "context 'default'" in message
    assert "guard=fallback" in message  # what is allowed instead


def test_guard_off_lets_the_nan_through():
    outputs, handle, _ = drive("off")
    assert outputs[2].isnan().all() and outputs[3].isnan().all()
    assert handle.stats().guard_fallbacks == 0


def test_guard_rejects_unknown_policies_and_reads_yaml_off():
    with pytest.raises(ConfigError, match="guard='maybe' is not allowed; allowed: fallback, raise, off"):
        attach([Site("a", nn.Identity())], Reuse(), Mask(full_steps=[0]), guard="maybe")
    assert attach([Site("a", nn.Identity())], Reuse(), Mask(full_steps=[0]), guard=False).guard == "off"
    with pytest.raises(ConfigError, match="guard='maybe'"):
        check_config(make_cfg("guard=maybe"))
    assert build_strategy(make_cfg("guard=raise")).guard == "raise"
    assert build_strategy(make_cfg()).guard == "fallback"


class PoisonedReuse(Reuse):
    """Reuse whose record of full step ``at`` is NaN (the model's output itself is finite):
    a corrupted cache, which only the guard can keep out of the samples."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def update(self, state, s, value):
        super().update(state, s, torch.full_like(value, math.nan) if s == self.at else value)


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_guard_keeps_a_poisoned_cache_out_of_a_generation(granularity):
    """On the tiny DiT (10 steps, full at 0, 1, 4, 7): the records of full step 1 are NaN. With
    the guard every site computes at forecast steps 2 and 3 (span sites too: the whole span
    runs), so the samples are finite, and equal to the run whose caches were never poisoned
    but compute at 2, 3 (a mask with those steps full) wherever the records are not used."""
    schedule = Interval(3, 2)
    assert schedule.full_steps(10) == [0, 1, 4, 7]
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(2, seed=0)
    handle = Strategy("poisoned", PoisonedReuse(at=1), schedule, granularity).attach(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guarded = adapter.generate(inputs, handle)
    stats = handle.stats()
    assert torch.isfinite(guarded).all()
    sites = len(handle.sites)
    assert stats.guard_fallbacks == 2 * sites  # steps 2, 3: every site; 5, 6, 8, 9: clean again
    handle.remove()
    reference = Strategy("reuse", Reuse(), Mask(full_steps=[0, 1, 2, 3, 4, 7]), granularity).attach(adapter)
    assert torch.equal(guarded, adapter.generate(inputs, reference))
    assert not torch.equal(guarded, adapter.generate(inputs))  # the forecasts at 5, 6, 8, 9 were used


def test_guard_off_on_a_poisoned_cache_gives_nan_samples():
    adapter = tiny_adapter()
    handle = Strategy("poisoned", PoisonedReuse(at=1), Interval(3, 2), "module", guard="off").attach(adapter)
    assert not torch.isfinite(adapter.generate(adapter.make_inputs(2, seed=0), handle)).all()
    assert handle.stats().guard_fallbacks == 0


# -- no aliasing -----------------------------------------------------------------------------
class Two(nn.Module):
    """Returns a fresh tensor of 2s each call."""

    def forward(self, x):
        return torch.full_like(x, 2.0)


@pytest.mark.parametrize("predictor", [Reuse(), TaylorSeer(0), TaylorSeer(2, first_enhance=1), HiCache(1),
                                       Exponential(), LeastSquares(1, window=2)], ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("full", [[0], [0, 1, 2]])
def test_a_caller_changing_the_output_in_place_never_changes_the_cache(predictor, full):
    """The caller adds 100 into every output it gets: it must see 2, 2, 2, ... (not 2, 102,
    202, ... as when the cache kept the output of a full step or returned its own tensor)."""
    model = Two()
    handle = attach([Site("two", model)], predictor, Mask(full_steps=full))
    seen = []
    with torch.no_grad(), handle.generation(6):
        for s in range(6):
            handle.step(s)
            out = model(torch.zeros(3))
            seen.append(out[0].item())
            out.add_(100)
    assert seen == [2.0] * 6
    assert handle.stats().forecast_steps == [s for s in range(6) if s not in full]


@pytest.mark.parametrize("predictor", [Reuse(), TaylorSeer(1, first_enhance=1)], ids=["reuse", "taylor"])
def test_a_sampler_changing_the_dit_output_in_place_gets_what_a_copying_one_gets(predictor):
    """Output granularity on the tiny DiT (no CFG, so the sampler calls the model itself): a
    forward hook adding 0.1 into the output in place gives the same samples as one returning
    ``out + 0.1`` (a new tensor); a cache aliased with the output would drift by 0.1 per step."""
    results = []
    for hook in (lambda module, args, out: out.add_(0.1), lambda module, args, out: out + 0.1):
        adapter = tiny_adapter(guidance_scale=1.0)
        handle = Strategy("s", predictor, Mask(full_steps=[0, 1, 5]), "output").attach(adapter)
        registered = adapter.model.register_forward_hook(hook)
        results.append(adapter.generate(adapter.make_inputs(2, seed=5), handle))
        registered.remove()
        assert handle.stats().forecast_steps == [2, 3, 4, 6, 7, 8, 9]
    assert torch.equal(results[0], results[1])


# -- honest metrics --------------------------------------------------------------------------
def test_finite_json_and_strict_write(tmp_path):
    a = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    metrics = {"quality": {"psnr_db": psnr(a, a), "rel_l2": 0.5}, "per_step": [1.0, -math.inf, math.nan]}
    clean, flags = finite_json(metrics)
    assert clean == {"quality": {"psnr_db": None, "rel_l2": 0.5}, "per_step": [1.0, None, None]}
    assert flags == {"quality/psnr_db": "inf", "per_step/1": "-inf", "per_step/2": "nan"}
    write_json_atomic(tmp_path / "m.json", metrics)
    assert strict_json((tmp_path / "m.json").read_text()) == clean


def test_metrics_on_non_finite_images_are_nan_not_a_crash():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bad = a.clone()
    bad[0, 0, 0, 0] = math.nan
    worse = a.clone()
    worse[1, 2, 3, 4] = math.inf
    for broken in (bad, worse):
        assert math.isnan(psnr(broken, a)) and math.isnan(ssim(broken, a)) and math.isnan(relative_l2(broken, a))
        assert math.isnan(psnr(a, broken)) and math.isnan(relative_l2(a, broken))
    assert psnr(a, a) == math.inf and relative_l2(a, a) == 0


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_frechet_distance_on_non_finite_statistics_is_nan(poison):
    g = torch.Generator().manual_seed(0)
    mu, cov = gaussian_stats(torch.randn(50, 4, generator=g, dtype=torch.float64))
    for which in range(4):
        args = [mu.clone(), cov.clone(), mu.clone(), cov.clone()]
        args[which].view(-1)[0] = poison
        assert math.isnan(frechet_distance(*args))
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_nan_judge_features_does_not_kill_the_process():
    """At the judge's 128 dimensions LAPACK's eigenvalue routine on NaN segfaults (exit 139):
    run where a crash cannot take the test session with it."""
    code = ("import math, torch\n"
            "from cachelab.evaluation.judge import frechet_distance\n"
            "cov = torch.eye(128, dtype=torch.float64)\n"
            "bad = cov.clone(); bad[0, 0] = math.nan\n"
            "print(frechet_distance(torch.zeros(128), bad, torch.zeros(128), bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == "nan"


def test_digit_judge_on_non_finite_images():
    """A NaN image is recognised as no class, and makes the feature FD NaN (no eigvals on it)."""
    judge = DigitJudge()
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = classify(judge.classifier, images * 2 - 1)[0]  # what the judge sees in them
    clean = judge.evaluate(images, labels)
    assert clean["class_accuracy"] == 1 and math.isfinite(clean["feature_fd"])
    images[2, 0, 5, 5] = math.nan
    scores = judge.evaluate(images, labels)
    assert scores["class_accuracy"] == 0.75 and math.isnan(scores["feature_fd"])


@pytest.fixture(scope="module")
def huge_guidance_run(tmp_path_factory):
    """``model.guidance_scale=1e38`` on the embedded digits DiT: every sample is NaN."""
    run_dir = tmp_path_factory.mktemp("huge_guidance")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics = run(make_cfg("model.guidance_scale=1e38"), run_dir)
    torch.set_num_threads(threads)
    return run_dir, metrics


def test_huge_guidance_scale_writes_strict_metrics_with_nulls_and_flags(huge_guidance_run):
    run_dir, returned = huge_guidance_run
    metrics = strict_json((run_dir / "metrics.json").read_text())
    assert metrics == returned  # the job returns what metrics.json holds
    assert metrics["quality"] == {"rel_l2": None, "psnr_db": None, "ssim": None}
    assert metrics["model_quality"]["cached"]["feature_fd"] is None
    flags = metrics["non_finite"]
    assert flags["quality/psnr_db"] == "nan" and flags["model_quality/cached/feature_fd"] == "nan"
    assert all(metrics["per_step_rel_l2"][int(key.split("/")[1])] is None
               for key in flags if key.startswith("per_step_rel_l2/"))
    assert metrics["guard"] == "fallback" and metrics["guard_fallbacks"] > 0
    assert metrics["order_reached"] == {"min": 1, "max": 1}  # order=2 asked, 2 full steps
    assert (run_dir / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "n/a" in (run_dir / "report.md").read_text()


def test_huge_guidance_scale_with_guard_raise_stops_with_one_line(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^the TaylorSeer forecast at step 2, site blocks\.\d+\.\w+, "):
        run(make_cfg("model.guidance_scale=1e38", "guard=raise", "num_images=2"), tmp_path)


def test_identical_images_report_psnr_null_flagged_inf(tmp_path):
    metrics = run(make_cfg("model=tiny_dit_random", "strategy=none", "num_images=2", "num_steps=4"), tmp_path)
    written = strict_json((tmp_path / "metrics.json").read_text())
    assert written["quality"]["psnr_db"] is None and written["non_finite"]["quality/psnr_db"] == "inf"
    assert written["quality"]["rel_l2"] == 0 and metrics == written
    assert written["order_reached"] is None and written["guard_fallbacks"] == 0


def test_sample_job_metrics_are_strict_and_count_non_finite_images(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run(make_cfg("job=sample", "job.batch_size=2", "num_images=3", "model.guidance_scale=1e38",
                     "job.baseline_samples=true"), tmp_path)
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    assert metrics["non_finite_images"] == {"cached": 3, "baseline": 3}
    assert metrics["cache"]["guard_fallbacks"] > 0
    assert metrics["cache"]["order_reached"] == {"min": 1, "max": 1}
    assert isinstance(metrics["non_finite"], dict)


# -- the order reached -----------------------------------------------------------------------
def test_order_reached_is_what_the_history_allowed(adapter):
    """Taylor order 8 with full steps {0, 1, 4, 7} of 10 (first_enhance=2) holds at most 4 factors."""
    inputs = adapter.make_inputs(2, seed=0)
    for predictor, expected in ((TaylorSeer(8, first_enhance=2), {"min": 3, "max": 3}),
                                (TaylorSeer(8, first_enhance=5), {"min": 2, "max": 2}),
                                (Reuse(), {"min": 0, "max": 0}), (LeastSquares(2), None)):
        handle = Strategy("s", predictor, Interval(3, 2), "module").attach(adapter)
        adapter.generate(inputs, handle)
        stats = handle.stats()
        assert stats.order_reached == expected and stats.as_dict()["order_reached"] == expected
        assert handle._caches == {}  # freed at the end of the generation; the stats kept it
        handle.remove()
