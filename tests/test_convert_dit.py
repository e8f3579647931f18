"""The native DiT converted to diffusers' DiTTransformer2DModel computes what the native one does."""
import pytest
import torch

from cachelab.core.strategy import Strategy
from cachelab.core.schedules import Interval
from cachelab.errors import CheckpointMismatch
from cachelab.models.convert_dit import ConvertedDiTAdapter, convert_state_dict, dit_to_diffusers
from cachelab.models.dit import DiT
from cachelab.models.dit_adapter import DiTAdapter, randomize_zero_init
from cachelab.strategies.taylor import TaylorSeer


def random_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    model = DiT(**{**dict(input_size=16, patch_size=4, in_channels=2, hidden_size=64, depth=3, num_heads=4,
                          num_classes=7, learn_sigma=True), **kwargs})
    randomize_zero_init(model)  # gates and final layer non-zero: every weight matters
    return model.eval()


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converted_outputs_match_native(learn_sigma):
    native = random_dit(learn_sigma=learn_sigma)
    converted = dit_to_diffusers(native)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 16, 16, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 3, 6, 7])  # 7: the null class
    with torch.no_grad():
        ours = native(x, t, y)
        theirs = converted(x, timestep=t, class_labels=y).sample
    assert theirs.shape == ours.shape == (4, 4 if learn_sigma else 2, 16, 16)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-4), (theirs - ours).abs().max()


def test_diffusers_frequencies_would_differ():
    """The converter's frequency fix matters: with diffusers' own embedder frequencies the outputs differ."""
    native = random_dit()
    converted = dit_to_diffusers(native)
    for block in converted.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    x, t, y = torch.randn(2, 2, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.allclose(converted(x, timestep=t, class_labels=y).sample, native(x, t, y), atol=1e-4)


def test_every_key_converted_once():
    native = random_dit()
    converted = convert_state_dict(native.state_dict(), len(native.blocks))
    from diffusers import DiTTransformer2DModel
    from cachelab.models.convert_dit import diffusers_config

    assert set(converted) == set(DiTTransformer2DModel(**diffusers_config(native)).state_dict())
    state = native.state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="extra.weight"):
        convert_state_dict(state, len(native.blocks))


def test_unsupported_architecture_is_one_error():
    with pytest.raises(CheckpointMismatch, match="mlp_ratio"):
        dit_to_diffusers(random_dit(mlp_ratio=2.0))
    with pytest.raises(CheckpointMismatch, match="class_dropout_prob"):
        dit_to_diffusers(random_dit(class_dropout_prob=0.0))


def test_sampled_images_match_shipped_model():
    """The shipped trained DiT and its conversion sample the same digits with the same DDIM loop,
    and a cachelab strategy attaches to the converted model's discovered sites."""
    kwargs = dict(weights="tiny_dit_mnist", num_steps=6, guidance_scale=1.5)
    native, converted = DiTAdapter(name="native", **kwargs), ConvertedDiTAdapter(name="converted", **kwargs)
    inputs = native.make_inputs(3, seed=0)
    ours, theirs = native.generate(inputs), converted.generate(inputs)
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    handle = Strategy("taylor", TaylorSeer(1), Interval(3), "module").attach(converted)
    try:
        cached = converted.generate(inputs, handle)
        stats = handle.stats()
    finally:
        handle.remove()
    assert len(stats.forecast_steps) > 0 and not torch.equal(cached, theirs)
    assert torch.equal(converted.generate(inputs), theirs)


def test_diffusers_hooks_run_on_the_converted_model():
    """diffusers' own caching hooks enable on the converted transformer (its CacheMixin), keep their
    state in the adapter's cache context, skip steps, and are reset between generations."""
    from diffusers import FirstBlockCacheConfig

    adapter = ConvertedDiTAdapter(name="converted", weights="tiny_dit_mnist", num_steps=20, guidance_scale=1.5)
    inputs = adapter.make_inputs(2, seed=0)
    full = adapter.generate(inputs)
    ran = []
    hook = adapter.transformer.transformer_blocks[-1].ff.register_forward_hook(lambda *_: ran.append(1))  # runs when computed
    adapter.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    try:
        first, calls = adapter.generate(inputs), len(ran)
        second = adapter.generate(inputs)
    finally:
        adapter.transformer.disable_cache()
        hook.remove()
    assert calls < 20 and not torch.equal(first, full)
    assert torch.equal(first, second)  # the hook's state was reset after the first generation
    assert torch.equal(adapter.generate(inputs), full)
