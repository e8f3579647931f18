"""Quality of a cached generation against the full-compute one with the same seed."""
from __future__ import annotations

import math

import torch


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images with 1 or >= 3 channels as RGB (grey repeated; extra latent channels dropped)."""
    images = images.float().cpu()
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images[:, :3]


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of every tensor is finite (no NaN, no +-Inf)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def relative_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole batch, in float64; NaN if either holds NaN or Inf."""
    if not finite(x, reference):
        return math.nan
    x, reference = x.double(), reference.double()
    return (torch.linalg.vector_norm(x - reference) / torch.linalg.vector_norm(reference)).item()


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (mean squared error over the batch); inf if identical,
    NaN if either holds NaN or Inf."""
    if not finite(images, reference):
        return math.nan
    from torchmetrics.functional.image import peak_signal_noise_ratio  # slow import: only when used

    return peak_signal_noise_ratio(images.double(), reference.double(), data_range=1.0).item()


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of images in [0, 1] (Gaussian window 11, sigma 1.5; 1.0 if identical); NaN if
    either holds NaN or Inf."""
    if not finite(images, reference):
        return math.nan
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images.double(), reference.double(), data_range=1.0).item()
