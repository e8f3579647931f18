"""job=tune under a cache budget (``cache.budget``, ``python -m cachelab.tune budget.cache=``):
the planner leaves out every family and order over the budget before any cached run, and the
verification measures the chosen configuration's real peak cache bytes."""
from __future__ import annotations

import pytest

import cachelab
from cachelab.errors import ConfigError
from cachelab.jobs.base import build
from cachelab.jobs.plan import plan_keys
from cachelab.jobs.runner import run
from cachelab.jobs.schema import compose_config
from cachelab.jobs.tuning.tuner import Tuner
from cachelab.tune import argument

SMALL = ["model=tiny_dit_random", "num_steps=8", "num_images=2", "logger=none", "progress=false", "threads=1",
         "measure.flops_images=2", "first_enhance=1"]
TUNE = ["job=tune", "job.target.psnr=25", "job.orders=[1,2]", "job.intervals=[2,3]", "job.sensitivity_images=1",
        "job.calibration_runs=1"]


def planned_bound(cfg, order: int) -> int:
    """The bytes order ``order`` holds with every site recording every step (interval 1), planned."""
    adapter = build(cfg, "model")
    return cachelab.plan(adapter.model, "taylor", order=order, interval=1, first_enhance=1,
                         **plan_keys(cfg, adapter)).cache_bytes


def test_the_tuner_never_runs_an_order_over_the_budget_and_measures_the_chosen_bytes(tmp_path, monkeypatch):
    cfg = compose_config(SMALL + TUNE)
    order1, order2 = planned_bound(cfg, 1), planned_bound(cfg, 2)
    assert order1 < order2
    ran: list[int] = []
    cached_quality = Tuner.cached_quality
    monkeypatch.setattr(Tuner, "cached_quality", lambda self, bench, setting, *a: (
        ran.append(setting.order), cached_quality(self, bench, setting, *a))[1])
    result = run(compose_config(SMALL + TUNE + [f"cache.budget={order1}"]), tmp_path / "tune")
    assert ran and set(ran) == {1}  # no sensitivity or calibration run of order 2
    assert all(t["order"] == 1 for t in result["tries"])
    budget = result["cache_budget"]
    assert budget["budget"] == order1 and budget["excluded"] == ["taylor_o2"]
    assert budget["planned"] == {"taylor_o1": order1, "taylor_o2": order2}
    assert set(result["sensitivity"]) == {"taylor_o1"}
    assert result["met"]
    chosen = budget["chosen"]
    assert chosen["measured"] == result["tries"][-1]["measured"]["cache_bytes"] == chosen["planned"]
    assert 0 < chosen["measured"] <= order1
    assert "Cache budget" in (tmp_path / "tune" / "report.md").read_text()


def test_a_budget_no_candidate_fits_is_refused_in_one_line_before_any_cached_run(tmp_path, monkeypatch):
    monkeypatch.setattr(Tuner, "cached_quality", lambda *a: pytest.fail("a cached run"))
    with pytest.raises(ConfigError) as refused:
        run(compose_config(SMALL + TUNE + ["cache.budget=1KiB"]), tmp_path / "tune")
    line = str(refused.value)
    assert "\n" not in line and "budget 1024 B: no candidate fits" in line and "taylor order 1" in line


def test_job_tune_refuses_whole_blocks_it_would_not_tune():
    from cachelab.jobs.checks import check_config

    with pytest.raises(ConfigError, match="strategy.whole_blocks is not allowed"):
        check_config(compose_config(SMALL + TUNE + [r"strategy.whole_blocks=['blocks\.0']"]))


def test_the_budget_argument_of_python_m_cachelab_tune():
    assert argument("budget.cache=1GiB") == "cache.budget=1GiB"
    assert argument("target.psnr=35") == "job.target.psnr=35"
    assert argument("model=tiny_dit") == "model=tiny_dit"
