"""DDIM over the respaced DiT schedule, against closed forms."""
from __future__ import annotations

import numpy as np
import torch

from cachelab.models.diffusion import DDIMSchedule, linear_betas, respaced_timesteps
from cachelab.models.samplers import ddim


def test_respacing_matches_adm_rule():
    for n in (1, 2, 10, 50, 250, 1000):
        kept = respaced_timesteps(1000, n)
        assert len(kept) == n and kept[0] == 0
        if n > 1:
            assert kept[-1] == 999
            stride = 999 / (n - 1)
            assert all(abs(t - i * stride) <= 0.5 for i, t in enumerate(kept))
    assert respaced_timesteps(1000, 50)[:4] == [0, 20, 41, 61]


def test_schedule_alphas():
    sched = DDIMSchedule.respaced(50)
    alphas_cumprod = np.cumprod(1 - linear_betas())
    assert sched.timesteps[0] == 999 and sched.timesteps[-1] == 0
    np.testing.assert_allclose(sched.alpha_bar, alphas_cumprod[sched.timesteps])
    np.testing.assert_allclose(sched.alpha_bar_prev[:-1], sched.alpha_bar[1:])
    assert sched.alpha_bar_prev[-1] == 1.0
    assert linear_betas()[0] == 1e-4 and linear_betas()[-1] == 0.02


def test_oracle_denoiser_recovers_x0_exactly():
    """With the true noise of x_t = sqrt(a) x0 + sqrt(1-a) eps, DDIM lands on x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    alphas_cumprod = torch.tensor(np.cumprod(1 - linear_betas()))

    def oracle(x, t):
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    noise = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    seen = []
    out = ddim(oracle, noise, DDIMSchedule.respaced(20), before_step=lambda s, t: lambda: s % 2 == 0,
               callback=seen.append)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    assert [e["s"] for e in seen] == list(range(20))
    assert [e["full"] for e in seen] == [s % 2 == 0 for s in range(20)]
    assert seen[0]["t"] == 999 and set(seen[0]) >= {"s", "t", "x", "model_output", "pred_x0", "full"}


def test_one_step_closed_form():
    sched = DDIMSchedule.respaced(10)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x)
    out = ddim(lambda _x, _t: eps, x, DDIMSchedule(sched.timesteps[:1], sched.alpha_bar[:1],
                                                   sched.alpha_bar_prev[:1]))
    a, a_prev = sched.alpha_bar[0], sched.alpha_bar_prev[0]
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    torch.testing.assert_close(out, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps)
