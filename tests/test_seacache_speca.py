"""SeaCache and SpeCa: the SEA filter against explicit DFT matrices in float64 (and diffusers' own
filter), SeaCache's decisions on latents whose indicator distances are known, SpeCa's
accept/reject rule on constructed errors, and both through the controller on the tiny DiT."""
from __future__ import annotations

import math

import pytest
import torch

from cachelab.core.adaptive import SeaCache, SpeCa
from cachelab.core.schedules import Decision, StepContext
from cachelab.core.spectral import sea_filter
from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_config
from cachelab.jobs.runner import run
from cachelab.jobs.schema import compose_config

FAST = ["model=tiny_dit_random", "num_images=2", "logger=none", "progress=false", "threads=1", "measure.flops=false"]


def dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n)


def sea_reference(x: torch.Tensor, logsnr: float, power: float) -> torch.Tensor:
    """The SEA filter of a (B, C, H, W) float64 latent by DFT matrices: per axis the gain
    a P / (a^2 P + b^2) with P = 1 / (|f|^power + 1e-16), a = 1 / sqrt(1 + r), b = sqrt(r / (1 + r)),
    r = exp(-logsnr) (diffusers' form, with the signal and noise scales), the product scaled to unit mean."""
    r = math.exp(-logsnr)
    a, b = 1 / math.sqrt(1 + r), math.sqrt(r / (1 + r))
    H, W = x.shape[-2:]
    gains = []
    for n in (H, W):
        f = torch.tensor([k / n if k < (n + 1) // 2 else k / n - 1 for k in range(n)], dtype=torch.float64)
        P = 1 / (f.abs() ** power + 1e-16)
        gains.append(a * P / (a * a * P + b * b))
    gain = gains[0][:, None] * gains[1][None, :]
    gain = gain / gain.mean()
    spectrum = dft(H) @ x.to(torch.complex128) @ dft(W).T
    return ((dft(H).conj() @ (spectrum * gain) @ dft(W).conj().T) / (H * W)).real


@pytest.mark.parametrize(("shape", "logsnr", "power"), [((2, 3, 8, 8), 0.0, 3.0), ((1, 4, 6, 10), -3.0, 2.0),
                                                         ((2, 2, 7, 5), 5.0, 3.0)])
def test_sea_filter_is_the_dft_reference(shape, logsnr, power):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64)
    torch.testing.assert_close(sea_filter(x, logsnr, power), sea_reference(x, logsnr, power), rtol=1e-10, atol=1e-10)
    tokens = x.permute(0, 2, 3, 1).reshape(shape[0], shape[2] * shape[3], shape[1])  # (B, N, D) on the grid
    if shape[2] == shape[3]:
        torch.testing.assert_close(sea_filter(tokens, logsnr, power),
                                   sea_reference(x, logsnr, power).permute(0, 2, 3, 1).reshape(tokens.shape),
                                   rtol=1e-10, atol=1e-10)


def test_sea_filter_is_diffusers_filter_at_a_flow_sigma():
    sea_cache = pytest.importorskip("diffusers.hooks.sea_cache")
    latent = torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(0))  # (T, H, W, C), diffusers' layout
    for sigma in (0.1, 0.5, 0.9):
        theirs = sea_cache._apply_sea_filter(latent, sigma, 3.0)
        ours = sea_filter(latent.permute(3, 0, 1, 2)[None].double(), 2 * math.log((1 - sigma) / sigma), 3.0)
        torch.testing.assert_close(ours[0].permute(1, 2, 3, 0).float(), theirs, rtol=1e-5, atol=1e-5)


def test_seacache_accumulates_the_indicator_change():
    # x_s = c_s Z at one noise level: I_s = c_s G(Z), so d_s = |c_s - c_{s-1}| / c_{s-1} exactly
    scales = [1.0, 1.1, 1.155, 1.2705, 1.27, 1.40, 1.41, 1.42, 1.43, 1.44]
    T = len(scales)
    Z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    schedule = SeaCache(threshold=0.12, first_enhance=1, final_full=1, max_consecutive_forecasts=2)
    decisions, accumulated, reference = [], 0.0, []
    for s, c in enumerate(scales):
        ctx = StepContext(s=s, T=T, signals={"latent": c * Z}, logsnr=0.5)
        decisions.append(schedule.decide(ctx) is Decision.FULL)
    in_a_row = 0
    for s in range(T):  # the rule by hand
        if s == 0 or s == T - 1 or in_a_row == 2:
            full = True
        else:
            accumulated += abs(scales[s] - scales[s - 1]) / scales[s - 1]
            full = accumulated >= 0.12
        accumulated = 0.0 if full else accumulated
        in_a_row = 0 if full else in_a_row + 1
        reference.append(full)
    assert decisions == reference
    assert reference == [True, False, True, False, False, True, False, False, True, True]  # threshold, cap, cap, last


