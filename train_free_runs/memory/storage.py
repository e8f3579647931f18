"""Which derivative orders tolerate which factor storage: TaylorSeer order 2, module granularity,
N=5, on both trained models, one generation per storage choice on the same inputs.

    python train_free_runs/memory/storage.py --out train_free_runs/memory/storage [--images 32] [--models ...]

Per model and storage (``strategy.predictor.factor_dtype``): the peak cache bytes
(``stats().cache_bytes``), as a share of the fp32 cache, PSNR against the uncached model with a
95 % bootstrap interval over images, the PSNR difference to fp32 factors on the same images
(paired bootstrap) and the FLOPs speedup (counted with torch.utils.flop_counter on the first
images; storage changes no matrix product). Writes ``results.json`` and ``table.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cachelab.core.strategy import Strategy
from cachelab.evaluation.flops import count_flops
from cachelab.evaluation.statistics import per_image_mse, psnr_interval, psnr_of_mse, resamples
from cachelab.io import write_json_atomic, write_bytes_atomic
from cachelab.jobs.base import build
from cachelab.jobs.presets import preset
from cachelab.jobs.schema import compose_config

# uniform storage, then one order changed at a time, then mixed per order (D_0, D_1, D_2)
STORAGES = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8_channel", "int8_token",
            ["fp8_e4m3", "fp32", "fp32"], ["fp32", "fp8_e4m3", "fp8_e4m3"], ["fp32", "int8_token", "int8_token"],
            ["fp32", "fp32", "fp8_e5m2"], ["bf16", "fp8_e4m3", "fp8_e4m3"], ["bf16", "fp8_e5m2", "fp8_e5m2"],
            ["fp8_e4m3", "int8_token", "int8_token"], ["bf16", "int8_token", "int8_token"]]
SETTING = dict(order=2, interval=5, first_enhance=2, granularity="module")  # the models' recorded settings


def label(storage) -> str:
    return storage if isinstance(storage, str) else "[" + ",".join(storage) + "]"


def paired_difference(mse, reference, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """PSNR(mse) - PSNR(reference) on the same images, and its percentile-bootstrap 95 % interval."""
    mse, reference = np.asarray(mse), np.asarray(reference)
    values = [psnr_of_mse(mse[i]) - psnr_of_mse(reference[i]) for i in resamples(len(mse), draws, seed)]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return psnr_of_mse(mse) - psnr_of_mse(reference), float(low), float(high)


def measure(model: str, images: int, flops_images: int, steps: int) -> dict:
    cfg = compose_config([f"model={model}", f"num_steps={steps}", "logger=none"])
    adapter = build(cfg, "model")
    inputs = adapter.make_inputs(images, 0)
    started = time.perf_counter()
    baseline = adapter.decode(adapter.generate(inputs))
    counted = adapter.make_inputs(flops_images, 0)
    _, base_flops = count_flops(lambda: adapter.generate(counted))
    rows = []
    for storage in STORAGES:
        strategy: Strategy = preset("taylor", num_steps=steps, factor_dtype=storage, **SETTING)
        handle = strategy.attach(adapter)
        try:
            cached = adapter.decode(adapter.generate(inputs, handle))
            cache_bytes = handle.stats().cache_bytes
            flops = count_flops(lambda: adapter.generate(counted, handle))[1] if not rows else rows[0]["flops"]
        finally:
            handle.remove()
        mse = per_image_mse(cached, baseline)
        psnr, low, high = psnr_interval(mse)
        rows.append({"storage": label(storage), "cache_bytes": cache_bytes, "flops": flops,
                     "flops_speedup": base_flops / flops, "psnr": psnr, "psnr_low": low, "psnr_high": high,
                     "mse": mse.tolist()})
        print(f"{model} {label(storage)}: {cache_bytes} B, {psnr:.2f} dB [{low:.2f}, {high:.2f}]", flush=True)
    reference = rows[0]
    for row in rows:
        row["share_of_fp32"] = row["cache_bytes"] / reference["cache_bytes"]
        row["delta_psnr"], row["delta_low"], row["delta_high"] = paired_difference(row["mse"], reference["mse"])
    return {"model": model, "images": images, "flops_images": flops_images, "steps": steps, "setting": SETTING,
            "seconds": time.perf_counter() - started, "rows": rows}


def table(result: dict) -> str:
    lines = [f"### {result['model']} ({result['images']} images, {result['steps']} steps, TaylorSeer order 2, "
             f"module, N=5, first_enhance 2; {result['seconds']:.0f} s)", "",
             "| factor storage (D_0, D_1, D_2) | cache (peak) | % of fp32 | PSNR vs uncached (95 % CI) "
             "| ΔPSNR vs fp32 factors (95 % CI) | FLOPs speedup |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| `{r['storage']}` | {r['cache_bytes'] / 2**20:.2f} MiB | {100 * r['share_of_fp32']:.1f} % | "
                     f"{r['psnr']:.2f} dB [{r['psnr_low']:.2f}, {r['psnr_high']:.2f}] | "
                     f"{r['delta_psnr']:+.2f} dB [{r['delta_low']:+.2f}, {r['delta_high']:+.2f}] | "
                     f"{r['flops_speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["tiny_dit", "tiny_flux_digits"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--flops-images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(model, args.images, args.flops_images, args.steps) for model in args.models]
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    write_json_atomic(args.out / "results.json", {"machine": machine, "results": results})
    write_bytes_atomic(args.out / "table.md", ("\n\n".join(table(r) for r in results) + "\n").encode())
    print("\n\n".join(table(r) for r in results))


if __name__ == "__main__":
    main()
