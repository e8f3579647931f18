"""Wan 2.2's two experts (``transformer`` for high noise, ``transformer_2`` for low noise), each
cached with its own state, on a tiny random ``WanPipeline`` saved and loaded through
``from_pretrained``: the switch step as diffusers takes it, exactness without forecasts, each
expert's forecasts against a hand-run TaylorSeer on its own full steps and context only,
removal, resets between generations, and ``cachelab.apply`` / ``run.py`` on the pipeline."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cachelab
from cachelab.core.controller import attach
from cachelab.core.experts import ExpertHandles
from cachelab.core.schedules import Always, Interval
from cachelab.core.sites import SitePattern, select_sites
from cachelab.core.strategy import Strategy
from cachelab.models.pipelines.driver import expert_plan
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from tests.test_pipelines import tiny

STEPS = 10
BOUNDARY_RATIO = 0.875  # tiny_wan22's, A14B text-to-video's
SITES = [f"blocks.{b}.{m}" for b in range(2) for m in ("attn1", "attn2", "ffn")]  # Wan's discovered module sites


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return tiny("tiny_wan22", tmp_path_factory.mktemp("tiny_wan22") / "pipe", num_steps=STEPS)


def switch_step(scheduler, steps: int) -> int:
    """The first step of ``transformer_2``, recomputed in float64 from the scheduler's timesteps."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.double().tolist()
    return next(s for s, t in enumerate(timesteps) if t < BOUNDARY_RATIO * scheduler.config.num_train_timesteps)


def bare(adapter, inputs) -> torch.Tensor:
    """The pipeline called directly, nothing of cachelab installed."""
    return adapter.pipe(**adapter.call_arguments(inputs), generator=torch.Generator().manual_seed(inputs.seed),
                        num_inference_steps=STEPS, output_type="pt", return_dict=False)[0].float()


def taylor(order=2, schedule=None):
    return Strategy("taylor", TaylorSeer(order, first_enhance=1), schedule or Interval(2, 1), "module")


def taylor_reference(history: list[tuple[int, torch.Tensor]], s: int, order: int) -> torch.Tensor:
    """TaylorSeer's official rule in float64, written out (first_enhance 1: derivatives from the
    second full step): factors D_0 = F, D_{i+1} = (new D_i - old D_i) / gap; forecast k steps on."""
    factors, last = None, None
    for step, value in history:
        new = [value.double()]
        if factors is not None:
            new += [None] * min(len(factors), order)
            for i in range(len(new) - 1):
                new[i + 1] = (new[i] - factors[i]) / (step - last)
        factors, last = new, step
    k = s - last
    return sum(f * k ** i / math.factorial(i) for i, f in enumerate(factors))


class Recorder:
    """What every module site of both experts returned, per (expert, context, site): (step, value)."""

    def __init__(self, pipe):
        self.values: dict[tuple[str, str, str], list[tuple[int, torch.Tensor]]] = {}
        self.calls: list[tuple[int, str]] = []  # (step, expert) of every transformer call
        self.hooks, self.where = [], None
        for expert in ("transformer", "transformer_2"):
            model = getattr(pipe, expert)
            self.hooks.append(model.register_forward_pre_hook(self.enter(pipe, expert), with_kwargs=True))
            for site in SITES:
                self.hooks.append(model.get_submodule(site).register_forward_hook(self.output(expert, site)))

    def enter(self, pipe, expert):
        def pre_hook(module, args, kwargs):
            t = float(kwargs["timestep"].flatten()[0])
            s = [float(x) for x in pipe.scheduler.timesteps].index(t)
            context = "uncond" if self.calls and self.calls[-1] == (s, expert) else "cond"  # cond first, then uncond
            self.calls.append((s, expert))
            self.where = (s, expert, context)
        return pre_hook

    def output(self, expert, site):
        def hook(module, args, out):
            s, called, context = self.where
            assert called == expert
            self.values.setdefault((expert, context, site), []).append((s, out.detach().clone()))
        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def test_tiny_wan22_has_two_experts_with_their_own_weights_and_the_boundary(adapter):
    pipe = adapter.pipe
    assert pipe.config.boundary_ratio == BOUNDARY_RATIO  # saved with the pipeline, read back by from_pretrained
    first, second = dict(pipe.transformer.named_parameters()), dict(pipe.transformer_2.named_parameters())
    assert first.keys() == second.keys()
    assert not any(torch.equal(first[name], second[name]) for name in first if first[name].numel() > 1
                   and first[name].std() > 0)
    assert set(adapter.experts) == {"transformer", "transformer_2"}


