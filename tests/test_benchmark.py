"""job=benchmark (cachelab/jobs/benchmark.py) and its statistics (cachelab/evaluation/statistics.py):
grid coverage against the peers' documented parameters, the bootstrap against closed forms, the
nonsense filter, the selection on tuning only, and the smoke grid end to end."""
from __future__ import annotations

import copy
import csv
import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cachelab.errors import ConfigError
from cachelab.evaluation.metrics import psnr
from cachelab.evaluation.peers import cache_dit_available, check_coverage, documented_knobs
from cachelab.evaluation.statistics import (best_at, bootstrap_interval, frontier, level_ratios, nonsense,
                                            per_image_mse, psnr_interval, psnr_of_mse, verdict)
from cachelab.jobs.benchmark import (COLUMNS, GRIDS_DIR, Measured, check_tool_coverage, expand, load_grid, select)

REPO = Path(__file__).resolve().parents[1]


def tool_file(name: str, grid: str = "full") -> dict:
    return OmegaConf.to_container(OmegaConf.load(GRIDS_DIR / grid / f"{name}.yaml"))


# -- grid coverage -------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny_flux_digits", "tiny_dit"])
def test_the_shipped_grids_cover_every_documented_parameter(model):
    points, settings = load_grid("full", model)  # raises on a gap
    assert settings["held_out_images"] >= 64
    tools = {p.tool for p in points}
    assert {"diffusers TaylorSeer", "diffusers FirstBlockCache", "diffusers MagCache", "diffusers PAB",
            "diffusers SeaCache"} <= tools
    presets = {path.stem for path in (REPO / "conf" / "strategy").glob("*.yaml")} - {"none"}
    assert {f"cachelab {name}" for name in presets} <= tools  # every preset, each its own tool
    intervals = {p.knobs["cache_interval"] for p in points if p.tool == "diffusers TaylorSeer"}
    assert max(intervals) >= 10 and {p.knobs["disable_cache_before_step"] for p in points
                                     if p.tool == "diffusers TaylorSeer"} == {1, 2, 3}
    assert any(p.knobs.get("max_skip_steps") == 5 and p.knobs.get("retention_ratio") == 0.1 for p in points)


@pytest.mark.parametrize("name,dropped", [("diffusers_magcache", "retention_ratio"),
                                          ("diffusers_taylorseer", "max_order"),
                                          ("diffusers_fbcache", "threshold"),
                                          ("diffusers_pab", "spatial_attention_block_skip_range")])
def test_a_planted_grid_that_omits_a_knob_is_caught(name, dropped):
    spec = tool_file(name)
    check_tool_coverage(spec, name)
    planted = copy.deepcopy(spec)
    for grid in planted["grids"]:
        grid["knobs"].pop(dropped, None)
    with pytest.raises(ConfigError, match=f"not in the grid: {dropped}"):
        check_tool_coverage(planted, name)


def test_the_bundled_identifiers_count_and_a_fixed_knob_needs_a_reason():
    spec = tool_file("diffusers_taylorseer")
    planted = copy.deepcopy(spec)
    for grid in planted["grids"]:
        for choices in grid.get("bundles", {}).values():
            for fields in choices.values():
                fields.pop("skip_predict_identifiers", None)
    with pytest.raises(ConfigError, match="not in the grid: skip_predict_identifiers"):
        check_tool_coverage(planted, "planted")
    planted = copy.deepcopy(spec)
    del planted["not_searched"]["taylor_factors_dtype"]
    with pytest.raises(ConfigError, match="fixed without a reason.*taylor_factors_dtype"):
        check_tool_coverage(planted, "planted")


