"""Wan 2.1 (``WanPipeline`` + ``WanTransformer3DModel``): text-to-video, true CFG.

The pipeline calls the transformer twice per step inside ``cache_context("cond")`` and
``("uncond")``: each keeps its own caches (as the official TaylorSeer-Wan2.1 does with its
cond/uncond streams) while the schedule decides once per step. Discovered module sites: per block
self-attention (pre-gate), cross-attention (ungated) and FFN (pre-gate).
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter


class WanAdapter(PipelineAdapter):
    """Wan through ``WanPipeline`` (a single transformer; Wan 2.2's ``transformer_2`` is not cached)."""

    pipeline_class = "WanPipeline"

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        tokenizer = tiny.t5_tokenizer()
        return dict(
            transformer=WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                out_channels=16, text_dim=tiny.WIDTH, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
            vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
            text_encoder=tiny.t5_encoder(tokenizer, umt5=True), tokenizer=tokenizer,
        )
