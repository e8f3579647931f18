"""A zoo of tiny random diffusers transformers, each with the inputs of one forward call.

Every transformer class that a pipeline of the installed diffusers uses (read from the
annotations of the pipelines' ``transformer`` / ``transformer_2`` parameters) gets one entry:
a small config (1-2 blocks per stack, width 16-64, 2 heads) and a function making the keyword
arguments of one forward call (tiny latents: 8x8 images, 2-3 frames for video, short text).

Weights are random (``torch.manual_seed(0)``); parameters a class initialises to all zeros
(adaLN-Zero gates, zero-init output projections) or leaves uninitialised are refilled with small
random values, so that every block, and the timestep, reaches the output.

Run ``python -m train_free_runs.coverage.zoo`` to build every specimen, call it at two
timesteps with batch 2 and print a table.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
import types
import typing
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Specimen", "SPECIMENS", "UNSUPPORTED", "pipeline_transformer_classes", "specimen"]


@dataclass(frozen=True)
class Specimen:
    """One transformer class of diffusers, built tiny and random, with the inputs of one forward call."""

    name: str
    pipelines: tuple[str, ...]
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, float], dict]
    timestep_range: tuple[float, float]


# --------------------------------------------------------------------------- pipelines


def _model_classes(annotation) -> list[str]:
    """Names of the diffusers model classes in a parameter annotation (class, union or string)."""
    import diffusers

    if isinstance(annotation, str):
        names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", annotation)
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None, Optional[X]
        names = [getattr(a, "__name__", "") for a in typing.get_args(annotation)]
    else:
        names = [getattr(annotation, "__name__", "")]
    found = []
    for n in names:
        obj = getattr(diffusers, n, None) if n and n[0].isupper() else None
        if inspect.isclass(obj) and issubclass(obj, diffusers.ModelMixin):
            found.append(n)
    return found


def pipeline_transformer_classes() -> dict[str, tuple[str, ...]]:
    """Every transformer class that some pipeline class in the installed diffusers uses (read from the
    type annotation of the `transformer` (and `transformer_2`) parameter of each pipeline's __init__,
    via `inspect` over `diffusers` pipeline classes), -> the pipeline class names using it."""
    return dict(_pipeline_map())


@functools.cache
def _pipeline_map() -> dict[str, tuple[str, ...]]:
    import diffusers

    users: dict[str, set[str]] = {}
    for attr in dir(diffusers):
        if "Pipeline" not in attr:
            continue
        pipe = getattr(diffusers, attr)  # imports the pipeline module
        if not (inspect.isclass(pipe) and issubclass(pipe, diffusers.DiffusionPipeline)):
            continue
        params = inspect.signature(pipe.__init__).parameters
        for key in ("transformer", "transformer_2"):
            if key in params:
                for cls in _model_classes(params[key].annotation):
                    users.setdefault(cls, set()).add(pipe.__name__)
    return {cls: tuple(sorted(p)) for cls, p in sorted(users.items())}


# --------------------------------------------------------------------------- helpers


class _Rng:
    """Seeded tensor source: the same sequence of calls gives the same tensors."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.g)


