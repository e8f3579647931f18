"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel that ``twine check``
accepts; the wheel holds the configs and the assets under one top-level name, ``cachelab`` (and
Hydra's ``hydra_plugins``); installed in a fresh virtual environment it runs ``cachelab`` from a
folder outside the checkout. Slow (a few minutes, most of them pip installing torch): ``-m "not slow"``
leaves it out; ``python -m pytest`` and .ci/run run it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# the torch/torchvision pair of .ci/run and the README's install
PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Hydra discovers launcher plugins only in the ``hydra_plugins`` namespace package, so the SLURM
# launcher's class (hydra/launcher=slurm) must live there: the one top-level name besides cachelab
TOP_LEVEL = {"cachelab", "hydra_plugins"}


def run(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, command))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def fresh_env() -> dict[str, str]:
    """This process's environment without what points at its Python packages (the fresh venv's pip
    and Python see only the venv), offline for W&B and the hub."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    return env


def shipped(folder: str, prefix: str) -> set[str]:
    """The files under the checkout's ``folder`` as ``prefix/...`` paths, caches left out."""
    return {f"{prefix}/{path.relative_to(REPO / folder).as_posix()}" for path in (REPO / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel of ``python -m build`` (an isolated build: setuptools from the package index)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", out, REPO], timeout=900)
    files = {path.suffix: path for path in out.iterdir()}
    assert set(files) == {".gz", ".whl"}, sorted(out.iterdir())
    return {"sdist": files[".gz"], "wheel": files[".whl"]}


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    out = run([sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"]], timeout=300).stdout
    assert out.count("PASSED") == 2, out


def test_the_wheel_holds_the_configs_and_assets_under_one_top_level_name(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == TOP_LEVEL, f"top-level names other than cachelab (and hydra_plugins): {sorted(top - TOP_LEVEL)}"
    configs, assets = shipped("conf", "cachelab/conf"), shipped("cachelab/assets", "cachelab/assets")
    assert "cachelab/conf/config.yaml" in configs and "cachelab/assets/tiny_dit_mnist.pt" in assets
    assert not (configs | assets) - names, f"missing from the wheel: {sorted((configs | assets) - names)}"
    modules = shipped("strategies", "cachelab/strategies") | shipped("analysis", "cachelab/analysis")
    assert "cachelab/strategies/taylor.py" in modules and not modules - names, sorted(modules - names)
    root = dist["sdist"].name.removesuffix(".tar.gz")
    members = {name.removeprefix(root + "/") for name in tarfile.open(dist["sdist"]).getnames()}
    assert not (configs | assets | modules) - members, sorted((configs | assets | modules) - members)


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh virtual environment with the wheel and the pinned torch pair; removed afterwards (~6 GB)."""
    folder = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", folder], timeout=300, env=fresh_env())
    # --no-compile: torch's thousands of modules are byte-compiled on import instead (halves the install)
    run([folder / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", dist["wheel"], *PINS],
        timeout=1800, env=fresh_env())
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_installed_wheel_runs_from_outside_the_checkout(venv, tmp_path):
    env = fresh_env()
    python, cachelab = venv / "bin" / "python", venv / "bin" / "cachelab"
    where = run([python, "-c", "import cachelab.strategies.taylor as t, cachelab.analysis.sweep as s; "
                               "print(t.__file__); print(s.__file__)"], timeout=300, cwd=tmp_path, env=env).stdout
    assert all(Path(line).is_relative_to(venv) for line in where.split()), where
    gone = subprocess.run([python, "-c", "import strategies"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert gone.returncode == 1 and "ModuleNotFoundError" in gone.stderr, gone.stderr
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert run([cachelab, "--version"], timeout=120, cwd=tmp_path, env=env).stdout.split() == ["cachelab", version]
    listed = run([cachelab, "--list"], timeout=120, cwd=tmp_path, env=env).stdout  # the configs from the wheel
    assert "taylor" in listed and "tiny_dit" in listed, listed

    run([cachelab, "num_images=4", "num_steps=10"], timeout=900, cwd=tmp_path, env=env)
    [metrics] = tmp_path.glob("outputs/*/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert (record["model"], record["strategy"], record["num_images"], record["num_steps"]) == \
        ("tiny_dit", "taylor", 4, 10)
    assert record["flops"]["speedup"] > 1
