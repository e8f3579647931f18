"""An original-layout DiT (:class:`~cachelab.models.dit.DiT`, the reference checkpoints) as
diffusers' ``DiTTransformer2DModel``, so that diffusers' caching hooks and other tools built on
diffusers' classes can run on it.

The key mapping is that of diffusers' ``scripts/convert_dit_to_diffusers.py``: each block's
``AdaLayerNormZero`` gets a copy of the timestep and label embedders, ``qkv`` is split into
``to_q``/``to_k``/``to_v``, ``proj`` becomes ``to_out.0``, the MLP's ``fc1``/``fc2`` become
``ff.net.0.proj``/``ff.net.2``, the final layer ``proj_out_1``/``proj_out_2``. Two details make
the converted model compute what the original does (diffusers' converter leaves both as they
are): the LayerNorm epsilon is the original's 1e-6, and the timestep frequencies are the
original's ``exp(-ln(10000) i / 128)``, where diffusers' DiT embedder divides by 127
(``downscale_freq_shift=1``); the converted model's embedders are set to the original's on the
instance (a model saved and reloaded with ``from_pretrained`` gets diffusers' frequencies back).

:class:`DiffusersDiT` wraps the converted transformer in the original's call signature, so the
native sampler (:class:`~cachelab.models.dit_adapter.DiTAdapter`) drives it unchanged;
:class:`ConvertedDiTAdapter` is that adapter on the converted model, its sites discovered.
"""
from __future__ import annotations

from functools import cache, cached_property

import torch
from torch import nn

from cachelab.core.sites import SitePattern
from cachelab.errors import CheckpointMismatch
from cachelab.models.diffusers_private import reset_cache_hooks
from cachelab.models.diffusion import DDIMSchedule
from cachelab.models.dit import DiT, guided_forward
from cachelab.models.dit_adapter import DiTAdapter
from cachelab.models.discovery import DiscoveredSites, discover


def diffusers_config(model: DiT) -> dict:
    """``DiTTransformer2DModel`` arguments of ``model``'s architecture."""
    block = model.blocks[0]
    width = model.pos_embed.shape[-1]
    if block.mlp.fc1.out_features != 4 * width:
        raise CheckpointMismatch(f"DiT MLP width {block.mlp.fc1.out_features} is not 4 x {width}: diffusers' "
                                 f"DiTTransformer2DModel has no mlp_ratio; allowed: mlp_ratio=4")
    if model.y_embedder.embedding_table.num_embeddings != model.num_classes + 1:
        raise CheckpointMismatch("the DiT has no null-class embedding (class_dropout_prob=0): diffusers' "
                                 "DiTTransformer2DModel always has one; allowed: class_dropout_prob > 0")
    return dict(num_attention_heads=model.num_heads, attention_head_dim=width // model.num_heads,
                in_channels=model.in_channels, out_channels=model.out_channels, num_layers=len(model.blocks),
                sample_size=model.input_size, patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes,
                activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=1e-6)


