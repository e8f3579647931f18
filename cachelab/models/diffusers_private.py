"""diffusers' private names that cachelab uses, all read here and nowhere else in the library.

Checked against diffusers 0.42.1 (``pyproject.toml`` asks for 0.36 or later). Each of these may
change in any release, without notice:

- ``diffusers.hooks._helpers.TransformerBlockRegistry`` (its ``get``): which output of a block class
  is the image stream and which the text stream (discovery, for blocks that hand nothing on);
- ``diffusers.models.transformers.transformer_flux._get_qkv_projections``: FLUX's query, key and
  value projections (ToCa's attention score);
- an attention processor's ``_attention_backend`` and ``_parallel_config``: FLUX's attention
  dispatched as its processor does (token selection);
- ``CacheMixin._reset_stateful_cache``: diffusers' caching hooks reset after a generation;
- ``ModelMixin._cp_plan`` and ``ModelMixin._parallel_config``, ``ContextParallelConfig._flattened_mesh``
  and ``._device``: context parallelism and the group of ranks sharing one generation;
- ``FluxPipeline._pack_latents`` and ``_prepare_latent_image_ids``: training the digits FLUX.

The one fallback (:func:`private`): a name missing where its absence has a meaning (``optional``: a
module that is not diffusers' has no context-parallel plan; a block class diffusers has no metadata
for) reads as None; any other missing name is one error naming it, the installed release and the
release checked against.
"""
from __future__ import annotations

CHECKED = "0.42.1"  # the diffusers release these names were checked against


def private(owner, name: str, optional: bool = False):
    """``owner.<name>``, a private diffusers name; missing: None when ``optional``, else one error."""
    if hasattr(owner, name):
        return getattr(owner, name)
    if optional:
        return None
    import diffusers

    owner_name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
    raise RuntimeError(f"diffusers {diffusers.__version__} has no {owner_name}.{name}, a private name cachelab uses "
                       f"(checked against diffusers {CHECKED}); install diffusers {CHECKED}")


def block_metadata(block_class: type):
    """diffusers' ``TransformerBlockMetadata`` of ``block_class`` (the argument names and output
    indices of its image and text streams), or None where diffusers has none for it."""
    from diffusers.hooks import _helpers

    registry = private(_helpers, "TransformerBlockRegistry")
    try:
        return registry.get(block_class)
    except ValueError:  # the registry's answer for a class it has no metadata for
        return None


def qkv_projections(attn, hidden_states, encoder_hidden_states=None) -> tuple:
    """FLUX's ``(query, key, value, encoder_query, encoder_key, encoder_value)`` of a ``FluxAttention``
    call, fused projections or not."""
    from diffusers.models.transformers import transformer_flux

    return private(transformer_flux, "_get_qkv_projections")(attn, hidden_states, encoder_hidden_states)


def dispatch_options(processor) -> dict:
    """The ``backend`` and ``parallel_config`` an attention processor passes to ``dispatch_attention_fn``."""
    return {"backend": private(processor, "_attention_backend"),
            "parallel_config": private(processor, "_parallel_config")}


def reset_cache_hooks(model) -> None:
    """Reset the state of diffusers' caching hooks on ``model`` (a ``CacheMixin``), as a pipeline does after a call."""
    private(model, "_reset_stateful_cache")()


def context_parallel_plan(model) -> dict | None:
    """The model's context-parallel plan (None: none, or not a diffusers model)."""
    return private(model, "_cp_plan", optional=True)


def context_parallel_config(model):
    """The ``ContextParallelConfig`` the model runs under (None: not context parallel)."""
    return getattr(private(model, "_parallel_config", optional=True), "context_parallel_config", None)


def mesh_group(config):
    """The process group of all ranks of a ``ContextParallelConfig`` (ring and Ulysses flattened)."""
    return private(config, "_flattened_mesh").get_group()


def mesh_device(config):
    """The device a ``ContextParallelConfig`` places its rank on."""
    return private(config, "_device")


def pack_latents(pipe, latents, batch: int, channels: int, height: int, width: int):
    """FLUX's latents (B, C, H, W) as its transformer's token sequence."""
    return private(pipe, "_pack_latents")(latents, batch, channels, height, width)


def latent_image_ids(pipe, batch: int, height: int, width: int, device, dtype):
    """FLUX's position ids of the latent tokens."""
    return private(pipe, "_prepare_latent_image_ids")(batch, height, width, device, dtype)
