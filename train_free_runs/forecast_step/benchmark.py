"""The forecast step itself: its time against a full step, and against the bytes its
predictor must move at the measured memory bandwidth.

    python train_free_runs/forecast_step/benchmark.py --out train_free_runs/forecast_step/results.md

For each model shape (random weights), granularity and predictor: the model call of a full
step (nothing attached), and of forecast steps once every site holds its full order (full
steps 0..m, then forecasts; the median over ``--repeats`` consecutive forecast steps). The
predictor's memory traffic is computed from the cache size: per cached tensor of order m,
Horner moves 3m tensors (m fused multiply-adds, each reading two and writing one), a
residual site 3 more (the base added in place); reuse at a non-residual site moves 2 (the
cached tensor is copied, so that the caller may change what it gets in place). "fused" is the
least any implementation must move: the m+1 factors and the base read once, the output
written once. Floors are bytes / the bandwidth of a large copy measured in the same process.
``--guard`` is the controller's non-finite check (one reduction per forecast tensor, not
counted in the bytes); ``--guard off`` measures without it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from train_free_runs.bench.timing import copy_bandwidth, machine, median_seconds, seconds  # noqa: E402
from cachelab.core.controller import attach  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.models.adapter import DTYPES  # noqa: E402
from cachelab.models.dit_adapter import DiTAdapter  # noqa: E402
from cachelab.core.schedules import Mask  # noqa: E402
from cachelab.core.sites import Site, select_sites  # noqa: E402
from cachelab.strategies.reuse import Reuse  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402

RESIDUAL = {"module": False, "block": True, "stack": True, "output": False}


def traffic(cache_bytes: int, order: int, residual: bool) -> tuple[float, float]:
    """(bytes our forecast moves, bytes a single fused kernel would move) for caches of
    ``cache_bytes`` holding factors of ``order`` (every cached tensor at full order)."""
    tensor = cache_bytes / (order + 1)  # the bytes of one value of every cached tensor together
    ours = tensor * (3 * order + 3 * residual + 2 * (not order and not residual))  # reuse: a copy
    fused = tensor * (order + 1 + residual + 1)
    return ours, fused


class Identity(torch.nn.Module):
    """A site whose own work is nothing."""

    def forward(self, x):
        return x


# the site calls timed: (label, predictor, full steps; None: every step)
SITE_CALLS = (("full step", Reuse, None), ("forecast, reuse", Reuse, [0]),
              ("forecast, taylor o2", lambda: TaylorSeer(2, first_enhance=1), [0, 1, 2]))


def site_call_us(label: str, calls: int = 20000, guard: str = "fallback", attach_fn=attach) -> float:
    """Median microseconds of one call of an :class:`Identity` site (on 8 numbers) under the
    controller, in the :data:`SITE_CALLS` case ``label``; ``attach_fn``: the controller's
    ``attach`` (another revision's in ``paired.py``)."""
    make, full_steps = next((make, full) for name, make, full in SITE_CALLS if name == label)
    site, x = Identity(), torch.zeros(8)
    handle = attach_fn([Site("identity", site)], make(), Mask(full_steps=full_steps or list(range(calls + 3))),
                       guard=guard)
    with torch.inference_mode(), handle.generation(calls + 3):
        for s in range(3):
            handle.step(s)
            site(x + s)
        elapsed = []
        for s in range(3, calls + 3):
            handle.step(s)
            start = time.perf_counter()
            site(x)
            elapsed.append(time.perf_counter() - start)
    handle.remove()
    return 1e6 * median(elapsed)


def overhead_us(calls: int = 20000, guard: str = "fallback") -> dict[str, float]:
    """Microseconds the controller adds per site call (:func:`site_call_us` less the bare call)."""
    site, x = Identity(), torch.zeros(8)
    result = {}
    for label, _, _ in SITE_CALLS:
        bare = median_seconds(lambda: [site(x) for _ in range(calls)], torch.device("cpu"), 3)
        result[label] = site_call_us(label, calls, guard) - 1e6 * bare / calls
    return result


def measure(adapter: DiTAdapter, granularity: str, predictor_name: str, order: int, repeats: int,
            batch: int, device: torch.device, guard: str = "fallback", attach_fn=attach, bare: bool = True) -> dict:
    """Full-step and forecast-step model-call times and the cache size of one configuration:
    ``full_s`` with nothing attached (None unless ``bare``), ``recorded_s`` the full steps recording (median of the
    ``order + 1`` warm-up steps), ``forecast_s`` the forecast steps. ``attach_fn``: as in
    :func:`site_call_us` (the strategy's sites of ``granularity``, attached as ``Strategy.attach`` does)."""
    model = adapter.model
    inputs = adapter.make_inputs(batch, seed=0)
    x = torch.cat([inputs.noise, inputs.noise]).to(device, adapter.dtype)
    y = torch.cat([inputs.labels, torch.full_like(inputs.labels, model.num_classes)]).to(device)
    t = torch.full((len(x),), 500, device=device)

    def call():
        return model.forward_with_cfg(x, t, y, adapter.guidance_scale)

    predictor = Reuse() if predictor_name == "reuse" else TaylorSeer(order, first_enhance=1)
    warm = order + 1
    handle = attach_fn(select_sites(model, adapter.site_patterns(granularity)), predictor,
                       Mask(full_steps=list(range(warm))), guard=guard)
    with torch.inference_mode():
        call()  # warm-up, nothing attached yet (the handle is idle outside a generation)
        full = median_seconds(call, device, repeats) if bare else None
        recorded, forecasts = [], []
        with handle.generation(warm + repeats):
            for s in range(warm + repeats):
                handle.step(s)
                (forecasts if s >= warm else recorded).append(seconds(call, device))
            cache_bytes = handle.stats().cache_bytes
    handle.remove()
    return {"full_s": full, "recorded_s": median(recorded), "forecast_s": median(forecasts), "cache_bytes": cache_bytes,
            "sites": len(handle.sites)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="DiT-S/2,DiT-B/2")
    p.add_argument("--granularities", default="module,block,stack,output")
    p.add_argument("--orders", default="reuse,1,2,3")
    p.add_argument("--batch", type=int, default=2, help="images; CFG doubles the model batch")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--guard", default="fallback", choices=["fallback", "raise", "off"],
                   help="the controller's non-finite check of every forecast tensor (off: none)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gbps = copy_bandwidth(device, dtype) / 1e9
    header = [f"# Forecast step vs full step ({machine(device)}; torch {torch.__version__}; {args.dtype}; "
              f"batch {args.batch} x2 (CFG); median of {args.repeats}; guard={args.guard})", "",
              f"Copy bandwidth: {gbps:.1f} GB/s (read + write). Controller time per site call (no work in the "
              f"site): " + ", ".join(f"{k} {v:.1f} µs" for k, v in overhead_us(guard=args.guard).items()) + ".", "",
              "| model | granularity | predictor | full step (ms) | forecast step (ms) | forecast / full | "
              "cache MiB | predictor MB moved | its floor (ms) | fused MB | fused floor (ms) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(header), flush=True)
    rows, lines = [], []
    for preset in args.presets.split(","):
        adapter = DiTAdapter(name=preset, preset=preset, init="random", guidance_scale=1.5, dtype=args.dtype,
                             device=args.device)
        for granularity in args.granularities.split(","):
            for name in args.orders.split(","):
                order = 0 if name == "reuse" else int(name)
                row = measure(adapter, granularity, "reuse" if name == "reuse" else "taylor", order, args.repeats,
                              args.batch, device, args.guard)
                ours, fused = traffic(row["cache_bytes"], order, RESIDUAL[granularity])
                row.update(model=preset, granularity=granularity, predictor=name if order == 0 else f"taylor o{order}",
                           ours_mb=ours / 1e6, fused_mb=fused / 1e6, floor_ms=ours / gbps / 1e6,
                           fused_floor_ms=fused / gbps / 1e6)
                rows.append(row)
                line = (f"| {preset} | {granularity} | {row['predictor']} | {1e3 * row['full_s']:.1f} | "
                        f"{1e3 * row['forecast_s']:.2f} | {row['forecast_s'] / row['full_s']:.3f} | "
                        f"{row['cache_bytes'] / 2**20:.1f} | {row['ours_mb']:.1f} | {row['floor_ms']:.2f} | "
                        f"{row['fused_mb']:.1f} | {row['fused_floor_ms']:.2f} |")
                lines.append(line)
                print(line, flush=True)
                if args.out:  # rewritten after every row: a partial run is kept
                    write_bytes_atomic(args.out, ("\n".join(header + lines) + "\n").encode())
    return rows


if __name__ == "__main__":
    main()
