"""diffusers adapters on tiny random pipelines saved and loaded through ``from_pretrained``:
exactness without caching, restore, repeatability, state resets, separate CFG contexts,
step indices from the scheduler, and offline hub ids."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cachelab.errors import WeightsUnavailable
from cachelab.models.pipelines.base import PipelineAdapter
from cachelab.core.controller import attach
from cachelab.core.schedules import Always, Interval, PerKindInterval
from cachelab.core.sites import select_sites
from cachelab.core.strategy import Strategy
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
FAMILIES = ["tiny_diffusers_dit", "tiny_pixart", "tiny_sd3", "tiny_flux", "tiny_wan", "tiny_hunyuan_video",
            "tiny_qwenimage"]  # the last one with no family file
STEPS = 6


def tiny(name: str, folder: Path, **overrides) -> PipelineAdapter:
    """The adapter of ``conf/model/<name>.yaml`` with its pipeline in ``folder``."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.merge_with({"path": str(folder), "num_steps": STEPS, "device": "cpu", **overrides})
    return instantiate(cfg)


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tmp_path_factory) -> PipelineAdapter:
    return tiny(request.param, tmp_path_factory.mktemp(request.param) / "pipe")


def bare_pipeline(adapter: PipelineAdapter, inputs) -> torch.Tensor:
    """The pipeline called directly, as a user would, with nothing of cachelab installed."""
    return adapter.pipe(**adapter.call_arguments(inputs), generator=torch.Generator().manual_seed(inputs.seed),
                        num_inference_steps=STEPS, output_type="pt", return_dict=False)[0].float()


def taylor(adapter, granularity="module", schedule=None):
    return Strategy("taylor", TaylorSeer(2, first_enhance=2), schedule or Interval(3, 2), granularity).attach(adapter)


def test_no_strategy_and_all_full_steps_are_bit_identical_to_the_bare_pipeline(adapter):
    inputs = adapter.make_inputs(2, seed=3)
    bare = bare_pipeline(adapter, inputs)
    assert torch.equal(adapter.generate(inputs), bare)  # strategy=none: the driver alone changes nothing
    for granularity in ("module", "block", "stack", "output"):
        handle = taylor(adapter, granularity, schedule=Always())
        try:
            assert torch.equal(adapter.generate(inputs, handle), bare), granularity
            assert handle.stats().forecast_steps == []
        finally:
            handle.remove()


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_cached_runs_repeat_exactly_and_removal_restores(adapter, granularity):
    inputs = adapter.make_inputs(2, seed=4)
    bare = bare_pipeline(adapter, inputs)
    modules_before = {name: dict(vars(m)) for name, m in adapter.model.named_modules()}
    pipe_before = (dict(vars(adapter.pipe.scheduler)), dict(vars(adapter.model)))
    handle = taylor(adapter, granularity)
    try:
        first = adapter.generate(inputs, handle)
        stats = handle.stats()
        second = adapter.generate(inputs, handle)
    finally:
        handle.remove()
    assert not torch.equal(first, bare)  # the forecasts really replaced computation
    assert torch.equal(second, first)  # no state carried from one call to the next
    assert stats.full_steps == Interval(3, 2).full_steps(STEPS) and stats.fallbacks == 0
    assert stats.cache_bytes > 0
    assert torch.equal(bare_pipeline(adapter, inputs), bare)
    assert {name: dict(vars(m)) for name, m in adapter.model.named_modules()} == modules_before
    assert (dict(vars(adapter.pipe.scheduler)).keys(), dict(vars(adapter.model)).keys()) == \
        (pipe_before[0].keys(), pipe_before[1].keys())


