"""cachelab against diffusers' own caching hooks, in one process, on the same FLUX pipeline
and seeds: wall time, FLOPs, the wall-time ratio cachelab / peer, cache memory, and
rel-L2 / PSNR against full compute.

    python train_free_runs/peers/benchmark.py --repeats 5 --out train_free_runs/peers/results.md

The pipeline has tiny text encoders and a random FLUX transformer of a measurable size
(``--layers``/``--width``); it is built once into ``--folder`` and loaded through
``from_pretrained``. Each pair uses settings that mean the same thing in both tools.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cachelab.adaptive import FirstBlockCache  # noqa: E402
from cachelab.controller import attach  # noqa: E402
from cachelab.flops import count_flops  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.metrics import psnr, relative_l2  # noqa: E402
from cachelab.models.pipelines.flux import FluxAdapter  # noqa: E402
from cachelab.schedules import Mask  # noqa: E402
from cachelab.sites import SitePattern, select_sites  # noqa: E402
from cachelab.strategy import Strategy  # noqa: E402
from strategies.reuse import Reuse  # noqa: E402
from strategies.taylor import TaylorSeer  # noqa: E402


def build_pipeline(folder: Path, layers: int, width: int) -> None:
    """A FLUX pipeline with ``layers`` double and ``2 * layers`` single blocks of ``width``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if (folder / "model_index.json").is_file():
        return
    torch.manual_seed(0)
    components = FluxAdapter.tiny_components(folder.parent / "scratch")
    heads = width // 64
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=2 * layers, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 24, 24])
    FluxPipeline(**components).save_pretrained(folder)


def peer_taylorseer(adapter, steps: int, interval: int, warmup: int, order: int):
    """diffusers' ``TaylorSeerCacheConfig`` and cachelab's TaylorSeer with the same meaning:
    attention sites, the hook's schedule as a mask, derivatives from the first full step, fp32 factors."""
    from diffusers import TaylorSeerCacheConfig

    def peer():
        adapter.model.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup,
                                                         max_order=order, taylor_factors_dtype=torch.float32))
        return adapter.model.disable_cache

    full = [s for s in range(steps) if s < warmup or (s - warmup - 1) % interval == 0]

    def ours():
        sites = select_sites(adapter.model, [SitePattern(r"(single_)?transformer_blocks\.\d+\.attn")])
        return attach(sites, TaylorSeer(order, first_enhance=1, factor_dtype="fp32"), Mask(full_steps=full))

    return f"TaylorSeer o{order} N={interval} D={warmup}", peer, ours


def peer_fbcache(adapter, threshold: float):
    """diffusers' ``FirstBlockCacheConfig`` and cachelab's ``fbcache`` preset: the first block's
    residual change against the last full step decides; skipped steps reuse the tail's
    residual (diffusers: one residual for the whole tail; cachelab: one per block, the same sum)."""
    from diffusers import FirstBlockCacheConfig

    def peer():
        adapter.model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return adapter.model.disable_cache

    def ours():
        return Strategy("fbcache", Reuse(), FirstBlockCache(threshold=threshold), "block").attach(adapter)

    return f"FBCache threshold {threshold}", peer, ours


def hook_state_bytes(model) -> int:
    """Bytes of the tensors held by diffusers' hook states on ``model``'s modules."""
    seen, total = set(), 0

    def walk(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict) and depth < 12:
            for value in obj.values():
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)) and depth < 12:
            for value in obj:
                walk(value, depth + 1)
        elif hasattr(obj, "__dict__") and depth < 12 and type(obj).__module__.startswith("diffusers.hooks"):
            walk(vars(obj), depth + 1)

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            walk(registry.hooks)
    return total


def timed(fn, repeats: int) -> tuple[torch.Tensor, float]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path.home() / ".cache/cachelab/peers_flux")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the table (Markdown) here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_pipeline(args.folder, args.layers, args.width)
    adapter = FluxAdapter("peers_flux", str(args.folder), num_steps=args.steps, guidance_scale=3.5,
                          call_kwargs={"height": args.resolution, "width": args.resolution, "max_sequence_length": 32})
    inputs = adapter.make_inputs(args.images, seed=0)
    generate = lambda handle=None: adapter.generate(inputs, handle)  # noqa: E731
    generate()  # warm-up
    baseline, base_wall = timed(generate, args.repeats)
    _, base_flops = count_flops(generate)
    pairs = [peer_taylorseer(adapter, args.steps, interval=5, warmup=3, order=order) for order in (1, 2)]
    pairs += [peer_fbcache(adapter, threshold) for threshold in (0.05, 0.1)]
    rows = [("no caching", "-", base_wall, None, base_flops, 0, None, None)]
    for name, peer, ours in pairs:
        disable = peer()
        try:
            peer_out, peer_wall = timed(generate, args.repeats)
            _, peer_flops = count_flops(generate)
            held = []  # the hook resets its states when the pipeline call ends: read them at every step
            adapter.generate(inputs, callback=lambda step: held.append(hook_state_bytes(adapter.model)))
            peer_bytes = max(held)
        finally:
            disable()
        handle = ours()
        try:
            our_out, our_wall = timed(lambda: generate(handle), args.repeats)
            _, our_flops = count_flops(lambda: generate(handle))
            our_bytes = handle.stats().cache_bytes
        finally:
            handle.remove()
        rows.append((name, "diffusers hook", peer_wall, None, peer_flops, peer_bytes,
                     relative_l2(peer_out, baseline), psnr(peer_out, baseline)))
        rows.append((name, "cachelab", our_wall, our_wall / peer_wall, our_flops, our_bytes,
                     relative_l2(our_out, baseline), psnr(our_out, baseline)))
    table = markdown(rows, base_wall, base_flops, args)
    print(table)
    if args.out:
        write_bytes_atomic(args.out, table.encode())


def markdown(rows, base_wall: float, base_flops: int, args) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch "
             f"{torch.__version__}; FLUX {args.layers}+{2 * args.layers} blocks, width {args.width}, "
             f"{args.resolution}^2, {args.steps} steps, {args.images} images, median of {args.repeats}.", "",
             "| setting | tool | wall (s) | wall speedup | cachelab / peer wall | FLOPs speedup | cache MiB | "
             "rel-L2 | PSNR (dB) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, tool, wall, ratio, flops, cache, rel, db in rows:
        lines.append(f"| {name} | {tool} | {wall:.3f} | {base_wall / wall:.2f} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} | {base_flops / flops:.2f} | {cache / 2**20:.2f} | "
                     f"{'' if rel is None else f'{rel:.2e}'} | {'' if db is None else f'{db:.1f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
