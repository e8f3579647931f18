"""``cachelab.apply`` on a diffusers pipeline, a bare diffusers transformer, the native DiT and
a user's own ``nn.Module`` in a hand-written loop; discovery by tensor identity; the
timestep maps; a handle that is not driven, or removed; bad input in one line."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import cachelab
from cachelab.core.schedules import Interval
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError
from cachelab.models.discovery import discover
from cachelab.models.pipelines.driver import PipelineDriver, TimestepMap
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter

T = 10


# -- a user's own DiT, driven by a hand-written loop ---------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v)


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.attn, self.mlp, self.ada = nn.LayerNorm(width), SelfAttention(width), Mlp(width), \
            nn.Linear(width, 2 * width)

    def forward(self, tokens, emb):
        scale, gate = self.ada(emb).unsqueeze(1).chunk(2, dim=-1)
        tokens = tokens + gate * self.attn(self.norm(tokens) * (1 + scale))
        return tokens + self.mlp(self.norm(tokens))


class UserDiT(nn.Module):
    """Tokens in, tokens out; the timestep embedded by a small MLP."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, width)

    def forward(self, tokens, t):
        emb = self.embed(t.view(-1, 1).float() / 1000)
        for layer in self.layers:
            tokens = layer(tokens, emb)
        return self.out(tokens)


def user_model() -> UserDiT:
    torch.manual_seed(0)
    return UserDiT().eval()