def convert_state_dict(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """An original DiT state dict (``depth`` blocks) in ``DiTTransformer2DModel``'s keys (all of
    them; the fixed position embedding, a buffer diffusers does not save, is left out)."""
    sd = dict(state_dict)
    out = {"pos_embed.proj.weight": sd.pop("x_embedder.proj.weight"),
           "pos_embed.proj.bias": sd.pop("x_embedder.proj.bias")}
    sd.pop("pos_embed")  # a non-persistent buffer there: :func:`dit_to_diffusers` copies it
    embedders = {"emb.timestep_embedder.linear_1": "t_embedder.mlp.0", "emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
    for i in range(depth):
        ours, theirs = f"transformer_blocks.{i}", f"blocks.{i}"
        for new, old in embedders.items():
            for kind in ("weight", "bias"):
                out[f"{ours}.norm1.{new}.{kind}"] = state_dict[f"{old}.{kind}"].clone()
        out[f"{ours}.norm1.emb.class_embedder.embedding_table.weight"] = \
            state_dict["y_embedder.embedding_table.weight"].clone()
        for kind in ("weight", "bias"):
            q, k, v = sd.pop(f"{theirs}.attn.qkv.{kind}").chunk(3, dim=0)
            out.update({f"{ours}.attn1.to_q.{kind}": q, f"{ours}.attn1.to_k.{kind}": k, f"{ours}.attn1.to_v.{kind}": v})
            for new, old in (("norm1.linear", "adaLN_modulation.1"), ("attn1.to_out.0", "attn.proj"),
                             ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):
                out[f"{ours}.{new}.{kind}"] = sd.pop(f"{theirs}.{old}.{kind}")
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = sd.pop(f"final_layer.adaLN_modulation.1.{kind}")
        out[f"proj_out_2.{kind}"] = sd.pop(f"final_layer.linear.{kind}")
        for old in embedders.values():
            sd.pop(f"{old}.{kind}")
    sd.pop("y_embedder.embedding_table.weight")
    if sd:
        raise CheckpointMismatch(f"unconverted DiT keys: {', '.join(sorted(sd)[:5])}")
    return out


@cache
def caching_dit_class() -> type:
    """``DiTTransformer2DModel`` with diffusers' caching interface (``enable_cache``,
    ``cache_context``: diffusers' ``CacheMixin``), which diffusers' own DiT class lacks."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.cache_utils import CacheMixin

    class CachingDiTTransformer2DModel(DiTTransformer2DModel, CacheMixin):
        """diffusers' DiT transformer that diffusers' caching hooks can be enabled on."""

    return CachingDiTTransformer2DModel


def dit_to_diffusers(model: DiT):
    """``model`` as a ``DiTTransformer2DModel`` (:func:`caching_dit_class`) computing the same
    function (float rounding aside), in ``model``'s dtype and device, in eval mode."""
    parameter = next(model.parameters())
    converted = caching_dit_class()(**diffusers_config(model))
    converted.load_state_dict(convert_state_dict(model.state_dict(), len(model.blocks)), strict=True)
    converted.pos_embed.pos_embed.copy_(model.pos_embed.detach())
    for block in converted.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # the original's frequencies (module docstring)
    if parameter.dtype != torch.float32:
        converted = converted.to(parameter.dtype)
    return converted.to(parameter.device).eval()


class DiffusersDiT(nn.Module):
    """A ``DiTTransformer2DModel`` called like the original DiT: ``(x, t, y) -> output`` and
    ``forward_with_cfg``. Each call runs in the transformer's ``cache_context("cond")`` (the
    batched CFG call is one call, as in diffusers' ``DiTPipeline``), where diffusers' caching
    hooks keep their state (``transformer``: :func:`dit_to_diffusers`'s); ``current_timestep`` is
    the last call's timestep, as a diffusers pipeline exposes it (PAB's callback reads it)."""

    def __init__(self, transformer, num_classes: int, input_size: int):
        super().__init__()
        self.transformer = transformer
        self.in_channels = transformer.config.in_channels
        self.out_channels, self.num_classes, self.input_size = transformer.out_channels, num_classes, input_size
        self.current_timestep: int | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.current_timestep = int(t[0])
        with self.transformer.cache_context("cond"):
            return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None) -> torch.Tensor:
        """:meth:`DiT.forward_with_cfg <cachelab.models.dit.DiT.forward_with_cfg>` on this model,
        called as a module (its forward hooks run: site discovery traces through them)."""
        return guided_forward(self, x, t, y, cfg_scale, self.in_channels, guided_channels)


class ConvertedDiTAdapter(DiTAdapter):
    """:class:`DiTAdapter`'s model (shipped weights, a checkpoint or a preset) converted to
    diffusers' ``DiTTransformer2DModel`` and sampled by the same DDIM loop; sites are discovered
    (:mod:`cachelab.models.discovery`) from one call at the first step's timestep."""

    def build(self) -> DiffusersDiT:
        native = super().build()
        return DiffusersDiT(dit_to_diffusers(native), native.num_classes, native.input_size)

    def generate(self, inputs, handle=None, callback=None, progress=None) -> torch.Tensor:
        """:meth:`DiTAdapter.generate`; then, as a diffusers pipeline does at the end of its
        call, the state of any diffusers caching hook on the transformer is reset."""
        try:
            return super().generate(inputs, handle, callback, progress)
        finally:
            reset_cache_hooks(self.transformer)

    @property
    def transformer(self):
        """The converted ``DiTTransformer2DModel``."""
        return self.model.transformer

    @cached_property
    def discovered(self) -> DiscoveredSites:
        """The sites, read from one forward of the model at the sampler's first timestep."""
        inputs = self.make_inputs(1, seed=0)
        t = torch.full((1,), int(DDIMSchedule.respaced(self.num_steps).timesteps[0]), device=self.device)
        return discover(self.model, lambda: self.model(inputs.noise, t, inputs.labels))

    def site_patterns(self, granularity: str) -> list[SitePattern]:
        return self.discovered.site_patterns(granularity)
