"""A transformer on the meta device (no weights) and the inputs its pipeline hands it at one
step, shaped for a resolution, a number of frames, a batch and a guidance scale: what the
planner (:mod:`cachelab.planner`) runs instead of a generation.

:data:`FAMILY_CALLS` describes each family the planner knows by its class name: how its
pipeline turns pixels into latent tokens (the VAE's factor, the packing), how many text tokens
it pads to, and how classifier-free guidance runs (``batch``: cond and uncond concatenated in
one call; ``calls``: two calls, the contexts ``cond`` and ``uncond``; ``embedded``: a
guidance-distilled model takes the scale as an input, one call). The shipped configs
(``cachelab/assets/transformers/<name>.json``: the class and its ``config.json`` keys from the
published checkpoints) build a family's transformer without downloading anything.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cachelab.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "assets" / "transformers"
CFG_MODES = ("batch", "calls", "embedded")


@dataclass(frozen=True)
class Shape:
    """What one generation asks of the transformer: the image (``num_frames`` for video), the
    prompts per call, the guidance scale, the text tokens per prompt and the VAE's factor."""

    height: int
    width: int
    num_frames: int
    batch_size: int
    guidance: float
    text_tokens: int
    vae_scale_factor: int


@dataclass(frozen=True)
class Family:
    """A family's pipeline conventions (see the module docstring) and its call builder:
    ``inputs(model, shape, batch, dtype)`` -> the keyword arguments of one call of ``batch``
    samples."""

    inputs: Callable[[nn.Module, Shape, int, torch.dtype], dict]
    cfg: str
    height: int
    width: int
    guidance: float
    text_tokens: int = 0
    num_frames: int = 1
    vae_scale_factor: int = 8


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _timestep(batch: int) -> torch.Tensor:
    return torch.full((batch,), 500.0, device="meta")


def _grid(model_name: str, shape: Shape, divisor: int) -> tuple[int, int]:
    """The latent grid (height, width) in tokens; a size the VAE and patching do not divide is refused."""
    step = shape.vae_scale_factor * divisor
    if shape.height % step or shape.width % step:
        raise ConfigError(f"height={shape.height}, width={shape.width}: {model_name} needs multiples of {step}")
    return shape.height // step, shape.width // step


def _video_frames(shape: Shape, temporal: int) -> int:
    """Latent frames of ``num_frames`` under a VAE that keeps the first frame and packs ``temporal`` after it."""
    if (shape.num_frames - 1) % temporal:
        raise ConfigError(f"num_frames={shape.num_frames} is not allowed; allowed: 1 + a multiple of {temporal}")
    return (shape.num_frames - 1) // temporal + 1


def _flux(model, shape, batch, dtype):
    h, w = _grid("FLUX", shape, 2)
    config = model.config
    guidance = torch.full((batch,), shape.guidance, device="meta") if config.guidance_embeds else None
    return dict(hidden_states=_meta(batch, h * w, config.in_channels, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.joint_attention_dim, dtype=dtype),
                pooled_projections=_meta(batch, config.pooled_projection_dim, dtype=dtype),
                timestep=_timestep(batch) / 1000, img_ids=_meta(h * w, 3), txt_ids=_meta(shape.text_tokens, 3),
                guidance=guidance, return_dict=False)


def _flux2(model, shape, batch, dtype):
    h, w = _grid("FLUX.2", shape, 2)
    config = model.config
    return dict(hidden_states=_meta(batch, h * w, config.in_channels, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.joint_attention_dim, dtype=dtype),
                timestep=_timestep(batch) / 1000, img_ids=_meta(batch, h * w, 4), txt_ids=_meta(batch, shape.text_tokens, 4),
                guidance=torch.full((batch,), shape.guidance, device="meta") if config.guidance_embeds else None,
                return_dict=False)


def _qwenimage(model, shape, batch, dtype):
    h, w = _grid("Qwen-Image", shape, 2)
    config = model.config
    return dict(hidden_states=_meta(batch, h * w, config.in_channels, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.joint_attention_dim, dtype=dtype),
                encoder_hidden_states_mask=None, timestep=_timestep(batch) / 1000,
                img_shapes=[[(1, h, w)]] * batch, return_dict=False)


def _sd3(model, shape, batch, dtype):
    h, w = _grid("SD3", shape, 1)
    config = model.config
    return dict(hidden_states=_meta(batch, config.in_channels, h, w, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.joint_attention_dim, dtype=dtype),
                pooled_projections=_meta(batch, config.pooled_projection_dim, dtype=dtype),
                timestep=_timestep(batch), return_dict=False)


def _pixart(model, shape, batch, dtype):
    h, w = _grid("PixArt", shape, 1)
    config = model.config
    return dict(hidden_states=_meta(batch, config.in_channels, h, w, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.caption_channels, dtype=dtype),
                timestep=_timestep(batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False)


def _wan(model, shape, batch, dtype):
    h, w = _grid("Wan", shape, 1)
    config = model.config
    return dict(hidden_states=_meta(batch, config.in_channels, _video_frames(shape, 4), h, w, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.text_dim, dtype=dtype),
                timestep=_timestep(batch), return_dict=False)


def _hunyuan_video(model, shape, batch, dtype):
    h, w = _grid("HunyuanVideo", shape, 1)
    config = model.config
    return dict(hidden_states=_meta(batch, config.in_channels, _video_frames(shape, 4), h, w, dtype=dtype),
                timestep=_timestep(batch),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.text_embed_dim, dtype=dtype),
                encoder_attention_mask=torch.ones(batch, shape.text_tokens, device="meta"),
                pooled_projections=_meta(batch, config.pooled_projection_dim, dtype=dtype),
                guidance=torch.full((batch,), shape.guidance * 1000, device="meta"), return_dict=False)


