"""job=tune (cachelab/jobs/tune.py) and the per-site schedule it writes (PerSiteInterval)."""
from __future__ import annotations

import json

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
from cachelab.jobs.tune import CostModel
from strategies.reuse import Reuse

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
    ({}, "job.target: give exactly one of job.target.psnr, job.target.rel_l2, job.target.speedup .*got none"),
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
