"""Parity with other tools' caching on a tiny FLUX pipeline: diffusers' own hooks and, when
installed, cache-dit (``pip install -e ".[peers]"``), each against cachelab set up to mean the
same thing (:mod:`train_free_runs.bench.peers`). Each pair asserts the same full steps, outputs within a
tight tolerance, and that changing one setting on cachelab's side breaks the match.

TaylorSeer (``TaylorSeerCacheConfig``): with the same sites (its default: every attention
module), its schedule written as a step mask and its derivative rule (a difference at every
full step, warm-up included) our TaylorSeer reproduces it. With the official rule the outputs
differ, and switching either documented difference alone (the schedule: step D forecast, D+1
full; the warm-up derivatives) is not enough: together they account for all of it.

FirstBlockCache, MagCache and cache-dit's DBCache reuse one residual per stream for the blocks
they skip, as cachelab's presets do (``stack`` granularity); PAB reuses the same attention
outputs. Only cache-dit's TaylorSeer calibrator evaluates its polynomial in another order.
"""
from __future__ import annotations

import pytest
import torch

from train_free_runs.bench import peers
from cachelab.core.adaptive import MagCache
from cachelab.core.controller import attach
from cachelab.evaluation.metrics import relative_l2
from cachelab.core.schedules import Interval, Mask
from cachelab.core.sites import select_sites
from cachelab.core.strategy import Strategy
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from tests.test_pipelines import tiny

STEPS, INTERVAL, WARMUP, ORDER = 12, 3, 3, 2
TOLERANCE = 1e-6
needs_cache_dit = pytest.mark.skipif(not peers.cache_dit_available(),
                                     reason='cache-dit is not installed (pip install -e ".[peers]")')


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    adapter = tiny("tiny_flux", tmp_path_factory.mktemp("flux") / "pipe", num_steps=STEPS)
    adapter.inputs = adapter.make_inputs(2, seed=0)
    return adapter


def with_diffusers_hook(adapter) -> torch.Tensor:
    return peer_run(adapter, peers.taylorseer(adapter, INTERVAL, WARMUP, ORDER)).output


def with_cachelab(adapter, full_steps: list[int], first_enhance: int) -> torch.Tensor:
    handle = attach(select_sites(adapter.model, peers.ATTENTION), TaylorSeer(ORDER, first_enhance, factor_dtype="fp32"),
                    Mask(full_steps=full_steps))
    try:
        return adapter.generate(adapter.inputs, handle)
    finally:
        handle.remove()


def test_the_rules_differ_where_documented():
    official = Interval(INTERVAL, WARMUP).full_steps(STEPS)
    hook = peers.diffusers_taylorseer_steps(STEPS, INTERVAL, WARMUP)
    assert official == [0, 1, 2, 5, 8, 11]
    assert hook == [0, 1, 2, 4, 7, 10]  # step D=3 forecast, D+1 full


def test_same_rule_matches_diffusers_taylorseer_hook(flux):
    reference = with_diffusers_hook(flux)
    ours = with_cachelab(flux, peers.diffusers_taylorseer_steps(STEPS, INTERVAL, WARMUP), first_enhance=1)
    assert relative_l2(ours, reference) <= TOLERANCE
    assert relative_l2(reference, flux.generate(flux.inputs)) > 1e-4  # the hook really forecast


def test_official_rule_differs_by_exactly_the_documented_differences(flux):
    reference = with_diffusers_hook(flux)
    hook_steps, official_steps = peers.diffusers_taylorseer_steps(STEPS, INTERVAL, WARMUP), Interval(INTERVAL, WARMUP).full_steps(STEPS)
    gaps = {
        "official": relative_l2(with_cachelab(flux, official_steps, first_enhance=WARMUP), reference),
        "official schedule only": relative_l2(with_cachelab(flux, official_steps, first_enhance=1), reference),
        "official derivatives only": relative_l2(with_cachelab(flux, hook_steps, first_enhance=WARMUP), reference),
    }
    for name, gap in gaps.items():
        assert gap > 10 * TOLERANCE, (name, gaps)


# -- the pairs of train_free_runs.bench.peers: same full steps, same outputs, and a changed setting breaks them
def peer_run(adapter, pair: peers.Pair) -> peers.Observation:
    with pair.peer():
        return peers.observe(adapter, adapter.inputs, pair.probe)


