"""FLOP counting with ``torch.utils.flop_counter`` (no hand-written model formulas)."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

T = TypeVar("T")

# PyTorch counts the CUDA attention kernels but not the CPU one that SDPA dispatches to
# here; register it with PyTorch's own SDPA formula so CPU and GPU counts agree.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_SDPA is not None and _CPU_SDPA not in torch.utils.flop_counter.flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` under a FLOP counter; returns its result and the total FLOPs."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()