def test_seacache_needs_the_noise_level():
    schedule = SeaCache()
    with pytest.raises(ValueError, match="grid"):
        schedule.decide(StepContext(s=0, T=4, signals={"latent": torch.ones(1, 1, 4, 4)}))


# -- SpeCa ----------------------------------------------------------------------------------
def test_speca_tolerance_and_accept_reject_on_constructed_errors():
    schedule = SpeCa(tolerance=0.1, decay=0.01, floor=0.01)
    T = 50
    for s in (0, 10, 24, 40, 49):
        assert schedule.tolerance_at(s, T) == pytest.approx(max(0.1 * 0.01 ** ((s + 1) / T), 0.01))
    assert schedule.tolerance_at(0, T) == pytest.approx(0.1 * 0.01 ** 0.02)
    assert schedule.tolerance_at(30, T) == 0.01  # past halfway: the floor
    tau = schedule.tolerance_at(10, T)
    assert schedule.accepts(torch.tensor([tau * 0.99, tau * 0.5]), 10, T)
    assert schedule.accepts(torch.tensor([tau, tau]), 10, T)  # at the tolerance: accepted
    assert not schedule.accepts(torch.tensor([tau * 0.5, tau * 1.01]), 10, T)  # one sample rejects: all compute
    assert not schedule.accepts(torch.tensor([0.02]), 40, T)


def drive(schedule: SpeCa, T: int, errors_at) -> tuple[list[int], list[int]]:
    """Decide every step, feeding the check of each verified forecast step (``errors_at(s)``)."""
    full, verified, check = [], [], None
    schedule.reset()
    for s in range(T):
        decision = schedule.decide(StepContext(s=s, T=T, signals={"verification_error": check}))
        check = None
        if decision is Decision.FULL:
            full.append(s)
        elif schedule.verifies(s, T):
            verified.append(s)
            check = (s, torch.tensor(errors_at(s)))
    return full, verified


def test_speca_drafts_until_a_check_fails_or_the_cap():
    schedule = SpeCa(tolerance=0.1, decay=1.0, floor=0.0, min_drafts=2, max_drafts=5, first_enhance=3)
    # every check passes: warm-up 0-2, then five drafts and a full step
    full, verified = drive(schedule, 16, lambda s: [0.0, 0.0])
    assert full == [0, 1, 2, 8, 14]
    assert verified == [4, 5, 6, 10, 11, 12]  # the 2nd to 4th drafts; the 5th is followed by a forced full step
    # every check fails: the second draft's check makes the next step full
    full, verified = drive(schedule, 12, lambda s: [0.0, 0.5])
    assert full == [0, 1, 2, 5, 8, 11]
    assert verified == [4, 7, 10]
    # the check at step 5 fails only
    full, _ = drive(schedule, 14, lambda s: [0.2] if s == 5 else [0.05])
    assert full == [0, 1, 2, 6, 12]


def speca_run(*extra: str):
    cfg = compose_config(FAST + ["num_steps=14", "strategy=speca", *extra])
    check_config(cfg)
    return cfg


def test_speca_through_the_controller_checks_the_last_site(tmp_path):
    lenient = run(speca_run("schedule.tolerance=1000", "schedule.floor=1"), tmp_path / "lenient")
    assert lenient["full_steps"] == [0, 1, 2, 8]
    strict = run(speca_run("schedule.tolerance=1e-12", "schedule.floor=1e-12"), tmp_path / "strict")
    assert strict["full_steps"] == [0, 1, 2, 5, 8, 11]  # the drafts' real errors exceed any tiny tolerance


def test_speca_at_one_site_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="granularity"):
        run(speca_run("strategy.granularity=output"), tmp_path / "run")


def test_seacache_through_the_controller(tmp_path):
    cfg = compose_config(FAST + ["num_steps=12", "strategy=seacache", "schedule.threshold=1000"])
    check_config(cfg)
    metrics = run(cfg, tmp_path / "run")
    # a threshold never reached: the cap (2 forecasts in a row), the first and the last step decide
    assert metrics["full_steps"] == [0, 3, 6, 9, 11]


def test_speca_checks_the_last_site_that_computes_from_its_own_inputs():
    from torch import nn

    from cachelab.core.verification import checked_site
    from cachelab.core.sites import Site

    owner = nn.Identity()
    double = [Site("transformer_blocks.0.attn", owner), Site("transformer_blocks.0.ff", owner)]
    single = [Site("single_transformer_blocks.0.attn", owner, skip="proj_out"),
              Site("single_transformer_blocks.0.proj_mlp", owner, skip="proj_out"),
              Site("single_transformer_blocks.0.proj_out", owner)]
    # the single block's proj_out is fed by skipped sites (zeros on a forecast step): not checkable
    assert checked_site(double + single) == "transformer_blocks.0.ff"
    assert checked_site(double) == "transformer_blocks.0.ff"
    with pytest.raises(ConfigError, match="granularity"):
        checked_site([Site("stack", owner, members=(owner, owner))])
