"""FLUX (``FluxPipeline``): 19 double-stream and 38 single-stream blocks in FLUX.1.

Module sites as in the official TaylorSeer-FLUX code: per double block the joint
attention (image and text streams: one state each) and both feed-forwards, pre-gate;
per single block the fused output projection, with its attention and MLP input
projection skipped (zeros) on forecast steps since only ``proj_out`` consumes them.
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter, family_sites
from cachelab.core.sites import SitePattern

_DOUBLE, _SINGLE = r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"
STREAMS = ("encoder_hidden_states", "hidden_states")  # what a block returns, in order
# Adaptive schedules' signals (as TeaCache4FLUX and FBCache): the first double block's
# image-stream residual; its norm1 (adaLN-Zero) returns the modulated image input first.
PROBES = {"first_block_residual": SitePattern(r"transformer_blocks\.0", residual=(None, "hidden_states")),
          "modulated_input": SitePattern(r"transformer_blocks\.0\.norm1")}


class FluxAdapter(PipelineAdapter):
    """FLUX.1 through ``FluxPipeline`` (guidance-distilled: one transformer call per step;
    with ``negative_prompt`` and ``call_kwargs.true_cfg_scale > 1`` two, cond and uncond)."""

    pipeline_class = "FluxPipeline"
    timestep_scale = 1000.0  # the pipeline passes t / 1000
    sites = family_sites([SitePattern(rf"{_DOUBLE}\.(attn|ff|ff_context)"), SitePattern(rf"{_SINGLE}\.proj_out"),
                          SitePattern(rf"{_SINGLE}\.(attn|proj_mlp)", skip="proj_out")],
                         f"{_DOUBLE}|{_SINGLE}", STREAMS, PROBES)

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
