"""PixArt-α/Σ (``PixArtSigmaPipeline`` + ``PixArtTransformer2DModel``): T5 text, batched CFG.

Discovered module sites: per block the self-attention (pre-gate), the cross-attention (added
ungated) and the feed-forward (pre-gate).
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter


class PixArtAdapter(PipelineAdapter):
    """PixArt-Σ through ``PixArtSigmaPipeline`` (``call_kwargs`` e.g. ``use_resolution_binning``)."""

    pipeline_class = "PixArtSigmaPipeline"

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

        tokenizer = tiny.t5_tokenizer()
        return dict(
            transformer=PixArtTransformer2DModel(
                sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                caption_channels=tiny.WIDTH, in_channels=4, cross_attention_dim=24, out_channels=8,
                attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6),
            vae=tiny.autoencoder_kl(4),
            scheduler=DPMSolverMultistepScheduler(),
            text_encoder=tiny.t5_encoder(tokenizer), tokenizer=tokenizer,
        )
