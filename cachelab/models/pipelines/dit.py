"""diffusers' DiT (``DiTPipeline`` + ``DiTTransformer2DModel``): class-conditional, batched CFG.

Discovered sites: module: each block's self-attention and feed-forward outputs, before the
adaLN-Zero gate (the paper's DiT choice); block: each block's residual; output: the model.
"""
from __future__ import annotations

from pathlib import Path

from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter, PromptInputs


class DiffusersDiTAdapter(PipelineAdapter):
    """DiT through ``DiTPipeline``; ``prompts`` are ImageNet class ids."""

    pipeline_class = "DiTPipeline"
    prompt_key = "class_labels"

    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        from diffusers import DDIMScheduler, DiTTransformer2DModel

        return dict(
            transformer=DiTTransformer2DModel(
                sample_size=16, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2,
                in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero", norm_elementwise_affine=False),
            vae=tiny.autoencoder_kl(4),
            scheduler=DDIMScheduler(),
        )

    def call_arguments(self, inputs: PromptInputs) -> dict:
        return {"class_labels": [int(label) for label in inputs.prompts], "guidance_scale": self.guidance_scale,
                **self.call_kwargs}
