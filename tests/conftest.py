"""Shared fixtures: a tiny DiT adapter small enough for exact checks in milliseconds; a one-node
SLURM cluster for the tests of `hydra/launcher=slurm`."""
from __future__ import annotations

import os

import pytest
import torch

from cachelab.models.dit_adapter import DiTAdapter

torch.set_num_threads(2)


def tiny_adapter(**overrides) -> DiTAdapter:
    kwargs = dict(name="tiny", arch=dict(hidden_size=32, depth=2, num_heads=2, patch_size=2), input_size=8,
                  in_channels=1, num_classes=10, learn_sigma=False, init="random", num_steps=10,
                  guidance_scale=1.5)
    kwargs.update(overrides)
    return DiTAdapter(**kwargs)


@pytest.fixture
def adapter() -> DiTAdapter:
    return tiny_adapter()


REQUIRE_SLURM = "CACHELAB_REQUIRE_SLURM"  # "1" (.ci/run): no SLURM cluster is a failure, not a skip


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster (tests/slurm_cluster.py) for the session, clients pointed at it
    through ``SLURM_CONF``; stopped, with every job and daemon, after the last test. Where it
    cannot start, the tests that use it skip with one line (fail with ``CACHELAB_REQUIRE_SLURM=1``)."""
    from cachelab.jobs.cli import plugin_installed
    from slurm_cluster import Cluster, ClusterUnavailable

    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        if not plugin_installed("hydra_plugins.hydra_submitit_launcher"):
            raise ClusterUnavailable("hydra-submitit-launcher is not installed (pip install -e '.[test]')")
        cluster.start()
    except ClusterUnavailable as why:
        if os.environ.get(REQUIRE_SLURM) == "1":
            pytest.fail(f"no SLURM cluster, and {REQUIRE_SLURM}=1: {why}", pytrace=False)
        pytest.skip(f"no SLURM cluster: {why}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
