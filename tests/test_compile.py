"""Regional torch.compile with a strategy attached: the same outputs and decisions as eager,
no recompilation when the schedule changes (decisions stay outside the graphs), a model the
user compiles whole still obeys the schedule, and removal restores the eager model exactly."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_compile
from cachelab.core.compiling import compile_regions, uncompile_regions
from cachelab.evaluation.metrics import relative_l2
from cachelab.jobs.runner import run
from cachelab.core.schedules import Interval, Mask
from cachelab.core.strategy import Strategy
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter
from tests.test_pipelines import tiny

# aot_eager traces and partitions exactly like inductor but runs the graphs with eager ops:
# dynamo's behaviour (graphs, breaks, guards) without a C++ toolchain
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def cached_run(adapter, granularity: str, schedule, compile_options: dict | None):
    """Latents and full steps of a cached generation, the model compiled first if asked."""
    handle = Strategy("taylor", TaylorSeer(2, first_enhance=2), schedule, granularity).attach(adapter)
    inputs = adapter.make_inputs(2, seed=3)
    try:
        if compile_options is not None:
            compile_regions(adapter.model, adapter.site_patterns("block"), handle, **compile_options)
        with torch.inference_mode():
            return adapter.generate(inputs, handle), handle.stats().full_steps
    finally:
        handle.remove()
        uncompile_regions(adapter.model)


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_compiled_cached_run_equals_the_eager_one(granularity):
    adapter = tiny_adapter(num_steps=12)
    eager, eager_full = cached_run(adapter, granularity, Interval(4, 2), None)
    compiled, compiled_full = cached_run(adapter, granularity, Interval(4, 2), {"backend": BACKEND})
    assert compiled_full == eager_full and len(eager_full) < 12
    assert relative_l2(compiled, eager) < 1e-6
    assert graphs() > 0  # something was compiled


def test_changing_the_schedule_never_recompiles():
    adapter = tiny_adapter(num_steps=12)
    handle = Strategy("taylor", TaylorSeer(2, first_enhance=2), Interval(3, 2), "module").attach(adapter)
    compile_regions(adapter.model, adapter.site_patterns("block"), handle, backend=BACKEND)
    inputs = adapter.make_inputs(2, seed=0)
    with torch.inference_mode():
        adapter.generate(inputs, handle)
        compiled = graphs()
        breaks = sum(counters["graph_break"].values())
        handle.schedule = Mask(mask=[s % 2 == 0 or s > 9 for s in range(12)])  # other full/forecast steps
        adapter.generate(inputs, handle)
        adapter.generate(inputs)  # and no strategy at all
    assert graphs() == compiled
    assert breaks > 0  # the sites break the blocks' graphs: the decisions run outside them
    assert handle.stats().full_steps == [s for s in range(12) if s % 2 == 0 or s > 9]
    handle.remove()


def test_a_model_compiled_whole_by_the_user_still_obeys_the_schedule():
    adapter = tiny_adapter(num_steps=12)
    eager, eager_full = cached_run(adapter, "module", Interval(4, 2), None)
    handle = Strategy("taylor", TaylorSeer(2, first_enhance=2), Interval(4, 2), "module").attach(adapter)
    adapter.model.compile(backend=BACKEND)  # not compile_regions: the whole DiT, sites inside
    with torch.inference_mode():
        compiled = adapter.generate(adapter.make_inputs(2, seed=3), handle)
    assert handle.stats().full_steps == eager_full
    assert relative_l2(compiled, eager) < 1e-6
    handle.remove()
    uncompile_regions(adapter.model)


def test_removal_after_compilation_restores_the_eager_model_exactly():
    adapter = tiny_adapter(num_steps=6)
    inputs = adapter.make_inputs(2, seed=1)
    with torch.inference_mode():
        before = adapter.generate(inputs)
        cached_run(adapter, "module", Interval(3, 2), {"backend": BACKEND})
        after = adapter.generate(inputs)
    assert torch.equal(after, before)
    assert all(module._compiled_call_impl is None for module in adapter.model.modules())


def test_cuda_graph_modes_make_the_caches_copy_site_outputs():
    """A CUDA graph replay overwrites its outputs' memory, so under ``reduce-overhead`` the
    cache must not keep the output tensor itself; nor in eager mode, where the caller may
    change the output in place (tests/test_faults_numeric.py)."""
    for options, aliased in (({"backend": BACKEND}, False), ({"backend": BACKEND, "mode": "reduce-overhead"}, False)):
        adapter = tiny_adapter()
        handle = Strategy("taylor", TaylorSeer(1), Interval(2), "module").attach(adapter)
        handle.compile(**options)
        block = adapter.model.blocks[0]
        x, shift, scale = torch.randn(2, 16, 32), torch.zeros(2, 32), torch.zeros(2, 32)
        with handle.generation(4), torch.inference_mode():
            handle.step(0)
            out = block.attn_branch(x, shift, scale)
            kept = handle._caches["default"]["blocks.0.attn"].states[0].factors[0]
            assert (kept.data_ptr() == out.data_ptr()) is aliased
            assert torch.equal(kept, out)
        handle.remove()


def test_compiled_pipeline_with_multi_output_and_skip_sites(tmp_path):
    adapter = tiny("tiny_flux", tmp_path / "pipe")
    eager, eager_full = cached_run(adapter, "module", Interval(3, 2), None)
    compiled, compiled_full = cached_run(adapter, "module", Interval(3, 2), {"backend": BACKEND})
    assert compiled_full == eager_full
    assert relative_l2(compiled, eager) < 1e-5


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_inductor_compiled_blocks_match_eager():
    adapter = tiny_adapter(num_steps=8)
    eager, eager_full = cached_run(adapter, "block", Interval(3, 2), None)
    compiled, compiled_full = cached_run(adapter, "block", Interval(3, 2), {"backend": "inductor"})
    assert compiled_full == eager_full
    assert relative_l2(compiled, eager) < 1e-5


@pytest.mark.parametrize("options, device, message", [
    ({"mode": "fast"}, "cpu", "compile.mode='fast' is not allowed; allowed: default, reduce-overhead"),
    ({"mode": "reduce-overhead"}, "cpu", "needs device=cuda, got device='cpu'"),
])
def test_bad_compile_settings_fail_early_naming_the_key(options, device, message):
    with pytest.raises(ConfigError, match=message):
        check_compile(OmegaConf.create({"compile": options, "device": device}))
    check_compile(OmegaConf.create({"compile": {**options, "mode": "default"}, "device": device}))


def test_run_with_compile_compiles_both_sides_and_records_it(tmp_path):
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["model=tiny_dit_random", "num_images=2", "num_steps=8", "logger=none", "progress=false",
                 "measure.flops=false"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        eager_cfg = compose("config", overrides=overrides)
        compiled_cfg = compose("config", overrides=[*overrides, "compile=inductor", "compile.backend=aot_eager"])
    eager = run(eager_cfg, tmp_path / "eager")
    compiled = run(compiled_cfg, tmp_path / "compiled")
    assert compiled["compile"]["backend"] == "aot_eager" and eager["compile"] is None
    assert graphs() > 0
    assert compiled["full_steps"] == eager["full_steps"]
    assert compiled["quality"]["rel_l2"] == pytest.approx(eager["quality"]["rel_l2"], rel=1e-4)

