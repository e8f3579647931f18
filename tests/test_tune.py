"""job=tune (cachelab/jobs/tune.py) and the per-site schedule it writes (PerSiteInterval)."""
from __future__ import annotations

import functools
import itertools
import json
import math
import random

import pytest
import torch
from torch import nn

from cachelab.core.controller import attach
from cachelab.core.schedules import Interval, PerSiteInterval
from cachelab.core.sites import Site, select_sites
from cachelab.errors import ConfigError
from cachelab.evaluation.flops import count_flops
from cachelab.jobs.base import build, build_strategy
from cachelab.jobs.checks import check_config, check_target
from cachelab.jobs.presets import preset
from cachelab.jobs.runner import run
from cachelab.jobs.schema import compose_config
from cachelab.analysis.sensitivity import Calibration, additive, anchored, greedy_path, mse_from_psnr, psnr_from_mse
from cachelab.jobs.tuning.records import Clock, CostModel, ErrorModel, Reference, SensitivityTable, Setting
from cachelab.jobs.tuning.targets import PsnrTarget
from cachelab.jobs.tuning.tuner import Bench, Tuner, TuneOptions
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer


def record(table: dict) -> SensitivityTable:
    """The typed table of a dict in the sensitivity file's form."""
    return SensitivityTable.from_dict(table)

SMALL = ["model=tiny_dit_random", "num_steps=8", "num_images=2", "logger=none", "progress=false", "threads=1",
         "measure.flops_images=2", "first_enhance=1"]


def per_site_loop(T: int, first_enhance: int, interval: int) -> list[bool]:
    """A hand-written per-site counter (the official TaylorSeer rule, one counter per site)."""
    counter, mask = 0, []
    for s in range(T):
        full = s < first_enhance or counter == interval - 1
        counter = 0 if full else counter + 1
        mask.append(full)
    return mask


class Recorder:
    """Which sites computed (full) and which were forecast, per step."""

    def __init__(self):
        self.computed, self.forecasts = set(), set()

    def full(self, site, context, s, values):
        self.computed.add((site, s))

    def forecast(self, site, context, s, forecast, true):
        self.forecasts.add((site, s))


def test_per_site_schedule_follows_a_hand_written_loop_in_a_cached_run():
    torch.manual_seed(0)
    adapter = build(compose_config(SMALL), "model")
    sites = select_sites(adapter.model, adapter.site_patterns("module"))
    intervals = {site.name: 1 + i % 4 for i, site in enumerate(sites[:-1])}  # the last site is not named
    schedule = PerSiteInterval(intervals, first_enhance=2)
    T = adapter.num_steps
    recorder = Recorder()
    handle = attach(sites, Reuse(), schedule)
    handle.observe(recorder)
    try:
        adapter.generate(adapter.make_inputs(2, 0), handle)
    finally:
        handle.remove()
    for site in sites:
        mask = per_site_loop(T, 2, intervals.get(site.name, 1))
        assert mask == (schedule.site_masks(T).get(site.name) or [True] * T)
        assert {s for name, s in recorder.computed if name == site.name} == {s for s in range(T) if mask[s]}
        assert {s for name, s in recorder.forecasts if name == site.name} == {s for s in range(T) if not mask[s]}


def test_per_site_schedule_naming_no_site_computes_every_step():
    adapter = build(compose_config(SMALL), "model")
    sites = select_sites(adapter.model, adapter.site_patterns("module"))
    recorder = Recorder()
    handle = attach(sites, Reuse(), PerSiteInterval({}))  # what schedule=per_site alone builds
    handle.observe(recorder)
    try:
        adapter.generate(adapter.make_inputs(1, 0), handle)
    finally:
        handle.remove()
    assert not recorder.forecasts
    assert recorder.computed == {(site.name, s) for site in sites for s in range(adapter.num_steps)}


def test_per_site_schedule_refuses_unknown_sites_and_bad_intervals():
    adapter = build(compose_config(SMALL), "model")
    sites = select_sites(adapter.model, adapter.site_patterns("module"))
    with pytest.raises(ConfigError, match="names site\\(s\\) blocks.9.attn .*allowed.*blocks.0.attn"):
        attach(sites, Reuse(), PerSiteInterval({"blocks.9.attn": 2}))
    with pytest.raises(ValueError, match="intervals must be integers >= 1"):
        PerSiteInterval({"blocks.0.attn": 0})
    skip = Site("single_transformer_blocks.0.attn", nn.Identity(), skip="proj_out")
    assert skip.decision_name == "single_transformer_blocks.0.proj_out"


