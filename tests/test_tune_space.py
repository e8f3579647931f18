"""job=tune job.search=space: the space's enumerations, the placed full steps against hand sums
and brute force, the bisection against a scan, a candidate's round trip through the command
line, the wall target, and the job end to end on a tiny model."""
from __future__ import annotations

import itertools
import random

import pytest

from cachelab.core.adaptive import ErrorControlled
from cachelab.core.schedules import Interval, StaticSchedule
from cachelab.errors import ConfigError
from cachelab.jobs.base import build_strategy
from cachelab.jobs.benchmark import expand, is_ours, read_tool
from cachelab.jobs.checks import check_config, check_target
from cachelab.jobs.presets import command_line, preset
from cachelab.jobs.runner import run
from cachelab.jobs.schema import compose_config
from cachelab.jobs.tuning.search import SCREEN, SpaceSearch
from cachelab.jobs.tuning.space import Candidate, Family, Frame, Space, placed_full_steps
from cachelab.jobs.tuning.targets import PsnrTarget, SpeedupTarget, WallSpeedupTarget

SMALL = ["model=tiny_dit_random", "num_steps=8", "logger=none", "progress=false", "threads=1"]
TAYLOR = Family("taylor", "taylor", (1, 2))


def default_space(steps: int = 50) -> Space:
    job = compose_config(SMALL + ["job=tune"]).job
    s = job.space
    return Space.of(s.families, s.granularities, s.intervals, s.warm_ups, s.final_full, steps, s.adaptive)


# -- the space -----------------------------------------------------------------------------------
def test_default_intervals_are_every_n_from_2_to_10():
    job = compose_config(SMALL + ["job=tune"]).job
    assert set(range(2, 11)) <= set(job.intervals) and set(range(2, 11)) <= set(job.space.intervals)
    space = default_space()
    frame = space.frames()[0]
    assert [c.value for c in space.interval_axis(frame, 2, 0)] == list(range(2, 11))


def test_frames_are_every_granularity_family_and_order_of_the_registry():
    space = default_space()
    expected = {(g, f.name, o) for g in ("output", "stack", "block", "module") for f in space.families
                for o in (f.orders or (None,))}
    assert {(fr.granularity, fr.family.name, fr.order) for fr in space.frames()} == expected
    assert len(space.frames()) == len(expected)
    assert {f.name for f in space.families} >= {"taylor", "newton", "adams_bashforth", "hicache", "exponential"}
    exponential = next(f for f in space.families if f.name == "exponential")
    assert "order" not in Candidate(Frame("output", exponential, None), 2, 0, "interval", 4).knobs()


def test_one_registry_entry_adds_a_family():
    space = Space.of({"taylor": {"preset": "taylor", "orders": [1]}, "reuse": {"preset": "reuse", "orders": []}},
                     ["output"], [3, 2, 1], [1], [0], 10)
    assert [(f.granularity, f.family.preset, f.order) for f in space.frames()] == [("output", "taylor", 1),
                                                                                    ("output", "reuse", None)]
    assert space.intervals == (2, 3)  # sorted, 1 (always computing) left out


def test_placed_axis_spends_every_count_of_full_steps_the_uniform_intervals_span_and_fewer():
    space = Space.of({"taylor": {"preset": "taylor", "orders": [1]}}, ["output"], range(2, 11), [2], [1], 50)
    frame = space.frames()[0]
    flat = [1.0] * 50
    axis = space.placed_axis(frame, 2, 1, flat)
    counts = [len(c.value) for c in axis]
    assert counts == list(range(sum(Interval(2, 2, 1).mask(50)), 3, -1))  # down to the 3 forced steps and one more
    assert {sum(Interval(n, 2, 1).mask(50)) for n in range(2, 11)} <= set(counts)
    for c in axis:
        assert {0, 1, 49} <= set(c.value)


# -- the placed full steps -----------------------------------------------------------------------
def cost(sensitivity, steps, growth):
    """The predicted error of ``steps`` written as a loop over the forecast steps."""
    total, last = 0.0, None
    for t, s in enumerate(sensitivity):
        if t in steps:
            last = t
        else:
            total += s * (t - last) ** (2 * growth)
    return total


