"""The top-level shorthands (``order=``, ``interval=``, ``first_enhance=``): a run says in one
line when the one it was given changes nothing (``strategy=toca interval=3``: ToCa's schedule keeps
its own ``schedule.interval``), and only then. The reference is behaviour, not the config text: a
shorthand is unused exactly when two values of it compose to the same resolved strategy, schedule
and job."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.checks import SHORTHANDS, unused_shorthands
from cachelab.jobs.schema import compose_config
from test_cli import check_ok, overrides, run_app

STRATEGIES = sorted(path.stem for path in (CONFIG_DIR / "strategy").glob("*.yaml"))
VALUES = {"order": (1, 3), "interval": (3, 7), "first_enhance": (1, 4)}


def resolved(config) -> dict:
    whole = OmegaConf.to_container(config, resolve=True)
    return {node: whole.get(node) for node in ("strategy", "schedule", "job")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_note_exactly_when_the_shorthand_changes_nothing(strategy):
    for key in SHORTHANDS:
        one, other = (compose_config([f"strategy={strategy}", f"{key}={value}"]) for value in VALUES[key])
        given = [f"strategy={strategy}", f"{key}={VALUES[key][0]}"]
        notes = unused_shorthands(one, given)
        assert bool(notes) == (resolved(one) == resolved(other)), (strategy, key, notes)
        assert all(note.startswith(f"note: {key}={VALUES[key][0]} has no effect here: ") for note in notes)


def test_the_note_names_the_key_that_takes_the_value_instead():
    given = ["strategy=toca", "interval=3"]
    assert unused_shorthands(compose_config(given), given) == [
        "note: interval=3 has no effect here: neither strategy=toca nor its schedule (ToCaInterval) reads the "
        "shorthand (set schedule.interval=3 instead)"]


def test_a_run_says_so_in_its_log(tmp_path):
    proc = run_app([*overrides("strategy=reuse", "order=3", "logger=none"), f"hydra.run.dir={tmp_path}"])
    check_ok(proc)
    line = "note: order=3 has no effect here: neither strategy=reuse nor its schedule (Interval) reads the shorthand"
    assert line in (tmp_path / "run.log").read_text()


def test_from_python_a_shorthand_reaches_the_schedule_that_keeps_its_own():
    """``cachelab.apply(pipe, "toca", interval=3)``: ToCa's schedule takes the interval (it has its
    own ``schedule.interval``), where the top-level shorthand would change nothing."""
    from cachelab.jobs.presets import command_line, preset

    assert preset("toca", interval=3).schedule.interval == 3 != preset("toca").schedule.interval
    assert command_line("toca", interval=3) == ["strategy=toca", "schedule.interval=3"]
    assert preset("taylor", interval=3).schedule.interval == 3
    assert command_line("taylor", interval=3) == ["strategy=taylor", "interval=3"]

