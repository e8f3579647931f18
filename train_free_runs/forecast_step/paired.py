"""This tree's controller against another revision's (default: main), paired in one process.

    python train_free_runs/forecast_step/paired.py --against main --rounds 7 \
        --out train_free_runs/forecast_step/paired.json

The other revision's ``cachelab/core/controller.py`` (``git show``) is loaded as a module of its
own beside this tree's; every other module is this tree's for both. The two controllers take
turns on the same model, inputs and sites, in an order that alternates every round. Per round
and measure the ratio this tree / the other; reported: the median ratio over rounds with its 95 %
percentile-bootstrap interval, and each side's median.

Measures (one thread unless ``--threads``):
- ``site call``: µs of one call of a site doing nothing, the controller's work included
  (``benchmark.site_call_us``);
- ``step``: µs of ``handle.step(s)`` while ``--sites`` sites in two contexts hold Taylor o2 states
  (the per-step work outside the model call: the decision and the cache-size bookkeeping);
- ``<model> <granularity> <predictor>``: the model call of a forecast step, and of a full step
  recording into the caches, each controller on its own copy of the model, step by step in turns
  (the two calls of a step are adjacent in time, so the machine's load hits both alike).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from train_free_runs.forecast_step.benchmark import SITE_CALLS, site_call_us  # noqa: E402
from train_free_runs.bench.timing import machine, seconds  # noqa: E402
from cachelab.core import controller as ours  # noqa: E402
from cachelab.core.schedules import Mask  # noqa: E402
from cachelab.core.sites import Site, select_sites  # noqa: E402
from cachelab.evaluation.statistics import bootstrap_interval  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.models.dit_adapter import DiTAdapter  # noqa: E402
from cachelab.strategies.reuse import Reuse  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402


def load_controller(revision: str):
    """``cachelab/core/controller.py`` of ``revision`` as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:cachelab/core/controller.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    name = f"controller_at_{revision.replace('/', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:cachelab/core/controller.py", "exec"), module.__dict__)
    return module


def step_us(attach_fn, sites: int, steps: int = 300) -> float:
    """Median µs of ``handle.step(s)`` with ``sites`` sites x 2 contexts at Taylor order 2."""
    layers = [nn.Linear(8, 8) for _ in range(sites)]
    handle = attach_fn([Site(f"l{i}", layer) for i, layer in enumerate(layers)], TaylorSeer(2, first_enhance=1),
                       Mask(full_steps=[0, 1, 2]))
    x, elapsed = torch.zeros(2, 8), []
    with torch.inference_mode(), handle.generation(steps):
        for s in range(steps):
            start = time.perf_counter()
            handle.step(s)
            elapsed.append(time.perf_counter() - start)
            if s < 3:
                for context in ("cond", "uncond"):
                    with handle.context(context):
                        for layer in layers:
                            layer(x + s)
    handle.remove()
    return 1e6 * median(elapsed[3:])


def model_steps_ms(controllers: dict, adapters: list[DiTAdapter], granularity: str, order: int, repeats: int,
                   batch: int) -> dict[str, dict[str, list[float]]]:
    """Model-call times (ms) of each controller on its own copy of the model (``adapters``, one per
    controller, same weights), step by step in turns (the order alternating every step): the
    full steps recording (``order + 1``) and the forecast steps (``repeats``)."""
    warm, calls, handles = order + 1, {}, {}
    for (side, module), adapter in zip(controllers.items(), adapters):
        model, inputs = adapter.model, adapter.make_inputs(batch, seed=0)
        x = torch.cat([inputs.noise, inputs.noise])
        y = torch.cat([inputs.labels, torch.full_like(inputs.labels, model.num_classes)])
        t = torch.full((len(x),), 500)
        calls[side] = partial(model.forward_with_cfg, x, t, y, adapter.guidance_scale)
        predictor = Reuse() if order == 0 else TaylorSeer(order, first_enhance=1)
        handles[side] = module.attach(select_sites(model, adapter.site_patterns(granularity)), predictor,
                                      Mask(full_steps=list(range(warm))))
    times: dict[str, dict[str, list[float]]] = {"full": {}, "forecast": {}}
    with torch.inference_mode(), ExitStack() as stack:
        for call in calls.values():  # warm-up (outside a generation the model runs untouched)
            call()
        for handle in handles.values():
            stack.enter_context(handle.generation(warm + repeats))
        for s in range(warm + repeats):
            for side in (list(handles) if s % 2 else list(handles)[::-1]):
                handles[side].step(s)
                times["full" if s < warm else "forecast"].setdefault(side, []).append(
                    1e3 * seconds(calls[side], torch.device("cpu")))
    for handle in handles.values():
        handle.remove()
    return times


