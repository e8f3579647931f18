"""FLOP counting with ``torch.utils.flop_counter`` (no hand-written model formulas)."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, TypeVar
from unittest import mock

import torch
from torch import nn
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


def count_flops_per_call(fn: Callable[[], T], callables: dict[str, tuple[nn.Module, str]]
                         ) -> tuple[T, int, dict[str, int]]:
    """Run ``fn()`` under one FLOP counter; returns its result, the total FLOPs and, per name of
    ``callables`` (name -> ``(owner, method)``), the FLOPs counted while ``getattr(owner, method)``
    ran, summed over its calls (the method is wrapped for the run and restored after it)."""
    counts = dict.fromkeys(callables, 0)
    with FlopCounterMode(display=False) as counter, ExitStack() as restore:
        for name, (owner, method) in callables.items():
            restore.enter_context(mock.patch.object(owner, method, _counted(getattr(owner, method), name, counter, counts)))
        result = fn()
    return result, counter.get_total_flops(), counts


def _counted(compute: Callable, name: str, counter: FlopCounterMode, counts: dict) -> Callable:
    """``compute`` adding the FLOPs of each of its calls to ``counts[name]``."""
    def counted(*args, **kwargs):
        before = counter.get_total_flops()
        out = compute(*args, **kwargs)
        counts[name] += counter.get_total_flops() - before
        return out

    return counted
