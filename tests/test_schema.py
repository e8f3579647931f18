"""Structured config schemas: Hydra refuses a value of the wrong type while composing, as one
line naming the key and the type (exit 2 on the command line); ranges and cross-key rules stay
in cachelab/jobs/checks.py."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_config
from cachelab.jobs.presets import preset
from cachelab.core.schedules import Interval
from cachelab.jobs.components import schema_of
from cachelab.jobs.schema import AtlasJobSchema, ConfigSchema, compose_config

REPO = Path(__file__).resolve().parent.parent


def test_a_valid_config_composes_typed():
    cfg = compose_config(["job=atlas", "num_images=3", "schedule.final_full=1"])
    check_config(cfg)
    assert OmegaConf.get_type(cfg) is ConfigSchema and OmegaConf.get_type(cfg.job) is AtlasJobSchema
    assert {f.name: f.type for f in fields(schema_of(Interval))} == {"interval": int, "first_enhance": int,
                                                                     "final_full": int}  # from the signature
    assert cfg.num_images == 3


@pytest.mark.parametrize(("overrides", "message"), [
    (["num_images=abc"], "num_images='abc' is not an integer; allowed: integers >= 1"),
    (["measure.flops=maybe"], "measure.flops='maybe' is not allowed; allowed: true, false"),
    (["threads=two"], "threads='two' is not an integer; allowed: integers or null"),
    (["job_timeout_s=soon"], "job_timeout_s='soon' is not a number; allowed: numbers or null"),
    (["strategy=teacache", "schedule.threshold=high"], "schedule.threshold='high' is not a number"),
    (["job=atlas", "job.audit=perhaps"], "job.audit='perhaps' is not allowed; allowed: true, false"),
    (["schedule=mask", "schedule.full_steps=[0,x]"], "schedule.full_steps[1]='x' is not an integer"),
])
def test_a_wrong_type_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_wrong_type_in_python_is_the_same_line():
    with pytest.raises(ConfigError, match=r"^order=1.5 is not an integer; allowed: integers 0\.\.\d+$"):
        preset("taylor", order=1.5)
    with pytest.raises(ConfigError, match="order=-1 is out of range"):
        preset("taylor", order=-1)


def test_a_wrong_type_on_the_command_line_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "-m", "logger=none", "num_images=2,abc",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: num_images='abc' is not an integer; allowed: integers >= 1\n"
    assert not (tmp_path / "sweep").exists()