def test_predicted_cost_is_the_closed_form_and_the_counted_flops():
    cfg = compose_config(SMALL)
    adapter = build(cfg, "model")
    T, n, first_enhance = cfg.num_steps, 3, 1
    cost = CostModel.measure(adapter, "module", 2, 0, first_enhance)
    share = sum(cost.site_flops.values()) / cost.total
    assert 0.5 < share < 1
    forecasts = T - sum(per_site_loop(T, first_enhance, n))
    closed = 1 / (1 - share * forecasts / T)
    assert cost.speedup({site: n for site in cost.site_flops}) == pytest.approx(closed, rel=1e-12)
    # the same as the FLOPs a real cached generation is counted at
    inputs = adapter.make_inputs(2, 0)
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), Reuse(), Interval(n, first_enhance))
    try:
        _, cached = count_flops(lambda: adapter.generate(inputs, handle))
    finally:
        handle.remove()
    assert cost.total / cached == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize("target, message", [
    ({}, "job.target: give exactly one of job.target.psnr, job.target.rel_l2, job.target.speedup, "
         "job.target.wall_speedup .*got none"),
    ({"psnr": 30, "speedup": 2}, "got job.target.psnr=30 and job.target.speedup=2; allowed"),
    ({"psnr": -1}, "job.target.psnr=-1 is out of range; allowed: numbers > 0"),
    ({"rel_l2": 2}, "job.target.rel_l2=2 is out of range; allowed: numbers between 0 and 1"),
    ({"speedup": 0.5}, "job.target.speedup=0.5 is out of range; allowed: numbers > 1"),
])
def test_bad_targets_are_one_line(target, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_target(target)
    assert "\n" not in str(err.value)


def test_bad_targets_stop_the_run_before_any_model():
    with pytest.raises(ConfigError, match="got none"):
        check_config(compose_config(SMALL + ["job=tune"]))
    with pytest.raises(ConfigError, match="job.group='layer' is not allowed; allowed: site, block"):
        check_config(compose_config(SMALL + ["job=tune", "job.target.psnr=30", "job.group=layer"]))
    with pytest.raises(ConfigError, match="strategy.granularity='stack' is not allowed; allowed: module, block"):
        check_config(compose_config(SMALL + ["job=tune", "job.target.psnr=30", "strategy.granularity=stack"]))


def test_tune_meets_its_target_and_the_written_config_reproduces_the_verified_run(tmp_path):
    target = 25.0
    cfg = compose_config(SMALL + ["job=tune", f"job.target.psnr={target}", "job.orders=[1,2]", "job.intervals=[2,3]",
                                  "job.sensitivity_images=1", "job.calibration_runs=2"])
    result = run(cfg, tmp_path / "tune")
    verified = result["tries"][-1]
    assert result["met"] and verified["met"] and verified["measured"]["psnr_db"] >= target
    assert verified["predicted"]["speedup"] == pytest.approx(verified["measured"]["speedup"], rel=1e-6)
    assert json.loads((tmp_path / "tune" / "metrics.json").read_text())["chosen"] == verified["setting"]
    # the written strategy, through run.py's composition (--config-dir adds the folder to the search path)
    conf = tmp_path / "tune" / "conf"
    again = run(compose_config(SMALL + ["strategy=tuned", f"hydra.searchpath=[file://{conf}]"]), tmp_path / "again")
    assert again["full_steps"] == verified["full_steps"]
    assert again["flops"]["speedup"] == pytest.approx(verified["measured"]["speedup"], rel=1e-9)
    assert again["quality"]["psnr_db"] == pytest.approx(verified["measured"]["psnr_db"], rel=1e-6)
    # ... and its keyword form for cachelab.apply
    keys = json.loads((tmp_path / "tune" / "tuned_apply.json").read_text())
    strategy = preset(keys.pop("strategy"), **keys)
    schedule = build_strategy(compose_config(SMALL + ["strategy=tuned", f"hydra.searchpath=[file://{conf}]"])).schedule
    assert isinstance(strategy.schedule, PerSiteInterval)
    assert strategy.schedule.site_masks(8) == schedule.site_masks(8)
    assert strategy.predictor.order == verified["order"]


# -- the error model and the search (analysis/sensitivity.py) ---------------------------------
def test_additive_error_is_the_hand_sum_of_the_groups_squared_errors():
    table = {"a": {2: 0.01, 4: 0.09}, "b": {2: 0.04, 4: 0.25}, "c": {2: 1.0, 4: 4.0}}
    # by hand: a at 4 (0.09) + b at 2 (0.04) + c always computed (0)
    assert additive(table, {"a": 4, "b": 2, "c": 1}) == pytest.approx(0.13, rel=1e-15)
    # rel-L2 of independent errors: the root of the summed squares
    assert math.sqrt(additive(table, {"a": 2, "b": 2})) == pytest.approx(math.hypot(0.1, 0.2), rel=1e-15)
    assert additive(table, {"a": 1, "b": 1, "c": 1}) == 0
    # from the uniform interval 2 (measured 0.03 with every group at 2): plus a's change 2 -> 4
    assert anchored(table, {2: 0.03, 4: 0.5}, 2, {"a": 4, "b": 2, "c": 2}) == pytest.approx(0.03 + 0.09 - 0.01)
    assert anchored(table, {2: 0.03}, 2, {"a": 2, "b": 2, "c": 2}) == 0.03
    assert anchored(table, {}, 1, {"a": 4, "b": 2, "c": 1}) == additive(table, {"a": 4, "b": 2, "c": 1})


def test_calibration_recovers_a_power_law_and_psnr_converts_mse_back():
    points = [(p, 3 * p ** 1.25) for p in (1e-4, 1e-3, 2e-2)]
    fit = Calibration(points)
    assert (fit.slope, fit.intercept) == (pytest.approx(1.25), pytest.approx(math.log10(3)))
    assert fit(5e-3) == pytest.approx(3 * 5e-3 ** 1.25, rel=1e-9)
    assert Calibration([(1e-3, 4e-3)])(1e-2) == pytest.approx(4e-2)  # one point: the ratio
    assert Calibration([])(0.5) == pytest.approx(0.5)
    assert psnr_from_mse(mse_from_psnr(31.7)) == pytest.approx(31.7, rel=1e-12)


def brute_force(errors, savings, intervals):
    """Every configuration of the toy: (saving, error, choice)."""
    groups = list(errors)
    out = []
    for combo in itertools.product([1, *intervals], repeat=len(groups)):
        choice = dict(zip(groups, combo))
        out.append((sum(savings[g][n] for g, n in choice.items() if n != 1), additive(errors, choice), choice))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_greedy_search_walks_the_brute_force_lower_hull(seed):
    rng = random.Random(seed)
    intervals = [2, 3, 4, 6]
    errors, savings = {}, {}
    for g in "abcd":
        # savings grow with the interval; errors grow, not always convexly
        s = sorted(rng.uniform(0.01, 0.2) for _ in intervals)
        e = sorted(rng.uniform(1e-4, 1e-1) for _ in intervals)
        savings[g], errors[g] = dict(zip(intervals, s)), dict(zip(intervals, e))
    everything = brute_force(errors, savings, intervals)
    path = greedy_path(errors, savings, {g: 1 for g in errors})
    assert path[0] == {g: 1 for g in errors} and path[-1] == {g: 6 for g in errors}
    on_path = [(sum(savings[g][n] for g, n in c.items() if n != 1), additive(errors, c)) for c in path]
    assert all(s1 > s0 for (s0, _), (s1, _) in zip(on_path, on_path[1:]))
    # for every trade-off weight, the best configuration of all is on the greedy path
    for lam in [0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 3.0, 100.0]:
        best = min(e - lam * s for s, e, _ in everything)
        assert min(e - lam * s for s, e in on_path) == pytest.approx(best, abs=1e-12)
    # and nothing in the brute force dominates a point of the path
    for s, e in on_path:
        assert not [c for s2, e2, c in everything if s2 >= s and e2 <= e and (s2 > s + 1e-15 or e2 < e - 1e-15)]


def test_greedy_from_uniform_lengthens_the_cheapest_error_per_flop_first():
    errors = {"a": {2: 0.010, 3: 0.020}, "b": {2: 0.002, 3: 0.100}}
    savings = {"a": {2: 0.10, 3: 0.15}, "b": {2: 0.10, 3: 0.15}}
    path = greedy_path(errors, savings, {"a": 2, "b": 2})
    # by hand: a 2->3 adds 0.010 for 0.05 (0.2 per share), b 2->3 adds 0.098 for 0.05 (1.96)
    assert path == [{"a": 2, "b": 2}, {"a": 3, "b": 2}, {"a": 3, "b": 3}]


def test_candidates_include_every_uniform_interval_of_every_order():
    sites = ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    cost = CostModel(total=100, site_flops={s: 20 for s in sites}, T=20, first_enhance=2)
    intervals = [2, 3, 5]
    tables = {}
    for order in (1, 2, 3):
        table = {s: {n: (i + 1) * n ** order * 1e-4 for n in intervals} for i, s in enumerate(sites)}
        uniform = {n: 0.5 * n ** order * 1e-3 for n in intervals}
        tables["taylor", order] = {"sq": table, "mse": table, "uniform": {"sq": uniform, "mse": uniform}}
    for group, count in [("site", 4), ("block", 2)]:
        job = Tuner(PsnrTarget(30), {"taylor": None}, TuneOptions([1, 2, 3], intervals, first_enhance=2, group=group))
        groups = job.groups(sites)
        assert len(groups) == count
        # a group's error: its sites' summed (as if measured)
        grouped = {k: {m: {g: {n: sum(t[s][n] for s in members) for n in intervals} for g, members in groups.items()}
                       if m != "uniform" else t for m, t in v.items()} for k, v in tables.items()}
        settings = job.settings({k: record(v) for k, v in grouped.items()}, groups, cost)
        uniform = {(s.order, s.intervals[sites[0]]) for s in settings if s.uniform}
        assert uniform == {(o, n) for o in (1, 2, 3) for n in intervals}
        assert all(a.speedup >= b.speedup for a, b in zip(settings, settings[1:]))  # fastest first
        for s in settings:
            assert s.speedup == pytest.approx(cost.speedup(s.intervals))
            table = tables["taylor", s.order]
            assert s.mse == pytest.approx(anchored(table["mse"], table["uniform"]["mse"], s.base, s.intervals))
            if s.uniform:  # exactly the measured uniform run
                assert s.base == s.intervals[sites[0]] and s.mse == table["uniform"]["mse"][s.base]
        assert any(not s.uniform for s in settings)
    # uniform runs measured on the tuning's images: those candidates carry (and predict) them
    for order in (1, 2, 3):
        tables["taylor", order]["uniform_4_images"] = {"sq": {n: 1e-4 * n for n in intervals},
                                                       "mse": {n: mse_from_psnr(40 - n) for n in intervals}}
    job = Tuner(PsnrTarget(30), {"taylor": None}, TuneOptions([1, 2, 3], intervals, first_enhance=2))
    settings = job.settings({k: record(v) for k, v in tables.items()}, job.groups(sites), cost, 4)
    model = ErrorModel([])
    for s in settings:
        assert (s.measured is not None) == s.uniform
        if s.uniform:
            n = s.base
            assert model.predict(s) == pytest.approx({"speedup": s.speedup, "rel_l2": math.sqrt(1e-4 * n),
                                                      "psnr_db": 40 - n})


def test_sensitivities_are_measured_once_and_reused_from_the_file(tmp_path, monkeypatch):
    cfg = compose_config(SMALL + ["job=tune", "job.target.psnr=30"])
    adapter = build(cfg, "model")
    path = tmp_path / "sensitivity.json"
    families = {"taylor": functools.partial(TaylorSeer, first_enhance=1)}  # what job.predictors instantiates
    job = Tuner(PsnrTarget(30), families, TuneOptions([1], [2, 3], first_enhance=1, group="block",
                                                      sensitivity_images=1, sensitivity_file=str(path)))
    bench = Bench(adapter, "module", seed=0, num_images=2, flops_images=2)  # plain values: no config
    sites = list(CostModel.measure(adapter, "module", 1, 0, 1).site_flops)
    groups, small, full = job.groups(sites), Reference.generate(adapter, 1, 0), Reference.generate(adapter, 2, 0)
    tables, measured = job.sensitivity_tables(bench, groups, small, full, Clock())
    assert measured["runs"] == (len(groups) + 2) * 2 and measured["file"] is None and path.is_file()
    assert set(tables["taylor", 1].as_dict()) == {"sq", "mse", "uniform", "uniform_2_images"}
    # each entry: the squared errors of a real run forecasting that group alone
    one = Setting("taylor", 1, {}, {s: 3 for s in groups["block 1"]}, 1.0, 0.0, 0.0)
    alone = job.cached_quality(bench, one, small, None)
    assert tables["taylor", 1].groups["block 1"].sq[3] == pytest.approx(alone["rel_l2"] ** 2, rel=1e-12)
    assert tables["taylor", 1].groups["block 1"].mse[3] == pytest.approx(mse_from_psnr(alone["psnr_db"]), rel=1e-9)
    monkeypatch.setattr(Tuner, "cached_quality", lambda *a: pytest.fail("measured again"))
    again, reused = job.sensitivity_tables(bench, groups, small, full, Clock())
    assert again == tables and reused["file"] == str(path) and reused["runs"] == measured["runs"]
    # another setup (other intervals) is measured anew
    monkeypatch.undo()
    other = Tuner(PsnrTarget(30), families, TuneOptions([1], [2], first_enhance=1, group="block", sensitivity_images=1,
                                                        sensitivity_file=str(path)))
    assert other.sensitivity_tables(bench, groups, small, full, Clock())[1]["file"] is None
