"""The adapter interface: what cachelab needs to know about one model family."""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from cachelab.core.controller import CacheHandle
from cachelab.core.distributed import GroupReduce
from cachelab.models.parallel import context_parallel_group
from cachelab.models.samplers import Callback
from cachelab.core.schedules import Decision
from cachelab.core.sites import SitePattern
from cachelab.core.variables import StepGrid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Inputs:
    """Everything random about one generation, fixed by the seed: noise and conditioning."""

    noise: torch.Tensor
    labels: torch.Tensor


class ModelAdapter(ABC):
    """Knows one model family: how to build or load it, its cache sites per granularity,
    its conditioning and guidance, how its sampler drives the controller, how to decode."""

    name: str
    description: str  # e.g. which weights: "original checkpoint", "random (untrained)"
    num_steps: int
    guidance_scale: float

    @cached_property
    def model(self) -> nn.Module:
        """The model, built on first use, in eval mode with gradients off."""
        return self.build().eval().requires_grad_(False)

    @abstractmethod
    def build(self) -> nn.Module:
        """Build (and load) the denoiser."""

    @property
    def parallel_group(self) -> GroupReduce | None:
        """The ranks sharing each generation when the model runs context parallel, else None."""
        return context_parallel_group(self.model)

    @abstractmethod
    def site_patterns(self, granularity: str) -> list[SitePattern]:
        """Which callables are cache sites at ``granularity`` (``module | block | stack | output``)."""

    @abstractmethod
    def make_inputs(self, num_images: int, seed: int, start: int = 0) -> Inputs:
        """Noise and conditioning for ``num_images`` samples, reproducible from ``seed``;
        ``start`` is the index of the first of them among all images of a chunked run
        (conditioning taken from a fixed list continues from there)."""

    @abstractmethod
    def generate(self, inputs: Inputs, handle: CacheHandle | None = None,
                 callback: Callback | None = None, progress: str | None = None) -> torch.Tensor:
        """Sample latents; with a handle, the sampler drives it step by step.
        ``progress`` labels a progress bar (None: no bar)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, C, H, W)."""

    def evaluate(self, images: torch.Tensor, inputs: Inputs) -> dict:
        """The model's own quality metrics of decoded images (e.g. class accuracy); none by default."""
        return {}

    @staticmethod
    @contextmanager
    def driving(handle: CacheHandle | None, num_steps: int, grid: StepGrid | None = None):
        """One generation driven by ``handle``: yields the sampler's ``before_step`` hook
        (None without caching). ``grid``: the sampler's per-step timestep, sigma and log-SNR."""
        if handle is None:
            yield None
            return
        def before_step(s: int, t: float, latent: torch.Tensor):
            handle.step(s, t, latent=latent)
            return lambda: handle.decision is Decision.FULL  # read after the model call

        with handle.generation(num_steps, grid):
            yield before_step
