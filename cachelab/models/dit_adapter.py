"""Adapter for the native DiT: class-conditional, batched CFG, DDIM, pixel or VAE latents."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from cachelab.core.controller import CacheHandle
from cachelab.models.diffusion import DDIMSchedule, check_precision
from cachelab.models.adapter import DTYPES, Inputs, ModelAdapter
from cachelab.models.dit import DiT, dit_from_preset, load_checkpoint
from cachelab.assets import load_asset
from cachelab.models.loading import load_vae
from cachelab.models.samplers import Callback, ddim
from cachelab.core.sites import SitePattern, SitePatterns
from cachelab.core.tokens import TOKENWISE

_BLOCK = r"blocks\.\d+"
# Signals of adaptive schedules, read inside block 0 (which then always computes); not at
# output granularity, where the one site encloses them.
PROBES = {"first_block_residual": SitePattern(r"blocks\.0", residual=True),
          "modulated_input": SitePattern(r"blocks\.0", "modulated_input")}
SITE_PATTERNS = {
    # TaylorSeer's choice: attention and MLP outputs per block, before the adaLN gate.
    # Token selection: the MLP is token-wise; the attention recomputes the selected queries against
    # every key and value; on request it gives each token's attention received (ToCa's score) and
    # the norm of its value vector (DuCa's V-caching score).
    "module": SitePatterns([SitePattern(_BLOCK, "attn_branch", label="attn", tokens="attn_tokens",
                                        scores=(("attention", "attention_received"), ("value_norm", "value_norms"))),
                            SitePattern(_BLOCK, "mlp_branch", label="mlp", tokens=TOKENWISE)], PROBES),
    "block": SitePatterns([SitePattern(_BLOCK, residual=True)], PROBES),
    # FBCache / TeaCache / MagCache: the blocks after the probe's as one residual
    "stack": SitePatterns([SitePattern(_BLOCK, residual=True, span=True)], PROBES),
    "output": SitePatterns([SitePattern("")]),
}


class DiTAdapter(ModelAdapter):
    """A DiT preset (``DiT-XL/2``...) or custom size. Weights, first match wins: a shipped
    asset (``weights``: architecture and sha256-checked weights from ``cachelab/assets``),
    an original checkpoint, the reference initialisation (``init="reference"``), or
    ``init="random"`` (gates and final layer drawn too, so an untrained model still has
    moving features). An optional ``judge`` scores decoded samples (``evaluate``).
    ``sampler_precision="reference"`` computes DDIM's coefficients as ADM/DiT's sampler does
    (from float32-rounded alpha_bar), for bit-for-bit comparisons with it."""

    sites = SITE_PATTERNS  # granularity -> site patterns and probes (class data, as diffusers adapters have)

    def __init__(
        self,
        name: str,
        description: str = "",
        preset: str | None = None,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        arch: dict | None = None,
        weights: str | None = None,
        checkpoint: str | None = None,
        init: str = "random",
        init_seed: int = 0,
        vae: str | None = None,
        judge=None,
        num_steps: int = 50,
        guidance_scale: float = 1.5,
        guided_channels: int | None = None,
        sampler_precision: str = "exact",
        dtype: str = "fp32",
        device: str = "cpu",
    ):
        self.name, self.description = name, description
        self.preset, self.arch = preset, dict(arch or {})
        self.dit_kwargs = dict(input_size=input_size, in_channels=in_channels,
                               num_classes=num_classes, learn_sigma=learn_sigma)
        self.weights, self.checkpoint, self.init, self.init_seed = weights, checkpoint, init, init_seed
        self.vae_path, self.judge = vae, judge
        self.num_steps, self.guidance_scale, self.guided_channels = num_steps, guidance_scale, guided_channels
        self.sampler_precision = check_precision(sampler_precision)
        self.dtype, self.device = DTYPES[dtype], torch.device(device)

    def build(self) -> DiT:
        if self.vae_path is not None:
            self.vae  # noqa: B018 -- load it first, so a missing VAE fails before sampling
        with torch.random.fork_rng():
            torch.manual_seed(self.init_seed)
            model = self._shipped() if self.weights else self._constructed()
        return model.to(self.device, self.dtype)

    def _shipped(self) -> DiT:
        state_dict, manifest = load_asset(self.weights)
        model = DiT(**manifest["arch"])
        model.load_state_dict(state_dict)
        return model

    def _constructed(self) -> DiT:
        if self.preset:
            model = dit_from_preset(self.preset, **self.dit_kwargs)
        else:
            model = DiT(**self.arch, **self.dit_kwargs)
        if self.checkpoint:
            load_checkpoint(model, self.checkpoint)
        elif self.init == "random":
            randomize_zero_init(model)
        return model

    def site_patterns(self, granularity: str) -> list[SitePattern]:
        return self.sites[granularity]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        model = self.model
        return (model.in_channels, model.input_size, model.input_size)

    def make_inputs(self, num_images: int, seed: int, start: int = 0) -> Inputs:
        # the labels are drawn from the seed's generator after the noise, so ``start`` is not needed
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(num_images, *self.latent_shape, generator=g)
        labels = torch.randint(0, self.model.num_classes, (num_images,), generator=g)
        return Inputs(noise.to(self.device, self.dtype), labels.to(self.device))

    def generate(self, inputs: Inputs, handle: CacheHandle | None = None,
                 callback: Callback | None = None, progress: str | None = None) -> torch.Tensor:
        model = self.model
        channels = model.in_channels
        schedule = DDIMSchedule.respaced(self.num_steps, precision=self.sampler_precision)
        if self.guidance_scale == 1.0:
            x, y = inputs.noise, inputs.labels

            def denoise(x, t):
                return model(x, t, y)[:, :channels]
        else:  # [cond; uncond] in one batch, as in the reference sample.py
            x = torch.cat([inputs.noise, inputs.noise])
            y = torch.cat([inputs.labels, torch.full_like(inputs.labels, model.num_classes)])

            def denoise(x, t):
                out = model.forward_with_cfg(x, t, y, self.guidance_scale, self.guided_channels)
                return out[:, :channels]

        with self.driving(handle, self.num_steps, schedule.grid()) as before_step:
            x = ddim(denoise, x, schedule, before_step=before_step, callback=callback, progress=progress)
        return x[: len(inputs.noise)]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae_path is None:  # pixel space (or a latent preview for latent models without a VAE)
            return ((latents.float() + 1) / 2).clamp(0, 1)
        images = self.vae.decode(latents.to(self.vae.dtype) / 0.18215).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def evaluate(self, images: torch.Tensor, inputs: Inputs) -> dict:
        return self.judge.evaluate(images, inputs.labels) if self.judge is not None else {}

    @cached_property
    def vae(self):
        """diffusers ``AutoencoderKL`` for latent models."""
        return load_vae(self.vae_path).to(self.device).eval().requires_grad_(False)


def randomize_zero_init(model: nn.Module, bias_std: float = 0.1) -> None:
    """Draw the weights that adaLN-Zero sets to zero (weights N(0, 1/fan_in)), so an
    untrained DiT is not the identity and its gates are not vanishingly small."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.normal_(module.bias, std=bias_std)