def our_run(adapter, pair: peers.Pair, attach_ours=None) -> peers.Observation:
    """cachelab's side of ``pair`` (or ``attach_ours()``, another setting), watched by the pair's probe."""
    handle = (attach_ours or pair.ours)()
    try:
        return peers.observe(adapter, adapter.inputs, pair.probe, handle)
    finally:
        handle.remove()


def assert_parity(peer: peers.Observation, ours: peers.Observation, tolerance: float) -> None:
    assert 1 < len(peer.full_steps) < STEPS, peer.full_steps  # the peer really skipped, and not everything
    assert ours.full_steps == peer.full_steps
    assert relative_l2(ours.output, peer.output) <= tolerance


def assert_broken(peer: peers.Observation, other: peers.Observation, tolerance: float) -> None:
    assert relative_l2(other.output, peer.output) > 10 * tolerance, (other.full_steps, peer.full_steps)


def test_first_block_cache_matches_diffusers_hook_where_it_skips(flux):
    pair = peers.fbcache(flux, threshold=0.4)
    peer = peer_run(flux, pair)
    assert_parity(peer, our_run(flux, pair), TOLERANCE)
    assert_broken(peer, our_run(flux, pair, peers.fbcache(flux, threshold=0.3).ours), TOLERANCE)


@pytest.fixture(scope="module")
def mag_ratios(flux, tmp_path_factory) -> str:
    """diffusers' MagCache calibration of the tiny FLUX, as a file both tools read."""
    ratios = peers.diffusers_mag_ratios(flux, flux.inputs)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    return str(peers.write_mag_ratios(tmp_path_factory.mktemp("magcache") / "ratios.json", flux, ratios))


def test_magcache_matches_diffusers_hook_with_its_retention_rounding(flux, mag_ratios):
    threshold, max_skip, retention = 0.06, 3, 0.3  # retention T = 3.6: diffusers starts at step 4, int() at 3
    pair = peers.magcache(flux, mag_ratios, threshold, max_skip, retention)
    peer = peer_run(flux, pair)
    assert_parity(peer, our_run(flux, pair), TOLERANCE)
    assert peers.magcache_first_step(STEPS, retention) == 4
    as_given = lambda: Strategy("magcache", Reuse(), MagCache(mag_ratios, threshold, max_skip, retention),  # noqa: E731
                                "block").attach(flux)
    assert_broken(peer, our_run(flux, pair, as_given), TOLERANCE)


def test_pab_matches_diffusers_pyramid_attention_broadcast(flux):
    pair = peers.pab(flux, interval=2, window=(100, 800))
    peer = peer_run(flux, pair)
    assert_parity(peer, our_run(flux, pair), TOLERANCE)
    assert_broken(peer, our_run(flux, pair, peers.pab(flux, interval=3, window=(100, 800)).ours), TOLERANCE)


@needs_cache_dit
def test_cache_dit_dbcache_f1b0_matches_first_block_cache(flux):
    pair = peers.dbcache(flux, threshold=0.4)
    peer = peer_run(flux, pair)
    assert torch.equal(peer.output, peer_run(flux, peers.fbcache(flux, threshold=0.4)).output)  # = diffusers' FBCache
    assert_parity(peer, our_run(flux, pair), TOLERANCE)
    assert_broken(peer, our_run(flux, pair, peers.dbcache(flux, threshold=0.3).ours), TOLERANCE)


@needs_cache_dit
def test_cache_dit_taylorseer_calibrator_takes_derivatives_from_step_3(flux):
    """With 3 warm-up steps, step 2 is full: cache-dit takes no derivative there (cachelab's
    ``first_enhance=4``), where ``first_enhance=3`` would."""
    threshold, warmup, order = 0.4, 3, 2
    pair = peers.dbcache(flux, threshold, warmup, order)
    peer = peer_run(flux, pair)
    assert 2 in peer.full_steps
    assert_parity(peer, our_run(flux, pair), TOLERANCE)
    from_step_2 = lambda: peers.first_block_cache(flux, threshold, warmup, TaylorSeer(order, first_enhance=3))  # noqa: E731
    assert_broken(peer, our_run(flux, pair, from_step_2), TOLERANCE)


@needs_cache_dit
def test_cache_dit_leaves_the_pipeline_as_it_was(flux):
    model = flux.model
    before = (list(model._modules), vars(model).get("forward"), flux.generate(flux.inputs))
    peer_run(flux, peers.dbcache(flux, threshold=0.4, order=1))
    after = (list(model._modules), vars(model).get("forward"), flux.generate(flux.inputs))
    assert after[:2] == before[:2]
    assert torch.equal(after[2], before[2])
