"""FLUX (``FluxPipeline``): 19 double-stream and 38 single-stream blocks in FLUX.1.

Module sites as in the official TaylorSeer-FLUX code: per double block the joint
attention (image and text streams: one state each) and both feed-forwards, pre-gate;
per single block the fused output projection, with its attention and MLP input
projection skipped (zeros) on forecast steps since only ``proj_out`` consumes them.
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter
from cachelab.core.sites import SitePattern
from cachelab.core.tokens import TOKENWISE

_DOUBLE, _SINGLE = r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"
# The official TaylorSeer module sites of dual-stream models (FLUX, HunyuanVideo): per double
# block the joint attention and both feed-forwards; per single block the fused output
# projection, its inputs (attention, MLP projection) skipped on forecast steps. Token selection:
# the feed-forwards are token-wise; the joint attention and the single blocks' fused projection
# (whose inputs are skipped) cannot compute a subset of their tokens.
DUAL_STREAM_MODULE_SITES = [SitePattern(rf"{_DOUBLE}\.attn"), SitePattern(rf"{_DOUBLE}\.(ff|ff_context)", tokens=TOKENWISE),
                            SitePattern(rf"{_SINGLE}\.proj_out"),
                            SitePattern(rf"{_SINGLE}\.(attn|proj_mlp)", skip="proj_out")]


class FluxAdapter(PipelineAdapter):
    """FLUX.1 through ``FluxPipeline`` (guidance-distilled: one transformer call per step;
    with ``negative_prompt`` and ``call_kwargs.true_cfg_scale > 1`` two, cond and uncond)."""

    pipeline_class = "FluxPipeline"
    # the official module sites; block, stack, output and the probes are discovered
    sites = {"module": DUAL_STREAM_MODULE_SITES}

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        tokenizer, tokenizer_2 = tiny.clip_tokenizer(tmp_dir / "clip"), tiny.t5_tokenizer()
        return dict(
            transformer=FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=tiny.WIDTH, pooled_projection_dim=tiny.WIDTH,
                axes_dims_rope=[4, 6, 6]),
            vae=tiny.autoencoder_kl(4, shift_factor=0.0609, scaling_factor=1.5035),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=tiny.clip_text_model(tokenizer), tokenizer=tokenizer,
            text_encoder_2=tiny.t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
        )
