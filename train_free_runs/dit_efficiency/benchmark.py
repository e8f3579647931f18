"""Efficiency of feature caching on DiT shapes: FLOPs speedup vs wall-clock speedup.

For each model shape (random weights, 256px latents), each predictor (reuse, TaylorSeer of
several orders), each interval N of the Interval schedule and each cache granularity, this
measures against the full-compute baseline from the same seed:

* FLOPs speedup   baseline / cached FLOPs of one whole generation (cachelab.evaluation.flops.count_flops;
                  deterministic and blind to the predictor's elementwise work, so counted once
                  per granularity and interval);
* wall speedup    median baseline wall / median cached wall; the baseline is timed --repeats
                  times before and --repeats times after all configurations of a model (its
                  min/max show the drift), each configuration --repeats times after a warm-up;
* efficiency      wall speedup / FLOPs speedup (1.0: the saved FLOPs are saved time);
* rel-L2          of the cached latents vs the baseline latents (cachelab.evaluation.metrics.relative_l2);
* per-step times  baseline full step = baseline wall / steps; forecast step =
                  (cached wall - num_full * full step) / num_forecast, which also carries the
                  predictor's extra work at full steps (factor updates), see README.md.

Run from the repository root:

    .venv/bin/python train_free_runs/dit_efficiency/benchmark.py --out train_free_runs/dit_efficiency/results.md
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from statistics import median

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # cachelab and strategies are not installed packages
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cachelab.evaluation.flops import count_flops  # noqa: E402
from cachelab.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from cachelab.evaluation.metrics import relative_l2  # noqa: E402
from cachelab.models.dit_adapter import DiTAdapter  # noqa: E402
from cachelab.jobs.runner import timed_generation  # noqa: E402
from cachelab.core.strategy import Strategy  # noqa: E402
from cachelab.core.schedules import Interval  # noqa: E402
from cachelab.core.sites import GRANULARITIES  # noqa: E402
from cachelab.strategies.reuse import Reuse  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402

FIRST_ENHANCE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FLOPs speedup vs wall-clock speedup of feature caching (reuse, TaylorSeer) "
                    "on DiT shapes with random weights, CPU. Prints a Markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default="DiT-S/2,DiT-B/2",
                   help="comma-separated DiT presets with a conf/model file (dit_s_2.yaml, dit_b_2.yaml)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--orders", default="reuse,1,2,3",
                   help="comma-separated predictors: 'reuse' (or 0) for reuse/FORA, k >= 1 for TaylorSeer order k")
    p.add_argument("--intervals", default="3,5", help="comma-separated intervals N of the Interval schedule")
    p.add_argument("--granularities", default=",".join(GRANULARITIES),
                   help=f"comma-separated cache granularities ({' | '.join(GRANULARITIES)})")
    p.add_argument("--first-enhance", type=int, default=FIRST_ENHANCE, help="warm-up full steps")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed cached generations per configuration; baseline: this many before and after")
    p.add_argument("--warmup", type=int, default=1, help="untimed baseline generations per model")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--num-images", type=int, default=2, help="images per generation (CFG doubles the batch)")
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0, help="seed of noise and labels")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", type=Path, default=None,
                   help="write the Markdown here and all numbers to the same path with .json "
                        "(rewritten after every configuration); default: print only")
    args = p.parse_args(argv)
    args.models = _split(args.models)
    args.orders = [_order(o) for o in _split(args.orders)]
    args.intervals = [int(n) for n in _split(args.intervals)]
    args.granularities = _split(args.granularities)
    for g in args.granularities:
        if g not in GRANULARITIES:
            p.error(f"unknown granularity {g!r}; allowed: {', '.join(GRANULARITIES)}")
    if args.repeats < 1 or args.steps < 1 or args.threads < 1:
        p.error("--repeats, --steps and --threads must be >= 1")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _order(text: str) -> int:
    return 0 if text.lower() in ("reuse", "fora", "0") else int(text)


def make_strategy(order: int, interval: int, granularity: str, first_enhance: int) -> Strategy:
    schedule = Interval(interval, first_enhance=first_enhance)
    if order == 0:
        return Strategy("reuse", Reuse(), schedule, granularity)
    return Strategy(f"taylor-o{order}", TaylorSeer(order, first_enhance=first_enhance), schedule, granularity)


def make_adapter(preset: str, args: argparse.Namespace) -> DiTAdapter:
    """The model of ``conf/model/dit_<s|b|...>_2.yaml`` (the preset's config file), with this
    run's steps, guidance and weight seed."""
    path = REPO_ROOT / "conf" / "model" / (preset.lower().replace("dit-", "dit_").replace("/", "_") + ".yaml")
    cfg = OmegaConf.merge({"num_steps": args.steps, "device": "cpu"}, {"model": OmegaConf.load(path)})
    cfg.model.guidance_scale, cfg.model.init_seed = args.guidance_scale, args.init_seed
    return instantiate(cfg.model)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(args: argparse.Namespace) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:8.1f}s] {msg}", file=sys.stderr, flush=True)