def _ltx_video(model, shape, batch, dtype):
    h, w = _grid("LTX-Video", shape, 1)
    config = model.config
    frames = _video_frames(shape, 8)
    return dict(hidden_states=_meta(batch, frames * h * w, config.in_channels, dtype=dtype),
                encoder_hidden_states=_meta(batch, shape.text_tokens, config.caption_channels, dtype=dtype),
                timestep=_timestep(batch), encoder_attention_mask=None, num_frames=frames, height=h, width=w,
                rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


def _diffusers_dit(model, shape, batch, dtype):
    h, w = _grid("DiT", shape, 1)
    return dict(hidden_states=_meta(batch, model.config.in_channels, h, w, dtype=dtype), timestep=_timestep(batch).long(),
                class_labels=torch.zeros(batch, dtype=torch.long, device="meta"), return_dict=False)


def _cachelab_dit(model, shape, batch, dtype):
    h, w = _grid("DiT", shape, 1)
    return dict(x=_meta(batch, model.in_channels, h, w, dtype=dtype), t=_timestep(batch).long(),
                y=torch.zeros(batch, dtype=torch.long, device="meta"))


# class name -> the family's conventions (defaults: the published pipelines' own)
FAMILY_CALLS = {
    "FluxTransformer2DModel": Family(_flux, "embedded", 1024, 1024, 3.5, text_tokens=512),
    "Flux2Transformer2DModel": Family(_flux2, "embedded", 1024, 1024, 4.0, text_tokens=512, vae_scale_factor=8),
    "QwenImageTransformer2DModel": Family(_qwenimage, "calls", 1328, 1328, 4.0, text_tokens=256),
    "SD3Transformer2DModel": Family(_sd3, "batch", 1024, 1024, 3.5, text_tokens=333),
    "PixArtTransformer2DModel": Family(_pixart, "batch", 1024, 1024, 4.5, text_tokens=300),
    "WanTransformer3DModel": Family(_wan, "calls", 480, 832, 5.0, text_tokens=512, num_frames=81),
    "HunyuanVideoTransformer3DModel": Family(_hunyuan_video, "embedded", 720, 1280, 6.0, text_tokens=256,
                                             num_frames=129),
    "LTXVideoTransformer3DModel": Family(_ltx_video, "batch", 480, 704, 3.0, text_tokens=128, num_frames=161,
                                         vae_scale_factor=32),
    "DiTTransformer2DModel": Family(_diffusers_dit, "batch", 256, 256, 4.0),
    "DiT": Family(_cachelab_dit, "batch", 32, 32, 1.5, vae_scale_factor=1),
}


def family_calls(model: nn.Module) -> tuple[str, Family]:
    """The class name (or that of a base class) ``model``'s family is known by, and its conventions."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILY_CALLS:
            return cls.__name__, FAMILY_CALLS[cls.__name__]
    raise ConfigError(f"the planner has no inputs for {type(model).__name__}; allowed: {', '.join(FAMILY_CALLS)}")


def step_calls(model: nn.Module, shape: Shape, dtype: torch.dtype) -> list[tuple[str | None, dict]]:
    """The transformer calls of one denoising step: (context or None, keyword arguments)."""
    _, family = family_calls(model)
    guided = family.cfg != "embedded" and shape.guidance > 1
    if guided and family.cfg == "calls":
        return [(name, family.inputs(model, shape, shape.batch_size, dtype)) for name in ("cond", "uncond")]
    batch = shape.batch_size * (2 if guided else 1)
    return [(None, family.inputs(model, shape, batch, dtype))]


def shipped_configs() -> list[str]:
    """The names of the transformer configs the package ships."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.json"))


def read_config(target: str) -> dict:
    """A shipped config by name, or a diffusers ``config.json`` path: ``{"class", "config", "experts"}``."""
    path = Path(target)
    if path.suffix == ".json" and path.is_file():
        config = json.loads(path.read_text())
        if "class" in config:
            return config
        return {"class": config["_class_name"],
                "config": {k: v for k, v in config.items() if not k.startswith("_")}}
    shipped = CONFIGS_DIR / f"{target.lower()}.json"
    if not shipped.is_file():
        raise ConfigError(f"target={target!r} is neither a config.json file nor a shipped config; "
                          f"allowed: {', '.join(shipped_configs())}")
    return json.loads(shipped.read_text())


def meta_model(target, dtype: torch.dtype | None = None) -> tuple[nn.Module, int]:
    """The transformer of ``target`` (a config name or path, a diffusers transformer or any module)
    on the meta device, in eval mode, and its number of experts (Wan 2.2: two of one config). A
    given model is rebuilt from its config (diffusers) or copied to meta; its weights are untouched."""
    if isinstance(target, (str, Path)):
        spec = read_config(str(target))
        import diffusers

        cls = getattr(diffusers, spec["class"], None)
        if cls is None:
            raise ConfigError(f"diffusers {diffusers.__version__} has no class {spec['class']}; upgrade diffusers")
        with torch.device("meta"):
            model = cls.from_config(spec["config"])
        return model.to(dtype or torch.bfloat16).eval(), int(spec.get("experts", 1))
    if hasattr(target, "config") and hasattr(type(target), "from_config"):
        with torch.device("meta"):
            model = type(target).from_config(target.config)
        model = model.to(dtype or next(target.parameters()).dtype)
    else:
        model = copy.deepcopy(target).to("meta")
        model = model.to(dtype) if dtype is not None else model
    return model.eval(), 1
