"""Metrics, FLOP counting and atomic writes against independent references."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cachelab.evaluation.flops import count_flops
from cachelab.io import write_json_atomic
from cachelab.evaluation.metrics import psnr, relative_l2, ssim
from cachelab.core.schedules import Interval
from cachelab.strategies.taylor import TaylorSeer
from cachelab.core.strategy import Strategy
from tests.conftest import tiny_adapter


def test_relative_l2_and_psnr_against_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 5, 5, generator=g), torch.rand(3, 1, 5, 5, generator=g)
    an, bn = a.double().numpy(), b.double().numpy()
    assert relative_l2(a, b) == pytest.approx(np.linalg.norm(an - bn) / np.linalg.norm(bn), rel=1e-12)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / np.mean((an - bn) ** 2)), rel=1e-6)
    assert psnr(a, a) == math.inf and relative_l2(a, a) == 0


def test_ssim_against_a_scipy_gaussian_window():
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 24, 24, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    # 11-tap window; scipy's "mirror" is torch's "reflect" padding (d c b | a b c d)
    blur = lambda x: gaussian_filter(x, sigma=1.5, truncate=5 / 1.5, mode="mirror")  # noqa: E731
    maps = []
    for x, y in zip(a.double().numpy().reshape(-1, 24, 24), b.double().numpy().reshape(-1, 24, 24)):
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        m = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        maps.append(m)
    assert ssim(b, a) == pytest.approx(np.mean(maps), rel=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)


def test_flops_of_linear_and_cpu_attention_closed_form():
    layer = nn.Linear(16, 8)
    _, flops = count_flops(lambda: layer(torch.randn(5, 16)))
    assert flops == 2 * 5 * 16 * 8
    q = torch.randn(2, 3, 10, 4)  # (B, H, N, d)
    _, flops = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 10 * 10 * 4)  # QK^T and AV


def test_flops_of_a_cached_generation_follow_the_schedule():
    """Forecast steps skip every attention and MLP: the FLOPs saved are exactly those of the
    skipped branches (counted once on a full step), the rest (adaLN, embed, head) still runs."""
    adapter = tiny_adapter(num_steps=12)
    inputs = adapter.make_inputs(2, seed=0)
    _, base = count_flops(lambda: adapter.generate(inputs))
    handle = Strategy("taylor", TaylorSeer(1, 2), Interval(4, 2), "module").attach(adapter)
    _, cached = count_flops(lambda: adapter.generate(inputs, handle))
    num_forecast = len(handle.stats().forecast_steps)
    model, x = adapter.model, torch.randn(4, 16, 32)
    branches = 0
    for block in model.blocks:
        shift = scale = torch.zeros(4, 32)
        branches += count_flops(lambda: block.attn_branch(x, shift, scale))[1]
        branches += count_flops(lambda: block.mlp_branch(x, shift, scale))[1]
    assert base - cached == num_forecast * branches


@pytest.mark.parametrize("cached", [False, True])
def test_flops_are_linear_in_the_batch(cached):
    """What lets job=compare count FLOPs on measure.flops_images images and scale the count to
    num_images: 2n images cost exactly twice n (guidance, attention and a cache included)."""
    adapter = tiny_adapter(num_steps=8)
    handle = Strategy("taylor", TaylorSeer(2, 2), Interval(3, 2), "module").attach(adapter) if cached else None
    counts = [count_flops(lambda: adapter.generate(adapter.make_inputs(n, seed=0), handle))[1] for n in (3, 6)]
    assert counts[0] > 0 and counts[1] == 2 * counts[0]


def test_atomic_json_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