def bench_model(preset: str, args: argparse.Namespace, t0: float, on_row) -> tuple[dict, list[dict]]:
    adapter = make_adapter(preset, args)
    model = adapter.model  # built here, not inside the first timing
    params = sum(p.numel() for p in model.parameters())
    inputs = adapter.make_inputs(args.num_images, args.seed)
    T = args.steps

    for i in range(args.warmup):
        log(f"{preset}: warm-up {i + 1}/{args.warmup}", t0)
        adapter.generate(inputs)
    baseline_latents, base_flops = count_flops(lambda: adapter.generate(inputs))
    log(f"{preset}: {params / 1e6:.1f}M params, {base_flops / 1e9:.1f} GFLOPs per generation", t0)

    def time_baseline() -> list[float]:
        return [timed_generation(adapter, inputs, None, 1, None)[1] for _ in range(args.repeats)]

    # The baseline is timed before and after all configurations: its spread shows the drift.
    all_base_times = time_baseline()
    rows = []
    flops_by_schedule: dict[tuple[str, int], int] = {}
    configs = [(o, n, g) for g in args.granularities for n in args.intervals for o in args.orders]
    for k, (order, interval, granularity) in enumerate(configs, 1):
        strategy = make_strategy(order, interval, granularity, args.first_enhance)
        log(f"{preset}: [{k}/{len(configs)}] {strategy.name} N={interval} {granularity}", t0)
        handle = strategy.attach(adapter)
        try:
            # The counter sees matmuls and attention only, never the predictor's elementwise
            # work, so the cached FLOPs depend on granularity and schedule, not on the order.
            key = (granularity, interval)
            if key not in flops_by_schedule:
                _, flops_by_schedule[key] = count_flops(lambda: adapter.generate(inputs, handle))
            cached_flops = flops_by_schedule[key]
            cached_latents, _ = timed_generation(adapter, inputs, handle, 1, None)  # warm-up
            cached_times = [timed_generation(adapter, inputs, handle, 1, None)[1] for _ in range(args.repeats)]
            stats = handle.stats().as_dict()
        finally:
            handle.remove()
        flops_speedup = base_flops / cached_flops
        row = {
            "model": preset,
            "strategy": strategy.name,
            "order": order,
            "interval": interval,
            "first_enhance": args.first_enhance,
            "granularity": granularity,
            "num_sites": len(handle.sites),
            "num_full": stats["num_full"],
            "num_forecast": stats["num_forecast"],
            "full_steps": stats["full_steps"],
            "fallbacks": stats["fallbacks"],
            "cache_bytes": stats["cache_bytes"],
            "flops": {"baseline": base_flops, "cached": cached_flops, "speedup": flops_speedup},
            "rel_l2": relative_l2(cached_latents, baseline_latents),
            **timing(all_base_times, cached_times, stats["num_full"], stats["num_forecast"], T, flops_speedup),
        }
        rows.append(row)
        log(f"{preset}: FLOPs x{flops_speedup:.2f}  wall x{row['wall_s']['speedup']:.2f}  "
            f"eff {row['efficiency']:.2f}  rel-L2 {row['rel_l2']:.3g}", t0)
        on_row(row)

    all_base_times += time_baseline()
    for row in rows:  # final figures: against the baseline timed before and after
        row.update(timing(all_base_times, row["wall_s"]["cached_all"], row["num_full"], row["num_forecast"], T,
                          row["flops"]["speedup"]))
    summary = {
        "model": preset,
        "params": params,
        "flops_per_generation": base_flops,
        "forward_batch": args.num_images * (2 if args.guidance_scale != 1.0 else 1),
        "baseline_wall_s": {"median": median(all_base_times), "min": min(all_base_times),
                            "max": max(all_base_times), "all": all_base_times},
        "baseline_step_s": median(all_base_times) / T,
    }
    return summary, rows


