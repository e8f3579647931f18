"""Samplers: small functions with one signature and a per-step callback dict."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from cachelab.models.diffusion import DDIMSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> eps
# (s, t) -> a function telling, once the model has run, whether step s was a full step
BeforeStep = Callable[[int, float, torch.Tensor], Callable[[], bool]]
Callback = Callable[[dict], None]


@torch.no_grad()
def ddim(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    before_step: BeforeStep | None = None,
    callback: Callback | None = None,
    progress: str | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) as in ADM/DiT, from ``noise`` to x_0.

    ``before_step(s, t, x)`` runs before the model call of step ``s`` (steps count up from 0) on
    the latent ``x``:
    it is how the step index reaches a cache controller; it returns a function that says,
    after the model call, whether the step was full (an adaptive schedule decides inside
    the model call). ``callback`` gets
    ``{s, t, x, model_output, pred_x0, full}`` after each step. ``progress`` labels a
    progress bar (None: no bar).
    """
    x = noise
    for s in tqdm(range(len(schedule)), desc=progress, disable=progress is None, leave=False):
        t = int(schedule.timesteps[s])
        was_full = before_step(s, t, x) if before_step is not None else None
        eps = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        recip, recipm1, sqrt_prev, sqrt_1m_prev = schedule.coefficients(s)
        pred_x0 = recip * x - recipm1 * eps
        eps = (recip * x - pred_x0) / recipm1  # ADM recomputes eps from x0; kept for parity
        x = pred_x0 * sqrt_prev + sqrt_1m_prev * eps
        if callback is not None:
            full = was_full() if was_full is not None else True
            callback({"s": s, "t": t, "x": x, "model_output": eps, "pred_x0": pred_x0, "full": full})
    return x
