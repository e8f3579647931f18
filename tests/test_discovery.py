"""Discovery on diffusers transformers that cachelab has no family file for (tiny and random,
from train_free_runs/coverage/zoo.py): all-full schedules bit-identical, forecasts happen,
removal restores bit for bit, and the streams found by tensor identity are diffusers' own."""
from __future__ import annotations

import pytest
import torch

import cachelab
from cachelab.core.schedules import Interval
from cachelab.models import discovery
from cachelab.models.diffusers_private import block_metadata
from train_free_runs.coverage.zoo import _output_tensor, specimen

# no family file in cachelab for any of these; QwenImage also with text as long as the image
FAMILIES = ["CogVideoXTransformer3DModel", "QwenImageTransformer2DModel", "QwenImageTransformer2DModel/equal_lengths",
            "LTXVideoTransformer3DModel", "SanaTransformer2DModel", "Lumina2Transformer2DModel",
            "MochiTransformer3DModel", "AuraFlowTransformer2DModel", "CogView4Transformer2DModel",
            "ChromaTransformer2DModel", "AllegroTransformer3DModel", "HiDreamImageTransformer2DModel"]
STEPS, BATCH = 8, 2


def timesteps(spec) -> list[float]:
    lo, hi = spec.timestep_range
    return [hi - (hi - lo) * (s + 0.5) / STEPS for s in range(STEPS)]


def generate(model, spec, handle=None) -> torch.Tensor:
    """The model's output at every step (inputs fixed but the timestep), driven by ``handle``."""
    outputs = []
    with torch.no_grad(), (handle.generation(STEPS) if handle else torch.autograd.grad_mode.no_grad()):
        for s, t in enumerate(timesteps(spec)):
            if handle:
                handle.step(s, t)
            outputs.append(_output_tensor(model(**spec.inputs(BATCH, t), return_dict=False)))
    return torch.stack(outputs)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    spec = specimen(request.param)
    model = spec.build()
    return spec, model, generate(model, spec)


@pytest.mark.parametrize("granularity", ["output", "block", "module"])
def test_all_full_is_exact_forecasts_happen_and_removal_restores(family, granularity):
    spec, model, bare = family
    with cachelab.apply(model, "taylor", schedule="always", granularity=granularity) as handle:
        assert torch.equal(generate(model, spec, handle), bare)
    with cachelab.apply(model, "taylor", order=2, interval=5, first_enhance=1, granularity=granularity) as handle:
        cached = generate(model, spec, handle)
        stats = handle.stats()
    assert stats.full_steps == Interval(5, 1).full_steps(STEPS) and stats.fallbacks == 0
    assert torch.isfinite(cached).all() and not torch.equal(cached, bare)
    assert torch.equal(generate(model, spec), bare)


def test_streams_found_by_identity_are_diffusers_own(family, monkeypatch):
    """Where diffusers has metadata for a block class, the identity trace (metadata switched off)
    finds the same argument for each output: no pairing by shape, even at equal lengths."""
    spec, model, _ = family
    monkeypatch.setattr(discovery, "_registry_streams", lambda block_class, n: None)
    found = discovery.discover(model, lambda: model(**spec.inputs(BATCH, timesteps(spec)[0]), return_dict=False))
    checked = 0
    for stack in found.stacks:
        metadata = block_metadata(type(model.get_submodule(stack.name)[0]))
        if metadata is None or stack.size < 2:
            continue
        expected = {metadata.return_hidden_states_index: metadata.hidden_states_argument_name,
                    metadata.return_encoder_hidden_states_index: metadata.encoder_hidden_states_argument_name}
        assert {j: stack.streams[j] for j in expected if j is not None} == \
            {j: name for j, name in expected.items() if j is not None}
        checked += 1
    if spec.name.startswith("QwenImage"):
        assert checked and found.stacks[0].streams == ("encoder_hidden_states", "hidden_states")


def test_equal_lengths_really_are_equal():
    spec = specimen("QwenImageTransformer2DModel/equal_lengths")
    inputs = spec.inputs(BATCH, 0.5)
    assert inputs["encoder_hidden_states"].shape[1] == inputs["hidden_states"].shape[1]