def test_placed_full_steps_on_a_constructed_curve_are_the_hand_computed_ones():
    # Step 5 is sensitive; the other forecastable steps cost 1 (step 3: 2) times k^2 (growth 1).
    # Full steps {0, a, 5}: a=2 costs 1 + (2 + 4) + (1 + 4) = 12, a=3 costs (1 + 4) + 1 + 5 = 11,
    # a=1 and a=4 cost 19; every set without 5 costs at least 50. So [0, 3, 5], where the uniform
    # interval with 3 full steps would be [0, 3, 6].
    curve = [0, 1, 1, 2, 1, 50, 1, 1]
    assert placed_full_steps(curve, 3, 1, 0, 1) == [0, 3, 5]
    assert cost(curve, {0, 3, 5}, 1) == 11 and cost(curve, {0, 2, 5}, 1) == 12
    assert Interval(3, 1).full_steps(8) == [0, 3, 6]


def test_a_flat_curve_gives_the_uniform_interval():
    for T, n in ((9, 3), (20, 4), (50, 5)):  # T a multiple of N: every full step followed by N - 1 forecasts
        uniform = Interval(n, 1).full_steps(T)
        assert placed_full_steps([1.0] * T, len(uniform), 1, 0, 2) == uniform


@pytest.mark.parametrize("seed", range(6))
def test_placed_full_steps_minimise_the_error_against_brute_force(seed):
    rng = random.Random(seed)
    T = rng.randint(6, 10)
    curve = [rng.random() for _ in range(T)]
    d, f, growth = rng.randint(1, 2), rng.randint(0, 1), rng.randint(1, 3)
    forced = set(range(d)) | set(range(T - f, T))
    for count in range(len(forced) + (1 if f == 0 or d + f < T else 0), min(T, len(forced) + 4)):
        best = min(cost(curve, forced | set(rest), growth)
                   for rest in itertools.combinations(sorted(set(range(T)) - forced), count - len(forced)))
        steps = placed_full_steps(curve, count, d, f, growth)
        assert len(steps) == count and forced <= set(steps)
        assert cost(curve, set(steps), growth) == pytest.approx(best, rel=1e-12)


def test_placed_full_steps_refuse_too_few():
    with pytest.raises(ValueError, match="count=2: allowed: 3..8"):
        placed_full_steps([1.0] * 8, 2, 2, 1, 1)


# -- the search ----------------------------------------------------------------------------------
def fake(psnr_of, speed_of=None):
    """A measure whose PSNR and speed are functions of the candidate; counts its calls."""
    calls = []

    def measure(candidate, stage):
        calls.append((candidate, stage))
        return {"speedup": (speed_of or (lambda c: float(c.value)))(candidate), "psnr_db": psnr_of(candidate),
                "rel_l2": 0.01}
    return measure, calls


@pytest.mark.parametrize("level", [28.5, 31, 33.5, 40, 100])
def test_bisection_finds_what_a_scan_finds(level):
    space = Space.of({"taylor": {"preset": "taylor", "orders": [1]}}, ["output"], range(2, 11), [1], [0], 50)
    axis = space.interval_axis(space.frames()[0], 1, 0)
    measure, calls = fake(lambda c: 45 - 2 * c.value)  # 41 dB at N=2 .. 25 dB at N=10
    found = SpaceSearch(PsnrTarget(level), space, measure, lambda frame: []).boundary(axis, "uniform")
    scan = [c for c in axis if 45 - 2 * c.value >= level]
    assert (found.candidate if found else None) == (scan[-1] if scan else None)
    assert len(calls) <= 5  # log2(9) + 1, not 9

    speed = SpaceSearch(SpeedupTarget(level / 5), space, measure, lambda frame: []).boundary(axis, "uniform")
    fast = [c for c in axis if c.value >= level / 5]
    assert (speed.candidate if speed else None) == (fast[0] if fast else None)  # the gentlest: best PSNR


