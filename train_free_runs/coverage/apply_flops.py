"""FLOPs of ``cachelab.apply`` against the command line's path on the shipped FLUX pipeline
(``tiny_flux_digits``): TaylorSeer order 2, interval 8 (first_enhance 2), ``torch.utils.flop_counter``
around each whole pipeline call (text encoders and VAE included), and the ratio to the bare call:
``first`` counts the first call, with the one-time forwards that find the sites (discovery's traced
call, the site coverage count), ``then`` a later call of the same handle (the steady state).

Rows: the bare pipeline; ``cachelab.apply(pipe, "taylor", ...)`` with its defaults; the same with
FLUX's module sites passed by hand (``sites={"module": FLUX_MODULE_SITES}``); the command line's
path (``FluxDigitsAdapter`` with the composed strategy attached, as ``python run.py
model=tiny_flux_digits strategy=taylor order=2 interval=8``). Run it from a checkout to measure
that checkout's ``cachelab``:

    python -m train_free_runs.coverage.apply_flops [--images 16] [--steps 50]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import cachelab
from cachelab.jobs.base import build, build_strategy
from cachelab.jobs.schema import compose_config
from cachelab.models.pipelines.flux import FLUX_MODULE_SITES

ORDER, INTERVAL, FIRST_ENHANCE = 2, 8, 2


def counted(call) -> int:
    """The FLOPs of ``call()``, under no_grad."""
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        call()
    return mode.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keys = [f"order={ORDER}", f"interval={INTERVAL}", f"first_enhance={FIRST_ENHANCE}", f"num_steps={args.steps}"]
    cfg = compose_config(["model=tiny_flux_digits", "strategy=taylor", *keys, "device=cpu"])
    adapter = build(cfg, "model")
    inputs = adapter.make_inputs(args.images, seed=0)
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)

    def pipeline_call():
        pipe(**adapter.call_arguments(inputs), generator=torch.Generator().manual_seed(inputs.seed),
             num_inference_steps=args.steps, output_type="pt")

    settings = dict(order=ORDER, interval=INTERVAL, first_enhance=FIRST_ENHANCE)
    bare = counted(pipeline_call)
    rows = {"bare pipeline": (bare, bare)}
    with cachelab.apply(pipe, "taylor", **settings) as handle:
        rows["cachelab.apply defaults"] = counted(pipeline_call), counted(pipeline_call)
        sites = len(handle.inner.sites)
    with cachelab.apply(pipe, "taylor", sites={"module": FLUX_MODULE_SITES}, **settings):
        rows["cachelab.apply, FLUX sites by hand"] = counted(pipeline_call), counted(pipeline_call)
    strategy, handles = build_strategy(cfg), []

    def attached_generation():  # the run.py path: attach (the adapter's discovery call) and generate
        handles.append(strategy.attach(adapter))
        adapter.generate(inputs, handles[0])

    try:
        first = counted(attached_generation)
        rows["run.py path (adapter + composed strategy)"] = first, counted(lambda: adapter.generate(inputs, handles[0]))
    finally:
        for handle in handles:
            handle.remove()
    print(f"tiny_flux_digits, {args.images} prompts x {args.steps} steps, taylor order {ORDER} interval {INTERVAL} "
          f"first_enhance {FIRST_ENHANCE}; apply defaults hooked {sites} sites")
    print(f"{'':45s} {'first GFLOPs':>12s} {'speedup':>8s} {'then GFLOPs':>12s} {'speedup':>8s}")
    for name, (first, then) in rows.items():
        print(f"{name:45s} {first / 1e9:12.2f} {bare / first:7.2f}x {then / 1e9:12.2f} {bare / then:7.2f}x")


if __name__ == "__main__":
    main()
