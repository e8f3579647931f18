"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` + ``SD3Transformer2DModel``): MMDiT.

Discovered module sites as for FLUX double blocks: the joint attention (image and text streams; the
last block has no text output) and both feed-forwards, pre-gate; SD3.5's second
self-attention (``attn2``) too.
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter


class SD3Adapter(PipelineAdapter):
    """SD3 through ``StableDiffusion3Pipeline`` (batched CFG: one transformer call per step)."""

    pipeline_class = "StableDiffusion3Pipeline"

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        clip, clip_2, t5 = tiny.clip_tokenizer(tmp_dir / "clip"), tiny.clip_tokenizer(tmp_dir / "clip_2"), \
            tiny.t5_tokenizer()
        return dict(
            transformer=SD3Transformer2DModel(
                sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=tiny.WIDTH, joint_attention_dim=tiny.WIDTH,
                pooled_projection_dim=2 * tiny.WIDTH, out_channels=4),
            vae=tiny.autoencoder_kl(4, shift_factor=0.0609, scaling_factor=1.5035),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=tiny.clip_text_model(clip, projection=True, seed=1), tokenizer=clip,
            text_encoder_2=tiny.clip_text_model(clip_2, projection=True, seed=2), tokenizer_2=clip_2,
            text_encoder_3=tiny.t5_encoder(t5), tokenizer_3=t5,
        )