def test_the_search_chooses_the_best_frame_and_verifies_it():
    space = Space.of({"taylor": {"preset": "taylor", "orders": [1, 2]}}, ["output", "module"], range(2, 11),
                     [2, 1], [0, 1], 20)
    quality = {("output", 1): 40, ("output", 2): 46, ("module", 1): 44, ("module", 2): 30}

    def psnr(c):
        base = quality[c.frame.granularity, c.frame.order] + (1 if c.first_enhance == 2 else 0)
        count = len(c.value) if c.schedule == "mask" else sum(Interval(c.value, c.first_enhance, c.final_full).mask(20))
        return base - 60 / count

    def speed(c):
        count = len(c.value) if c.schedule == "mask" else sum(Interval(c.value, c.first_enhance, c.final_full).mask(20))
        return 20 / count

    measure, calls = fake(psnr, speed)
    chosen, found = SpaceSearch(PsnrTarget(33), space, measure, lambda frame: [1.0] * 20, keep=2, verify=2).run()
    every = [c for frame in space.frames() for d in (2, 1) for f in (0, 1) for c in space.interval_axis(frame, d, f)]
    best = max((speed(c), psnr(c)) for c in every if psnr(c) >= 33)
    assert (speed(chosen.candidate), psnr(chosen.candidate)) == best
    assert chosen.verified is not None and chosen.candidate.frame.order == 2
    assert sum(stage == SCREEN for _, stage in calls) < len(every)  # cheaper than scanning the space


def test_verification_goes_on_down_the_ranking_until_one_meets_the_target():
    space = Space.of({"taylor": {"preset": "taylor", "orders": [1]}}, ["output", "block", "module"], range(2, 11),
                     [1], [0], 50)
    optimism = {"output": 3.0, "block": 2.0, "module": 0.0}  # the screening images flatter the first two frames

    def measure(c, stage):
        psnr = 45 - 2 * c.value + (optimism[c.frame.granularity] if stage == SCREEN else 0)
        return {"speedup": float(c.value) + {"output": 0.2, "block": 0.1, "module": 0}[c.frame.granularity],
                "psnr_db": psnr, "rel_l2": 0.01}

    search = SpaceSearch(PsnrTarget(33), space, measure, lambda frame: [1.0] * 50, keep=0, verify=2)
    chosen, found = search.run()
    assert [f.candidate.frame.granularity for f in found if f.verified is not None] == ["output", "block", "module"]
    assert chosen.candidate.frame.granularity == "module" and chosen.verified["psnr_db"] >= 33


# -- the candidate on the command line ----------------------------------------------------------
CANDIDATES = [
    Candidate(Frame("output", TAYLOR, 2), 3, 1, "interval", 5),
    Candidate(Frame("block", Family("adams_bashforth", "adams_bashforth", (2,)), 2), 2, 0, "mask", (0, 1, 4, 7)),
    Candidate(Frame("module", Family("newton", "taylor_newton", (3,)), 3), 1, 2, "error_controlled", 0.05, "tolerance"),
    Candidate(Frame("stack", Family("exponential", "exponential", ()), None), 2, 0, "interval", 4),
]


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: c.label())
def test_a_candidate_round_trips_through_the_command_line(candidate):
    direct = preset(candidate.preset, **candidate.knobs())
    args = command_line(candidate.preset, **candidate.knobs())
    composed = build_strategy(compose_config(args))
    assert type(composed.predictor) is type(direct.predictor) and composed.granularity == candidate.frame.granularity
    assert type(composed.schedule) is type(direct.schedule)
    if candidate.frame.order is not None:
        assert composed.predictor.order == direct.predictor.order == candidate.frame.order
    if isinstance(composed.schedule, StaticSchedule):
        expected = (list(candidate.value) if candidate.schedule == "mask" else
                    Interval(candidate.value, candidate.first_enhance, candidate.final_full).full_steps(10))
        assert composed.schedule.full_steps(10) == direct.schedule.full_steps(10) == expected
    else:
        assert isinstance(composed.schedule, ErrorControlled)
        assert composed.schedule.tolerance == direct.schedule.tolerance == candidate.value
        assert composed.schedule.first_enhance == candidate.first_enhance == direct.schedule.first_enhance
        assert composed.schedule.final_full == candidate.final_full


