"""HunyuanVideo (``HunyuanVideoPipeline`` + ``HunyuanVideoTransformer3DModel``): 20 double- and
40 single-stream blocks, embedded guidance (one call per step; true CFG with a negative
prompt and ``call_kwargs.true_cfg_scale > 1`` runs cond and uncond in separate contexts).

Module sites as in the official TaylorSeer-HunyuanVideo code: per double block the joint
attention (image and text streams) and both feed-forwards; per single block the fused
output projection, with the attention and MLP input projection skipped on forecast steps.
The token refiner and every modulation still run each step.
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter
from cachelab.models.pipelines.flux import DUAL_STREAM_MODULE_SITES


class HunyuanVideoAdapter(PipelineAdapter):
    """HunyuanVideo through ``HunyuanVideoPipeline``."""

    pipeline_class = "HunyuanVideoPipeline"
    # the official module sites; block, stack, output and the probes are discovered
    sites = {"module": DUAL_STREAM_MODULE_SITES}

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
        from diffusers import HunyuanVideoTransformer3DModel

        llama, clip = tiny.llama_tokenizer(), tiny.clip_tokenizer(tmp_dir / "clip")
        return dict(
            transformer=HunyuanVideoTransformer3DModel(
                in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=tiny.WIDTH, pooled_projection_dim=tiny.WIDTH, rope_axes_dim=(2, 4, 4)),
            vae=AutoencoderKLHunyuanVideo(
                in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
                temporal_compression_ratio=4, mid_block_add_attention=True),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder=tiny.llama_model(llama), tokenizer=llama,
            text_encoder_2=tiny.clip_text_model(clip), tokenizer_2=clip,
        )
