"""One prepared GPU check: DiT-XL/2-shaped random model, bf16, batch 16 with CFG, 50 DDIM steps,
TaylorSeer N=5 order 2 at module granularity: FLOPs speedup, wall speedup, efficiency, and the
forecast step's time against the time its bytes need at the measured memory bandwidth.

    python train_free_runs/gpu/dit_xl2_gpu.py                      # on the GPU (defaults)
    python train_free_runs/gpu/dit_xl2_gpu.py --compile cudagraphs  # + regional compile, CUDA graphs
    python train_free_runs/gpu/dit_xl2_gpu.py --device cpu --preset DiT-S/2 --batch 1 --steps 10 --dtype fp32

The forecast step's floor: every module site reads its order+1 factors and writes one output
(bf16), and every block still reads its adaLN weights; divided by the bandwidth of a large
device-to-device copy measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from train_free_runs.bench.timing import copy_bandwidth, machine, median_seconds  # noqa: E402
from cachelab.core.compiling import compile_regions, uncompile_regions  # noqa: E402
from cachelab.evaluation.flops import count_flops  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.models.adapter import DTYPES  # noqa: E402
from cachelab.models.dit_adapter import DiTAdapter  # noqa: E402
from cachelab.core.schedules import Interval  # noqa: E402
from cachelab.core.strategy import Strategy  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-XL/2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", default="none", choices=["none", "inductor", "cudagraphs"],
                   help="also time both sides regionally compiled (cudagraphs: mode reduce-overhead)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    adapter = DiTAdapter(name="gpu_check", preset=args.preset, init="random", num_steps=args.steps,
                         guidance_scale=1.5, dtype=args.dtype, device=args.device)
    inputs = adapter.make_inputs(args.batch, seed=0)
    schedule = Interval(args.interval, first_enhance=2)
    handle = Strategy("taylor", TaylorSeer(args.order, first_enhance=2), schedule, "module").attach(adapter)
    with torch.inference_mode():
        adapter.generate(inputs)  # warm-up
        adapter.generate(inputs, handle)
        _, base_flops = count_flops(lambda: adapter.generate(inputs))
        _, cached_flops = count_flops(lambda: adapter.generate(inputs, handle))
        base = median_seconds(lambda: adapter.generate(inputs), device, args.repeats)
        cached = median_seconds(lambda: adapter.generate(inputs, handle), device, args.repeats)
        stats = handle.stats()
        compiled = {}
        if args.compile != "none":  # the same generations, regionally compiled; the first call compiles
            mode = "reduce-overhead" if args.compile == "cudagraphs" else "default"
            compile_regions(adapter.model, adapter.site_patterns("block"), handle, mode=mode)
            adapter.generate(inputs)
            adapter.generate(inputs, handle)
            compiled = {"compile": args.compile,
                        "compiled_base_s": median_seconds(lambda: adapter.generate(inputs), device, args.repeats),
                        "compiled_cached_s": median_seconds(lambda: adapter.generate(inputs, handle), device,
                                                            args.repeats)}
            compiled["compiled_wall_speedup_vs_eager_base"] = base / compiled["compiled_cached_s"]
            uncompile_regions(adapter.model)
    handle.remove()
    full, forecast = len(stats.full_steps), len(stats.forecast_steps)
    full_step = base / args.steps
    forecast_step = (cached - full * full_step) / forecast
    model = adapter.model
    element = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    # bytes a forecast step must move: each site reads its factors and writes its output; every
    # block's adaLN modulation weights are read (the embeddings and final layer are ignored)
    per_site = stats.cache_bytes / max(1, len(handle.sites))
    site_bytes = len(handle.sites) * per_site * (1 + 1 / (args.order + 1))
    adaln_bytes = sum(b.adaLN_modulation[-1].weight.numel() * element for b in model.blocks)
    floor = (site_bytes + adaln_bytes) / copy_bandwidth(device, DTYPES[args.dtype])
    result = {
        "device": machine(device),
        "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
        "interval": args.interval, "order": args.order, "num_full": full,
        "flops_speedup": base_flops / cached_flops, "wall_speedup": base / cached,
        "efficiency": (base / cached) / (base_flops / cached_flops),
        "full_step_ms": 1e3 * full_step, "forecast_step_ms": 1e3 * forecast_step,
        "forecast_floor_ms": 1e3 * floor, "cache_mib": stats.cache_bytes / 2**20, **compiled,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_bytes_atomic(args.out, json.dumps(result, indent=2).encode())
    return result


if __name__ == "__main__":
    main()
