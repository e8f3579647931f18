"""The planner (cachelab.plan) against real generations: on tiny models its cache bytes equal the
peak the controller measured and its FLOPs the FLOPs counted (torch.utils.flop_counter) exactly."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

import cachelab
from cachelab.errors import ConfigError
from cachelab.evaluation.flops import count_flops_per_call
from cachelab.planner import size_text
from tests.conftest import tiny_adapter

STEPS = 10
STRATEGY = dict(order=2, interval=3, first_enhance=2)


def transformer_flops(pipe, call) -> int:
    """FLOPs of the transformer's calls (every expert's) inside ``call()``."""
    owners = {name: (getattr(pipe, name), "forward") for name in ("transformer", "transformer_2")
              if getattr(pipe, name, None) is not None}
    _, _, per = count_flops_per_call(call, owners)
    return sum(per.values())


def tiny_pipeline(adapter_class, tmp_path: Path):
    import diffusers

    return getattr(diffusers, adapter_class.pipeline_class)(**adapter_class.tiny_components(tmp_path)).to(torch.float32)


def check_pipeline(pipe, call_kwargs: dict, plan_keys: dict, strategy: str = "taylor", **keys):
    """A cached generation of ``pipe`` (after one that hooks the sites) against the plan."""
    keys = {**STRATEGY, **keys}

    def generate(steps: int):
        torch.manual_seed(0)
        return pipe("a digit seven", num_inference_steps=steps, output_type="latent", **call_kwargs)

    uncached = transformer_flops(pipe, lambda: generate(STEPS))
    planned = cachelab.plan(pipe, strategy, num_inference_steps=STEPS, **plan_keys, **keys)
    with cachelab.apply(pipe, strategy, **keys) as handle:
        generate(2)  # finds the sites (a traced call, not counted)
        cached = transformer_flops(pipe, lambda: generate(STEPS))
        stats = handle.stats()
    assert stats.cache_bytes > 0
    assert planned.cache_bytes == stats.cache_bytes
    assert planned.flops_total == cached
    assert planned.flops_full_step * STEPS == uncached
    assert planned.full_steps == len(stats.full_steps)
    assert planned.flops_speedup == pytest.approx(uncached / cached)
    return planned


def flux_digits_call():
    """The shipped FLUX digits pipeline, its call's keywords (guidance 3.5) and the matching plan keys."""
    from diffusers import FluxPipeline

    from cachelab.models.pipelines import flux_digits

    pipe = FluxPipeline.from_pretrained(flux_digits.verified_folder())
    return (pipe, dict(flux_digits.CALL_KWARGS, guidance_scale=3.5),
            dict(height=32, width=32, text_tokens=flux_digits.MAX_SEQUENCE_LENGTH))


def test_the_plan_of_tiny_flux_digits_is_its_measured_cache_and_flops():
    from diffusers import FluxPipeline

    from cachelab.models.pipelines import flux_digits

    pipe = FluxPipeline.from_pretrained(flux_digits.verified_folder())
    check_pipeline(pipe, dict(flux_digits.CALL_KWARGS, guidance_scale=3.5),
                   dict(height=32, width=32, text_tokens=flux_digits.MAX_SEQUENCE_LENGTH, guidance=3.5))


def test_bf16_factors_and_block_sites_are_planned_exactly_too():
    pipe, kwargs, plan_keys = flux_digits_call()
    fp32 = check_pipeline(pipe, kwargs, plan_keys)
    bf16 = check_pipeline(pipe, kwargs, plan_keys, factor_dtype="bf16")
    assert bf16.cache_bytes * 2 == fp32.cache_bytes  # every factor in half the bytes
    check_pipeline(pipe, kwargs, plan_keys, granularity="block")


