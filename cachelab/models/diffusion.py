"""The DiT/ADM noise schedule: linear betas over 1000 steps, respaced to fewer steps."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cachelab.core.variables import StepGrid


def linear_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The DDPM linear schedule, scaled to ``num_train_steps`` as in ADM/DiT (float64)."""
    scale = 1000 / num_train_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_train_steps, dtype=np.float64)


def alphas_cumprod(num_train_steps: int = 1000) -> np.ndarray:
    """alpha_bar_t = prod_{i<=t} (1 - beta_i) of the linear schedule (float64)."""
    return np.cumprod(1.0 - linear_betas(num_train_steps))


def respaced_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """ADM's ``space_timesteps(T, str(n))``: ``n`` training timesteps, evenly strided, rounded."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    stride = (num_train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1
    return sorted({round(i * stride) for i in range(num_steps)})


@dataclass(frozen=True)
class DDIMSchedule:
    """Sampling-order timesteps and cumulative alphas (index ``s`` counts denoising steps up)."""

    timesteps: np.ndarray  # (T,) original training timesteps, descending
    alpha_bar: np.ndarray  # (T,) alpha_bar at each sampling step
    alpha_bar_prev: np.ndarray  # (T,) alpha_bar of the next (less noisy) step; 1 after the last

    @classmethod
    def respaced(cls, num_steps: int, num_train_steps: int = 1000) -> "DDIMSchedule":
        kept = np.array(respaced_timesteps(num_train_steps, num_steps))
        alpha_bar = alphas_cumprod(num_train_steps)[kept]  # ascending in t
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        return cls(kept[::-1].copy(), alpha_bar[::-1].copy(), alpha_bar_prev[::-1].copy())

    def grid(self) -> StepGrid:
        """The timestep, sigma and log-SNR of every sampling step (for ``predictor.variable``)."""
        return StepGrid.from_alpha_bar(self.timesteps.tolist(), self.alpha_bar.tolist(), source="DDIM")

    def __len__(self) -> int:
        return len(self.timesteps)