class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, a, b):
        return self.linear(a), self.linear(b)


class Pairs(torch.nn.Module):
    """Blocks of two streams; ``between`` says what the model does to them between two blocks."""

    def __init__(self, between):
        super().__init__()
        self.blocks, self.between = torch.nn.ModuleList(Pair() for _ in range(3)), between

    def forward(self, a, b):
        for block in self.blocks:
            a, b = self.between(*block(a, b))
        return a + b


def trace(model):
    return discovery.discover(model, lambda: model(torch.randn(2, 4), torch.randn(2, 4)))


def test_an_output_reaching_the_next_block_changed_is_cached_as_it_is():
    found = trace(Pairs(lambda a, b: (a, b * 1.0)))  # b reaches the next block as a new tensor
    assert found.stacks[0].streams == ("a", None)
    with pytest.raises(cachelab.ConfigError, match="none can be one span"):
        found.site_patterns("stack")


def test_an_output_reaching_the_next_block_twice_is_an_error_naming_the_class():
    with pytest.raises(cachelab.ConfigError, match="an output of Pair reaches the next block as a, b"):
        trace(Pairs(lambda a, b: (a, a)))


def test_outputs_swapped_between_blocks_are_paired_by_identity():
    """Equal shapes, swapped order: identity pairs output 0 with ``b`` and output 1 with ``a``."""
    assert trace(Pairs(lambda a, b: (b, a))).stacks[0].streams == ("b", "a")


# -- adaptive norms, known by what they do ------------------------------------------------------
class Modulated(torch.nn.Module):
    """An adaptive norm under a name with no "Ada": scale and shift from the conditioning."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.norm, self.linear = torch.nn.LayerNorm(dim, elementwise_affine=False), torch.nn.Linear(dim, 2 * dim)

    def forward(self, x, emb):
        scale, shift = self.linear(emb).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class AdaLookalike(torch.nn.LayerNorm):
    """"Ada" in the name, yet a plain norm: it receives its input alone."""


class JointNorm(torch.nn.Module):
    """A plain norm of both streams: it receives the text stream besides its input, no conditioning."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x, context):
        return self.norm(x), self.norm(context)


