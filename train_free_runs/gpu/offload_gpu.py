"""One prepared GPU check of host offload (``cache.offload``): DiT-XL/2-shaped random model, bf16,
batch 8 with CFG, 50 DDIM steps, TaylorSeer order 2, N=5, module granularity; uncached, cached,
and cached with the factors in pinned host memory between uses (the next site's prefetched on a
side stream).

    python train_free_runs/gpu/offload_gpu.py                     # on the GPU (defaults)
    python train_free_runs/gpu/offload_gpu.py --device cpu --preset DiT-S/2 --batch 1 --steps 10 --dtype fp32

Prints a table: time per step, peak device memory (``torch.cuda.max_memory_allocated`` over the
generation), the bytes offload moved each way, the time those copies take alone (at the pinned
copy bandwidth measured here), and the overlap: the share of that copy time hidden behind
compute, ``1 - (offloaded - cached) / copy time`` (clipped to [0, 1]). On the CPU nothing moves
(the code path runs, bit-identical), so memory and overlap are n/a.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from train_free_runs.bench.timing import machine, median_seconds, synchronize  # noqa: E402
from cachelab.core.controller import attach  # noqa: E402
from cachelab.core.offload import HostOffload, Transfers  # noqa: E402
from cachelab.core.schedules import Interval  # noqa: E402
from cachelab.core.sites import select_sites  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.models.adapter import DTYPES  # noqa: E402
from cachelab.models.dit_adapter import DiTAdapter  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402


class CountedTransfers(Transfers):
    """:class:`Transfers` that count the bytes they copy each way."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.to_host_bytes = self.to_device_bytes = 0

    def to_host(self, tensor):
        self.to_host_bytes += tensor.numel() * tensor.element_size()
        return super().to_host(tensor)

    def to_device(self, tensor):
        self.to_device_bytes += tensor.numel() * tensor.element_size()
        return super().to_device(tensor)


def pinned_bandwidth(device: torch.device, mib: int = 256) -> tuple[float, float]:
    """Bytes per second of a large host-to-device and device-to-host copy from/to pinned memory."""
    host = torch.ones(mib * 2**20, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty_like(host, device=device)
    on_device.copy_(host)
    up = median_seconds(lambda: on_device.copy_(host, non_blocking=True), device, 5)
    down = median_seconds(lambda: host.copy_(on_device, non_blocking=True), device, 5)
    return host.numel() / up, host.numel() / down


def peak_memory(fn, device: torch.device) -> int | None:
    """The most device memory allocated while ``fn()`` runs (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-XL/2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--factor-dtype", default=None, help="factor storage, e.g. fp8_e4m3 (default: the model's dtype)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    adapter = DiTAdapter(name="offload_check", preset=args.preset, init="random", num_steps=args.steps,
                         guidance_scale=1.5, dtype=args.dtype, device=args.device)
    inputs = adapter.make_inputs(args.batch, seed=0)
    sites = select_sites(adapter.model, adapter.site_patterns("module"))
    counted: list[CountedTransfers] = []

    def transfers(where: torch.device):
        if where.type != "cuda":
            return None
        counted.append(CountedTransfers(where))
        return counted[-1]

    def handle(offload: bool):
        predictor = TaylorSeer(args.order, first_enhance=2, factor_dtype=args.factor_dtype)
        return attach(sites, HostOffload(predictor, transfers) if offload else predictor,
                      Interval(args.interval, first_enhance=2))

    rows, outputs = {}, {}
    with torch.inference_mode():
        for name, offload in (("uncached", None), ("cached", False), ("cached + offload", True)):
            h = None if offload is None else handle(offload)
            run = (lambda h=h: outputs.__setitem__(name, adapter.generate(inputs, h)))
            run()  # warm-up (and the first generation's output)
            memory = peak_memory(run, device)
            seconds = median_seconds(run, device, args.repeats)
            rows[name] = {"step_ms": 1e3 * seconds / args.steps, "peak_mib": None if memory is None else memory / 2**20,
                          "cache_mib": None if h is None else h.stats().cache_bytes / 2**20}
            if h is not None:
                h.remove()
    identical = bool(torch.equal(outputs["cached"], outputs["cached + offload"]))
    generations = 2 + args.repeats  # warm-up, memory, timed
    moved = {"to_device": sum(t.to_device_bytes for t in counted) / generations,
             "to_host": sum(t.to_host_bytes for t in counted) / generations}
    copy_ms = overlap = None
    if device.type == "cuda":
        up, down = pinned_bandwidth(device)
        copy_ms = 1e3 * (moved["to_device"] / up + moved["to_host"] / down) / args.steps
        exposed = rows["cached + offload"]["step_ms"] - rows["cached"]["step_ms"]
        overlap = min(1.0, max(0.0, 1 - exposed / copy_ms)) if copy_ms > 0 else None
    result = {"device": machine(device), "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
              "steps": args.steps, "interval": args.interval, "order": args.order, "factor_dtype": args.factor_dtype,
              "rows": rows, "moved_mib_per_generation": {k: v / 2**20 for k, v in moved.items()},
              "copy_alone_ms_per_step": copy_ms, "overlap": overlap, "offload_bit_identical": identical}
    na = "n/a"
    print(f"{result['device']}: {args.preset} {args.dtype}, batch {args.batch} (CFG), {args.steps} steps, "
          f"TaylorSeer o{args.order} N={args.interval} module, factors {args.factor_dtype or args.dtype}")
    print(f"| run | ms / step | peak device MiB | cache MiB |\n| --- | --- | --- | --- |")
    for name, row in rows.items():
        peak = na if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        cache = na if row["cache_mib"] is None else f"{row['cache_mib']:.1f}"
        print(f"| {name} | {row['step_ms']:.2f} | {peak} | {cache} |")
    print(f"offload moved {moved['to_device'] / 2**20:.0f} MiB to the device and {moved['to_host'] / 2**20:.0f} MiB "
          f"to the host per generation; those copies alone: "
          f"{na if copy_ms is None else f'{copy_ms:.2f} ms'} per step; overlap "
          f"{na if overlap is None else f'{100 * overlap:.0f} %'}; bit-identical to no offload: {identical}")
    if args.out:
        write_bytes_atomic(args.out, json.dumps(result, indent=2).encode())
    return result


if __name__ == "__main__":
    main()
