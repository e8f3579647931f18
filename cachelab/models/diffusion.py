"""The DiT/ADM noise schedule: linear betas over 1000 steps, respaced to fewer steps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate, repeat

import numpy as np
import torch

from cachelab.core.variables import StepGrid
from cachelab.errors import ConfigError

# How DDIM's coefficients are computed: "exact" in float64 from float64 alpha_bar; "reference" as
# ADM/DiT's sampler does, from alpha_bar rounded to float32 (its output bit for bit; up to 8e-5
# relative off the exact value in one coefficient).
PRECISIONS = ("exact", "reference")


def linear_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The DDPM linear schedule, scaled to ``num_train_steps`` as in ADM/DiT (float64)."""
    scale = 1000 / num_train_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_train_steps, dtype=np.float64)


def alphas_cumprod(num_train_steps: int = 1000) -> np.ndarray:
    """alpha_bar_t = prod_{i<=t} (1 - beta_i) of the linear schedule (float64)."""
    return np.cumprod(1.0 - linear_betas(num_train_steps))


def respaced_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """ADM's ``space_timesteps(T, str(n))``: ``n`` training timesteps, evenly strided, rounded.

    As the reference does, the float stride is added up step by step and each partial sum is
    rounded (half to even); rounding ``i * stride`` instead differs at .5 ties (T = 1000, n = 21:
    499, not 500).
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    stride = (num_train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1
    return sorted({round(cur) for cur in accumulate(repeat(stride, num_steps - 1), initial=0.0)})


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a one-line ``ConfigError``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"sampler_precision={precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class DDIMSchedule:
    """Sampling-order timesteps and cumulative alphas (index ``s`` counts denoising steps up)."""

    timesteps: np.ndarray  # (T,) original training timesteps, descending
    alpha_bar: np.ndarray  # (T,) alpha_bar at each sampling step
    alpha_bar_prev: np.ndarray  # (T,) alpha_bar of the next (less noisy) step; 1 after the last
    precision: str = "exact"  # one of PRECISIONS: how ``coefficients`` computes

    @classmethod
    def respaced(cls, num_steps: int, num_train_steps: int = 1000, precision: str = "exact") -> "DDIMSchedule":
        kept = np.array(respaced_timesteps(num_train_steps, num_steps))
        alpha_bar = alphas_cumprod(num_train_steps)[kept]  # ascending in t
        if check_precision(precision) == "reference":  # rebuilt from the respaced betas, as ADM's SpacedDiffusion
            betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
            alpha_bar = np.cumprod(1.0 - betas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        return cls(kept[::-1].copy(), alpha_bar[::-1].copy(), alpha_bar_prev[::-1].copy(), precision)

    def coefficients(self, s: int) -> tuple[float, float, float, float]:
        """DDIM's ``sqrt(1/a)``, ``sqrt(1/a - 1)``, ``sqrt(a_prev)``, ``sqrt(1 - a_prev)`` at step ``s``.

        "exact": float64 throughout. "reference": ADM's values, which reach the sampler as float32
        tensors: the first two rounded to float32 from float64, the last two computed in float32
        from alpha_bar_prev rounded to float32, by torch's ``sqrt`` as ADM computes them (on some
        CPUs torch's float32 ``sqrt`` is not the correctly rounded one that numpy's is: 1 ulp apart).
        """
        a, a_prev = self.alpha_bar[s], self.alpha_bar_prev[s]
        recip, recipm1 = math.sqrt(1.0 / a), math.sqrt(1.0 / a - 1.0)
        if self.precision == "exact":
            return recip, recipm1, math.sqrt(a_prev), math.sqrt(1.0 - a_prev)
        a_prev32 = torch.tensor(a_prev, dtype=torch.float32)
        return (float(np.float32(recip)), float(np.float32(recipm1)),
                float(torch.sqrt(a_prev32)), float(torch.sqrt(1.0 - a_prev32)))

    def grid(self) -> StepGrid:
        """The timestep, sigma and log-SNR of every sampling step (for ``predictor.variable``)."""
        return StepGrid.from_alpha_bar(self.timesteps.tolist(), self.alpha_bar.tolist(), source="DDIM")

    def __len__(self) -> int:
        return len(self.timesteps)