def test_coverage_against_the_dataclass_fields():
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    assert documented_knobs(FirstBlockCacheConfig) == {"threshold"}
    assert {"threshold", "max_skip_steps", "retention_ratio", "mag_ratios", "calibrate"} <= documented_knobs(MagCacheConfig)
    check_coverage("fb", FirstBlockCacheConfig, {"threshold"}, {})
    with pytest.raises(ConfigError, match="not parameters of it: thresh"):
        check_coverage("fb", FirstBlockCacheConfig, {"threshold", "thresh"}, {})
    with pytest.raises(ConfigError, match="without a reason: threshold"):
        check_coverage("fb", FirstBlockCacheConfig, set(), {"threshold": " "})


@pytest.mark.skipif(not cache_dit_available(), reason='cache-dit is not installed (pip install -e ".[peers]")')
@pytest.mark.parametrize(("name", "calibrator"), [("cache_dit_dbcache_foca", "FoCaCalibratorConfig"),
                                                  ("cache_dit_dbcache_dmd", "DMDCalibratorConfig")])
def test_cache_dit_foca_and_dmd_grids_cover_dbcache_and_the_calibrator(name, calibrator):
    spec = tool_file(name)
    check_tool_coverage(spec, name)
    planted = copy.deepcopy(spec)
    planted["not_searched"].pop("calibrator.calibrator_type")
    with pytest.raises(ConfigError, match=f"{calibrator}.*not in the grid: calibrator_type"):
        check_tool_coverage(planted, "planted")


@pytest.mark.skipif(not cache_dit_available(), reason='cache-dit is not installed (pip install -e ".[peers]")')
def test_cache_dit_grids_cover_dbcache_and_its_calibrator():
    spec = tool_file("cache_dit_dbcache_taylorseer")
    check_tool_coverage(spec, "cache_dit_dbcache_taylorseer")
    planted = copy.deepcopy(spec)
    for grid in planted["grids"]:
        grid["knobs"].pop("calibrator.taylorseer_order")
    with pytest.raises(ConfigError, match="TaylorSeerCalibratorConfig.*not in the grid: taylorseer_order"):
        check_tool_coverage(planted, "planted")


def test_expand_is_the_product_of_knobs_and_bundles_per_model():
    spec = tool_file("diffusers_taylorseer")
    flux, dit = expand(spec, "x", "tiny_flux_digits"), expand(spec, "x", "tiny_dit")
    assert len(flux) == 2 * 7 * 3 * 2 + 2 * 8 * 3 and len(dit) == 2 * 7 * 3 * 3
    assert len({p.setting for p in flux}) == len(flux)  # every setting named apart
    assert all(p.knobs["taylor_factors_dtype"] == "torch.float32" for p in flux)


