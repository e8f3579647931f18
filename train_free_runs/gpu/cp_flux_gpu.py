"""Caching under diffusers context parallelism (Ulysses) on GPUs: correctness against one process,
and the communication plan on paper.

    python train_free_runs/gpu/cp_flux_gpu.py                    # 2 ranks, tiny random FLUX, on the GPU(s)
    python train_free_runs/gpu/cp_flux_gpu.py --device cpu       # the same on CPU (gloo)
    python train_free_runs/gpu/cp_flux_gpu.py --plan-only        # FLUX.1-dev's all-to-all bytes, no model run

Correctness: one process generates uncached and with TaylorSeer (interval), FBCache and MagCache
through ``cachelab.apply``; then ``--ranks`` processes do the same with Ulysses context
parallelism; the table gives each case's full steps (one process / every rank), the largest
difference between the two outputs and between cached and uncached. Ranks use NCCL when each
has its own GPU, else gloo (one GPU: a correctness check only, no speed).

The plan: Ulysses moves q, k, v (all-to-all before attention) and the attention output (after)
of every attention layer: per rank and layer ``4 B (S / N) W b (N - 1) / N`` bytes (``S`` joint
sequence, ``W`` heads x head dim, ``b`` bytes per value). A forecast step at module
granularity skips every cached attention, so its all-to-alls disappear; the gather of the
output (``B S_img C b (N - 1) / N``) stays on every step.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

CASES = [("taylor", "taylor", {"interval": 3}), ("fbcache", "fbcache", {"threshold": 0.3}),
         ("magcache", "magcache", {"threshold": 0.1})]
# FLUX.1-dev at 1024 x 1024: 4096 image + 512 text tokens, 19 double + 38 single blocks of 24 x 128
FLUX_DEV = dict(image_tokens=4096, text_tokens=512, width=3072, layers=57, out_channels=64)


def all_to_all_bytes(ranks: int, image_tokens: int, text_tokens: int, width: int, layers: int, out_channels: int,
                     batch: int = 1, value_bytes: int = 2) -> tuple[float, float]:
    """Bytes one rank sends per full step (attention all-to-alls and the output gather) and per
    forecast step at module granularity (the gather alone)."""
    share = (ranks - 1) / ranks
    attention = 4 * batch * (image_tokens + text_tokens) / ranks * width * value_bytes * share * layers
    gather = batch * image_tokens * out_channels * value_bytes * share
    return attention + gather, gather


def plan(steps: int = 50, full: int = 10) -> str:
    """The table of FLUX.1-dev's all-to-all volume per rank, uncached and cached (``full`` of ``steps``)."""
    lines = ["ranks | GB per full step | GB per forecast step | GB per generation uncached | cached "
             f"({full} full of {steps})", "--- | --- | --- | --- | ---"]
    for ranks in (2, 4, 8):
        full_step, forecast_step = all_to_all_bytes(ranks, **FLUX_DEV)
        lines.append(f"{ranks} | {full_step / 1e9:.3f} | {forecast_step / 1e9:.4f} | {steps * full_step / 1e9:.1f} | "
                     f"{(full * full_step + (steps - full) * forecast_step) / 1e9:.1f}")
    return "\n".join(lines)


def generations(args, folder: Path, parallel: bool) -> dict:
    """Uncached, then every case through cachelab.apply: images, full steps, seconds."""
    import cachelab
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cachelab.models.parallel import enable_context_parallel

    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml")
    cfg.merge_with({"path": str(folder / args.model), "num_steps": args.steps, "device": args.device})
    model = instantiate(cfg)
    if parallel:
        enable_context_parallel(model.pipe.transformer, ulysses=args.ranks)
    arguments = model.call_arguments(model.make_inputs(1, seed=0))

    def generate():
        start = time.perf_counter()
        images = model.pipe(**arguments, generator=torch.Generator(args.device).manual_seed(0),
                            num_inference_steps=args.steps, output_type="pt", return_dict=False)[0].float().cpu()
        return images, time.perf_counter() - start

    generate()  # warm-up
    images, seconds = generate()
    results = {"uncached": {"images": images, "seconds": seconds, "full_steps": list(range(args.steps))}}
    for case, preset, keys in CASES:
        if preset == "magcache":
            keys = {**keys, "calibration": str(folder / "calibration.json")}
        handle = cachelab.apply(model.pipe, preset, **keys)
        images, seconds = generate()
        results[case] = {"images": images, "seconds": seconds, "full_steps": handle.stats().full_steps}
        handle.remove()
    return results


def rank_main(rank: int, args, folder: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    own_gpus = args.device == "cuda" and torch.cuda.device_count() >= args.ranks
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if own_gpus else "gloo", rank=rank, world_size=args.ranks,
                            timeout=timedelta(seconds=120))
    try:
        results = generations(args, folder, parallel=True)
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny_flux", help="a conf/model name with a context-parallel plan")
    p.add_argument("--device", default="cuda")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--folder", default=str(REPO / "outputs" / "cp_flux_gpu"), help="pipelines and results")
    p.add_argument("--plan-only", action="store_true")
    args = p.parse_args(argv)
    print(plan())
    if args.plan_only:
        return
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calibration.json").write_text(json.dumps({"ratios": [1.0, 0.9, 0.95, 1.05, 0.97, 1.02, 0.99, 1.0]}))
    single = generations(args, folder, parallel=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args, folder, port), nprocs=args.ranks)
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(args.ranks)]
    print(f"\n{args.model}, {args.steps} steps, {args.ranks} ranks on {args.device}\n"
          "case | full steps (1 process) | same on every rank | max |CP - 1 process| | max |cached - uncached| "
          "| s (1 process) | s (CP)\n--- | --- | --- | --- | --- | --- | ---")
    for case in single:
        same = all(r[case]["full_steps"] == single[case]["full_steps"] for r in ranks)
        diff = max(float((r[case]["images"] - single[case]["images"]).abs().max()) for r in ranks)
        effect = float((single[case]["images"] - single["uncached"]["images"]).abs().max())
        print(f"{case} | {single[case]['full_steps']} | {same} | {diff:.1e} | {effect:.1e} | "
              f"{single[case]['seconds']:.3f} | {ranks[0][case]['seconds']:.3f}")


if __name__ == "__main__":
    main()
