"""DDIM over the respaced DiT schedule, against closed forms and ADM's sampler written out."""
from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from cachelab.errors import ConfigError
from cachelab.models.diffusion import DDIMSchedule, linear_betas, respaced_timesteps
from cachelab.models.samplers import ddim
from tests.conftest import tiny_adapter


def adm_space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """ADM's ``space_timesteps(T, str(count))`` as a while loop: a Python float ``cur`` starts at 0
    and grows by the stride each step (float accumulation, as the reference); each value of
    ``cur`` is rounded half to even."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    taken, cur = set(), 0.0
    while len(taken) < count:
        taken.add(round(cur))
        cur += stride
    return sorted(taken)


def test_respacing_matches_adm_rule():
    for n in (1, 2, 10, 50, 250, 1000):
        kept = respaced_timesteps(1000, n)
        assert len(kept) == n and kept[0] == 0
        if n > 1:
            assert kept[-1] == 999
            stride = 999 / (n - 1)
            assert all(abs(t - i * stride) <= 0.5 for i, t in enumerate(kept))
    assert respaced_timesteps(1000, 50)[:4] == [0, 20, 41, 61]


def test_respacing_equals_the_reference_rule_at_every_step_count():
    """Every T in 1..1000 against the reference's accumulated stride; rounding ``i * stride`` instead
    differs at .5 ties (T = 21: 999 / 20 * 10 = 499.5 rounds to 500, the accumulated sum to 499)."""
    assert 499 in adm_space_timesteps(1000, 21) and 500 not in adm_space_timesteps(1000, 21)
    wrong = [T for T in range(1, 1001) if respaced_timesteps(1000, T) != adm_space_timesteps(1000, T)]
    assert wrong == []


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
    out = ddim(oracle, noise, DDIMSchedule.respaced(20), before_step=lambda s, t, x: lambda: s % 2 == 0,
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


def adm_ddim(denoise, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """ADM's SpacedDiffusion + ``ddim_sample`` (eta = 0) written out: float64 numpy tables rebuilt
    from the respaced betas, each read per step as a float32 tensor broadcast to x's shape."""
    base = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    use, new_betas, last = adm_space_timesteps(1000, num_steps), [], 1.0
    for i, alpha_cumprod in enumerate(base):
        if i in use:
            new_betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
    ac = np.cumprod(1.0 - np.array(new_betas, dtype=np.float64))
    tables = {"ac_prev": np.append(1.0, ac[:-1]), "recip": np.sqrt(1.0 / ac), "recipm1": np.sqrt(1.0 / ac - 1)}

    def extract(name, i):
        return torch.from_numpy(tables[name])[torch.full((x.shape[0],), i)].float().view(-1, 1, 1, 1).expand(x.shape)

    for i in reversed(range(len(use))):
        eps = denoise(x, torch.full((x.shape[0],), use[i], dtype=torch.long))
        pred_xstart = extract("recip", i) * x - extract("recipm1", i) * eps
        eps = (extract("recip", i) * x - pred_xstart) / extract("recipm1", i)
        alpha_bar_prev, sigma = extract("ac_prev", i), torch.zeros(x.shape)
        x = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    return x


def nonlinear_eps(x, t):
    return torch.tanh(1.3 * x + t.view(-1, 1, 1, 1) / 700.0)


@pytest.mark.parametrize("num_steps", [21, 50])
def test_reference_precision_is_adm_bit_for_bit_and_exact_precision_is_float64_rounded(num_steps):
    """precision="reference": ADM's float32 sampler bit for bit (T = 21 also checks the respacing).
    precision="exact": a float32 run within float32 rounding of a float64 run, which matches DDIM's
    closed form in float64; the two precisions differ (by float32 rounding of alpha_bar_prev)."""
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    reference = ddim(nonlinear_eps, noise, DDIMSchedule.respaced(num_steps, precision="reference"))
    assert torch.equal(reference, adm_ddim(nonlinear_eps, noise, num_steps))
    exact = ddim(nonlinear_eps, noise, DDIMSchedule.respaced(num_steps))
    exact64 = ddim(nonlinear_eps, noise.double(), DDIMSchedule.respaced(num_steps))
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    x, kept = noise.double(), adm_space_timesteps(1000, num_steps)[::-1]
    for t, t_prev in zip(kept, kept[1:] + [None]):
        a_t, a_prev = a[t], (a[t_prev] if t_prev is not None else torch.tensor(1.0, dtype=torch.float64))
        x0 = (x - (1 - a_t).sqrt() * nonlinear_eps(x, torch.full((2,), t))) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    torch.testing.assert_close(exact64, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact.double(), exact64, rtol=1e-5, atol=1e-5)
    assert not torch.equal(exact, reference)
    torch.testing.assert_close(reference.double(), exact64, rtol=1e-4, atol=1e-4)


def test_exact_coefficients_are_the_nearest_float32_and_reference_ones_are_adms():
    """Each coefficient against 40-digit decimal square roots of the same alpha_bar: "exact" rounds to
    the nearest float32 at every step; "reference" is within float32 rounding of sqrt(float32(a_prev))
    and sqrt(1 - float32(a_prev)) (subtraction and root in float32), so its sqrt(1 - a_prev) is off by
    up to ~1e-4 near a_prev = 1."""
    getcontext().prec = 40
    exact, reference = DDIMSchedule.respaced(50), DDIMSchedule.respaced(50, precision="reference")
    worst = 0.0
    for s in range(50):
        a, a_prev = Decimal(float(exact.alpha_bar[s])), Decimal(float(exact.alpha_bar_prev[s]))
        a32_prev = Decimal(float(np.float32(reference.alpha_bar_prev[s])))
        truth = [(1 / a).sqrt(), (1 / a - 1).sqrt(), a_prev.sqrt(), (1 - a_prev).sqrt()]
        adm = [(1 / a).sqrt(), (1 / a - 1).sqrt(), a32_prev.sqrt(), (1 - a32_prev).sqrt()]
        for ours, theirs, want, want_adm in zip(exact.coefficients(s), reference.coefficients(s), truth, adm):
            assert float(np.float32(ours)) == float(np.float32(float(want)))
            assert abs(Decimal(theirs) - want_adm) <= abs(want_adm) * Decimal(2.0**-23)  # two float32 roundings
            assert theirs == float(np.float32(theirs))  # a float32 value, as ADM's tensors hold
            if want:
                worst = max(worst, float(abs(Decimal(theirs) - want) / want))
    assert 1e-5 < worst < 2e-4  # sqrt(1 - a_prev) at the second-last step, a_prev = 0.9999


def test_adapter_reference_precision_samples_as_adm_and_a_bad_value_is_one_line():
    adapter = tiny_adapter(num_steps=21, guidance_scale=1.0, sampler_precision="reference")
    inputs = adapter.make_inputs(2, seed=0)
    model = adapter.model
    expected = adm_ddim(lambda x, t: model(x, t, inputs.labels)[:, : model.in_channels], inputs.noise, 21)
    assert torch.equal(adapter.generate(inputs), expected)
    with pytest.raises(ConfigError, match=r"^sampler_precision='fp16' is not allowed; allowed: exact, reference$"):
        tiny_adapter(sampler_precision="fp16")