# -- statistics ----------------------------------------------------------------------------------
def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=4000)
    low, high = bootstrap_interval(x, np.mean, draws=4000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_psnr_interval_matches_the_delta_method():
    mse = np.random.default_rng(2).gamma(4.0, 1e-4, size=4000)  # positive per-image errors
    point, low, high = psnr_interval(mse, draws=4000, seed=0)
    assert point == pytest.approx(-10 * math.log10(mse.mean()))
    half = 1.96 * 10 / math.log(10) * mse.std(ddof=1) / (math.sqrt(len(mse)) * mse.mean())  # d PSNR = -10/ln10 dm/m
    assert low == pytest.approx(point - half, abs=0.1 * half) and high == pytest.approx(point + half, abs=0.1 * half)


def test_per_image_mse_and_batch_psnr_agree_with_a_loop_and_torchmetrics():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(5, 1, 8, 8, generator=g)
    images = (reference + 0.05 * torch.randn(5, 1, 8, 8, generator=g)).clamp(0, 1)
    mse = per_image_mse(images, reference)
    for i in range(5):
        assert mse[i] == pytest.approx(sum((a - b) ** 2 for a, b in zip(images[i].flatten().tolist(),
                                                                       reference[i].flatten().tolist())) / 64)
    assert psnr_of_mse(mse) == pytest.approx(psnr(images, reference), rel=1e-6)
    assert psnr_of_mse(np.zeros(3)) == math.inf


def brute_best(mse_rows, speeds, idx, level):
    best = 1.0
    for row, speed in zip(mse_rows, speeds):
        mean = sum(row[i] for i in idx) / len(idx)
        if mean == 0 or -10 * math.log10(mean) >= level:
            best = max(best, speed)
    return best


def test_level_ratios_against_a_hand_loop():
    rng = random.Random(3)
    n = 6
    a = [[rng.choice([1e-3, 1e-4, 3e-4]) for _ in range(n)] for _ in range(3)]
    b = [[rng.choice([1e-3, 1e-4, 3e-4]) for _ in range(n)] for _ in range(2)]
    sa, sb = [2.0, 3.0, 4.5], [2.5, 3.5]
    levels = [30.0, 35.0, 40.0]
    got = level_ratios(np.array(a), sa, np.array(b), sb, levels, draws=300, seed=5)
    every = list(range(n))
    for j, level in enumerate(levels):
        assert got[j][0] == pytest.approx(brute_best(a, sa, every, level) / brute_best(b, sb, every, level))
        assert got[j][1] <= got[j][0] <= got[j][2] or math.isclose(got[j][1], got[j][2])
    from cachelab.evaluation.statistics import resamples

    idx = resamples(n, 300, 5)
    ratios = [brute_best(a, sa, row, 35.0) / brute_best(b, sb, row, 35.0) for row in idx]
    assert got[1][1] == pytest.approx(np.percentile(ratios, 2.5)) and got[1][2] == pytest.approx(np.percentile(ratios, 97.5))


def test_verdict_claims_only_outside_the_interval():
    assert verdict(1.05, 1.3, "A") == "A ahead" and verdict(0.7, 0.95, "A") == "A behind"
    assert verdict(0.9, 1.2, "A") == "parity"
    assert verdict(1.05, 1.3, "A", noise=0.1) == "parity"  # within the timing noise


def brute_front(points):
    return {p for p in points if not any((q[0] >= p[0] and q[1] > p[1]) or (q[0] > p[0] and q[1] >= p[1]) for q in points)}


def test_frontier_and_best_at_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.choice([20.0, 25.0, 30.0, 35.0, math.inf]), rng.choice([1.0, 1.5, 2.0, 3.0]))
                  for _ in range(rng.randint(1, 9))]
        assert set(frontier(points)) == brute_front(set(points))
        for level in (30.0, 35.0):
            reaching = [s for q, s in points if q >= level]
            assert best_at(points, level) == (max(reaching) if reaching else None)


# -- FLOPs from calls ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from tests.test_pipelines import tiny

    adapter = tiny("tiny_flux", tmp_path_factory.mktemp("flux") / "pipe", num_steps=8)
    adapter.generate(adapter.make_inputs(1, seed=1))
    return adapter


def grid_point(driver, target, calibrator=None, **knobs):
    from cachelab.jobs.benchmark import GridPoint

    return GridPoint("t", "s", driver, target, knobs, "", calibrator)


DBCACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.45, max_warmup_steps=1,
               max_continuous_cached_steps=-1)
needs_cache_dit = pytest.mark.skipif(not cache_dit_available(), reason='cache-dit is not installed (pip install -e ".[peers]")')


