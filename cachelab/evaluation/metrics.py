"""Quality of a cached generation against the full-compute one with the same seed."""
from __future__ import annotations

import torch


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images with 1 or >= 3 channels as RGB (grey repeated; extra latent channels dropped)."""
    images = images.float().cpu()
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images[:, :3]


def relative_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole batch, in float64."""
    x, reference = x.double(), reference.double()
    return (torch.linalg.vector_norm(x - reference) / torch.linalg.vector_norm(reference)).item()


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (mean squared error over the batch); inf if identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # slow import: only when used

    return peak_signal_noise_ratio(images.double(), reference.double(), data_range=1.0).item()


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of images in [0, 1] (Gaussian window 11, sigma 1.5; 1.0 if identical)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images.double(), reference.double(), data_range=1.0).item()
