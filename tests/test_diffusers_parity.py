"""Parity with diffusers' own TaylorSeer hook (``TaylorSeerCacheConfig``) on a tiny FLUX pipeline.

With the same sites (its default: every attention module), its schedule written as a step
mask and its derivative rule (a difference at every full step, warm-up included) our
TaylorSeer reproduces it. With the official rule the outputs differ, and switching either
documented difference alone (the schedule: step D forecast, D+1 full; the warm-up
derivatives) is not enough: together they account for all of it.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import TaylorSeerCacheConfig

from cachelab.controller import attach
from cachelab.metrics import relative_l2
from cachelab.schedules import Interval, Mask
from cachelab.sites import SitePattern, select_sites
from strategies.taylor import TaylorSeer
from tests.test_pipelines import tiny

STEPS, INTERVAL, WARMUP, ORDER = 12, 3, 3, 2
TOLERANCE = 1e-6
ATTENTION = [SitePattern(r"(single_)?transformer_blocks\.\d+\.attn")]  # the hook's default identifiers


def diffusers_full_steps(T: int, interval: int, warmup: int) -> list[int]:
    """The hook's rule, read from its code: compute while ``s < D`` or ``(s - D - 1) % N == 0``."""
    return [s for s in range(T) if s < warmup or (s - warmup - 1) % interval == 0]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    adapter = tiny("tiny_flux", tmp_path_factory.mktemp("flux") / "pipe", num_steps=STEPS)
    adapter.inputs = adapter.make_inputs(2, seed=0)
    return adapter


def with_diffusers_hook(adapter) -> torch.Tensor:
    transformer = adapter.pipe.transformer
    transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=INTERVAL, disable_cache_before_step=WARMUP,
                                                   max_order=ORDER, taylor_factors_dtype=torch.float32))
    try:
        return adapter.generate(adapter.inputs)
    finally:
        transformer.disable_cache()


def with_cachelab(adapter, full_steps: list[int], first_enhance: int) -> torch.Tensor:
    handle = attach(select_sites(adapter.model, ATTENTION), TaylorSeer(ORDER, first_enhance, factor_dtype="fp32"),
                    Mask(full_steps=full_steps))
    try:
        return adapter.generate(adapter.inputs, handle)
    finally:
        handle.remove()


def test_the_rules_differ_where_documented():
    official = Interval(INTERVAL, WARMUP).full_steps(STEPS)
    hook = diffusers_full_steps(STEPS, INTERVAL, WARMUP)
    assert official == [0, 1, 2, 5, 8, 11]
    assert hook == [0, 1, 2, 4, 7, 10]  # step D=3 forecast, D+1 full


def test_same_rule_matches_diffusers_taylorseer_hook(flux):
    reference = with_diffusers_hook(flux)
    ours = with_cachelab(flux, diffusers_full_steps(STEPS, INTERVAL, WARMUP), first_enhance=1)
    assert relative_l2(ours, reference) <= TOLERANCE
    assert relative_l2(reference, flux.generate(flux.inputs)) > 1e-4  # the hook really forecast


def test_official_rule_differs_by_exactly_the_documented_differences(flux):
    reference = with_diffusers_hook(flux)
    hook_steps, official_steps = diffusers_full_steps(STEPS, INTERVAL, WARMUP), Interval(INTERVAL, WARMUP).full_steps(STEPS)
    gaps = {
        "official": relative_l2(with_cachelab(flux, official_steps, first_enhance=WARMUP), reference),
        "official schedule only": relative_l2(with_cachelab(flux, official_steps, first_enhance=1), reference),
        "official derivatives only": relative_l2(with_cachelab(flux, hook_steps, first_enhance=WARMUP), reference),
    }
    for name, gap in gaps.items():
        assert gap > 10 * TOLERANCE, (name, gaps)