def test_fp8_and_int8_factors_are_planned_exactly_scales_included():
    pipe, kwargs, plan_keys = flux_digits_call()
    fp8 = check_pipeline(pipe, kwargs, plan_keys, factor_dtype="fp8_e4m3")
    mixed = check_pipeline(pipe, kwargs, plan_keys, factor_dtype=["bf16", "int8_token"])
    # by hand from the sites' shapes (B, N, C): per factor, one byte per element and a float32
    # scale per sample and channel (fp8) or per token (int8_token); bf16: two bytes per element
    elements = sum(math.prod(shape) for site in fp8.sites for shape in site.shapes)
    channels = sum(shape[0] * shape[-1] for site in fp8.sites for shape in site.shapes)
    tokens = sum(math.prod(shape[:-1]) for site in fp8.sites for shape in site.shapes)
    assert fp8.cache_bytes == 3 * (elements + 4 * channels)
    assert mixed.cache_bytes == 2 * elements + 2 * (elements + 4 * tokens)


def test_per_site_orders_and_whole_blocks_are_planned_exactly():
    """Mixed orders and mixed granularity: the plan is the measured peak and FLOPs, and the
    bytes are the per-site closed form (each site's factors times its record's bytes)."""
    pipe, kwargs, plan_keys = flux_digits_call()
    module = check_pipeline(pipe, kwargs, plan_keys)
    orders = {3: [r"transformer_blocks\.0\..*"], 1: [r"single_.*"]}
    mixed = check_pipeline(pipe, kwargs, plan_keys, site_orders=orders)
    per_factor = {site.name: site.nbytes // 3 for site in module.sites}  # order 2 everywhere: 3 factors
    factors = {name: 4 if name.startswith("transformer_blocks.0.") else 2 if name.startswith("single_") else 3
               for name in per_factor}
    assert mixed.cache_bytes == sum(per_factor[name] * factors[name] for name in per_factor)
    whole = check_pipeline(pipe, kwargs, plan_keys, whole_blocks=[r"single_transformer_blocks\.\d+"],
                           site_orders={0: [r"transformer_blocks\.1\..*"]})
    block = check_pipeline(pipe, kwargs, plan_keys, granularity="block")
    names = [site.name for site in whole.sites]
    assert names[:6] == [name for name in per_factor if name.startswith("transformer_blocks.")]
    assert names[6:] == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    single = {site.name: site.nbytes for site in block.sites if site.name.startswith("single_")}
    assert whole.cache_bytes == (sum(per_factor[n] * (1 if n.startswith("transformer_blocks.1.") else 3)
                                     for n in per_factor if n.startswith("transformer_blocks."))
                                 + sum(single.values()))


def test_the_native_dit_with_mixed_orders_and_a_whole_block_is_planned_exactly():
    adapter = tiny_adapter()
    keys = dict(STRATEGY, site_orders={1: [r"blocks\.0"], 0: [r"blocks\.1\.mlp"]}, whole_blocks=[r"blocks\.0"])
    planned = cachelab.plan(adapter.model, "taylor", num_inference_steps=adapter.num_steps, batch_size=3,
                            guidance=adapter.guidance_scale, **keys)
    with cachelab.apply(adapter.model, "taylor", **keys) as handle:
        adapter.generate(adapter.make_inputs(3, seed=0), handle)
        assert [site.name for site in handle.inner.sites] == ["blocks.0", "blocks.1.attn", "blocks.1.mlp"]
        assert planned.cache_bytes == handle.stats().cache_bytes
    # by hand: (2 factors at blocks.0 + 3 at blocks.1.attn + 1 at blocks.1.mlp) x (6 x 16 x 32) fp32
    assert planned.cache_bytes == (2 + 3 + 1) * 6 * 16 * 32 * 4


def test_the_plan_of_a_tiny_wan_with_two_cfg_calls_per_step(tmp_path):
    from cachelab.models.pipelines.wan import WanAdapter

    pipe = tiny_pipeline(WanAdapter, tmp_path)
    planned = check_pipeline(pipe, dict(height=64, width=64, num_frames=5, guidance_scale=5.0, max_sequence_length=16),
                             dict(height=64, width=64, num_frames=5, text_tokens=16, guidance=5.0))
    alone = cachelab.plan(pipe, "taylor", num_inference_steps=STEPS, height=64, width=64, num_frames=5,
                          text_tokens=16, guidance=1.0, **STRATEGY)
    assert planned.cache_bytes == 2 * alone.cache_bytes  # cond and uncond: one cache each


def test_the_plan_of_a_tiny_sd3_with_cfg_in_the_batch(tmp_path):
    from cachelab.models.pipelines.sd3 import SD3Adapter

    pipe = tiny_pipeline(SD3Adapter, tmp_path)
    check_pipeline(pipe, dict(height=32, width=32, guidance_scale=4.0, max_sequence_length=16),
                   dict(height=32, width=32, text_tokens=77 + 16, guidance=4.0))


def test_the_plan_of_the_native_dit_is_its_measured_cache_and_flops():
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(3, seed=0)
    planned = cachelab.plan(adapter.model, "taylor", num_inference_steps=adapter.num_steps, batch_size=3,
                            guidance=adapter.guidance_scale, **STRATEGY)
    uncached = count_flops_per_call(lambda: adapter.generate(inputs), {"dit": (adapter.model, "forward")})[2]["dit"]
    with cachelab.apply(adapter.model, "taylor", **STRATEGY) as handle:
        adapter.generate(adapter.make_inputs(3, seed=1), handle)  # finds the sites
        cached = count_flops_per_call(lambda: adapter.generate(inputs, handle),
                                      {"dit": (adapter.model, "forward")})[2]["dit"]
        stats = handle.stats()
    assert planned.cache_bytes == stats.cache_bytes > 0
    assert planned.flops_total == cached
    assert planned.flops_full_step * adapter.num_steps == uncached
    # by hand: 2 blocks x 2 module sites x order 2 (3 factors) x (6 x 16 tokens x 32 channels) fp32
    assert planned.cache_bytes == 2 * 2 * 3 * 6 * 16 * 32 * 4
    int8 = dict(STRATEGY, factor_dtype="int8_channel")
    planned = cachelab.plan(adapter.model, "taylor", num_inference_steps=adapter.num_steps, batch_size=3,
                            guidance=adapter.guidance_scale, **int8)
    with cachelab.apply(adapter.model, "taylor", **int8) as handle:
        adapter.generate(inputs, handle)
        assert planned.cache_bytes == handle.stats().cache_bytes
    # int8 codes and a float32 scale per sample (6: CFG doubles the 3) and channel
    assert planned.cache_bytes == 2 * 2 * 3 * (6 * 16 * 32 + 6 * 32 * 4)


def test_the_peak_is_kept_when_a_site_starts_over_smaller():
    """``stats().cache_bytes`` is the most held during the generation, not what is left at its end."""
    adapter = tiny_adapter()
    with cachelab.apply(adapter.model, "taylor", **STRATEGY) as handle:
        with handle.generation(6):
            for s in range(6):
                handle.step(s)
                batch = 4 if s < 3 else 1  # from step 3 on every site starts a new, smaller history
                adapter.model(torch.zeros(batch, 1, 8, 8), torch.full((batch,), 10), torch.zeros(batch, dtype=torch.long))
            held_late = sum(handle.stats().context_bytes.values())
        stats = handle.stats()
        assert stats.cache_bytes > held_late
        # each site keeps its own peak (every site peaked at batch 4, together: their sum is the peak)
        assert len(stats.site_bytes) == 4 and sum(stats.site_bytes.values()) == stats.cache_bytes
        summary = handle.summary()
        assert "cache per site (its peak, every context): 4 sites" in summary
        assert all(f"{site}: " in summary for site in stats.site_bytes)


def test_a_shipped_config_plans_on_the_meta_device_without_weights():
    planned = cachelab.plan("dit-xl-2-256", "taylor", num_inference_steps=50, batch_size=1, **STRATEGY)
    from diffusers import DiTTransformer2DModel

    from cachelab.models.meta_inputs import read_config

    with torch.device("meta"):
        model = DiTTransformer2DModel.from_config(read_config("dit-xl-2-256")["config"])
    parameters = sum(p.numel() for p in model.parameters())
    # DiT-XL/2 has 675 M parameters; diffusers' port repeats the timestep and label embedders in each block
    assert 675e6 < parameters < 760e6
    assert planned.weight_bytes == 2 * parameters + 2 * sum(b.numel() for b in model.buffers())  # bf16
    assert "cache (peak)" in str(planned) and planned.flops_speedup > 1


def test_bad_targets_and_keys_are_one_line():
    with pytest.raises(ConfigError, match="allowed: .*flux.1-dev"):
        cachelab.plan("flux.3", "taylor")
    with pytest.raises(ConfigError, match="budget="):
        cachelab.plan("dit-xl-2-256", "taylor", budget="four gigabytes")


def test_apply_refuses_a_strategy_over_its_budget_before_hooking_anything():
    adapter = tiny_adapter()
    planned = cachelab.plan(adapter.model, "taylor", num_inference_steps=10, batch_size=3, guidance=1.5, **STRATEGY)
    with pytest.raises(ConfigError) as refused:
        cachelab.apply(adapter.model, "taylor", budget=planned.cache_bytes - 1, num_inference_steps=10, batch_size=3,
                       guidance=1.5, **STRATEGY)
    line = str(refused.value)
    assert "\n" not in line and "budget" in line
    assert f"({planned.cache_bytes} B)" in line and f"({planned.cache_bytes - 1} B)" in line
    # order 1 keeps 2 of the 3 factors: 2/3 of the bytes, which fits
    assert f"order=1 ({size_text(planned.cache_bytes * 2 // 3)})" in line
    assert "forward" not in vars(adapter.model)  # nothing was hooked
    with cachelab.apply(adapter.model, "taylor", budget=planned.cache_bytes, num_inference_steps=10, batch_size=3,
                        guidance=1.5, **STRATEGY) as handle:
        adapter.generate(adapter.make_inputs(3, seed=0), handle)
        assert handle.stats().cache_bytes == planned.cache_bytes  # exactly the budget: allowed


def test_a_refusal_offers_int8_factors_at_their_planned_size():
    adapter = tiny_adapter()
    keys = dict(num_inference_steps=10, batch_size=3, guidance=1.5)
    planned = cachelab.plan(adapter.model, "taylor", **keys, **STRATEGY)
    int8 = cachelab.plan(adapter.model, "taylor", **keys, **dict(STRATEGY, factor_dtype="int8_token"))
    budget = planned.cache_bytes * 3 // 10  # below order 0 (1/3) and bf16 (1/2); int8 (about 1/4) fits
    assert int8.cache_bytes <= budget
    with pytest.raises(ConfigError) as refused:
        cachelab.apply(adapter.model, "taylor", budget=budget, **keys, **STRATEGY)
    assert f"factor_dtype=int8_token ({size_text(int8.cache_bytes)})" in str(refused.value)


def test_the_command_line_refuses_a_budget_in_one_line_and_writes_no_metrics(tmp_path):
    from tests.test_cli import run_app

    proc = run_app(["cache.budget=1MiB", "logger=none", "num_images=4", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "budget" in line]
    assert len(lines) == 1 and "9.00 MiB (9437184 B)" in lines[0] and "1.00 MiB (1048576 B)" in lines[0]
    assert "granularity=output" in lines[0]
    assert not (tmp_path / "metrics.json").exists()


def test_job_plan_writes_the_plan(tmp_path):
    import json

    from tests.test_cli import run_app

    proc = run_app(["job=plan", "logger=none", "num_images=4", "plan.device_memory=1GiB", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["cache_bytes"] == 9437184 and record["fits"] is True
    assert not (tmp_path / "metrics.json").exists()


def test_job_plan_with_offload_writes_and_prints_the_device_and_host_bytes(tmp_path):
    import json

    from tests.test_cli import run_app

    proc = run_app(["job=plan", "cache.offload=true", "logger=none", "num_images=4", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "plan.json").read_text())
    # the default DiT's 12 sites hold 9 MiB (as without offload); the device one site's state, a twelfth
    assert (record["offload"], record["host_bytes"], record["cache_bytes"]) == (True, 9437184, 9437184 // 12)
    assert "768.00 KiB (786432 B) on the device (host offload" in proc.stdout
    assert "9.00 MiB (9437184 B) in host memory" in proc.stdout


def test_the_activation_estimate_frees_each_tensor_with_its_last_reference():
    from cachelab.planner import LiveBytes

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to("meta")
    x = torch.empty(2, 8, device="meta")
    with torch.no_grad(), LiveBytes(x.numel() * 4) as live:
        y = model(x)
    # by hand, fp32: the input (64 B), then the first linear's output (128 B) and the ReLU's (128 B) at
    # once; the first is freed after the ReLU, so the last linear (32 B) adds less than it frees
    assert live.peak == 64 + 128 + 128
    assert live.live == 64 + 32 and y.shape == (2, 4)


# published parameter counts (model cards), in billions
PARAMETERS = {"flux.1-dev": 12, "flux.2-dev": 32, "qwen-image": 20, "sd3.5-large": 8.1, "pixart-sigma": 0.61,
              "wan2.1-t2v-1.3b": 1.4, "wan2.1-t2v-14b": 14, "wan2.2-t2v-a14b": 14, "hunyuanvideo": 13,
              "ltx-video": 1.9, "dit-xl-2-256": 0.675 + 0.077}  # diffusers' DiT: embedders in every block


def test_every_shipped_config_builds_on_the_meta_device_at_its_published_size():
    from cachelab.models.meta_inputs import meta_model, shipped_configs

    assert sorted(PARAMETERS) == shipped_configs()
    for name, billions in PARAMETERS.items():
        model, experts = meta_model(name)
        assert next(model.parameters()).is_meta
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(billions * 1e9, rel=0.06), name
        assert experts == (2 if name == "wan2.2-t2v-a14b" else 1)


@pytest.mark.parametrize("name", ["fbcache", "teacache", "seacache"])
def test_a_probe_driven_schedule_is_planned_at_its_worst_case_measured_by_a_run(name):
    """A schedule deciding from the values the model computes is planned at its worst case (a full
    history, then forecasts): a run that forecasts whenever its guards let it (a threshold no change
    reaches) holds exactly that, its caches and the schedule's stored signal."""
    adapter = tiny_adapter()
    keys = dict(num_inference_steps=adapter.num_steps, batch_size=3, guidance=adapter.guidance_scale)
    planned = cachelab.plan(adapter.model, name, **keys)
    with cachelab.apply(adapter.model, name, threshold=1e9, max_consecutive_forecasts=2) as handle:
        adapter.generate(adapter.make_inputs(3, seed=0), handle)
        stats = handle.stats()
    assert stats.full_steps == [0, 3, 6, 9]  # a full history (SeaCache's order 1: two full steps), then forecasts
    assert planned.cache_bytes == stats.cache_bytes > sum(stats.site_bytes.values())
    # by hand: the stack residual of (6 x 16 x 32) fp32 (CFG doubles the batch of 3) and the stored signal:
    # the first block's residual or modulated input (6 x 16 x 32), or SeaCache's filtered latent (6 x 1 x 8 x 8)
    signal = 6 * 1 * 8 * 8 * 4 if name == "seacache" else 6 * 16 * 32 * 4
    assert planned.cache_bytes == 6 * 16 * 32 * 4 * (2 if name == "seacache" else 1) + signal
    assert planned.full_steps >= 1 and str(planned)


def test_token_selection_is_planned_at_its_measured_flops():
    """Token selection's forecast steps recompute some tokens: every step is run and counted (the
    planner once counted each step after the first as the first, a full one)."""
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(3, seed=0)
    planned = cachelab.plan(adapter.model, "toca", num_inference_steps=adapter.num_steps, batch_size=3,
                            guidance=adapter.guidance_scale)
    with cachelab.apply(adapter.model, "toca") as handle:
        adapter.generate(adapter.make_inputs(3, seed=1), handle)  # finds the sites
        cached = count_flops_per_call(lambda: adapter.generate(inputs, handle),
                                      {"dit": (adapter.model, "forward")})[2]["dit"]
        stats = handle.stats()
    assert planned.flops_total == cached and planned.cache_bytes == stats.cache_bytes
    assert planned.full_steps == len(stats.full_steps) < adapter.num_steps


def test_a_refusal_names_per_site_orders_whole_blocks_and_lite_that_fit():
    """Besides lower orders and codecs, the refusal names the cheapest per-site orders and whole
    blocks that fit (one block family at a time, the one saving least first) and the coarser
    granularities (output: TaylorSeer-Lite), each at its planned size."""
    pipe, _, plan_keys = flux_digits_call()
    keys = dict(plan_keys, num_inference_steps=STEPS, **STRATEGY)
    double, single = r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"
    orders = cachelab.plan(pipe, "taylor", site_orders={1: [double + r"\..*"]}, **keys)
    single_orders = cachelab.plan(pipe, "taylor", site_orders={1: [single + r"\..*"]}, **keys)
    whole = cachelab.plan(pipe, "taylor", whole_blocks=[double], **keys)
    lite = cachelab.plan(pipe, "taylor", **dict(keys, granularity="output"))
    budget = (orders.cache_bytes + single_orders.cache_bytes) // 2  # the double blocks' lower order fits, not single's
    assert orders.cache_bytes <= budget < single_orders.cache_bytes and whole.cache_bytes <= budget
    with pytest.raises(ConfigError) as refused:
        cachelab.plan(pipe, "taylor", budget=budget, **keys)
    line = str(refused.value)
    assert "\n" not in line
    assert f"site_orders={{1: ['{double}\\..*']}} ({size_text(orders.cache_bytes)})" in line
    assert f"whole_blocks=['{double}'] ({size_text(whole.cache_bytes)})" in line
    assert f"granularity=output (TaylorSeer-Lite, {size_text(lite.cache_bytes)})" in line
    assert "order=1 (" in line  # the lower orders and codecs still come first


def offloaded_run(target, strategy, generate):
    """``strategy`` applied with its states moving through the stand-in device of tests/test_offload.py
    (CPU copies: on the CPU itself nothing would move), one generation, its statistics."""
    import dataclasses

    from cachelab.core.offload import HostOffload
    from tests.test_offload import Copies

    copies = Copies()
    moving = dataclasses.replace(strategy, offload=False,
                                 predictor=HostOffload(strategy.predictor, transfers=lambda device: copies))
    with cachelab.apply(target, moving) as handle:
        generate(handle)
        stats = handle.stats()
    assert copies.prefetched > 0
    return stats


def test_with_host_offload_the_plan_is_the_measured_device_and_host_bytes():
    """With offload the device holds, at a step's end, the state prefetched for the next site (the
    first site of the next step, one site ahead) and host memory every state: the plan counts both
    as the run measures them through real copies, and ``cache_bytes`` (the budget's) is the device's."""
    import dataclasses

    from cachelab.jobs.presets import preset

    adapter = tiny_adapter()
    keys = dict(num_inference_steps=adapter.num_steps, batch_size=3, guidance=adapter.guidance_scale)
    strategy = preset("taylor", **STRATEGY)
    alone = cachelab.plan(adapter.model, strategy, **keys)
    planned = cachelab.plan(adapter.model, dataclasses.replace(strategy, offload=True), **keys)
    stats = offloaded_run(adapter.model, strategy, lambda handle: adapter.generate(adapter.make_inputs(3, seed=0),
                                                                                    handle))
    assert (planned.cache_bytes, planned.host_bytes) == (stats.cache_bytes, stats.host_bytes)
    assert planned.offload and not alone.offload and alone.host_bytes == 0
    # by hand: one site's 3 factors of (6 x 16 x 32) fp32 on the device, the 4 sites' in host memory
    assert planned.cache_bytes == 3 * 6 * 16 * 32 * 4 and planned.host_bytes == alone.cache_bytes == 4 * 36864
    assert planned.flops_total == alone.flops_total
    assert cachelab.plan(adapter.model, "taylor", offload=True, **keys, **STRATEGY).cache_bytes == planned.cache_bytes
    text = str(planned)
    assert "36.00 KiB (36864 B) on the device (host offload" in text and "144.00 KiB (147456 B) in host memory" in text


def test_tiny_flux_digits_with_host_offload_is_planned_at_its_measured_device_and_host_bytes():
    """FLUX's sites differ in size (double and single blocks): the device's step-end figure is the
    state of the one site prefetched then, as the run measures it."""
    import dataclasses

    from cachelab.jobs.presets import preset

    pipe, call, plan_keys = flux_digits_call()
    strategy = preset("taylor", **STRATEGY)
    planned = cachelab.plan(pipe, dataclasses.replace(strategy, offload=True), num_inference_steps=STEPS,
                            **plan_keys, guidance=3.5)
    alone = cachelab.plan(pipe, strategy, num_inference_steps=STEPS, **plan_keys, guidance=3.5)

    def generate(handle):
        torch.manual_seed(0)
        pipe("a digit seven", num_inference_steps=STEPS, output_type="latent", **call)

    stats = offloaded_run(pipe, strategy, generate)
    assert (planned.cache_bytes, planned.host_bytes) == (stats.cache_bytes, stats.host_bytes)
    assert planned.host_bytes == alone.cache_bytes and 0 < planned.cache_bytes < max(stats.site_bytes.values())
    assert planned.cache_bytes in stats.site_bytes.values()  # one site's state


def test_a_budget_that_fits_only_with_offload_is_accepted_with_it_and_refused_without():
    adapter = tiny_adapter()
    keys = dict(num_inference_steps=10, batch_size=3, guidance=1.5, **STRATEGY)
    device = cachelab.plan(adapter.model, "taylor", offload=True, **keys)
    with cachelab.apply(adapter.model, "taylor", budget=device.cache_bytes, offload=True, **keys) as handle:
        assert handle.strategy.offload
    with pytest.raises(ConfigError) as refused:
        cachelab.apply(adapter.model, "taylor", budget=device.cache_bytes, **keys)
    line = str(refused.value)
    assert "(147456 B) of cache, over the budget of 36.00 KiB (36864 B)" in line
    assert "the cheapest settings that fit: cache.offload=true (36.00 KiB on the device), order=" in line
    with pytest.raises(ConfigError) as refused:
        cachelab.apply(adapter.model, "taylor", budget=device.cache_bytes - 1, offload=True, **keys)
    line = str(refused.value)
    assert ("plans 36.00 KiB (36864 B) of cache on the device (host offload; 144.00 KiB in host memory), over the "
            "budget of 36.00 KiB (36863 B)") in line and "cache.offload=true (" not in line


def test_a_pab_window_is_planned_with_the_samplers_timesteps():
    """PAB forecasts only inside its timestep window: the planner drives the schedule with the DDIM
    timesteps the DiT's sampler gives (999, 888, ..., 0 for 10 steps), so the plan is the run's."""
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(3, seed=0)
    keys = dict(num_inference_steps=adapter.num_steps, batch_size=3, guidance=adapter.guidance_scale)
    planned = cachelab.plan(adapter.model, "pab", **keys)
    with cachelab.apply(adapter.model, "pab") as handle:
        adapter.generate(adapter.make_inputs(3, seed=1), handle)  # finds the sites
        cached = count_flops_per_call(lambda: adapter.generate(inputs, handle),
                                      {"dit": (adapter.model, "forward")})[2]["dit"]
        stats = handle.stats()
    assert planned.cache_bytes == stats.cache_bytes > 0 and planned.flops_total == cached
    # window (100, 800): the attention is forecast at the odd steps inside it, 3, 5 and 7 (t = 666, 444, 222)
    assert stats.full_steps == [0, 1, 2, 4, 6, 8, 9] and planned.full_steps == 7
    # by hand: the four module sites' outputs, (6 x 16 x 32) fp32 each (Reuse keeps one value)
    assert planned.cache_bytes == 4 * 6 * 16 * 32 * 4
    unwindowed = cachelab.plan(adapter.model, "pab", window=None, **keys)
    assert unwindowed.full_steps == 5 and unwindowed.flops_total < planned.flops_total
    with pytest.raises(ConfigError, match="reads the timestep, and the target has no sampler.*allowed: a diffusers"):
        cachelab.plan("dit-xl-2-256", "pab", intervals={"attn1": 2}, num_inference_steps=10)  # a config: no sampler


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_planner_sets_a_pipelines_scheduler_as_its_call_does(dynamic):
    """The timesteps the plan drives the schedule with are those of the pipeline's own call (FLUX:
    sigmas from 1 to 1/steps, not the scheduler's default 1000 .. 1; with dynamic shifting, shifted
    by the image's tokens)."""
    from cachelab.models.meta_inputs import meta_model
    from cachelab.models.pipelines.driver import scheduler_grid
    from cachelab.planner import _shape, sampler_grid

    pipe, call, plan_keys = flux_digits_call()
    if dynamic:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    model, _ = meta_model(pipe.transformer)
    planned = sampler_grid(pipe, model, _shape(model, dict(plan_keys, vae_scale_factor=pipe.vae_scale_factor)), 7)
    pipe("a digit seven", num_inference_steps=7, output_type="latent", **call)
    assert planned == scheduler_grid(pipe.scheduler)
    assert (planned.timestep[1] > 1000 * 6 / 7 + 1) == dynamic  # the shift moves the steps toward noise


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_the_planner_sets_the_scheduler_of_a_pipeline_on_latent_grids_as_its_call_does(family, tmp_path):
    """SD3 and Wan take latent grids, not packed tokens: their pipelines set ``steps`` timesteps (SD3's
    flow shift 3, Wan's UniPC with its flow shift), and so does the planner."""
    from cachelab.models.meta_inputs import meta_model
    from cachelab.models.pipelines.driver import scheduler_grid
    from cachelab.models.pipelines.sd3 import SD3Adapter
    from cachelab.models.pipelines.wan import WanAdapter
    from cachelab.planner import _shape, sampler_grid

    pipe = tiny_pipeline({"sd3": SD3Adapter, "wan": WanAdapter}[family], tmp_path)
    frames = {"num_frames": 5} if family == "wan" else {}
    call = dict(height=32, width=32, guidance_scale=4.0, max_sequence_length=16, **frames)
    model, _ = meta_model(pipe.transformer)
    shape = _shape(model, dict(height=32, width=32, text_tokens=16, guidance=4.0, **frames))
    planned = sampler_grid(pipe, model, shape, 7)
    pipe("a digit seven", num_inference_steps=7, output_type="latent", **call)
    assert planned == scheduler_grid(pipe.scheduler)
