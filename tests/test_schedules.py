"""Schedules against the full-step sets of docs/library/taylorseer.md and a stateful copy of the official counter."""
from __future__ import annotations

import random

import pytest

from cachelab.core.schedules import Always, Decision, Interval, StepContext


@pytest.mark.parametrize("first_enhance, interval, expected", [
    (2, 5, [0, 1, 6, 11, 16, 21, 26, 31, 36, 41, 46]),
    (3, 6, [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]),
    (1, 5, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]),
])
def test_design_full_step_sets(first_enhance, interval, expected):
    assert Interval(interval, first_enhance).full_steps(50) == expected


def official_counter(T, first_enhance, interval):
    """The official ``cal_type``: a counter called once per step, state kept across calls."""
    counter, full = 0, []
    for step in range(T):
        if step < first_enhance or counter == interval - 1:
            counter = 0
            full.append(step)
        else:
            counter += 1
    return full


def test_matches_official_counter_and_closed_form():
    rng = random.Random(0)
    for _ in range(200):
        T, fe, n = rng.randint(1, 80), rng.randint(1, 6), rng.randint(1, 9)
        ours = Interval(n, fe).full_steps(T)
        assert ours == official_counter(T, fe, n)
        assert ours == [s for s in range(T) if s < fe or (s - fe + 1) % n == 0]


def test_dit_counting_down_is_the_same_set():
    """DiT counts 49 -> 0: full if among the first fe steps or counter == N-1."""
    T, fe, n = 50, 2, 5
    counter, full_down = 0, []
    for step in reversed(range(T)):
        if step > T - fe - 1 or counter == n - 1:
            counter = 0
            full_down.append(step)
        else:
            counter += 1
    assert sorted(T - 1 - step for step in full_down) == Interval(n, fe).full_steps(T)


def test_final_full_and_decide():
    sched = Interval(5, 2, final_full=3)
    full = sched.full_steps(20)
    assert full[-3:] == [17, 18, 19]
    mask = sched.mask(20)
    for s in range(20):
        expected = Decision.FULL if mask[s] else Decision.FORECAST
        assert sched.decide(StepContext(s=s, T=20)) is expected


def test_interval_one_and_always_are_all_full():
    assert Interval(1, 1).full_steps(7) == list(range(7))
    assert Always().full_steps(7) == list(range(7))


@pytest.mark.parametrize("kwargs, key", [(dict(interval=0), "interval"), (dict(interval=3, first_enhance=0),
                                         "first_enhance"), (dict(interval=3, final_full=-1), "final_full")])
def test_bad_parameters(kwargs, key):
    with pytest.raises(ValueError, match=key):
        Interval(**kwargs)


def test_mask_schedule_from_steps_or_bools():
    from cachelab.core.schedules import Mask

    expected = [s in (0, 3, 4) for s in range(6)]
    assert Mask(full_steps=[4, 0, 3, 3]).mask(6) == expected
    assert Mask(mask=[1, 0, 0, 1, 1, 0]).mask(6) == expected
    assert Mask(full_steps=[0, 3, 4]).full_steps(6) == [0, 3, 4]
    with pytest.raises(ValueError, match="mask has 6 entries but the generation has 5 steps"):
        Mask(mask=expected).mask(5)
    with pytest.raises(ValueError, match=r"full_steps \[7\] are beyond the last step 5"):
        Mask(full_steps=[0, 7]).mask(6)
    with pytest.raises(ValueError, match="exactly one"):
        Mask()
    with pytest.raises(ValueError, match="step indices"):
        Mask(full_steps=[-1])
