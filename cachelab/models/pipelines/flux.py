"""FLUX (``FluxPipeline``): 19 double-stream and 38 single-stream blocks in FLUX.1.

Module sites as in the official TaylorSeer-FLUX code: per double block the joint
attention (image and text streams: one state each) and both feed-forwards, pre-gate;
per single block the fused output projection, with its attention and MLP input
projection skipped (zeros) on forecast steps since only ``proj_out`` consumes them. Under token
selection the fused projection recomputes its selected tokens from the skipped inputs
(:func:`single_block_tokens`), as ToCa's FLUX code does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cachelab.models.diffusers_private import dispatch_options, qkv_projections
from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PipelineAdapter
from cachelab.core.sites import SitePattern, first_tensor
from cachelab.core.tokens import TOKENWISE, FromSkipped, gather_tokens
from cachelab.errors import ConfigError

_DOUBLE, _SINGLE = r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"
# The official TaylorSeer module sites of dual-stream models (FLUX, HunyuanVideo): per double
# block the joint attention and both feed-forwards; per single block the fused output
# projection, its inputs (attention, MLP projection) skipped on forecast steps. Token selection:
# the feed-forwards are token-wise; the joint attention and (here) the single blocks' fused
# projection, whose inputs are skipped, cannot compute a subset of their tokens.
_SINGLE_OUT = rf"{_SINGLE}\.proj_out"
DUAL_STREAM_MODULE_SITES = [SitePattern(rf"{_DOUBLE}\.attn"), SitePattern(rf"{_DOUBLE}\.(ff|ff_context)", tokens=TOKENWISE),
                            SitePattern(_SINGLE_OUT), SitePattern(rf"{_SINGLE}\.(attn|proj_mlp)", skip="proj_out")]


def single_block_tokens(block: torch.nn.Module, inputs: dict, index: torch.Tensor) -> torch.Tensor:
    """``FluxSingleTransformerBlock.proj_out`` at the tokens ``index`` (B, k) only, from the skipped
    calls' arguments (token selection): the MLP (``act_mlp(proj_mlp(.))``) of the k tokens of the
    block's normalised input and their attention (:func:`attention_at`), concatenated and projected
    as the block does (``proj_mlp`` and ``proj_out`` by their class's ``forward``: the instances'
    are the cache sites' hooks). (B, k, D)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    if not isinstance(block, FluxSingleTransformerBlock):
        raise ConfigError(f"strategy.tokens: {type(block).__name__} is not FLUX's single block, whose tokens this "
                          f"computes; allowed: strategy.tokens.attention_kinds=[attn,attn1,proj_out]")
    args, kwargs = inputs["attn"]
    extra = sorted(set(kwargs) - {"hidden_states", "image_rotary_emb"})
    if len(args) > 1 or extra:
        raise ConfigError(f"strategy.tokens: FLUX's single-block attention was called with {extra or 'positional'} "
                          f"arguments, which token selection does not compute; allowed: "
                          f"strategy.tokens.attention_kinds=[attn,attn1,proj_out]")
    h = first_tensor(args, kwargs)
    mlp = block.act_mlp(type(block.proj_mlp).forward(block.proj_mlp, gather_tokens(h, index)))
    attn = attention_at(block.attn, h, index, kwargs.get("image_rotary_emb"))
    return type(block.proj_out).forward(block.proj_out, torch.cat([attn, mlp], dim=2))


def attention_at(attn: torch.nn.Module, h: torch.Tensor, index: torch.Tensor, rotary) -> torch.Tensor:
    """``FluxAttnProcessor`` on a ``FluxAttention`` without a text stream (single blocks), for the
    queries at ``index`` (B, k) against the keys and values of every token of ``h`` (B, N, D): the
    same operations, the query projection, norm and rotation run on the k tokens. (B, k, inner)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if type(attn.processor) is not FluxAttnProcessor or attn.fused_projections or attn.added_kv_proj_dim is not None:
        raise ConfigError(f"strategy.tokens: the single block's attention ({type(attn.processor).__name__}, fused "
                          f"projections {attn.fused_projections}) is not FluxAttnProcessor's on separate projections; "
                          f"allowed: strategy.tokens.attention_kinds=[attn,attn1,proj_out]")
    B, k = index.shape
    query = attn.norm_q(attn.to_q(gather_tokens(h, index)).unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(attn.to_k(h).unflatten(-1, (-1, attn.head_dim)))
    value = attn.to_v(h).unflatten(-1, (-1, attn.head_dim))
    if rotary is not None:  # each query at its own position: batch and tokens flattened into one sequence
        cos, sin = rotary
        flat = index.reshape(-1)
        query = apply_rotary_emb(query.reshape(1, B * k, *query.shape[2:]), (cos[flat], sin[flat]),
                                 sequence_dim=1).reshape(query.shape)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    out = dispatch_attention_fn(query, key, value, attn_mask=None, **dispatch_options(attn.processor))
    return out.flatten(2, 3).to(query.dtype)


def attention_received(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                       attention_mask=None, image_rotary_emb=None, chunk: int = 1024):
    """ToCa's attention score of a ``FluxAttention`` call, computed again on request (its fused
    attention gives no map): the softmax map of ``FluxAttnProcessor``'s queries and keys (norms and
    rotation included), averaged over heads and summed over queries, ``chunk`` queries at a time.
    (B, N) over the sequence attended (single blocks: text then image, as ``proj_out`` sees it);
    for joint attention a dict per stream: ``ff_context`` the text tokens, ``ff`` the image."""
    from diffusers.models.embeddings import apply_rotary_emb

    if attention_mask is not None:
        raise ConfigError("strategy.tokens.score=attention: FLUX's attention was called with a mask, which the "
                          "attention score does not apply; allowed: strategy.tokens.score=norm or random")
    query, key, _, encoder_query, encoder_key, _ = qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if joint:
        query = torch.cat([attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
        key = torch.cat([attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, heads, N, head_dim)
    received = sum(((q * attn.head_dim ** -0.5) @ key.transpose(-2, -1)).softmax(dim=-1).sum(dim=2)
                   for q in query.split(chunk, dim=2)).mean(dim=1)
    if not joint:
        return received
    text = encoder_hidden_states.shape[1]
    return {"ff_context": received[:, :text], "ff": received[:, text:]}


# FLUX's: the double blocks' joint attention gives ToCa's attention score to their feed-forwards,
# the single blocks' attention to their fused projection, which recomputes its tokens from the
# skipped inputs
_SCORES = (("attention", attention_received),)
FLUX_MODULE_SITES = [SitePattern(rf"{_DOUBLE}\.attn", scores=_SCORES),
                     SitePattern(rf"{_DOUBLE}\.(ff|ff_context)", tokens=TOKENWISE),
                     SitePattern(_SINGLE_OUT, tokens=FromSkipped(single_block_tokens)),
                     SitePattern(rf"{_SINGLE}\.attn", skip="proj_out", scores=_SCORES),
                     SitePattern(rf"{_SINGLE}\.proj_mlp", skip="proj_out")]


class FluxAdapter(PipelineAdapter):
    """FLUX.1 through ``FluxPipeline`` (guidance-distilled: one transformer call per step;
    with ``negative_prompt`` and ``call_kwargs.true_cfg_scale > 1`` two, cond and uncond)."""

    pipeline_class = "FluxPipeline"
    # the official module sites; block, stack, output and the probes are discovered
    sites = {"module": FLUX_MODULE_SITES}

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