def user_loop(model, handle=None, steps: int = T):
    """Euler-like steps over timesteps 999 -> 0; the model output after every step."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    outputs = []
    with torch.no_grad(), (handle.generation(steps) if handle else _nothing()):
        for s, t in enumerate(torch.linspace(999, 0, steps)):
            if handle:
                handle.step(s, float(t))
            out = model(x, t.expand(2))
            outputs.append(out)
            x = x - 0.1 * out
    return torch.stack(outputs)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_a_user_module_in_a_hand_written_loop(granularity):
    model = user_model()
    bare = user_loop(model)
    handle = cachelab.apply(model, "taylor", order=2, interval=3, first_enhance=2, granularity=granularity)
    with handle:
        cached = user_loop(model, handle)
        stats = handle.stats()
        assert stats.full_steps == Interval(3, 2).full_steps(T) and len(stats.forecast_steps) == T - 4
        assert 0 < (cached - bare).norm() / bare.norm() < 0.5
        assert torch.equal(cached[:2], bare[:2])  # the full steps before any forecast are exact
    assert torch.equal(user_loop(model), bare)  # removed: bit for bit
    assert "forward" not in vars(model)


def test_all_full_schedule_is_bit_identical_and_the_summary_says_so():
    model = user_model()
    bare = user_loop(model)
    with cachelab.apply(model, "taylor", schedule="always", granularity="block") as handle:
        assert torch.equal(user_loop(model, handle), bare)
        summary = handle.summary()
    assert f"full steps: {T}" in summary and "forecast steps: 0" in summary and "context default" in summary


def test_discovery_of_the_user_module():
    model = user_model()
    found = discover(model, lambda: model(torch.randn(2, 6, 16), torch.full((2,), 500.0)))
    assert [(s.name, s.block_class, s.size, s.residual) for s in found.stacks] == [("layers", "Block", 3, "tokens")]
    assert found.module_sites == [f"layers.{i}.{m}" for i in range(3) for m in ("attn", "mlp")]
    assert set(found.probes) == {"first_block_residual"}  # no adaptive norm: no modulated input


def test_the_native_dit_through_its_own_sampler_equals_its_family_sites():
    """apply() on cachelab's DiT (discovered block sites, residual on ``x``) and the DiT adapter's
    own block sites give the same generation."""
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(2, seed=0)
    strategy = Strategy("taylor", TaylorSeer(2, first_enhance=2), Interval(3, 2), "block")
    family = strategy.attach(adapter)
    expected = adapter.generate(inputs, family)
    family.remove()
    with cachelab.apply(adapter.model, strategy) as handle:
        assert torch.equal(adapter.generate(inputs, handle), expected)
        assert handle.stats().full_steps == Interval(3, 2).full_steps(adapter.num_steps)


def test_an_undriven_model_warns_once_and_can_raise():
    model = user_model()
    x, t = torch.randn(2, 6, 16), torch.full((2,), 500.0)
    with cachelab.apply(model, "taylor"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x, t), model(x, t)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "outside a generation" in messages[0] and "handle.generation" in messages[0]
    with cachelab.apply(model, "taylor", on_undriven="raise"), pytest.raises(RuntimeError, match="handle.step"):
        model(x, t)


def test_a_removed_handle_refuses_to_be_driven():
    model = user_model()
    handle = cachelab.apply(model, "reuse")
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.begin(T)
    handle.remove()  # twice is harmless


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: cachelab.apply(m, "taylor", ordr=2), "ordr= is not a key of strategy='taylor'"),
    (lambda m: cachelab.apply(m, "tayler"), "strategy='tayler' is unknown; allowed: adams_bashforth"),
    (lambda m: cachelab.apply(m, "taylor", order=-1), "order=-1 is out of range"),
    (lambda m: cachelab.apply(m, "taylor", granularity="layer"), "granularity='layer' is not allowed"),
    (lambda m: cachelab.apply(m, "none"), "caches nothing"),
    (lambda m: cachelab.apply(m, "taylor", on_undriven="maybe"), "on_undriven='maybe' is not allowed"),
    # the command line's MagCache reads the model's own curve; here no model names it
    (lambda m: cachelab.apply(m, "magcache"), "calibration= is required in cachelab.apply"),
])
def test_bad_arguments_are_one_line(call, message):
    with pytest.raises(ConfigError) as err:
        call(user_model())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_without_blocks_names_its_class_and_the_way_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    handle = cachelab.apply(model, "taylor", granularity="block")
    with pytest.raises(ConfigError, match=r"Sequential has no discoverable blocks.*sites="), handle.generation(T):
        handle.step(0)
        model(torch.randn(2, 4))
    handle.remove()


def test_given_sites_need_no_discovery():
    from cachelab.core.sites import SitePattern

    model = user_model()
    bare = user_loop(model)
    sites = {"block": [SitePattern(r"layers\.\d+", residual="tokens")]}
    with cachelab.apply(model, "taylor", sites=sites, granularity="block", interval=3) as handle:
        cached = user_loop(model, handle)
        assert handle.inner is not None and len(handle.inner.sites) == 3
    assert not torch.equal(cached, bare) and torch.equal(user_loop(model), bare)


def test_a_schedule_needing_a_missing_probe_is_one_line():
    model = user_model()
    handle = cachelab.apply(model, "teacache")
    with pytest.raises(ConfigError, match="UserDiT: .*modulated_input") as err, handle.generation(T):
        handle.step(0, 999.0)
        model(torch.randn(2, 6, 16), torch.full((2,), 999.0))
    assert "\n" not in str(err.value)
    handle.remove()


# -- timesteps as pipelines pass them ---------------------------------------------------------
@pytest.mark.parametrize("transform", [lambda t: t, lambda t: t / 1000, lambda t: 1 - t / 1000])
def test_timestep_maps_find_the_step_of_each_transform(transform):
    timesteps = torch.linspace(1000, 20, 12)
    mapping = TimestepMap(timesteps)
    assert [mapping.step_of(transform(t)) for t in timesteps] == list(range(12))


def test_a_timestep_that_no_transform_gives_is_an_error():
    mapping = TimestepMap(torch.linspace(1000, 20, 12))
    mapping.step_of(torch.tensor([0.0]))  # step 0 as 1 - t/1000
    with pytest.raises(RuntimeError, match="not the scheduler's"):
        mapping.step_of(torch.tensor([0.123456]))


class FakeScheduler:
    def __init__(self, steps: int):
        self.steps = steps

    def set_timesteps(self):
        self.timesteps = torch.linspace(1000, 1000 / self.steps, self.steps)

    def step(self, model_output, timestep, sample):
        return (sample - 0.1 * model_output,)


class Lumina2StylePipeline:
    """Calls its transformer with ``1 - t / 1000`` (as Lumina2 does), cond and uncond in contexts."""

    def __init__(self, transformer, steps: int = T):
        self.transformer, self.scheduler = transformer, FakeScheduler(steps)

    def __call__(self, x):
        self.scheduler.set_timesteps()
        for t in self.scheduler.timesteps:
            out = self.transformer(x, timestep=(1 - t / 1000).expand(len(x)))
            x = self.scheduler.step(out, t, x)[0]
        return x


class TimestepKeyword(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, timestep):
        return self.inner(x, 1000 * (1 - timestep))


def test_a_pipeline_passing_one_minus_t_drives_the_cache():
    torch.manual_seed(0)
    pipe = Lumina2StylePipeline(TimestepKeyword(UserDiT()).eval())
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        bare = pipe(x)
        handle = cachelab.apply(pipe, "taylor", interval=3, first_enhance=2, granularity="block", order=1)
        cached, again = pipe(x), pipe(x)
        stats = handle.stats()
        handle.remove()
        restored = pipe(x)
    assert stats.full_steps == Interval(3, 2).full_steps(T) and torch.equal(cached, again)
    assert not torch.equal(cached, bare) and torch.equal(restored, bare)


class PositionalLumina2StylePipeline(Lumina2StylePipeline):
    """Passes the timestep by position."""

    def __call__(self, x):
        self.scheduler.set_timesteps()
        for t in self.scheduler.timesteps:
            x = self.scheduler.step(self.transformer(x, (1 - t / 1000).expand(len(x))), t, x)[0]
        return x


def test_a_timestep_passed_by_position_drives_the_cache_as_by_keyword():
    results = []
    for kind in (Lumina2StylePipeline, PositionalLumina2StylePipeline):
        torch.manual_seed(0)
        pipe = kind(TimestepKeyword(UserDiT()).eval())
        x = torch.randn(2, 6, 16)
        with torch.no_grad():
            handle = cachelab.apply(pipe, "taylor", interval=3, first_enhance=2, granularity="block", order=1)
            results.append((pipe(x), handle.stats().full_steps))
            handle.remove()
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] == Interval(3, 2).full_steps(T)


def test_the_driver_ends_each_generation_after_the_last_step():
    torch.manual_seed(0)
    pipe = Lumina2StylePipeline(TimestepKeyword(UserDiT()).eval())
    handle = cachelab.apply(pipe, "reuse", interval=2, granularity="block")
    with torch.no_grad():
        pipe(torch.randn(2, 6, 16))
    assert not handle.inner.generating and handle.inner.caches == {}  # freed; the stats are kept
    assert handle.stats().cache_bytes > 0
    handle.remove()
    assert "forward" not in vars(pipe.transformer) and "step" not in vars(pipe.scheduler)


def test_driver_as_a_context_manager_removes_its_hooks():
    pipe = SimpleNamespace(transformer=TimestepKeyword(user_model()), scheduler=FakeScheduler(T))
    with PipelineDriver(pipe, None):
        assert "forward" in vars(pipe.transformer)
    assert "forward" not in vars(pipe.transformer) and "step" not in vars(pipe.scheduler)


def test_nested_outputs_are_taken_apart_and_rebuilt():
    """A model output holding a list of per-sample tensors (Z-Image) is cached tensor by tensor."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from cachelab.core.outputs import split

    a, b, c = torch.ones(1), torch.zeros(2), torch.full((3,), 2.0)
    for out, count in [((a, None, b), 3), (Transformer2DModelOutput(sample=[a, b]), 2), (((a, b), c, None), 4)]:
        parts, rebuild = split(out)
        assert len(parts) == count
        again = split(rebuild([None if p is None else p + 1 for p in parts]))[0]
        assert [None if p is None else p.tolist() for p in again] == \
            [None if p is None else (p + 1).tolist() for p in parts]
    with pytest.raises(TypeError, match="returned str"):
        split((a, "x"))


