"""Spectral filters on a tensor's spatial grid: FreqCa's low-pass split and SeaCache's SEA filter.

A tensor's spatial axes (:func:`spatial_axes`): an image latent ``(B, C, H, W)`` is filtered over
``H, W``; a video latent ``(B, C, T, H, W)`` over ``T, H, W``; tokens ``(B, N, D)`` over their
square grid (``N = side**2``: the patches of a square image, as DiT and packed FLUX latents lay
them out) and, where ``N`` is not a square (text tokens), along the token sequence. Filters are
real (their response is even in every frequency), computed with the FFT in float32 or wider.
"""
from __future__ import annotations

import math

import torch


def spatial_axes(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` viewed with its spatial axes explicit, and those axes (see the module docstring)."""
    if x.dim() in (4, 5):
        return x, tuple(range(2, x.dim()))
    if x.dim() == 3:
        B, N, D = x.shape
        side = math.isqrt(N)
        if side * side == N and side > 1:
            return x.reshape(B, side, side, D), (1, 2)
        return x, (1,)
    raise ValueError(f"a spectral filter needs (B, N, D) tokens or a (B, C, H, W) / (B, C, T, H, W) latent, "
                     f"got shape {tuple(x.shape)}")


def frequencies(x: torch.Tensor, axes: tuple[int, ...]) -> list[torch.Tensor]:
    """Per axis, its FFT frequencies (cycles per sample, ``torch.fft.fftfreq``) shaped to broadcast
    against ``x`` (float64)."""
    out = []
    for axis in axes:
        f = torch.fft.fftfreq(x.shape[axis], dtype=torch.float64, device=x.device)
        shape = [1] * x.dim()
        shape[axis] = -1
        out.append(f.reshape(shape))
    return out


def apply_response(x: torch.Tensor, response: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``x`` with its spectrum over ``axes`` multiplied by the real, even ``response``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    spectrum = torch.fft.fftn(x.to(dtype), dim=axes)
    return torch.fft.ifftn(spectrum * response.to(spectrum.real.dtype), dim=axes).real.to(x.dtype)


def low_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The part of ``x`` whose spatial frequency has norm ``sqrt(sum f_i^2) <= cutoff`` (cycles per
    sample; Nyquist is 0.5), shaped as ``x``; ``x - low_pass(x)`` is the rest."""
    view, axes = spatial_axes(x)
    radius2 = sum(f.square() for f in frequencies(view, axes))
    return apply_response(view, (radius2 <= cutoff * cutoff).to(torch.float64), axes).reshape(x.shape)


def sea_response(x: torch.Tensor, axes: tuple[int, ...], noise_to_signal: float, power: float) -> torch.Tensor:
    """SeaCache's spectral-evolution-aware response on ``x``'s ``axes``: per axis the Wiener gain
    ``P(f) / (P(f) + r)`` of a clean spectrum ``P(f) = 1 / |f|^power`` under white noise of relative
    power ``r = noise_to_signal`` (``sigma^2 / alpha^2`` of ``x = alpha x0 + sigma noise``), the
    product over axes scaled to unit mean (so distances compare across steps)."""
    gain = None
    for f in frequencies(x, axes):
        if f.numel() == 1:  # a single sample (a one-frame video): a constant gain, gone after scaling
            continue
        clean = 1.0 / (f.abs().pow(power) + 1e-16)
        axis_gain = clean / (clean + noise_to_signal)
        gain = axis_gain if gain is None else gain * axis_gain
    if gain is None:
        return torch.ones((1,) * x.dim(), dtype=torch.float64, device=x.device)
    return gain / gain.mean()


def sea_filter(x: torch.Tensor, logsnr: float, power: float) -> torch.Tensor:
    """``x`` through :func:`sea_response` at the noise level of log-SNR ``logsnr``
    (``log(alpha^2 / sigma^2)``: flow matching's ``2 log((1 - sigma) / sigma)``, DDIM's ``log(a / (1 - a))``)."""
    view, axes = spatial_axes(x)
    return apply_response(view, sea_response(view, axes, math.exp(-logsnr), power), axes).reshape(x.shape)