def test_new_batch_size_or_resolution_starts_fresh(adapter):
    """diffusers' own hook raises on a second call at another shape; here the caches reset."""
    handle = taylor(adapter)
    try:
        adapter.generate(adapter.make_inputs(2, seed=0), handle)
        after_other = adapter.generate(adapter.make_inputs(3, seed=1), handle)
    finally:
        handle.remove()
    fresh = taylor(adapter)
    try:
        assert torch.equal(after_other, adapter.generate(adapter.make_inputs(3, seed=1), fresh))
    finally:
        fresh.remove()
    if "height" not in adapter.call_kwargs:  # DiTPipeline has one resolution, its sample size
        return
    inputs, height = adapter.make_inputs(1, seed=2), adapter.call_kwargs["height"]
    handle = taylor(adapter)
    try:
        adapter.generate(inputs, handle)
        adapter.call_kwargs["height"] = 2 * height
        larger = adapter.generate(inputs, handle)
        handle.remove()
        fresh = taylor(adapter)
        expected = adapter.generate(inputs, fresh)
        fresh.remove()
    finally:
        adapter.call_kwargs["height"] = height
    assert larger.shape[-2] == 2 * height and torch.equal(larger, expected)


TRUE_CFG = {  # families whose pipeline calls the transformer twice per step, in cache_context cond / uncond
    "tiny_wan": {},
    "tiny_flux": {"negative_prompt": "blurry", "call_kwargs": {"true_cfg_scale": 2.0}},
    "tiny_hunyuan_video": {"negative_prompt": "blurry", "call_kwargs": {"true_cfg_scale": 2.0}},
    "tiny_qwenimage": {},
}


@pytest.mark.parametrize("name", list(TRUE_CFG))
def test_cond_and_uncond_calls_keep_separate_caches_and_one_decision_per_step(name, tmp_path):
    adapter = tiny(name, tmp_path / "pipe")
    adapter.call_kwargs.update(TRUE_CFG[name].get("call_kwargs", {}))
    if "negative_prompt" in TRUE_CFG[name]:
        adapter.negative_prompt = TRUE_CFG[name]["negative_prompt"]
    adapter.discovered  # noqa: B018 -- the sites are read from one traced call, before the counting starts
    calls, snapshots = [], []
    forward = adapter.model.forward
    adapter.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    handle = taylor(adapter)
    try:
        def snapshot(step):
            snapshots.append({context: {site: cache.states[0].factors[0].clone() for site, cache in caches.items()
                                         if cache.states}  # skip sites hold no history
                              for context, caches in handle._caches.items()})

        adapter.generate(adapter.make_inputs(2, seed=0), handle, callback=snapshot)
        stats = handle.stats()
    finally:
        handle.remove()
        del adapter.model.forward
    assert len(calls) == 2 * STEPS  # two transformer calls per step ...
    assert len(stats.full_steps) + len(stats.forecast_steps) == STEPS  # ... one decision per step
    last = snapshots[-1]
    assert set(last) == {"cond", "uncond"}
    differ = [site for site, value in last["cond"].items() if not torch.equal(value, last["uncond"][site])]
    # every site after the text enters (Wan: block 0's self-attention precedes it) holds its own
    # context's values: guidance survives forecasting
    assert differ and differ == list(last["cond"])[len(last["cond"]) - len(differ):]
    assert list(last["cond"])[-1] in differ


@pytest.mark.parametrize("name", ["tiny_flux", "tiny_hunyuan_video"])
def test_skip_sites_follow_their_consumer(name, tmp_path):
    """Single blocks' attn/proj_mlp are skip sites of proj_out: a per-kind schedule forecasting
    ``attn`` must not starve proj_out (it computes), and a uniform forecast skips them."""
    adapter = tiny(name, tmp_path / "pipe")
    inputs = adapter.make_inputs(1, seed=0)
    pab = PerKindInterval({"attn": 2})
    without_skip = [p for p in adapter.site_patterns("module") if not p.skip]
    results = []
    for patterns in (adapter.site_patterns("module"), without_skip):
        handle = attach(select_sites(adapter.model, patterns), Reuse(), pab)
        results.append(adapter.generate(inputs, handle))
        assert handle.stats().forecast_steps
        handle.remove()
    assert torch.equal(*results)
    processor = adapter.model.single_transformer_blocks[0].attn.processor
    calls = []
    adapter.model.single_transformer_blocks[0].attn.processor = lambda *a, **k: calls.append(1) or processor(*a, **k)
    handle = taylor(adapter, schedule=Interval(3, 2))
    adapter.generate(inputs, handle)
    stats = handle.stats()
    handle.remove()
    adapter.model.single_transformer_blocks[0].attn.processor = processor
    assert len(calls) == len(stats.full_steps) < STEPS