def test_the_switch_step_is_the_one_diffusers_takes(adapter):
    """The plan equals the expert diffusers calls at each step and the boundary recomputed from the timesteps."""
    switch = switch_step(adapter.pipe.scheduler, STEPS)
    assert 2 <= switch <= STEPS - 2  # both experts run several steps in the tiny run
    recorder = Recorder(adapter.pipe)
    try:
        bare(adapter, adapter.make_inputs(1, seed=0))
    finally:
        recorder.remove()
    called = [expert for s, expert in recorder.calls[::2]]  # cond and uncond: two calls per step
    assert called == ["transformer"] * switch + ["transformer_2"] * (STEPS - switch)
    adapter.pipe.scheduler.set_timesteps(STEPS)
    assert expert_plan(adapter.pipe, adapter.pipe.scheduler.timesteps) == called
    handle = taylor().attach(adapter)
    try:
        adapter.generate(adapter.make_inputs(1, seed=0), handle)
        stats = handle.stats()
    finally:
        handle.remove()
    # each expert's first step is a full step, and its steps are its own
    assert stats.experts["transformer"].full_steps[0] == 0 and stats.experts["transformer_2"].full_steps[0] == switch
    assert set(stats.experts["transformer"].full_steps + stats.experts["transformer"].forecast_steps) == \
        set(range(switch))
    assert stats.fallbacks == 0


def test_all_full_steps_are_bit_identical_to_the_bare_pipeline(adapter):
    inputs = adapter.make_inputs(2, seed=3)
    expected = bare(adapter, inputs)
    assert torch.equal(adapter.generate(inputs), expected)
    handle = taylor(schedule=Always()).attach(adapter)
    try:
        assert torch.equal(adapter.generate(inputs, handle), expected)
        assert handle.stats().forecast_steps == [] and handle.stats().full_steps == list(range(STEPS))
    finally:
        handle.remove()
    with cachelab.apply(adapter.pipe, taylor(schedule=Always())):
        assert torch.equal(bare(adapter, inputs), expected)


