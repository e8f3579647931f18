"""The native DiT: paper presets, original checkpoint layout, batched CFG, VAE decoding."""
from __future__ import annotations

import math

import pytest
import torch

from cachelab.models.dit import DiT, TimestepEmbedder, dit_from_preset, load_checkpoint
from cachelab.models.dit_adapter import DiTAdapter
from cachelab.errors import WeightsUnavailable
from cachelab.models.loading import load_vae
from tests.conftest import tiny_adapter


def test_dit_xl_2_has_the_papers_675m_parameters():
    with torch.device("meta"):
        model = dit_from_preset("DiT-XL/2", input_size=32)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == 675  # DiT paper, Table 1
    keys = set(model.state_dict())
    assert {"pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight",
            "blocks.27.attn.qkv.weight", "blocks.27.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
            "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"} <= keys
    assert model.y_embedder.embedding_table.num_embeddings == 1001  # + the null class


def test_unknown_preset():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_from_preset("DiT-M/2")


@pytest.mark.parametrize("layout", ["plain", "training"])
def test_original_checkpoint_layout_round_trips(tmp_path, layout):
    source = tiny_adapter(init="random", init_seed=123).model
    state = source.state_dict()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state if layout == "plain" else {"model": state, "ema": state, "opt": {}}, path)
    loaded = tiny_adapter(checkpoint=str(path), init_seed=0)
    inputs = loaded.make_inputs(2, seed=0)
    assert torch.equal(loaded.generate(inputs), tiny_adapter(init="random", init_seed=123).generate(inputs))
    assert not torch.equal(tiny_adapter(init_seed=0).generate(inputs), loaded.generate(inputs))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.pt"):
        load_checkpoint(DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2), tmp_path / "no-such.pt")


def test_reference_init_is_adaln_zero():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 5]))
    assert out.shape == (2, 8, 8, 8) and not out.any()


def test_timestep_embedding_closed_form():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 37.0]), 6)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    expected = [[math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs] for t in (0.0, 37.0)]
    torch.testing.assert_close(emb, torch.tensor(expected))


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_batched_cfg_equals_two_separate_passes(guided_channels):
    model = tiny_adapter(in_channels=4, learn_sigma=True).model
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([300, 300, 300, 300]), torch.tensor([1, 2, 10, 10])
    both = model.forward_with_cfg(torch.cat([x, x]), t, y, 4.0, guided_channels)
    cond, uncond = model(x, t[:2], y[:2]), model(x, t[:2], y[2:])
    g = guided_channels or 4
    expected = uncond[:, :g] + 4.0 * (cond[:, :g] - uncond[:, :g])
    torch.testing.assert_close(both[:2, :g], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[2:, :g], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[:2, g:4], cond[:, g:4], rtol=1e-5, atol=1e-5)


def test_vae_decoding_through_a_local_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    adapter = tiny_adapter(in_channels=4, learn_sigma=True, vae=str(tmp_path / "vae"))
    latents = adapter.generate(adapter.make_inputs(2, seed=0))
    images = adapter.decode(latents.clamp(-1, 1))
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    expected = vae.decode(latents.clamp(-1, 1) / 0.18215).sample
    torch.testing.assert_close(images, ((expected + 1) / 2).clamp(0, 1))


def test_unreachable_vae_names_itself(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="stabilityai/sd-vae-ft-ema.*model.vae"):
        load_vae("stabilityai/sd-vae-ft-ema")


def test_shipped_weights_load_by_name_with_their_architecture(tmp_path, monkeypatch):
    from cachelab import assets
    from cachelab.jobs.shipping import write_asset

    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    source = tiny_adapter(init_seed=7).model
    arch = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=False)
    write_asset("tiny_test", source.state_dict(), {"arch": arch})
    shipped = DiTAdapter(name="shipped", weights="tiny_test", num_steps=10)
    inputs = shipped.make_inputs(2, seed=0)
    assert shipped.latent_shape == (1, 8, 8)
    assert torch.equal(shipped.generate(inputs), tiny_adapter(init_seed=7).generate(inputs))


def test_adapter_scores_samples_with_its_judge():
    from cachelab.evaluation.judge import DigitJudge

    adapter = tiny_adapter(input_size=32, judge=DigitJudge())
    inputs = adapter.make_inputs(4, seed=0)
    scores = adapter.evaluate(adapter.decode(adapter.generate(inputs)), inputs)
    assert set(scores) == {"class_accuracy", "feature_fd", "num_samples"} and scores["num_samples"] == 4
    assert tiny_adapter().evaluate(torch.zeros(1, 1, 8, 8), inputs) == {}