def test_step_index_is_the_scheduler_position_of_the_timestep(tmp_path):
    adapter = tiny("tiny_flux", tmp_path / "pipe")
    seen = []
    handle = taylor(adapter)
    try:
        adapter.generate(adapter.make_inputs(1, seed=0), handle, callback=lambda step: seen.append(
            (step["s"], step["t"], step["full"])))
    finally:
        handle.remove()
    timesteps = adapter.pipe.scheduler.timesteps.tolist()
    mask = Interval(3, 2).mask(STEPS)
    assert seen == [(s, timesteps[s], mask[s]) for s in range(STEPS)]


@pytest.mark.parametrize("name", ["tiny_flux", "tiny_wan"])
def test_discovery_is_a_one_step_pipeline_call_that_runs_to_its_end(name, tmp_path):
    """The sites are read from the transformer's first forward in a one-step generation, which
    ends as any pipeline call does: a step-end callback of the user's runs (nothing is raised
    through the pipeline), no hook is left, and reading the sites sets nothing else on the adapter."""
    from cachelab.core import hooks

    adapter, ends = tiny(name, tmp_path / "pipe"), []
    adapter.call_kwargs["callback_on_step_end"] = lambda pipe, i, t, kwargs: ends.append(i) or {}
    attributes = set(vars(adapter))
    sites = adapter.discovered
    assert ends == [0] and sites.stacks and sites is adapter.discovered
    assert set(vars(adapter)) - attributes == {"pipe", "model", "first_forward"}
    args, kwargs = adapter.first_forward.inputs
    assert float(kwargs["timestep"].flatten()[0]) == pytest.approx(float(adapter.pipe.scheduler.timesteps[0]) /
                                                                   (1000 if name == "tiny_flux" else 1))
    assert not hooks.hooks(adapter.model)


def test_hub_id_offline_fails_at_once_naming_it_and_the_fix(monkeypatch):
    from cachelab.models.pipelines.flux import FluxAdapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match=r"'black-forest-labs/FLUX.1-dev'.*model.path=<local folder>"):
        FluxAdapter("flux_dev", "black-forest-labs/FLUX.1-dev").pipe  # noqa: B018


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_apply_on_the_pipeline_equals_the_family_adapter(adapter, granularity):
    """``cachelab.apply(pipe)`` (sites hooked at the first call, the pipeline driving itself)
    hooks the family adapter's sites (FLUX and HunyuanVideo: the official module sites), with
    the same schedule, and gives its generation bit for bit."""
    import cachelab

    inputs = adapter.make_inputs(2, seed=5)
    family = taylor(adapter, granularity)
    expected = adapter.generate(inputs, family)
    names, full_steps = [site.name for site in family.sites], family.stats().full_steps
    family.remove()
    strategy = Strategy("taylor", TaylorSeer(2, first_enhance=2), Interval(3, 2), granularity)
    with cachelab.apply(adapter.pipe, strategy) as handle:
        assert torch.equal(bare_pipeline(adapter, inputs), expected)
        assert [site.name for site in handle.inner.sites] == names
        assert handle.stats().full_steps == full_steps == Interval(3, 2).full_steps(STEPS)
    assert torch.equal(bare_pipeline(adapter, inputs), adapter.generate(inputs))
