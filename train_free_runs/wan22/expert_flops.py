"""FLOPs of each Wan 2.2 expert's transformer calls, full compute against TaylorSeer, on tiny_wan22.

    python train_free_runs/wan22/expert_flops.py --order 2 --interval 5 --first-enhance 2

The run's ``flops/speedup`` counts the whole pipeline (text encoder and VAE too, a large share
at tiny sizes); this counts only what each transformer's calls cost (every op inside its
forward, cache bookkeeping included), for one generation of ``--num-images`` prompts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cachelab.core.schedules import Interval  # noqa: E402
from cachelab.core.strategy import Strategy  # noqa: E402
from cachelab.evaluation.flops import count_flops_per_call  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402

EXPERTS = ("transformer", "transformer_2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--first-enhance", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--num-images", type=int, default=8)
    args = parser.parse_args()
    cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny_wan22.yaml")
    cache = os.path.expanduser(os.environ.get("CACHELAB_CACHE", "~/.cache/cachelab"))
    cfg.merge_with({"path": f"{cache}/tiny_wan22", "num_steps": args.num_steps, "device": "cpu"})
    adapter = instantiate(cfg)
    inputs = adapter.make_inputs(args.num_images, seed=0)
    strategy = Strategy("taylor", TaylorSeer(args.order, args.first_enhance),
                        Interval(args.interval, args.first_enhance), "module")
    handle = strategy.attach(adapter)
    callables = {name: (getattr(adapter.pipe, name), "forward") for name in EXPERTS}
    try:
        _, base_total, base = count_flops_per_call(lambda: adapter.generate(inputs), callables)
        _, cached_total, cached = count_flops_per_call(lambda: adapter.generate(inputs, handle), callables)
        stats = handle.stats()
    finally:
        handle.remove()
    print(f"tiny_wan22, TaylorSeer order {args.order}, N={args.interval}, first_enhance={args.first_enhance}, "
          f"{args.num_steps} steps, {args.num_images} prompts (CFG: two calls per step)\n")
    print("| expert | steps | full steps | transformer FLOPs full compute | cached | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in EXPERTS:
        expert = stats.experts[name]
        steps = len(expert.full_steps) + len(expert.forecast_steps)
        print(f"| {name} | {steps} | {len(expert.full_steps)} {expert.full_steps} | {base[name]:.3e} | "
              f"{cached[name]:.3e} | {base[name] / cached[name]:.2f}x |")
    both_base, both_cached = sum(base.values()), sum(cached.values())
    print(f"| both | {args.num_steps} | {len(stats.full_steps)} | {both_base:.3e} | {both_cached:.3e} | "
          f"{both_base / both_cached:.2f}x |")
    print(f"\nwhole pipeline: {base_total:.3e} -> {cached_total:.3e} FLOPs, {base_total / cached_total:.2f}x")


if __name__ == "__main__":
    main()
