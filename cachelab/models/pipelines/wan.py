"""Wan 2.1 and 2.2 (``WanPipeline`` + ``WanTransformer3DModel``): text-to-video, true CFG.

The pipeline calls the transformer twice per step inside ``cache_context("cond")`` and
``("uncond")``: each keeps its own caches (as the official TaylorSeer-Wan2.1 does with its
cond/uncond streams) while the schedule decides once per step. Discovered module sites: per block
self-attention (pre-gate), cross-attention (ungated) and FFN (pre-gate).

Wan 2.2 A14B has two experts: ``transformer`` runs the steps with
``t >= boundary_ratio * num_train_timesteps`` (high noise), ``transformer_2`` the rest, with its
own guidance scale ``guidance_scale_2``; each expert is cached with its own state
(:class:`~cachelab.core.experts.ExpertHandles`).
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter, PromptInputs


class WanAdapter(PipelineAdapter):
    """Wan through ``WanPipeline``; ``guidance_scale_2`` (Wan 2.2) is the low-noise expert's
    guidance scale (None: the pipeline's default, ``guidance_scale``)."""

    pipeline_class = "WanPipeline"

    def __init__(self, *args, guidance_scale_2: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance_scale_2 = guidance_scale_2

    def call_arguments(self, inputs: PromptInputs) -> dict:
        arguments = super().call_arguments(inputs)
        if self.guidance_scale_2 is not None:
            arguments["guidance_scale_2"] = self.guidance_scale_2
        return arguments

    @staticmethod
    def tiny_transformer():
        """A 2-block ``WanTransformer3DModel`` with random weights (drawn from the global generator)."""
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
            out_channels=16, text_dim=tiny.WIDTH, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

        tokenizer = tiny.t5_tokenizer()
        return dict(
            transformer=cls.tiny_transformer(),
            vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
            text_encoder=tiny.t5_encoder(tokenizer, umt5=True), tokenizer=tokenizer,
        )


class Wan22Adapter(WanAdapter):
    """Wan 2.2 A14B: Wan 2.1's pipeline with a low-noise expert ``transformer_2`` and the
    pipeline's ``boundary_ratio``; the tiny twin has a second random transformer (other weights)
    and ``boundary_ratio`` 0.875 (A14B text-to-video's)."""

    boundary_ratio = 0.875

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        components = super().tiny_components(tmp_dir)
        return dict(components, transformer_2=cls.tiny_transformer(), boundary_ratio=cls.boundary_ratio)
