"""Discovery on diffusers transformers that cachelab has no family file for (tiny and random,
from train_free_runs/coverage/zoo.py): all-full schedules bit-identical, forecasts happen,
removal restores bit for bit, and the streams found by tensor identity are diffusers' own."""
from __future__ import annotations

import pytest
import torch

import cachelab
from cachelab.core.schedules import Interval
from cachelab.models import discovery
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


def registered(block_class: str):
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls, metadata in TransformerBlockRegistry._registry.items():
        if cls.__name__ == block_class:
            return metadata
    return None


def test_streams_found_by_identity_are_diffusers_own(family, monkeypatch):
    """Where diffusers has metadata for a block class, the identity trace (metadata switched off)
    finds the same argument for each output: no pairing by shape, even at equal lengths."""
    spec, model, _ = family
    monkeypatch.setattr(discovery, "_registry_streams", lambda block_class, n: None)
    found = discovery.discover(model, lambda: model(**spec.inputs(BATCH, timesteps(spec)[0]), return_dict=False))
    checked = 0
    for stack in found.stacks:
        metadata = registered(stack.block_class)
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