class NormBlock(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm1, self.linear = norm, torch.nn.Linear(4, 4)

    def forward(self, x, context, emb):
        if isinstance(self.norm1, Modulated):
            h = self.norm1(x, emb)
        elif isinstance(self.norm1, JointNorm):
            h = self.norm1(x, context)[0]
        else:
            h = self.norm1(x)
        return x + self.linear(h), context + 1.0


class NormNet(torch.nn.Module):
    def __init__(self, norm_class):
        super().__init__()
        self.embed = torch.nn.Linear(1, 4)
        self.blocks = torch.nn.ModuleList(NormBlock(norm_class(4)) for _ in range(3))

    def forward(self, x, context, t):
        emb = self.embed(t[:, None, None])
        for block in self.blocks:
            x, context = block(x, context, emb)
        return x


def norm_probes(norm_class) -> set[str]:
    model = NormNet(norm_class)
    return set(discovery.discover(model, lambda: model(torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                                       torch.rand(2))).probes)


@pytest.mark.parametrize("norm_class, adaptive", [(Modulated, True), (AdaLookalike, False), (JointNorm, False)])
def test_an_adaptive_norm_is_known_by_its_conditioning_not_its_name(norm_class, adaptive):
    assert ("modulated_input" in norm_probes(norm_class)) == adaptive


def depends_on_more_than_its_input(model, norm, inputs) -> bool:
    """The independent reference: whether ``norm``'s first output in one call of ``model`` changes
    when every tensor it received besides its input changes (integers stay in their range)."""
    received = []
    hook = norm.register_forward_pre_hook(lambda _, args, kwargs: received.append((args, kwargs)) if not received
                                          else None, with_kwargs=True)
    with torch.no_grad():
        model(**inputs, return_dict=False)
    hook.remove()
    if not received:
        return False
    args, kwargs = received[0]
    names = [*range(len(args)), *kwargs]
    values = [*args, *kwargs.values()]
    first = next(i for i, value in enumerate(values) if isinstance(value, torch.Tensor))

    def changed(value):
        if not isinstance(value, torch.Tensor) or value is values[first]:
            return value
        return value + 1 if value.is_floating_point() else (value + 1) % max(int(value.max()) + 1, 2)

    def call(transform):
        moved = {name: transform(value) for name, value in zip(names, values)}
        with torch.no_grad():
            out = norm(*[moved[i] for i in range(len(args))], **{k: moved[k] for k in kwargs})
        return out[0] if isinstance(out, (tuple, list)) else out

    return not torch.equal(call(lambda value: value), call(changed))


def test_modulated_input_is_offered_exactly_where_norm1_is_conditioned_on_every_covered_transformer():
    """On every diffusers transformer class of the zoo: the probe is offered exactly where the first
    stack's first ``norm1`` computes its first output from more than its input (called again with
    the other tensors changed); diffusers' adaLN and its kin named without "Ada" (Mochi's
    ``MochiRMSNormZero``, CogVideoX's ``CogVideoXLayerNormZero``) among them."""
    from train_free_runs.coverage import zoo

    offered = set()
    for name, spec in zoo.SPECIMENS.items():
        model = spec.build()
        lo, hi = spec.timestep_range
        inputs = spec.inputs(1, (lo + hi) / 2)
        found = discovery.discover(model, lambda: model(**inputs, return_dict=False))
        norm = getattr(model.get_submodule(found.stacks[0].name)[0], "norm1", None) if found.stacks else None
        expected = isinstance(norm, torch.nn.Module) and depends_on_more_than_its_input(model, norm, inputs)
        assert ("modulated_input" in found.probes) == expected, name
        offered |= {name} if expected else set()
    assert {"FluxTransformer2DModel", "MochiTransformer3DModel", "CogVideoXTransformer3DModel"} <= offered
    assert "WanTransformer3DModel" not in offered  # its norm1 is a plain LayerNorm (modulation outside it)


def test_teacache_reads_the_modulated_input_of_a_norm_named_without_ada():
    """Mochi's ``MochiRMSNormZero`` gives TeaCache its signal: a tiny threshold computes every step (the
    bare outputs), an unreachable one forecasts all but the first and last steps."""
    spec = specimen("MochiTransformer3DModel")
    model = spec.build()
    bare = generate(model, spec)
    with cachelab.apply(model, "teacache", threshold=1e-9) as handle:
        assert torch.equal(generate(model, spec, handle), bare)
        assert handle.stats().full_steps == list(range(STEPS))
    with cachelab.apply(model, "teacache", threshold=1e9) as handle:
        generate(model, spec, handle)
        assert handle.stats().full_steps == [0, STEPS - 1]


# -- the first forward of a longer run ----------------------------------------------------------
def test_the_first_forward_of_a_run_is_traced_and_the_run_goes_on_to_its_end():
    """Discovery inside a run of several forwards: the first is traced and its output is the model's
    own; the run finishes normally (nothing raised through it), every forward returns the bare
    output, and no hook is left."""
    from cachelab.core import hooks

    model = NormNet(Modulated)
    inputs = [(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2)) for _ in range(3)]
    with torch.no_grad():
        bare = [model(*i) for i in inputs]
    seen, events = [], []
    model.register_forward_hook(lambda module, args, out: seen.append(out))  # a user's hook

    def run():
        try:
            return [model(*i) for i in inputs]
        except BaseException as err:
            events.append(type(err).__name__)
            raise
        finally:
            events.append("left")

    first = discovery.FirstForward(model).trace(run)
    assert events == ["left"] and len(seen) == 3 and all(map(torch.equal, seen, bare))
    assert first.inputs[0][0] is inputs[0][0] and [s.name for s in first.sites.stacks] == ["blocks"]
    assert "modulated_input" in first.sites.probes
    assert not hooks.hooks(model) and "forward" not in vars(model)


def test_a_run_that_never_calls_the_model_is_one_line():
    model = NormNet(Modulated)
    with pytest.raises(cachelab.ConfigError, match="NormNet was never called in the traced run") as err:
        discovery.FirstForward(model).trace(lambda: None)
    assert "\n" not in str(err.value)
