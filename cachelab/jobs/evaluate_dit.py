"""Measure the shipped digits DiT with the digit judge and record it in its manifest.

    python -m cachelab.jobs.evaluate_dit --num-samples 1000 --guidance-scale 1.5 [--record]

Generates ``--num-samples`` digits (classes balanced), 50 DDIM steps by default, and reports
the fraction the judge recognises as the requested class and the feature-space Fréchet
distance to the real digits. ``--record`` writes the figures into the model's manifest.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from cachelab.assets import ASSETS_DIR, read_manifest
from cachelab.io import write_json_atomic
from cachelab.evaluation.judge import DigitJudge
from cachelab.models.adapter import Inputs
from cachelab.models.dit_adapter import DiTAdapter


def evaluate(weights: str, num_samples: int, num_steps: int, guidance_scale: float, seed: int,
             batch_size: int = 250) -> dict:
    adapter = DiTAdapter(name=weights, weights=weights, num_steps=num_steps, guidance_scale=guidance_scale)
    judge = DigitJudge()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % adapter.model.num_classes
    images = []
    start = time.perf_counter()
    for chunk in labels.split(batch_size):
        noise = torch.randn(len(chunk), *adapter.latent_shape, generator=generator)
        images.append(adapter.decode(adapter.generate(Inputs(noise, chunk), progress="sample")))
    scores = judge.evaluate(torch.cat(images), labels)
    return {**scores, "num_steps": num_steps, "guidance_scale": guidance_scale, "seed": seed,
            "sampler": "DDIM (eta 0)", "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="tiny_dit_mnist")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", action="store_true", help="write the figures into the manifest")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.weights, args.num_samples, args.num_steps, args.guidance_scale, args.seed)
    print(json.dumps(result, indent=2))
    if args.record:
        manifest = read_manifest(args.weights)
        manifest["quality"] = {**result, "command": f"python -m cachelab.jobs.evaluate_dit --weights "
                                                    f"{args.weights} --num-samples {args.num_samples} --num-steps "
                                                    f"{args.num_steps} --guidance-scale {args.guidance_scale} "
                                                    f"--seed {args.seed} --record"}
        write_json_atomic(ASSETS_DIR / f"{args.weights}.json", manifest)


if __name__ == "__main__":
    main()