@pytest.mark.parametrize("point", [
    grid_point("cachelab", "taylor", order=2, interval=3),  # module sites: a forecast replaces the forward
    grid_point("cachelab", "taylorseer_lite", order=1, interval=4),
    grid_point("diffusers", "TaylorSeerCacheConfig", cache_interval=3, disable_cache_before_step=1, max_order=1,
               taylor_factors_dtype="torch.float32"),
    grid_point("diffusers", "FirstBlockCacheConfig", threshold=0.3),
    grid_point("diffusers", "PyramidAttentionBroadcastConfig", spatial_attention_block_skip_range=2,
               spatial_attention_timestep_skip_range=[0, 1000]),
    grid_point("cachelab", "foca", interval=3),
    grid_point("cachelab", "dmd", schedule="fbcache", threshold=0.3),
    grid_point("cachelab", "freqca", interval=3),
    grid_point("cachelab", "seacache", threshold=1.0),
    grid_point("cachelab", "speca", tolerance=1.0),
    grid_point("diffusers", "SeaCacheConfig", threshold=0.5, residual_order=1, retention_steps=1, cache_end_steps=1,
               max_consecutive_cached=2),
    pytest.param(grid_point("cache_dit", "DBCacheConfig", "FoCaCalibratorConfig", **DBCACHE), marks=needs_cache_dit,
                 id="DBCacheConfig+FoCa"),
    pytest.param(grid_point("cache_dit", "DBCacheConfig", "DMDCalibratorConfig", **DBCACHE,
                            **{"calibrator.dmd_history": 4}), marks=needs_cache_dit, id="DBCacheConfig+DMD"),
], ids=lambda p: getattr(p, "target", None))
def test_flops_from_calls_equal_the_counter(tiny_flux, point):
    from cachelab.evaluation.flops import CallFlops, count_flops
    from cachelab.jobs.benchmark import Bench, enabled
    from cachelab.models.pipelines.driver import scheduler_grid

    adapter = tiny_flux
    inputs = adapter.make_inputs(2, seed=0)
    bench = Bench(adapter, adapter.model, lambda: adapter.pipe.current_timestep, CallFlops(adapter.model),
                  grid=lambda: scheduler_grid(adapter.pipe.scheduler))
    _, base = bench.flops.calibrate(lambda: adapter.generate(inputs))
    assert bench.flops.count(lambda: adapter.generate(inputs))[1] == base
    with enabled(bench, point) as handle:
        _, counted = count_flops(lambda: adapter.generate(inputs, handle))
    with enabled(bench, point) as handle:
        _, from_calls = bench.flops.count(lambda: adapter.generate(inputs, handle))
    assert counted < base and from_calls == counted


def test_seacache_gets_the_step_coordinates_and_the_latent():
    from contextlib import contextmanager

    from cachelab.core.variables import StepGrid
    from cachelab.evaluation.peers import raw_vision, step_coordinates

    class Transformer(torch.nn.Module):
        opened: list = []

        @contextmanager
        def cache_context(self, name, **kwargs):
            self.opened.append((name, kwargs))
            yield

    flow = StepGrid.from_flow_sigmas([1000.0, 750.0, 500.0], [1.0, 0.75, 0.5])
    ddim = StepGrid.from_alpha_bar([981.0, 501.0, 21.0], [0.04, 0.5, 0.98])
    model, now = Transformer(), {"t": 0.0}
    for grid, sigmas in ((flow, [1.0, 0.75, 0.5]), (ddim, [1 / (1 + math.sqrt(0.04 / 0.96)), 0.5,
                                                           1 / (1 + math.sqrt(0.98 / 0.02))])):
        model.opened.clear()
        with step_coordinates(model, lambda: now["t"], lambda: grid):
            for t in grid.timestep:
                now["t"] = t + 0.4  # the nearest step's
                with model.cache_context("cond"):
                    pass
        assert [kw["step_index"] for _, kw in model.opened] == [0, 1, 2]
        assert {kw["num_inference_steps"] for _, kw in model.opened} == {3}
        # flow matching: its own sigma (1.0 at the first step, within the clamped log-SNR's 5e-5)
        assert [kw["sigma"] for _, kw in model.opened] == pytest.approx(sigmas, abs=1e-4)
    assert "cache_context" not in vars(model)  # the class's own method again
    latent = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert [v.shape for v in raw_vision(None, (latent,), {})] == [(3, 1, 4, 4)] * 2
    tokens = latent.permute(0, 2, 3, 1).reshape(2, 16, 3)  # packed: (B, N, C) on a 4 x 4 grid
    torch.testing.assert_close(torch.stack(raw_vision(None, (), {"hidden_states": tokens}))[:, :, 0], latent)


