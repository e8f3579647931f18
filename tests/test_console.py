"""The command line's surroundings: the console script and its packaged configs, the launcher
extras, a sweep's W&B group and its duplicate jobs, the FID extra on tiny inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from cachelab.errors import ConfigError
from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.cli import check_launcher, plugin_installed
from cachelab.jobs.sweep import claim, fingerprint, group_name, job_count

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_console_script_is_declared_and_the_wheel_carries_every_config():
    """``cachelab`` is cachelab.jobs.cli:console; the configs are package data under the
    cachelab/conf link (what a non-editable install has: docs/getting-started.md has the wheel check)."""
    assert PYPROJECT["project"]["scripts"] == {"cachelab": "cachelab.jobs.cli:console"}
    assert (REPO / "cachelab" / "conf").resolve() == (REPO / "conf").resolve() == CONFIG_DIR
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["cachelab"]
    packaged = {p for pattern in patterns for p in (REPO / "cachelab").glob(pattern)}
    assert packaged == set((REPO / "cachelab" / "conf").rglob("*.yaml"))


def test_the_console_entry_composes_the_packaged_configs_from_any_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "from cachelab.jobs.cli import console; console()", "--cfg", "job",
                           "strategy=reuse", "num_steps=10"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: reuse" in proc.stdout and "num_steps: 10" in proc.stdout
    assert not list(tmp_path.iterdir())  # --cfg composes only


def test_help_is_quick_and_imports_no_torch():
    code = ("import sys; sys.argv = ['cachelab', '--help']\nfrom cachelab.jobs.cli import console\n"
            "try:\n    console()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Powered by Hydra" in proc.stdout and proc.stdout.splitlines()[-1] == "False"


def test_a_launcher_without_its_plugin_is_one_line_naming_the_extra():
    with pytest.raises(ConfigError, match=r"hydra/launcher=local needs the hydra_joblib_launcher plugin, which is "
                                          r"not installed; allowed: pip install 'cachelab\[launchers\]'"):
        check_launcher(["hydra/launcher=local"], installed=lambda module: False)
    with pytest.raises(ConfigError, match="hydra_submitit_launcher"):
        check_launcher(["hydra/launcher=slurm"], installed=lambda module: False)
    check_launcher(["hydra/launcher=local", "strategy=reuse"], installed=lambda module: True)  # installed: no error
    assert not plugin_installed("hydra_plugins.no_such_launcher") and not plugin_installed("no_such_package.plugin")


def test_sweep_group_names_say_when_and_what():
    swept = OverridesParser.create().parse_overrides(["strategy=reuse,taylor", "order=1,2", "num_steps=4",
                                                      "hydra/launcher=local"])
    assert group_name(datetime(2026, 12, 5, 14, 14, 40), swept) == "2026-12-05_14-14-40_strategy-order"
    assert group_name(datetime(2027, 1, 2, 3, 4, 5), swept[2:]) == "2027-01-02_03-04-05_sweep"
    assert job_count(swept) == 4


def test_keys_a_strategy_does_not_use_do_not_make_new_runs(tmp_path):
    reuse = [fingerprint(composed("strategy=reuse", f"order={order}")) for order in (1, 2)]
    taylor = [fingerprint(composed("strategy=taylor", f"order={order}")) for order in (1, 2)]
    assert reuse[0] == reuse[1] and taylor[0] != taylor[1] and reuse[0] not in taylor
    jobs = [tmp_path / str(num) for num in range(3)]
    for job in jobs:
        job.mkdir()
    assert claim(tmp_path, 0, composed("strategy=reuse", "order=1"), jobs[0]) is None
    assert claim(tmp_path, 1, composed("strategy=reuse", "order=2"), jobs[1]) == 0
    assert (jobs[1] / "skipped.txt").read_text() == "the same run as job 0\n"
    assert claim(tmp_path, 2, composed("strategy=taylor", "order=2"), jobs[2]) is None
    assert claim(tmp_path, 0, composed("strategy=reuse", "order=1"), jobs[0]) is None  # resumed: still its own


def test_fid_extra_runs_on_tiny_inputs_against_reference_stats(tmp_path, monkeypatch):
    """The fid extra (torch-fidelity) end to end on 4 tiny images: Inception features against a
    reference .npz. No download here: the Inception weights are left as initialised."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    from cachelab.evaluation.paper_metrics import InceptionFID, evaluate_all

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    reference = tmp_path / "reference.npz"
    np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
    baseline = torch.rand(4, 1, 8, 8)
    results = evaluate_all({"fid": InceptionFID(str(reference))}, baseline, baseline.flip(0), inputs=None)["fid"]
    assert results["num_samples"] == 4
    assert results["fid_baseline"] == pytest.approx(results["fid_cached"]) and np.isfinite(results["fid_cached"])
