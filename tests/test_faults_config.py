"""Limits and silly settings refused (or said) before any model is built, in one line naming
the key; unreadable or mismatched checkpoints named with what was expected and found."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cachelab.errors import CheckpointMismatch, ConfigError
from cachelab.jobs.checks import check_config
from cachelab.models.dit import dit_from_preset, load_checkpoint
from cachelab.strategies.taylor import MAX_ORDER, TaylorSeer

REPO = Path(__file__).resolve().parent.parent
FAST = ["model=tiny_dit_random", "num_images=2", "measure.flops=false", "logger=none", "progress=false"]


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["order=100000000"], f"order=100000000 is out of range; allowed: integers 0..{MAX_ORDER}"),
    ([f"order={MAX_ORDER + 1}"], f"allowed: integers 0..{MAX_ORDER}"),
    (["first_enhance=20", "num_steps=10"], "no forecast step: first_enhance=20 with num_steps=10"),
    (["first_enhance=10", "num_steps=10"], "no forecast step"),
    (["device=tpu"], "device='tpu' is not a device; allowed: cpu, cuda"),
    (["device=cuda:7"] if torch.cuda.is_available() else ["device=cuda"], "device='cuda"),
    (["device=mps"] if not torch.backends.mps.is_available() else ["device=tpu"], "device='"),
])
def test_limits_are_refused_before_building_anything(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg(*FAST, *overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_cap_is_the_predictors_own():
    TaylorSeer(MAX_ORDER)
    with pytest.raises(ValueError, match=f"0..{MAX_ORDER}"):
        TaylorSeer(MAX_ORDER + 1)


def test_an_interval_longer_than_the_run_is_said_once(capsys):
    check_config(make_cfg(*FAST, "interval=20", "num_steps=10"))
    err = capsys.readouterr().err
    assert err == ("warning: interval=20 with num_steps=10: after the 2 warm-up steps every step is forecast "
                   "(2 full steps of 10)\n")


def test_a_fitting_interval_says_nothing(capsys):
    check_config(make_cfg(*FAST, "interval=3", "num_steps=10"))
    assert capsys.readouterr().err == ""


def test_device_on_the_command_line_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", *FAST, "device=tpu", f"hydra.run.dir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: device='tpu' is not a device; allowed: cpu, cuda, cuda:<index>, mps\n"
    assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def small_dit():
    return dit_from_preset("DiT-S/2", input_size=8, num_classes=10)


def test_random_bytes_are_not_a_checkpoint(small_dit, tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(small_dit, path)
    message = str(err.value)
    assert str(path) in message and "not a readable torch checkpoint" in message and "depth 12, width 384" in message


def test_a_checkpoint_of_another_shape_names_what_differs(small_dit, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(dit_from_preset("DiT-S/2", input_size=16, num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(small_dit, path)
    message = str(err.value)
    assert "does not fit" in message and "pos_embed" in message and "(1, 64, 384) vs (1, 16, 384)" in message


def test_a_checkpoint_of_another_depth_names_the_missing_keys(small_dit, tmp_path):
    path = tmp_path / "shallow.pt"
    torch.save(dit_from_preset("DiT-B/2", input_size=8, num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointMismatch, match="expected a state dict of"):
        load_checkpoint(small_dit, path)


def test_a_pickled_object_is_not_a_state_dict(small_dit, tmp_path):
    path = tmp_path / "object.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointMismatch, match="holds a list, not a state dict"):
        load_checkpoint(small_dit, path)


def test_a_matching_checkpoint_still_loads(small_dit, tmp_path):
    path = tmp_path / "same.pt"
    torch.save({"ema": small_dit.state_dict()}, path)
    load_checkpoint(small_dit, path)