# -- the nonsense filter -----------------------------------------------------------------------------
def test_nonsense_points_are_flagged():
    base = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    other = base + 0.01
    assert nonsense(2.0, 50, other, base) == ""
    assert nonsense(1.0, 50, base.clone(), base) == ""  # skipped nothing, changed nothing: full compute
    assert "identical to full compute" in nonsense(3.0, 50, base.clone(), base)
    assert "above the 50 steps" in nonsense(51.0, 50, other, base)
    assert "above the 50 steps" in nonsense(2.0, 50, None, None, wall_speedup=60.0)
    assert nonsense(2.0, 50, torch.full_like(base, math.nan), base) == "non-finite output"
    assert nonsense(math.inf, 50, other, base) == "non-finite FLOPs speedup"


def measured(tool, speed, quality, flag=""):
    return Measured(None, {"tool": tool, "flops_speedup": speed, "psnr": quality, "flag": flag})


def test_selection_uses_the_tuning_rows_and_never_a_flagged_point():
    rows = [measured("A", 9.0, 45.0, flag="FLOPs speedup 9.00 above the 5 steps"), measured("A", 3.0, 36.5),
            measured("A", 4.0, 35.2), measured("A", 5.0, 31.0), measured("B", 2.0, 41.5)]
    chosen = select(rows, [30.0, 35.0, 40.0], [0.0, 1.0])  # margins: level + 0 dB and + 1 dB
    assert 0 not in chosen
    assert chosen[3] == ["30+0", "30+1"] and chosen[2] == ["35+0"] and chosen[1] == ["35+1"]
    assert chosen[4] == ["30+0", "30+1", "35+0", "35+1", "40+0", "40+1"]
    assert set(itertools.chain(*chosen.values())) <= {"30+0", "30+1", "35+0", "35+1", "40+0", "40+1"}


def test_tuning_and_held_out_inputs_share_no_prompt_and_no_seed():
    from cachelab.jobs.benchmark import split_inputs
    from cachelab.models.pipelines.flux_digits import digit_prompts

    class Prompted:
        prompts = [prompt for prompt, _ in digit_prompts()]

    tuning, held = split_inputs(Prompted(), 8, 0, "tuning"), split_inputs(Prompted(), 64, 1000, "held_out")
    assert not set(tuning.prompts) & set(held.prompts) and tuning.seed != held.seed
    classes = dict(digit_prompts())
    assert {classes[p] for p in held.prompts} == set(range(10)) and len({classes[p] for p in tuning.prompts}) >= 5


# -- the smoke grid end to end ----------------------------------------------------------------------
def test_the_smoke_grid_writes_the_csv(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "run.py", "job=benchmark", "model=tiny_dit", "job.grid=smoke", "logger=none",
                           "threads=1", "progress=false", f"hydra.run.dir={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with (out / "benchmark.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(COLUMNS) <= set(rows[0]) and {"tool", "setting", "split", "flops_speedup", "wall_speedup", "psnr",
                                             "psnr_low", "psnr_high", "flag"} <= set(rows[0])
    tuning = [r for r in rows if r["split"] == "tuning" and r["tool"] != "full compute"]
    held = [r for r in rows if r["split"] == "held_out" and r["tool"] != "full compute"]
    assert {r["tool"] for r in tuning} == {"cachelab", "diffusers FirstBlockCache", "diffusers PAB"}
    assert held and all(r["selected_for"] for r in held)
    for r in held:
        if not r["flag"]:
            assert float(r["psnr_low"]) <= float(r["psnr"]) <= float(r["psnr_high"])
            assert float(r["wall_speedup"]) > 0 and float(r["flops_speedup"]) >= 1.0
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG" and (out / "benchmark.md").is_file()


def test_an_unknown_grid_is_one_line_naming_the_allowed(tmp_path):
    with pytest.raises(ConfigError, match="job.grid='nope'.*allowed: full, lead, smoke"):
        load_grid("nope", "tiny_dit")
