"""Adding a schedule is one class, one YAML and one test, as docs/guides/extending.md says: the
class below and a YAML written into a config folder on the search path, nothing else edited. Its
keys are typed by the constructor's signature, its range checked by the constructor, and both
refusals are one line naming the config key and what is allowed."""
from __future__ import annotations

from typing import Annotated

import pytest

from cachelab.core.arguments import at_least, checked
from cachelab.core.schedules import StaticSchedule
from cachelab.errors import ConfigError
from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.checks import check_config, check_group_choices
from cachelab.jobs.runner import run
from cachelab.jobs.schema import compose_config

FAST = ["model=tiny_dit_random", "num_steps=8", "num_images=2", "logger=none", "progress=false", "threads=1",
        "measure.flops=false"]


class EveryKth(StaticSchedule):
    """Full at the first ``start`` steps and then at every step ``s`` with ``s % k == 0``."""

    @checked
    def __init__(self, k: Annotated[int, at_least(2)] = 2, start: Annotated[int, at_least(1)] = 1):
        self.k, self.start = k, start

    def mask(self, T: int) -> list[bool]:
        return [s < self.start or s % self.k == 0 for s in range(T)]


@pytest.fixture
def searched(tmp_path):
    """A config folder holding only ``schedule/every_kth.yaml``: the command line's search path."""
    folder = tmp_path / "conf"
    (folder / "schedule").mkdir(parents=True)
    (folder / "schedule" / "every_kth.yaml").write_text(
        f"# every k-th step full\n_target_: {EveryKth.__module__}.{EveryKth.__qualname__}\nk: 3\nstart: 1\n")
    return [f"hydra.searchpath=[file://{folder}]", "schedule=every_kth"]


def test_a_new_schedule_composes_and_runs(searched, tmp_path):
    check_group_choices(searched, CONFIG_DIR)  # the search path names it
    cfg = compose_config(FAST + searched + ["schedule.k=4"])
    check_config(cfg)
    metrics = run(cfg, tmp_path / "run")
    # by hand: step 0 (the warm-up) and the multiples of 4 below 8
    assert metrics["full_steps"] == [0, 4]
    assert metrics["quality"]["rel_l2"] > 0  # the forecast steps took effect


@pytest.mark.parametrize(("overrides", "message", "stage"), [
    (["schedule.k=1"], "schedule.k=1 is out of range; allowed: integers >= 2", check_config),
    (["schedule.start=0"], "schedule.start=0 is out of range; allowed: integers >= 1", check_config),
    (["schedule.k=abc"], "schedule.k='abc' is not an integer; allowed: integers >= 2", None),
    (["+schedule.every=3"], "schedule.every is not an argument of EveryKth; allowed: k, start", None),
])
def test_a_bad_value_of_the_new_schedule_is_one_line(searched, overrides, message, stage):
    with pytest.raises(ConfigError) as err:
        cfg = compose_config(FAST + searched + overrides)  # a wrong type or key: while composing
        stage(cfg)  # a range: the constructor, called by the config check
    assert str(err.value) == message