def _ts(batch: int, t: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((batch,), t, dtype=dtype)


def _ones(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype)


def _ids(*sizes: int, prefix: int = 0) -> torch.Tensor:
    """Integer position ids of a grid, one row per cell: (prod(sizes), len(sizes) + prefix), float."""
    grid = torch.cartesian_prod(*[torch.arange(s) for s in sizes]).reshape(-1, len(sizes))
    return torch.cat([torch.zeros(grid.shape[0], prefix, dtype=grid.dtype), grid], dim=1).float()


def _fill_unset(model: torch.nn.Module, std: float = 0.05) -> None:
    """Refill parameters left all zero (adaLN-Zero, zero-init projections) or uninitialised (NaN, see _build)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and (not p.any() or p.isnan().any()):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@dataclass(frozen=True)
class _Entry:
    """Table row: a class, its tiny config and its input maker ``(rng, batch, t) -> kwargs``."""

    cls: str
    config: dict
    make: Callable[[_Rng, int, float], dict]
    timestep_range: tuple[float, float] = (0.0, 1000.0)
    name: str | None = None


def _build(entry: _Entry) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    # With deterministic algorithms on, torch.empty fills NaN: parameters a class never initialises
    # (LuminaNextDiT2DModel.pad_token) show up and are refilled instead of holding stale memory.
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model = getattr(diffusers, entry.cls)(**entry.config)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    _fill_unset(model)
    return model.float().eval()


def _inputs(entry: _Entry, batch: int, t: float) -> dict:
    return entry.make(_Rng(0), batch, float(t))


# --------------------------------------------------------------------------- input makers
# Shared sizes: 8x8 latents of 4 channels (packed 2x2 -> 4x4 tokens of 16 channels for the
# FLUX-style classes), 2 latent frames for video, text of 8 tokens.

TXT = 8


def _flux_like(pooled: int | None = None, guidance: float | None = None):
    """FLUX-family inputs: packed tokens, text, 3-axis position ids (img: (0, h, w); txt: zeros)."""

    def make(r: _Rng, b: int, t: float) -> dict:
        kw = dict(hidden_states=r.randn(b, 16, 16), encoder_hidden_states=r.randn(b, TXT, 32))
        if pooled:
            kw["pooled_projections"] = r.randn(b, pooled)
        kw.update(img_ids=_ids(4, 4, prefix=1), txt_ids=torch.zeros(TXT, 3), timestep=_ts(b, t))
        if guidance is not None:
            kw["guidance"] = _ts(b, guidance)
        return kw

    return make


def _flux2(r: _Rng, b: int, t: float) -> dict:
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TXT))
    return dict(
        hidden_states=r.randn(b, 16, 16),
        encoder_hidden_states=r.randn(b, TXT, 32),
        img_ids=img_ids.expand(b, -1, -1),
        txt_ids=txt_ids.expand(b, -1, -1),
        timestep=_ts(b, t),
        guidance=_ts(b, 4.0),
    )


def _qwen(txt: int):
    def make(r: _Rng, b: int, t: float) -> dict:
        return dict(
            hidden_states=r.randn(b, 16, 16),
            encoder_hidden_states=r.randn(b, txt, 16),
            encoder_hidden_states_mask=_ones(b, txt, dtype=torch.long),
            timestep=_ts(b, t),
            img_shapes=[(1, 4, 4)] * b,
        )

    return make


def _sd3(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        encoder_hidden_states=r.randn(b, TXT, 32),
        pooled_projections=r.randn(b, 32),
        timestep=_ts(b, t),
    )


def _img_text(r: _Rng, b: int, t: float) -> dict:
    """Image latents (b, 4, 8, 8) and text (b, 8, 16)."""
    return dict(hidden_states=r.randn(b, 4, 8, 8), encoder_hidden_states=r.randn(b, TXT, 16), timestep=_ts(b, t))


def _video_text(channels: int = 4):
    """Video latents (b, channels, 2, 8, 8) and text (b, 8, 16)."""

    def make(r: _Rng, b: int, t: float) -> dict:
        return dict(
            hidden_states=r.randn(b, channels, 2, 8, 8),
            encoder_hidden_states=r.randn(b, TXT, 16),
            timestep=_ts(b, t),
        )

    return make


def _cogview(r: _Rng, b: int, t: float) -> dict:
    """CogView 3/4 inputs with size conditions: original / target size 64x64, crop (0, 0)."""
    size = torch.tensor([[64.0, 64.0]]).repeat(b, 1)
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        original_size=size,
        target_size=size,
        crop_coords=torch.zeros(b, 2),
    )


def _dit(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, round(t), torch.long),  # DiT's schedulers hand over integer steps
        class_labels=r.randint(10, b),
    )


def _pixart(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _hunyuan_dit(r: _Rng, b: int, t: float) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, 4, 16),
        text_embedding_mask=_ones(b, 4),
        encoder_hidden_states_t5=r.randn(b, 4, 16),
        text_embedding_mask_t5=_ones(b, 4),
        image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]).repeat(b, 1),
        style=torch.zeros(b, dtype=torch.long),
        image_rotary_emb=get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4)),
    )


def _lumina_next(r: _Rng, b: int, t: float) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_mask=_ones(b, TXT),
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 16, 16),
        cross_attention_kwargs={},
    )


def _lumina2(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_attention_mask=_ones(b, TXT, dtype=torch.bool),
    )


def _z_image(r: _Rng, b: int, t: float) -> dict:
    return dict(
        x=[r.randn(4, 1, 8, 8) for _ in range(b)],
        cap_feats=[r.randn(TXT, 16) for _ in range(b)],
        t=_ts(b, t),
    )


def _hidream(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timesteps=_ts(b, t),
        encoder_hidden_states_t5=r.randn(b, TXT, 16),
        encoder_hidden_states_llama3=r.randn(4, b, TXT, 8),
        pooled_embeds=r.randn(b, 16),
    )


def _ernie(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, t),
        text_bth=r.randn(b, TXT, 16),
        text_lens=torch.full((b,), TXT, dtype=torch.long),
    )


def _omnigen(r: _Rng, b: int, t: float) -> dict:
    n_img = 16  # 8x8 latents, patch 2
    seq = TXT + 1 + n_img
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, t),
        input_ids=r.randint(10, b, TXT),
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=_ones(b, seq, seq),
        position_ids=torch.arange(seq).repeat(b, 1),
    )


def _glm_image(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        encoder_hidden_states=r.randn(b, TXT, 32),
        prior_token_id=r.randint(64, b, 16),  # one prior token per image token
        prior_token_drop=torch.zeros(b, dtype=torch.bool),
        timestep=_ts(b, t),
        target_size=torch.tensor([[8.0, 8.0]]).repeat(b, 1),
        crop_coords=torch.zeros(b, 2),
    )


def _vq_diffusion(r: _Rng, b: int, t: float) -> dict:
    # AdaLayerNorm (norm_type "ada_norm") embeds ONE integer step for the whole batch: a 0-d timestep
    return dict(
        hidden_states=r.randint(31, b, 64),  # codebook indices of an 8x8 grid
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=torch.tensor(round(t)),
    )


def _cogvideox(r: _Rng, b: int, t: float) -> dict:
    return dict(hidden_states=r.randn(b, 2, 4, 8, 8), encoder_hidden_states=r.randn(b, TXT, 16), timestep=_ts(b, t))


def _hunyuan_video(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_attention_mask=_ones(b, TXT),
        pooled_projections=r.randn(b, 8),
        guidance=_ts(b, 6000.0),
    )


def _hunyuan_video15(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_attention_mask=_ones(b, TXT),
        encoder_hidden_states_2=r.randn(b, 4, 8),
        encoder_attention_mask_2=_ones(b, 4),
        image_embeds=torch.zeros(b, 3, 12),
    )


def _framepack(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_attention_mask=_ones(b, TXT),
        pooled_projections=r.randn(b, 8),
        image_embeds=r.randn(b, TXT, 16),
        indices_latents=torch.arange(2),
        guidance=_ts(b, 10000.0),
        latents_clean=r.randn(b, 4, 1, 8, 8),
        indices_latents_clean=torch.tensor([2]),
        latents_history_2x=r.randn(b, 4, 2, 8, 8),
        indices_latents_history_2x=torch.tensor([3, 4]),
        latents_history_4x=r.randn(b, 4, 4, 8, 8),
        indices_latents_history_4x=torch.tensor([5, 6, 7, 8]),
    )


def _ltx(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 2 * 4 * 4, 4),
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        encoder_attention_mask=_ones(b, TXT, dtype=torch.bool),
        num_frames=2,
        height=4,
        width=4,
    )


def _ltx2(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 2 * 4 * 4, 4),
        audio_hidden_states=r.randn(b, 5, 4),
        encoder_hidden_states=r.randn(b, TXT, 16),
        audio_encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        encoder_attention_mask=_ones(b, TXT, dtype=torch.bool),
        num_frames=2,
        height=4,
        width=4,
        audio_num_frames=5,
        fps=25.0,
    )


def _mochi(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        encoder_attention_mask=_ones(b, TXT, dtype=torch.bool),
    )


def _cosmos(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        attention_mask=_ones(b, TXT),
        fps=24,
        padding_mask=torch.zeros(1, 1, 8, 8),  # repeated over the batch inside
    )


def _wan_vace(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        control_hidden_states=r.randn(b, 12, 2, 8, 8),
    )


def _wan_animate(r: _Rng, b: int, t: float) -> dict:
    # 5 face frames -> 2 latent frames; the hidden states carry one reference frame in front of them
    return dict(
        hidden_states=r.randn(b, 12, 3, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_hidden_states_image=r.randn(b, 4, 16),
        pose_hidden_states=r.randn(b, 4, 2, 8, 8),
        face_pixel_values=r.randn(b, 3, 5, 16, 16),
    )


def _helios(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 2, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        indices_hidden_states=_ones(b, 2),
        indices_latents_history_short=_ones(b, 1),
        indices_latents_history_mid=_ones(b, 1),
        indices_latents_history_long=_ones(b, 4),
        latents_history_short=r.randn(b, 4, 1, 8, 8),
        latents_history_mid=r.randn(b, 4, 1, 8, 8),
        latents_history_long=r.randn(b, 4, 4, 8, 8),
    )


def _anyflow(far: bool):
    def make(r: _Rng, b: int, t: float) -> dict:
        frames = 4 if far else 2
        kw = dict(
            hidden_states=r.randn(b, frames, 4, 8, 8),
            timestep=torch.full((b, frames), t),
            r_timestep=torch.full((b, frames), t),
            encoder_hidden_states=r.randn(b, TXT, 16),
        )
        if far:
            kw["chunk_partition"] = [2, 2]
        return kw

    return make


def _joyimage(r: _Rng, b: int, t: float) -> dict:
    return dict(hidden_states=r.randn(b, 4, 1, 8, 8), encoder_hidden_states=r.randn(b, TXT, 16), timestep=_ts(b, t))


def _joyimage_plus(r: _Rng, b: int, t: float) -> dict:
    # one row per (1, 2, 2) patch: 16 of the target and 16 of one reference image, each 4x4 patches
    return dict(
        hidden_states=r.randn(b, 32, 4, 1, 2, 2),
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        shape_list=[[(1, 4, 4), (1, 4, 4)]] * b,
    )


def _kandinsky5(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 2, 8, 8, 4),
        encoder_hidden_states=r.randn(b, TXT, 16),
        timestep=_ts(b, t),
        pooled_projections=r.randn(b, 8),
        visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
        text_rope_pos=torch.arange(TXT),
    )


def _longcat_audio(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 16, 8),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_attention_mask=_ones(b, TXT, dtype=torch.bool),
        timestep=_ts(b, t),
        attention_mask=_ones(b, 16, dtype=torch.bool),
    )


def _bria_fibo(r: _Rng, b: int, t: float) -> dict:
    kw = _flux_like()(r, b, t)
    kw["text_encoder_layers"] = [r.randn(b, TXT, 16) for _ in range(4)]  # one per block (2 double + 2 single)
    return kw


def _bria_fibo2(r: _Rng, b: int, t: float) -> dict:
    # text features: the Perceiver's bundle, then one bundle per injection block
    return dict(hidden_states=r.randn(b, 4, 8, 8), timestep=_ts(b, t), encoder_hidden_states=r.randn(b, 2, TXT, 16))


def _qwen_image21(r: _Rng, b: int, t: float) -> dict:
    # the VLM sequence: text, then one slot per 2x2 group of target tokens
    img_mask = torch.zeros(b, TXT + 4, dtype=torch.bool)
    img_mask[:, TXT:] = True
    return dict(
        hidden_states=r.randn(b, 16, 16),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_hidden_states_mask=_ones(b, TXT, dtype=torch.long),
        timestep=_ts(b, t),
        img_shapes=[[(1, 4, 4)]] * b,
        img_mask=img_mask,
    )


def _hunyuan_image(r: _Rng, b: int, t: float) -> dict:
    return dict(
        hidden_states=r.randn(b, 4, 8, 8),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        encoder_attention_mask=_ones(b, TXT),
    )


def _kandinsky6(r: _Rng, b: int, t: float) -> dict:
    # channels: noisy latent, conditioning latent, conditioning mask (visual_cond); audio optional
    return dict(
        hidden_states=r.randn(b, 2, 8, 8, 9),
        encoder_hidden_states=r.randn(b, TXT, 16),
        pooled_projections=r.randn(b, 8),
        timestep=_ts(b, t),
        audio_hidden_states=r.randn(b, 6, 4),
    )


def _ideogram4(r: _Rng, b: int, t: float) -> dict:
    from diffusers.models.transformers import transformer_ideogram4 as m

    # one joint sequence: 8 text slots (LLM features, zero latents), then 4x4 image tokens (latents, zero features)
    n_img, seq = 16, TXT + 16
    hidden = torch.zeros(b, seq, 16)
    hidden[:, TXT:] = r.randn(b, n_img, 16)
    features = torch.zeros(b, seq, 16)
    features[:, :TXT] = r.randn(b, TXT, 16)
    pos = torch.zeros(b, seq, 3, dtype=torch.long)
    pos[:, :TXT] = torch.arange(TXT)[:, None]
    pos[:, TXT:] = _ids(4, 4, prefix=1).long() + m.IMAGE_POSITION_OFFSET
    indicator = torch.full((b, seq), m.OUTPUT_IMAGE_INDICATOR)
    indicator[:, :TXT] = m.LLM_TOKEN_INDICATOR
    return dict(
        hidden_states=hidden,
        timestep=_ts(b, t),
        encoder_hidden_states=features,
        position_ids=pos,
        segment_ids=torch.ones(b, seq, dtype=torch.long),
        indicator=indicator,
    )


def _krea2(r: _Rng, b: int, t: float) -> dict:
    pos = torch.zeros(TXT + 16, 3)
    pos[TXT:, 1:] = _ids(4, 4)
    return dict(
        hidden_states=r.randn(b, 16, 16),
        encoder_hidden_states=r.randn(b, TXT, 2, 16),  # (batch, tokens, text-encoder layers, width)
        timestep=_ts(b, t),
        position_ids=pos,
        encoder_attention_mask=_ones(b, TXT, dtype=torch.bool),
    )


def _sana_wm(r: _Rng, b: int, t: float) -> dict:
    frames = 4
    c2w = torch.eye(4).repeat(b, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames) * 0.1  # forward translation
    intrinsics = torch.tensor([8.0, 8.0, 4.0, 4.0]).expand(b, frames, 4)
    return dict(
        hidden_states=r.randn(b, 4, frames, 8, 8),
        timestep=torch.full((b, 1, frames), t),  # per-frame timesteps
        encoder_hidden_states=r.randn(b, 1, TXT, 8),
        encoder_attention_mask=_ones(b, TXT, dtype=torch.long),
        camera_conditions=torch.cat([c2w.flatten(-2), intrinsics], dim=-1),
        chunk_plucker=r.randn(b, 8, frames, 8, 8),
    )


def _stable_audio(r: _Rng, b: int, t: float) -> dict:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return dict(
        hidden_states=r.randn(b, 4, 16),
        timestep=_ts(b, t),
        encoder_hidden_states=r.randn(b, TXT, 16),
        global_hidden_states=r.randn(b, 1, 16),
        rotary_embedding=get_1d_rotary_pos_embed(8, 16 + 1, use_real=True, repeat_interleave_real=False),
    )


def _cosmos3(r: _Rng, b: int, t: float) -> dict:
    # No batch axis: the class takes ONE packed sequence (text prefix, then generation tokens). The batch is
    # packed as b vision items (8x8 latents, 2x2 patches -> 16 tokens each) after a shared 8-token prompt,
    # so items attend to one another; the output is one prediction per item.
    n, seq = 16, TXT + b * 16
    pos = torch.zeros(3, seq, dtype=torch.long)
    pos[:, :TXT] = torch.arange(TXT)
    for k in range(b):
        pos[0, TXT + k * n : TXT + (k + 1) * n] = TXT + k
        pos[1:, TXT + k * n : TXT + (k + 1) * n] = _ids(4, 4).long().T + TXT
    vision = torch.arange(TXT, seq)
    return dict(
        input_ids=r.randint(32, TXT),
        text_indexes=torch.arange(TXT),
        position_ids=pos,
        und_len=TXT,
        sequence_length=seq,
        vision_tokens=[r.randn(1, 4, 1, 8, 8) for _ in range(b)],
        vision_token_shapes=[(1, 4, 4)] * b,
        vision_sequence_indexes=vision,
        vision_mse_loss_indexes=vision,
        vision_timesteps=torch.full((b * n,), t),  # one per noisy token
        vision_noisy_frame_indexes=[torch.tensor([0])] * b,
    )


def _rfd4_proteina(r: _Rng, b: int, t: float) -> dict:
    # a protein of 12 residues; both diffusion times (backbone, local latents) set to t
    n = 12
    return dict(
        bb_ca=r.randn(b, n, 3),
        local_latents=r.randn(b, n, 8),
        bb_ca_time=_ts(b, t),
        local_latents_time=_ts(b, t),
        padding_mask=_ones(b, n, dtype=torch.bool),
        conditioning={
            "is_in_context_conditioning": torch.zeros(b, n, dtype=torch.bool),
            "supports_local_latent": _ones(b, n, dtype=torch.bool),
        },
    )


# --------------------------------------------------------------------------- the table
# timestep_range is the range the pipelines pass: (0, 1000) for scheduler timesteps, (0, 1) where they
# pass t / 1000, a sigma, or 1 - t / 1000 (then 1 is the clean end: see the comments).

_FLUX_BLOCKS = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2)
_WAN_BASE = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
)  # fmt: skip
_WAN = dict(_WAN_BASE, rope_max_seq_len=32)
_QWEN = dict(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
_UNIT = (0.0, 1.0)

_TABLE: list[_Entry] = [
    # ---- image, MMDiT / FLUX family (the FLUX, Qwen-Image, AuraFlow pipelines pass t / 1000)
    _Entry("FluxTransformer2DModel", dict(in_channels=16, joint_attention_dim=32, pooled_projection_dim=32,
           guidance_embeds=True, axes_dims_rope=(4, 4, 8), **_FLUX_BLOCKS),
           _flux_like(pooled=32, guidance=3.5), _UNIT),
    _Entry("ChromaTransformer2DModel", dict(in_channels=16, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
           approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1, **_FLUX_BLOCKS),
           _flux_like(), _UNIT),
    _Entry("Flux2Transformer2DModel", dict(in_channels=16, joint_attention_dim=32, timestep_guidance_channels=32,
           axes_dims_rope=(4, 4, 4, 4), **_FLUX_BLOCKS), _flux2, _UNIT),
    _Entry("LongCatImageTransformer2DModel", dict(in_channels=16, joint_attention_dim=32, pooled_projection_dim=32,
           axes_dims_rope=(4, 4, 8), **_FLUX_BLOCKS), _flux_like(guidance=3.5), _UNIT),
    _Entry("OvisImageTransformer2DModel", dict(in_channels=16, out_channels=16, joint_attention_dim=32,
           axes_dims_rope=(4, 4, 8), **_FLUX_BLOCKS), _flux_like(), _UNIT),
    _Entry("BriaTransformer2DModel", dict(in_channels=16, joint_attention_dim=32, axes_dims_rope=(0, 8, 8),
           **_FLUX_BLOCKS), _flux_like()),
    _Entry("QwenImageTransformer2DModel", _QWEN, _qwen(TXT), _UNIT),
    _Entry("QwenImageTransformer2DModel", _QWEN, _qwen(16), _UNIT,  # 16 text tokens == 16 image tokens:
           name="QwenImageTransformer2DModel/equal_lengths"),  # both streams of a block have one shape
    _Entry("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
           pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16), _sd3),
    _Entry("AuraFlowTransformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
           num_single_dit_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
           caption_projection_dim=32, out_channels=4, pos_embed_max_size=16), _img_text, _UNIT),
    _Entry("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
           num_single_layers=2, attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 8],
           text_emb_dim=16, num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
           max_resolution=(16, 16), llama_layers=(0, 1, 2, 3), force_inference_output=True), _hidream),
    _Entry("BriaFiboTransformer2DModel", dict(in_channels=16, joint_attention_dim=32, text_encoder_dim=16,
           axes_dims_rope=(0, 8, 8), **_FLUX_BLOCKS), _bria_fibo),
    _Entry("QwenImage21Transformer2DModel", dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6)), _qwen_image21, _UNIT),
    _Entry("HunyuanImageTransformer2DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, num_single_layers=2, num_refiner_layers=1, text_embed_dim=16,
           rope_axes_dim=(8, 8)), _hunyuan_image),
    _Entry("Ideogram4Transformer2DModel", dict(in_channels=16, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, intermediate_size=64, adaln_dim=16, llm_features_dim=16, rope_theta=10_000,
           mrope_section=(4, 2, 2)), _ideogram4, _UNIT),  # the pipeline passes 1 - t / 1000
    _Entry("Krea2Transformer2DModel", dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
           num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
           text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
           num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(8, 4, 4)), _krea2, _UNIT),
    _Entry("BriaFibo2Transformer2DModel", dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1,
           n_heads=2, cap_feat_dim=16, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4,
           max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(8, 4, 4),
           axes_lens=(32, 16, 16)), _bria_fibo2, _UNIT),
    # ---- image, single-stream / cross-attention DiTs
    _Entry("DiTTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
           num_layers=2, num_embeds_ada_norm=10, sample_size=8, patch_size=2), _dit),
    _Entry("PixArtTransformer2DModel", dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16,
           num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=32, caption_channels=16,
           use_additional_conditions=False), _pixart),
    _Entry("SanaTransformer2DModel", dict(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
           caption_channels=16, sample_size=8), _img_text),
    _Entry("HunyuanDiT2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
           hidden_size=32, text_len=4, text_len_t5=4), _hunyuan_dit),
    _Entry("LuminaNextDiT2DModel", dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
           num_attention_heads=2, num_kv_heads=1, multiple_of=16, learn_sigma=False, cross_attention_dim=16),
           _lumina_next, _UNIT),  # the pipeline passes 1 - t / 1000 (1 = clean)
    _Entry("Lumina2Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
           num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 4, 4),
           axes_lens=(64, 32, 32), cap_feat_dim=16), _lumina2, _UNIT),  # 1 - t / 1000
    _Entry("ZImageTransformer2DModel", dict(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
           n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32]), _z_image, _UNIT),  # 1 - t/1000
    _Entry("CogView3PlusTransformer2DModel", dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=16, condition_dim=4,
           pos_embed_max_size=8, sample_size=8), _cogview),
    _Entry("CogView4Transformer2DModel", dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=16, condition_dim=4,
           rope_axes_dim=(8, 8)), _cogview),
    _Entry("GlmImageTransformer2DModel", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
           attention_head_dim=16, num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
           prior_vq_quantizer_codebook_size=64), _glm_image),  # the pipeline passes t - 1
    _Entry("ErnieImageTransformer2DModel", dict(hidden_size=32, num_attention_heads=2, num_layers=2,
           ffn_hidden_size=64, in_channels=4, out_channels=4, text_in_dim=16, rope_axes_dim=(8, 4, 4)), _ernie),
    _Entry("PRXTransformer2DModel", dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32,
           mlp_ratio=2.0, num_heads=2, depth=2, axes_dim=[8, 8]), _img_text, _UNIT),
    _Entry("OmniGenTransformer2DModel", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
           intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=16,
           rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0] * 8}), _omnigen, _UNIT),
    _Entry("NucleusMoEImageTransformer2DModel", dict(in_channels=16, out_channels=4, num_layers=2,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
           moe_enabled=False), _qwen(TXT), _UNIT),
    _Entry("Transformer2DModel", dict(num_attention_heads=2, attention_head_dim=16, num_layers=2,
           cross_attention_dim=16, sample_size=8, num_vector_embeds=32, activation_fn="geglu-approximate",
           num_embeds_ada_norm=100, norm_type="ada_norm"), _vq_diffusion, (0.0, 99.0)),  # VQ-Diffusion steps
    # ---- video
    _Entry("WanTransformer3DModel", _WAN, _video_text()),
    _Entry("SkyReelsV2Transformer3DModel", _WAN, _video_text()),
    _Entry("ChronoEditTransformer3DModel", _WAN, _video_text()),
    _Entry("WanVACETransformer3DModel", dict(_WAN, vace_layers=[0, 1], vace_in_channels=12), _wan_vace),
    _Entry("HeliosTransformer3DModel", dict(_WAN_BASE, rope_dim=(8, 4, 4)), _helios),
    _Entry("WanAnimateTransformer3DModel", dict(_WAN, in_channels=12, latent_channels=4, image_dim=16,
           motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
           motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
           face_encoder_num_heads=2, inject_face_latents_blocks=2), _wan_animate),
    _Entry("AnyFlowTransformer3DModel", _WAN, _anyflow(far=False)),
    _Entry("AnyFlowFARTransformer3DModel", dict(_WAN, compressed_patch_size=(1, 4, 4), full_chunk_limit=3),
           _anyflow(far=True)),
    _Entry("CogVideoXTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
           out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
           sample_frames=5, patch_size=2, max_text_seq_length=TXT), _cogvideox),
    _Entry("HunyuanVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=1,
           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)), _hunyuan_video),
    _Entry("HunyuanVideo15Transformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16,
           text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v"),
           _hunyuan_video15),
    _Entry("HunyuanVideoFramepackTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), has_image_proj=True,
           image_proj_dim=16, has_clean_x_embedder=True), _framepack),
    _Entry("LTXVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16), _ltx),
    _Entry("LTX2VideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
           audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
           caption_channels=16, rope_double_precision=False), _ltx2),
    _Entry("MochiTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=16, num_layers=2,
           pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=TXT),
           _mochi),
    _Entry("AllegroTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
           out_channels=4, num_layers=2, cross_attention_dim=32, sample_width=8, sample_height=8, sample_frames=8,
           caption_channels=16), _video_text()),
    _Entry("LatteTransformer3DModel", dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16,
           num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=32, out_channels=8,
           activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
           norm_elementwise_affine=False, norm_eps=1e-6, video_length=2), _video_text()),
    _Entry("EasyAnimateTransformer3DModel", dict(attention_head_dim=16, num_attention_heads=2, in_channels=4,
           mmdit_layers=2, num_layers=2, out_channels=4, patch_size=2, sample_height=8, sample_width=8,
           text_embed_dim=16, time_embed_dim=8), _video_text()),
    _Entry("CosmosTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
           max_size=(4, 16, 16)), _cosmos, _UNIT),  # Cosmos 2 passes sigma / (sigma + 1)
    _Entry("SanaVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
           cross_attention_dim=32, caption_channels=16, sample_size=8, rope_max_seq_len=32), _video_text()),
    _Entry("MotifVideoTransformer3DModel", dict(in_channels=9, out_channels=4, num_attention_heads=2,
           attention_head_dim=16, num_layers=2, num_single_layers=2, text_embed_dim=16, rope_axes_dim=(4, 6, 6)),
           _video_text(channels=9)),
    _Entry("JoyImageEditTransformer3DModel", dict(in_channels=4, hidden_size=32, num_attention_heads=2,
           text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]), _joyimage),
    _Entry("JoyImageEditPlusTransformer3DModel", dict(in_channels=4, hidden_size=32, num_attention_heads=2,
           text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]), _joyimage_plus),
    _Entry("Kandinsky5Transformer3DModel", dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
           out_visual_dim=4, model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
           _kandinsky5, _UNIT),
    _Entry("Kandinsky6Transformer3DModel", dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
           time_dim=16, model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
           in_audio_dim=4, out_audio_dim=4), _kandinsky6),
    _Entry("Kandinsky6SRTransformer3DModel", dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=32,
           ff_dim=64, num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_window=(3, 3, 3)),
           lambda r, b, t: dict(hidden_states=r.randn(b, 2, 8, 8, 9), timestep=_ts(b, t))),  # grid: 8x8 blocks
    _Entry("SanaWMTransformer3DModel", dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
           softmax_every_n=2, linear_head_dim=16, caption_channels=8, mlp_ratio=2.0, chunk_plucker_channels=8,
           chunk_plucker_post_attn_blocks=2, mixed_precision="fp32"), _sana_wm),
    # ---- audio
    _Entry("StableAudio3DiTModel", dict(io_channels=8, embed_dim=32, depth=2, num_heads=2, cond_token_dim=16,
           global_cond_dim=12, local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=2,
           use_differential_attention=False),
           lambda r, b, t: dict(hidden_states=r.randn(b, 8, 16), timestep=_ts(b, t),
                                encoder_hidden_states=r.randn(b, 4, 16), global_hidden_states=r.randn(b, 12)),
           _UNIT),
    _Entry("LongCatAudioDiTTransformer", dict(dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=8,
           text_conv=False), _longcat_audio, _UNIT),
    _Entry("AceStepTransformer1DModel", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8,
           rope_theta=10000.0, sliding_window=8),
           lambda r, b, t: dict(hidden_states=r.randn(b, 16, 8), timestep=_ts(b, t), timestep_r=_ts(b, t),
                                encoder_hidden_states=r.randn(b, TXT, 32), context_latents=r.randn(b, 16, 16)),
           _UNIT),  # timestep_r = t, as the pipeline calls it
    _Entry("StableAudioDiTModel", dict(sample_size=16, in_channels=4, num_layers=2, attention_head_dim=16,
           num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16,
           time_proj_dim=16, global_states_input_dim=16, cross_attention_input_dim=16), _stable_audio, _UNIT),
    # ---- other modalities
    _Entry("Cosmos3OmniTransformer", dict(head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4,
           latent_patch_size=2, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
           patch_latent_dim=16, rope_axes_dim=(4, 2, 2), vocab_size=32, dtype="float32"), _cosmos3),
    _Entry("RFD4ProteinaTransformer", dict(nlayers=2, token_dim=32, nheads=2, dim_cond=16, pair_repr_dim=16,
           latent_dim=8, token_type_emb_dim=8, cath_emb_dim=8, t_emb_dim=16, seq_sep_dim=8, xt_pair_dist_dim=8,
           tri_mult_c=16, feats_seq=("xt_bb_ca", "xt_local_latents"),
           feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"), feats_pair_repr=("xt_bb_ca_pair_dists",),
           feats_pair_cond=("time_emb_bb_ca", "time_emb_local_latents")), _rfd4_proteina, _UNIT),
]  # fmt: skip

UNSUPPORTED: dict[str, str] = {
    "UVit2DModel": "no timestep input: aMUSEd's masked-token model is called with token ids and micro-conditions",
}


# --------------------------------------------------------------------------- specimens


def _specimen(entry: _Entry, pipelines: dict[str, tuple[str, ...]]) -> Specimen:
    return Specimen(
        name=entry.name or entry.cls,
        pipelines=pipelines.get(entry.cls, ()),
        build=lambda: _build(entry),
        inputs=lambda batch, t: _inputs(entry, batch, t),
        timestep_range=entry.timestep_range,
    )


@functools.cache
def _specimens() -> dict[str, Specimen]:
    pipelines = pipeline_transformer_classes()
    return {s.name: s for s in (_specimen(e, pipelines) for e in _TABLE)}


def __getattr__(attr: str):
    """``SPECIMENS`` is built on first use: reading the pipelines imports all of diffusers (seconds)."""
    if attr == "SPECIMENS":
        return _specimens()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def specimen(name: str) -> Specimen:
    return _specimens()[name]


# --------------------------------------------------------------------------- self-check


def _output_tensor(out) -> torch.Tensor:
    """The first output of ``forward(..., return_dict=False)`` as one tensor (a per-sample list is stacked)."""
    out = out[0]
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def _equal(a, b) -> bool:
    """Deep equality of nested inputs (tensors, lists, dicts, scalars)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def check(spec: Specimen, batch: int = 2) -> tuple[int, str, float]:
    """Build ``spec``, run it at two timesteps; -> (parameters, 'ok' or 'failed: reason', seconds per call)."""
    params, seconds = 0, float("nan")
    try:
        model = spec.build()
        params = sum(p.numel() for p in model.parameters())
        lo, hi = spec.timestep_range
        t1, t2 = lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo)
        if not _equal(spec.inputs(batch, t1), spec.inputs(batch, t1)):
            return params, "failed: inputs are not deterministic", seconds
        if not all(_equal(a, b) for a, b in zip(model.state_dict().values(), spec.build().state_dict().values())):
            return params, "failed: build is not deterministic", seconds
        outs, start = [], time.perf_counter()
        with torch.no_grad():
            for t in (t1, t2):
                outs.append(_output_tensor(model(**spec.inputs(batch, t), return_dict=False)))
        seconds = (time.perf_counter() - start) / 2
        a, b = outs
        if a.shape[0] != batch:
            return params, f"failed: output batch {a.shape[0]} != {batch}", seconds
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return params, "failed: non-finite output", seconds
        if torch.equal(a, b):
            return params, "failed: output does not depend on the timestep", seconds
        return params, "ok", seconds
    except Exception as exc:  # the table reports it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return params, f"failed: {type(exc).__name__}: {reason}"[:160], seconds


def main() -> None:
    import diffusers

    torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest on a shared CPU
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    specs = _specimens()
    rows = []
    for name, spec in specs.items():
        params, status, seconds = check(spec)
        pipes = ", ".join(spec.pipelines[:2]) + (f" +{len(spec.pipelines) - 2}" if len(spec.pipelines) > 2 else "")
        rows.append((name, pipes, f"{params:,}", f"{seconds * 1000:.0f}", status))
    for cls, reason in UNSUPPORTED.items():
        pipes = ", ".join(pipeline_transformer_classes().get(cls, ()))
        rows.append((cls, pipes, "-", "-", f"unsupported: {reason}"))
    header = ("class", "pipelines", "parameters", "ms/call", "status")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    covered = {s.name.split("/")[0] for s in specs.values()}
    missing = set(pipeline_transformer_classes()) - covered - set(UNSUPPORTED)
    ok = sum(r[-1] == "ok" for r in rows)
    print(f"\n{ok} specimens ok of {len(specs)}; {len(UNSUPPORTED)} unsupported; not in the table: {sorted(missing)}")


if __name__ == "__main__":
    main()