@pytest.mark.parametrize("order", [1, 2])
def test_each_expert_forecasts_from_its_own_full_steps_and_context_only(adapter, order):
    """Every forecast of every site, context and expert equals TaylorSeer hand-run on that expert's
    own full-step values of that context (steps counted locally: the expert's segment)."""
    inputs = adapter.make_inputs(2, seed=1)
    handle = taylor(order).attach(adapter)  # discovers both experts before the recorder listens
    recorder = Recorder(adapter.pipe)
    try:
        adapter.generate(inputs, handle)
        stats = handle.stats()
    finally:
        recorder.remove()
        handle.remove()
    switch = switch_step(adapter.pipe.scheduler, STEPS)
    segments = {"transformer": list(range(switch)), "transformer_2": list(range(switch, STEPS))}
    assert set(stats.context_bytes) == {f"{e}/{c}" for e in segments for c in ("cond", "uncond")}
    checked = 0
    for (expert, context, site), values in recorder.values.items():
        steps = segments[expert]
        full = set(stats.experts[expert].full_steps)
        assert [s for s, _ in values] == steps  # the site ran (or was forecast) at its expert's steps only
        history = []
        for s, value in values:
            local = steps.index(s)
            if s in full:
                history.append((local, value))
                continue
            torch.testing.assert_close(value.double(), taylor_reference(history, local, order), rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked == 2 * len(SITES) * len(stats.forecast_steps)
    # the check can fail: the low-noise expert's first forecast from both experts' history differs
    site = ("transformer_2", "cond", "blocks.1.ffn")
    mixed = [(s, v) for s, v in recorder.values[("transformer", "cond", "blocks.1.ffn")]
             if s in stats.experts["transformer"].full_steps] + recorder.values[site][:1]
    first_forecast = recorder.values[site][1]
    assert not torch.allclose(first_forecast[1].double(), taylor_reference(mixed, first_forecast[0], order),
                              rtol=1e-3, atol=1e-4)


def test_cond_and_uncond_stay_apart_within_each_expert(adapter):
    handle = taylor().attach(adapter)
    seen = {}

    def snapshot(step):
        for expert, each in handle.handles.items():
            for context, caches in each._caches.items():
                seen[expert, context] = caches["blocks.1.ffn"].states[0].factors[0].clone()

    try:
        adapter.generate(adapter.make_inputs(2, seed=0), handle, callback=snapshot)
    finally:
        handle.remove()
    assert set(seen) == {(e, c) for e in ("transformer", "transformer_2") for c in ("cond", "uncond")}
    for expert in ("transformer", "transformer_2"):
        assert not torch.equal(seen[expert, "cond"], seen[expert, "uncond"])


def test_removal_restores_both_transformers_and_state_resets_between_generations(adapter):
    inputs, other = adapter.make_inputs(2, seed=4), adapter.make_inputs(3, seed=5)
    expected = bare(adapter, inputs)
    before = {expert: {name: dict(vars(m)) for name, m in getattr(adapter.pipe, expert).named_modules()}
              for expert in ("transformer", "transformer_2")}
    handle = taylor().attach(adapter)
    try:
        first = adapter.generate(inputs, handle)
        adapter.generate(other, handle)
        again = adapter.generate(inputs, handle)
    finally:
        handle.remove()
    assert not torch.equal(first, expected) and torch.equal(again, first)
    assert torch.equal(bare(adapter, inputs), expected)
    assert before == {expert: {name: dict(vars(m)) for name, m in getattr(adapter.pipe, expert).named_modules()}
                      for expert in ("transformer", "transformer_2")}


def test_apply_on_the_pipeline_caches_both_experts_like_the_adapter(adapter):
    inputs = adapter.make_inputs(2, seed=2)
    expected = bare(adapter, inputs)
    handle = taylor().attach(adapter)
    try:
        from_adapter = adapter.generate(inputs, handle)
        adapter_stats = handle.stats()
    finally:
        handle.remove()
    applied = cachelab.apply(adapter.pipe, "taylor", order=2, interval=2, first_enhance=1)
    try:
        assert isinstance(applied, ExpertHandles) and applied.experts == ("transformer", "transformer_2")
        out = bare(adapter, inputs)
        summary = applied.summary()
        stats = applied.stats()
    finally:
        applied.remove()
    assert torch.equal(out, from_adapter)
    assert stats.full_steps == adapter_stats.full_steps and stats.experts.keys() == adapter_stats.experts.keys()
    assert "expert transformer:" in summary and "expert transformer_2:" in summary
    assert torch.equal(bare(adapter, inputs), expected)
    for expert in ("transformer", "transformer_2"):
        assert "forward" not in vars(getattr(adapter.pipe, expert))


def test_expert_handles_count_steps_per_expert_and_free_finished_experts():
    """On two bare modules: each expert's schedule sees its local steps; the first expert's caches
    are freed at the switch; statistics in global steps; the most bytes held at once."""
    torch.manual_seed(0)
    models = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    handles = {name: attach(select_sites(model, [SitePattern("")]), Reuse(), Interval(3, 2))
               for name, model in models.items()}
    experts = ExpertHandles(handles)
    plan = ["a"] * 4 + ["b"] * 5
    x = torch.randn(2, 4)
    with experts.generation(len(plan), plan=plan):
        for s, name in enumerate(plan):
            experts.step(s)
            assert experts.expert == name
            models[name](x + s)
            if name == "b":
                assert handles["a"]._caches == {}  # the high-noise expert's caches are freed
    stats = experts.stats()
    local = Interval(3, 2).full_steps
    assert stats.experts["a"].full_steps == local(4)
    assert stats.experts["b"].full_steps == [4 + s for s in local(5)]
    assert stats.full_steps == local(4) + [4 + s for s in local(5)]
    assert stats.cache_bytes == max(stats.experts["a"].cache_bytes, stats.experts["b"].cache_bytes) > 0
    with pytest.raises(ValueError, match="plan"):
        experts.begin(3, plan=["a", "c", "a"])


def test_run_py_runs_both_experts_end_to_end(tmp_path):
    from tests.test_cli import app_env, check_ok, overrides, read_metrics, run_app

    run_dir = tmp_path / "run"
    env = {**app_env(tmp_path), "CACHELAB_CACHE": str(tmp_path / "cache")}
    check_ok(run_app(overrides("model=tiny_wan22", "strategy=taylor", "order=1", "interval=2", "first_enhance=1",
                               "num_steps=6", "measure.flops=true", "logger=none", f"hydra.run.dir={run_dir}"),
                     env=env))
    metrics = read_metrics(run_dir)
    experts = metrics["experts"]
    assert set(experts) == {"transformer", "transformer_2"}
    switch = len(experts["transformer"]["full_steps"]) + experts["transformer"]["num_forecast"]
    assert experts["transformer_2"]["full_steps"][0] == switch
    assert metrics["full_steps"] == sorted(experts["transformer"]["full_steps"] + experts["transformer_2"]["full_steps"])
    assert metrics["flops"]["speedup"] > 1 and metrics["fallbacks"] == 0
    assert "transformer_2" in (run_dir / "run.log").read_text()


def test_compile_covers_both_experts_blocks_and_sites(adapter):
    """``compile=...`` in compare and sample: every expert's blocks are compiled, and its sites through its own handle."""
    from cachelab.jobs.base import compiled_regions

    handle = taylor().attach(adapter)
    compiled = []
    for expert, each in handle.handles.items():
        each.compile = lambda expert=expert, compile=each.compile, **options: compiled.append(expert) or \
            compile(**options)
    try:
        with compiled_regions({"backend": "aot_eager"}, adapter, handle):
            assert compiled == ["transformer", "transformer_2"]  # each expert's sites through its own handle
            for expert in ("transformer", "transformer_2"):
                blocks = getattr(adapter.pipe, expert).blocks
                assert all(block._compiled_call_impl is not None for block in blocks), expert
        assert all(block._compiled_call_impl is None for expert in ("transformer", "transformer_2")
                   for block in getattr(adapter.pipe, expert).blocks)
    finally:
        handle.remove()


def test_a_call_of_the_other_expert_is_refused(adapter, monkeypatch):
    """Should diffusers' rule and the plan ever disagree, the run stops instead of mixing caches."""
    monkeypatch.setattr("cachelab.models.pipelines.driver.expert_plan",
                        lambda pipe, timesteps: ["transformer"] * len(timesteps))
    handle = taylor().attach(adapter)
    try:
        with pytest.raises(RuntimeError, match="ran transformer_2 at step"):
            adapter.generate(adapter.make_inputs(1, seed=0), handle)
    finally:
        handle.remove()


def test_jobs_that_observe_one_transformer_refuse_two_experts(adapter):
    from cachelab.errors import ConfigError
    from cachelab.jobs.base import observed_full_run

    with pytest.raises(ConfigError, match="transformer, transformer_2.*allowed: job=compare or job=sample"):
        observed_full_run(adapter, "module", None, adapter.make_inputs(1, seed=0))


def test_each_expert_expands_in_its_own_steps_of_the_grid():
    """A predictor expanding in sigma: each expert's handle gets the sigmas of its own steps, in
    its local order (the grid's slice), never the other expert's."""
    from cachelab.core.variables import StepGrid

    models = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    handles = {name: attach(select_sites(model, [SitePattern("")]), TaylorSeer(order=1, variable="sigma"),
                            Interval(2, 1)) for name, model in models.items()}
    experts = ExpertHandles(handles)
    plan = ["a"] * 3 + ["b"] * 4
    sigmas = [1.0 - s / 8 for s in range(len(plan))]
    grid = StepGrid.from_flow_sigmas(range(len(plan)), sigmas)
    seen = {}
    with torch.no_grad(), experts.generation(len(plan), grid, plan):
        for s, name in enumerate(plan):
            experts.step(s)
            seen[name] = handles[name]._positions
            models[name](torch.randn(2, 4))
    assert seen["a"] == tuple(sigmas[:3]) and seen["b"] == tuple(sigmas[3:])


def test_a_global_step_going_back_is_an_error_naming_it():
    models = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}
    handles = {name: attach(select_sites(model, [SitePattern("")]), TaylorSeer(order=1), Interval(2, 1))
               for name, model in models.items()}
    experts = ExpertHandles(handles)
    with torch.no_grad(), experts.generation(4, None, ["a", "a", "b", "b"]):
        for s in range(3):
            experts.step(s)
        with pytest.raises(RuntimeError, match="step 1 after step 2: .*begin"):
            experts.step(1)
        assert experts.stats().full_steps == [0, 2]  # nothing was reset
