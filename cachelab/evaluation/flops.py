"""FLOP counting with ``torch.utils.flop_counter`` (no hand-written model formulas), and its
cheaper reading from module calls (:class:`CallFlops`)."""
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


class CallFlops:
    """FLOPs of a generation read from the work it does, without a FLOP counter: every
    ``F.linear`` and ``F.scaled_dot_product_attention`` call gets its FLOPs from its shapes with
    the counter's own formulas; every other leaf module of ``model`` (convolutions...) costs
    what it cost per call in one full-compute generation under :func:`count_flops`
    (:meth:`calibrate`), which also measures the FLOPs outside all of these (the text encoder's
    and the VAE's other work, constant across caching tools). A tool that skips a module's work
    (replacing its forward, or not calling it) skips the calls. Checked against the counter in
    tests/test_benchmark.py and, on a sample of points, by job=benchmark; elementwise arithmetic
    (a forecast's) is free here as for the counter, which counts matrix products only."""

    def __init__(self, model: nn.Module):
        self.leaves = {name: m for name, m in model.named_modules()
                       if not any(True for _ in m.children()) and not isinstance(m, nn.Linear)}
        self.per_call: dict[str, float] = {}
        self.outside = 0.0

    def _watch(self, tally: dict, spans: dict | None = None, counter=None) -> ExitStack:
        """Count into ``tally`` ("linear", "attention": FLOPs; leaf name: calls) while open; with
        ``counter``, also each leaf call's counted FLOPs into ``spans``."""
        stack = ExitStack()
        for name, module in self.leaves.items():
            def pre(_module, _args, name=name):
                tally[name] = tally.get(name, 0) + 1
                if counter is not None:
                    spans.setdefault(name, []).append(-counter.get_total_flops())

            stack.callback(module.register_forward_pre_hook(pre).remove)
            if counter is not None:
                def post(_module, _args, _out, name=name):
                    spans[name][-1] += counter.get_total_flops()

                stack.callback(module.register_forward_hook(post).remove)
        functional = torch.nn.functional
        linear, attention = functional.linear, functional.scaled_dot_product_attention

        def counted_linear(x, weight, *args, **kwargs):
            tally["linear"] += 2 * x.numel() * weight.shape[0]  # 2 m k n of the product; the bias is free
            return linear(x, weight, *args, **kwargs)

        def counted_attention(query, key, value, *args, **kwargs):
            tally["attention"] += sdpa_flop_count(query.shape, key.shape, value.shape)
            return attention(query, key, value, *args, **kwargs)

        stack.enter_context(mock.patch.object(functional, "linear", counted_linear))
        stack.enter_context(mock.patch.object(functional, "scaled_dot_product_attention", counted_attention))
        return stack

    def calibrate(self, fn: Callable[[], T]) -> tuple[T, int]:
        """Run ``fn()`` (full compute) under the counter; learn the leaves' per-call FLOPs and the
        FLOPs outside; returns its result and its counted FLOPs."""
        tally, spans = {"linear": 0, "attention": 0}, {}
        with FlopCounterMode(display=False) as counter, self._watch(tally, spans, counter):
            result = fn()
        total = counter.get_total_flops()
        self.per_call = {name: sum(spans[name]) / len(spans[name]) for name in spans}
        self.outside = total - tally["linear"] - tally["attention"] - sum(sum(s) for s in spans.values())
        return result, total

    def count(self, fn: Callable[[], T]) -> tuple[T, float]:
        """Run ``fn()``; returns its result and its FLOPs from its calls (after :meth:`calibrate`)."""
        tally = {"linear": 0, "attention": 0}
        with self._watch(tally):
            result = fn()
        leaves = {name: calls for name, calls in tally.items() if name not in ("linear", "attention")}
        unknown = sorted(set(leaves) - set(self.per_call))
        if unknown:
            raise RuntimeError(f"leaf modules not seen at calibration: {', '.join(unknown[:5])}")
        return result, (self.outside + tally["linear"] + tally["attention"]
                        + sum(self.per_call[name] * calls for name, calls in leaves.items()))