@pytest.mark.parametrize("called", [False, True])
def test_a_second_apply_on_one_model_is_refused_naming_the_first_handle(called):
    torch.manual_seed(0)
    pipe = Lumina2StylePipeline(TimestepKeyword(UserDiT()).eval())
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        bare = pipe(x)
        first = cachelab.apply(pipe, "taylor", interval=3, granularity="block")
        if called:  # its sites are hooked by now
            pipe(x)
        for target in (pipe, pipe.transformer) + ((pipe.transformer.inner,) if called else ()):  # a hooked block
            with pytest.raises(ConfigError) as refused:
                cachelab.apply(target, "reuse")
            message = str(refused.value)
            held = repr(first) if target is not pipe.transformer.inner else repr(first.inner)  # its sites' handle
            assert "\n" not in message and held in message and "remove()" in message
        first.remove()
        second = cachelab.apply(pipe, "reuse", interval=2, granularity="block")
        reused = pipe(x)
        second.remove()
        assert torch.equal(pipe(x), bare) and not torch.equal(reused, bare)


def test_the_handle_drives_its_core_handle_and_keeps_no_copy_of_its_state():
    model = user_model()
    handle = cachelab.apply(model, "taylor", interval=2, granularity="block")
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), handle.generation(T):
        assert handle.inner.generating  # begun in the core before any site is hooked
        handle.step(0, 999.0)
        with handle.context("cond"):  # open before the first call: the call's caches are cond's
            model(x, torch.full((2,), 999.0))
        assert handle.inner.hooked and list(handle.inner._caches) == ["cond"]
        assert handle.stats() is not None and handle.stats().full_steps == handle.inner.stats().full_steps == [0]
    held = {"_T", "_grid", "_step", "_contexts", "_stats"} & set(vars(handle))
    assert not held, f"the handle keeps a copy of its core's state: {held}"
    handle.remove()
    assert handle.stats().full_steps == [0]  # the last generation's statistics outlive the removal