# -- the wall target ----------------------------------------------------------------------------
def test_wall_target_is_measured_and_refused_by_the_per_site_search():
    target = check_target({"wall_speedup": 1.5})
    assert isinstance(target, WallSpeedupTarget) and not target.gentle_meets
    assert target.met({"wall_speedup": 1.6, "speedup": 1.0}) and not target.met({"wall_speedup": 1.4, "speedup": 9.0})
    assert target.objective({"psnr_db": 33.0, "speedup": 2.0}) == 33.0
    with pytest.raises(ConfigError, match="job.target.wall_speedup is measured, not predicted.*allowed: job.search=space"):
        check_config(compose_config(SMALL + ["job=tune", "job.target.wall_speedup=1.5"]))
    check_config(compose_config(SMALL + ["job=tune", "job.target.wall_speedup=1.5", "job.search=space"]))
    with pytest.raises(ConfigError, match="job.search"):
        check_config(compose_config(SMALL + ["job=tune", "job.target.psnr=30", "job.search=grid"]))


# -- end to end ---------------------------------------------------------------------------------
def test_the_space_search_writes_a_choice_the_benchmark_and_the_command_line_run(tmp_path):
    args = SMALL + ["job=tune", "job.target.speedup=1.1", "job.search=space", "job.space.granularities=[output]",
                    "~job.space.families.newton", "~job.space.families.hicache", "~job.space.families.exponential",
                    "~job.space.families.adams_bashforth", "job.space.families.taylor.orders=[1]",
                    "job.space.warm_ups=[1]", "job.space.final_full=[0]", "job.space.screen_images=1",
                    "job.space.verify_images=1", "job.space.sensitivity_images=1", "job.space.keep=1",
                    "job.space.verify=1", f"job.space.probe_file={tmp_path / 'probes.json'}"]
    cfg = compose_config(args)
    result = run(cfg, tmp_path / "run")
    assert result["met"] and result["chosen"]["verified"]["speedup"] >= 1.1
    assert len(result["sensitivity"]["taylor o1 output"]) == 8
    points = expand(read_tool(tmp_path / "run" / "benchmark_tool.yaml"), "tuned", "tiny_dit_random")
    assert len(points) == 1 and is_ours(points[0].tool) and points[0].knobs == result["chosen"]["knobs"]
    again = run(cfg, tmp_path / "again")  # every measurement read back from the probe file
    assert again["probes"]["reused"] > 0 and again["chosen"] == result["chosen"]
    assert "screen" not in again["cost"]
    command = (tmp_path / "run" / "tuned_command.txt").read_text().split()
    assert command[:2] == ["python", "run.py"] and f"strategy={points[0].target}" in command


def test_each_cachelab_tool_is_compared_with_the_best_peer_and_all_of_them_together():
    import numpy as np

    from cachelab.jobs.benchmark import GridPoint, Measured, level_summary

    def point(tool, speed, mse):
        row = {"tool": tool, "flag": "", "flops_speedup": speed, "wall_speedup": speed}
        return Measured(GridPoint(tool, "t", "cachelab", "x", {}, str(speed)), row, np.full(8, mse))

    base = Measured(None, {"tool": "full compute", "flag": ""}, np.zeros(8))
    held = [base, point("cachelab", 4.0, 1e-4), point("cachelab tuned", 6.0, 1e-4), point("peer", 3.0, 1e-4)]
    summary = level_summary(held, [30.0], 50, 0, 0.0)["flops_speedup"]
    assert set(summary["ratio_per_tool"]) == {"cachelab", "cachelab tuned"} and not is_ours("peer")
    assert summary["ratio_per_tool"]["cachelab"][0]["ratio"] == pytest.approx(4 / 3)
    assert summary["ratio_per_tool"]["cachelab tuned"][0]["ratio"] == pytest.approx(2.0)
    assert summary["ratio"][0]["ratio"] == pytest.approx(2.0)  # all of cachelab's tools together: the best