def timing(base_times: list[float], cached_times: list[float], num_full: int, num_forecast: int, steps: int,
           flops_speedup: float) -> dict:
    """Wall-clock figures of one configuration from its timings and the baseline's."""
    base_wall, cached_wall = median(base_times), median(cached_times)
    full_step = base_wall / steps
    forecast_step = (cached_wall - num_full * full_step) / num_forecast if num_forecast else None
    wall_speedup = base_wall / cached_wall
    return {
        "wall_s": {"baseline": base_wall, "cached": cached_wall, "speedup": wall_speedup,
                   "baseline_all": list(base_times), "cached_all": cached_times},
        "efficiency": wall_speedup / flops_speedup,
        "step_s": {"full": full_step, "forecast": forecast_step,
                   "forecast_over_full": forecast_step / full_step if forecast_step is not None else None},
    }


def _f(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(env: dict, args: argparse.Namespace, models: list[dict], rows: list[dict]) -> str:
    lines = [
        "# DiT caching efficiency: FLOPs speedup vs wall-clock speedup",
        "",
        f"- torch {env['torch']}, {env['threads']} threads, CPU: {env['cpu']}",
        f"- {args.steps} DDIM steps, {args.num_images} images with CFG {args.guidance_scale} "
        f"(forward batch {args.num_images * (2 if args.guidance_scale != 1.0 else 1)}), 32x32x4 latents, "
        f"random weights; Interval schedule, first_enhance={args.first_enhance}; "
        f"median of {args.repeats} timings per configuration, baseline timed {args.repeats}x before and after",
        "",
    ]
    if models:
        lines += [
            "| model | params | GFLOPs / generation | baseline wall (s), median [min, max] | baseline step (ms) |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in models:
            w = m["baseline_wall_s"]
            lines.append(f"| {m['model']} | {m['params'] / 1e6:.1f}M | {m['flops_per_generation'] / 1e9:.1f} | "
                         f"{w['median']:.2f} [{w['min']:.2f}, {w['max']:.2f}] | {m['baseline_step_s'] * 1e3:.1f} |")
        lines.append("")
    lines += [
        "| model | strategy | N | granularity | full/forecast | FLOPs speedup | wall speedup | efficiency "
        "| rel-L2 | baseline (s) | cached (s) | full step (ms) | forecast step (ms) | forecast/full |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        st = r["step_s"]
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['interval']} | {r['granularity']} | "
            f"{r['num_full']}/{r['num_forecast']} | {r['flops']['speedup']:.2f}x | {r['wall_s']['speedup']:.2f}x | "
            f"{r['efficiency']:.2f} | {r['rel_l2']:.3g} | {r['wall_s']['baseline']:.2f} | "
            f"{r['wall_s']['cached']:.2f} | {st['full'] * 1e3:.1f} | {_f(None if st['forecast'] is None else st['forecast'] * 1e3, '.1f')} | "
            f"{_f(st['forecast_over_full'], '.1%')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args)
    print(f"torch {env['torch']} | threads {env['threads']} (interop {env['interop_threads']}) | CPU: {env['cpu']}",
          flush=True)

    t0 = time.perf_counter()
    models: list[dict] = []
    rows: list[dict] = []
    args_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    def save(finished: bool) -> None:
        if args.out is None:
            return
        json_path = args.out.with_suffix(".json")
        if json_path == args.out:
            json_path = args.out.with_name(args.out.name + ".json")
        write_bytes_atomic(args.out, markdown(env, args, models, rows).encode())
        write_json_atomic(json_path, {"environment": env, "args": args_record, "finished": finished,
                                      "elapsed_s": time.perf_counter() - t0, "models": models, "rows": rows})

    for preset in args.models:
        summary, _ = bench_model(preset, args, t0, on_row=lambda row: (rows.append(row), save(False)))
        models.append(summary)
        save(False)

    save(True)
    print(markdown(env, args, models, rows), end="")
    print(f"\ntotal elapsed: {time.perf_counter() - t0:.1f}s", flush=True)
    if args.out is not None:
        print(f"wrote {args.out} and its .json", flush=True)


if __name__ == "__main__":
    main()
