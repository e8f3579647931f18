"""Timing helpers shared by the benchmark scripts: device-synchronised wall time, the
bandwidth of a large copy (the floor for memory-bound work), the machine's name."""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CPU work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median of ``repeats`` timed calls."""
    return median(seconds(fn, device) for _ in range(repeats))


def copy_bandwidth(device: torch.device, dtype: torch.dtype, mib: int = 256) -> float:
    """Bytes per second of a large copy (read + write), median of 5 after one warm-up."""
    src = torch.ones(mib * 2**20 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * src.element_size() / median_seconds(lambda: dst.copy_(src), device, 5)


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (Linux) and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"
