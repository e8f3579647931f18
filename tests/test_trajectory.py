"""Trajectory statistics against closed forms on a site whose output is a known function of the step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cachelab.analysis.trajectory import TrajectoryRecorder
from cachelab.core.controller import attach
from cachelab.core.schedules import Always
from cachelab.core.sites import Site
from cachelab.strategies.reuse import Reuse


class Path(nn.Module):
    """Output at step s (read from the input): a + f(s) b, for fixed random a, b (float64)."""

    def __init__(self, f):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        self.b, self.f = torch.randn(3, 4, generator=generator, dtype=torch.float64), f

    def forward(self, s):
        return self.a + self.f(float(s[0])) * self.b


def record(module: Path, T: int, sketch_dim: int = 0) -> TrajectoryRecorder:
    recorder = TrajectoryRecorder(T, sketch_dim)
    handle = attach([Site("path", module)], Reuse(), Always())
    handle.observe(recorder)
    with handle.generation(T):
        for s in range(T):
            handle.step(s)
            module(torch.tensor([s]))
    handle.remove()
    return recorder


def test_statistics_match_closed_forms():
    T = 10
    module = Path(lambda s: s * s)
    stats = record(module, T).stats["path"]
    a, b = module.a.double(), module.b.double()
    F = [a + s * s * b for s in range(T)]
    for s in range(T):
        assert stats["norm"][s] == pytest.approx(float(F[s].norm()), rel=1e-12)
        if s >= 1:
            assert stats["rel_change"][s] == pytest.approx(float((F[s] - F[s - 1]).norm() / F[s - 1].norm()))
            cos = float((F[s] * F[s - 1]).sum() / (F[s].norm() * F[s - 1].norm()))
            assert stats["cosine"][s] == pytest.approx(cos)
        if s >= 2:  # s² has second difference 2 everywhere
            assert stats["rel_second_difference"][s] == pytest.approx(float(2 * b.norm() / F[s - 1].norm()))
    assert np.isnan(stats["rel_change"][0]) and np.isnan(stats["rel_second_difference"][1])


def test_a_straight_path_has_one_principal_component():
    recorder = record(Path(lambda s: 3.0 * s), T=12, sketch_dim=8)
    ((path, explained),) = recorder.pca().values()
    assert explained[0] > 0.9999 and explained.sum() <= 1 + 1e-12
    assert path.shape == (12, 2)
    assert np.abs(path[:, 1]).max() < 1e-4 * np.abs(path[:, 0]).max()
    assert np.allclose(np.diff(path[:, 0]), np.diff(path[:, 0])[0], rtol=1e-4)  # evenly spaced along it
    assert recorder.sketch_bytes == 12 * 4 * 8 + 12 * 8 * 8  # projection (numel x dim, fp32) + sketches (fp64)