def one_round(controllers: dict, args, adapters: dict) -> dict[str, dict[str, float]]:
    """Every measure once per controller, in the order of ``controllers``: {measure: {side: value}}."""
    values: dict[str, dict[str, float]] = {}
    for side, module in controllers.items():
        for label, _, _ in SITE_CALLS:
            values.setdefault(f"site call, {label} (µs)", {})[side] = site_call_us(label, args.calls,
                                                                                  attach_fn=module.attach)
        values.setdefault(f"step, {args.sites} sites x 2 contexts (µs)", {})[side] = step_us(module.attach, args.sites)
    for preset, pair in adapters.items():
        for granularity in args.granularities.split(","):
            for name in args.orders.split(","):
                order = 0 if name == "reuse" else int(name)
                times = model_steps_ms(controllers, pair, granularity, order, args.repeats, args.batch)
                label = f"{preset} {granularity} {name if order == 0 else f'taylor o{order}'}"
                for step, per_side in times.items():
                    for side, ms in per_side.items():
                        values.setdefault(f"{label}: {step} step (ms)", {})[side] = median(ms)
    return values


def summary(rounds: list[dict], args) -> dict:
    """Each measure's medians and the median ratio ours / theirs over ``rounds`` with its interval."""
    result = {"machine": machine(torch.device("cpu")), "torch": torch.__version__, "against": args.against,
              "rounds": len(rounds), "batch": args.batch, "measures": {}}
    for name in rounds[0]:
        ratios = np.array([rnd[name]["ours"] / rnd[name][args.against] for rnd in rounds])
        low, high = bootstrap_interval(ratios, np.median)
        result["measures"][name] = {"ours": median(rnd[name]["ours"] for rnd in rounds),
                                    args.against: median(rnd[name][args.against] for rnd in rounds),
                                    "ratio": float(np.median(ratios)), "interval": [low, high]}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="main", help="the git revision whose controller is compared")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--presets", default="DiT-S/2")
    p.add_argument("--granularities", default="module,block,stack")
    p.add_argument("--orders", default="reuse,2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="forecast steps timed per model measure")
    p.add_argument("--calls", type=int, default=20000, help="site calls per site-call measure")
    p.add_argument("--sites", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    theirs = load_controller(args.against)
    adapters = {preset: [DiTAdapter(name=preset, preset=preset, init="random", guidance_scale=1.5) for _ in range(2)]
                for preset in args.presets.split(",") if preset}
    rounds = []
    for r in range(args.rounds):
        sides = [("ours", ours), (args.against, theirs)]
        rounds.append(one_round(dict(sides if r % 2 else sides[::-1]), args, adapters))
        result = summary(rounds, args)
        if args.out:  # rewritten after every round: a partial run is kept
            write_bytes_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for name, m in result["measures"].items():
        print(f"{name}: ours {m['ours']:.3f}, {args.against} {m[args.against]:.3f}, ratio {m['ratio']:.3f} "
              f"[{m['interval'][0]:.3f}, {m['interval'][1]:.3f}]")
    return result


if __name__ == "__main__":
    main()
