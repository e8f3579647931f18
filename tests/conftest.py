"""Shared fixtures: a tiny DiT adapter small enough for exact checks in milliseconds."""
from __future__ import annotations

import pytest
import torch

from cachelab.models.dit_adapter import DiTAdapter

torch.set_num_threads(2)


def tiny_adapter(**overrides) -> DiTAdapter:
    kwargs = dict(name="tiny", arch=dict(hidden_size=32, depth=2, num_heads=2, patch_size=2), input_size=8,
                  in_channels=1, num_classes=10, learn_sigma=False, init="random", num_steps=10,
                  guidance_scale=1.5)
    kwargs.update(overrides)
    return DiTAdapter(**kwargs)


@pytest.fixture
def adapter() -> DiTAdapter:
    return tiny_adapter()
