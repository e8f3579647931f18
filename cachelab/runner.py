"""One experiment: the full-compute baseline and a cached generation from the same seeds,
compared on FLOPs, wall-clock and quality; everything written into the run folder."""
from __future__ import annotations

import time
from pathlib import Path
from statistics import median

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cachelab.checks import ConfigError, check_config
from cachelab.compiling import compiled_if_asked
from cachelab.controller import CacheHandle, CacheStats
from cachelab.flops import count_flops
from cachelab.io import save_png_atomic, write_bytes_atomic, write_json_atomic
from cachelab.metrics import psnr, relative_l2, ssim
from cachelab.paper_metrics import evaluate_all
from cachelab.models.adapter import Inputs, ModelAdapter
from cachelab.report import comparison_grid, per_step_plot, run_report, summary_table
from cachelab.sink import Sink
from cachelab.strategy import Strategy


def build(cfg: DictConfig, key: str):
    """``instantiate(cfg[key])`` with a constructor's complaint turned into a ConfigError."""
    node = cfg[key]
    if node is None:
        return None
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from err


def build_strategy(cfg: DictConfig) -> Strategy:
    return Strategy(cfg.strategy.name, build(cfg.strategy, "predictor"), build(cfg, "schedule"),
                    cfg.strategy.granularity)


def timed_generation(adapter: ModelAdapter, inputs: Inputs, handle: CacheHandle | None, repeats: int,
                     progress: str | None, trajectory: list | None = None) -> tuple[torch.Tensor, float]:
    """The latents and the median wall-clock (seconds) over ``repeats`` generations;
    ``trajectory`` (if given) receives x after every step of the last generation."""
    times = []
    for r in range(repeats):
        callback = None
        if trajectory is not None and r == repeats - 1:
            callback = lambda step: trajectory.append(step["x"])  # noqa: E731 -- a reference, no copy
        start = time.perf_counter()
        latents = adapter.generate(inputs, handle, progress=progress, callback=callback)
        if latents.is_cuda:  # the kernels run asynchronously: stop the clock when they are done
            torch.cuda.synchronize(latents.device)
        times.append(time.perf_counter() - start)
    return latents, median(times)


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run one experiment into ``out_dir``; returns what metrics.json holds."""
    out_dir = Path(out_dir)
    check_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    strategy = build_strategy(cfg)
    adapter: ModelAdapter = build(cfg, "model")
    sink: Sink = build(cfg, "logger")
    run_name = f"{cfg.model.name}-{strategy.name}-N{cfg.interval}-o{cfg.order}"
    sink.start(run_name, OmegaConf.to_container(cfg, resolve=True), out_dir)
    analysis = build(cfg, "analysis") if cfg.get("analysis") else None  # none: an empty group file
    if cfg.mode == "sample":  # check_config has ruled out an analysis
        from cachelab.sampling import sample as job
    else:
        job = analysis.run if analysis else measure
    failed = True
    try:
        metrics = job(cfg, adapter, strategy, sink, out_dir)
        failed = False
        return metrics
    finally:
        sink.finish(failed=failed)


def measure(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path) -> dict:
    torch.manual_seed(cfg.seed)
    inputs = adapter.make_inputs(cfg.num_images, cfg.seed)
    handle = strategy.attach(adapter)
    try:
        base_flops = cached_flops = None
        label = (lambda what: what) if cfg.progress else (lambda what: None)
        flops_images = min(cfg.measure.flops_images or cfg.num_images, cfg.num_images)
        if cfg.measure.flops:  # counted passes; they also warm the process up before timing
            counted = adapter.make_inputs(flops_images, cfg.seed)
            _, base_flops = count_flops(lambda: adapter.generate(counted, progress=label("FLOPs baseline")))
            _, cached_flops = count_flops(lambda: adapter.generate(counted, handle, progress=label("FLOPs cached")))
        base_path, cached_path = [], []
        # compiled (if asked) after the eager FLOPs count; one untimed generation per side compiles
        with compiled_if_asked(cfg.get("compile"), adapter.model, adapter.site_patterns("block"), handle):
            if cfg.get("compile"):
                adapter.generate(inputs)
                adapter.generate(inputs, handle)
            baseline, base_wall = timed_generation(adapter, inputs, None, cfg.measure.repeats, label("baseline"),
                                                   base_path)
            cached, cached_wall = timed_generation(adapter, inputs, handle, cfg.measure.repeats, label("cached"),
                                                   cached_path)
        stats = handle.stats() if handle else CacheStats(full_steps=list(range(cfg.num_steps)))
    finally:
        if handle is not None:
            handle.remove()

    base_images, cached_images = adapter.decode(baseline), adapter.decode(cached)
    grid_path = out_dir / "grid.png"
    save_png_atomic(grid_path, comparison_grid(base_images[: cfg.grid_rows], cached_images[: cfg.grid_rows]))
    flops_speedup = base_flops / cached_flops if base_flops else None
    wall_speedup = base_wall / cached_wall
    metrics = {
        **describe(cfg, adapter, strategy),
        "flops": {"baseline": base_flops, "cached": cached_flops, "speedup": flops_speedup,
                  "images": flops_images if cfg.measure.flops else None},
        "wall_s": {"baseline": base_wall, "cached": cached_wall, "speedup": wall_speedup},
        "efficiency": wall_speedup / flops_speedup if flops_speedup else None,
        "quality": {"rel_l2": relative_l2(cached, baseline), "psnr_db": psnr(cached_images, base_images),
                    "ssim": ssim(cached_images, base_images)},
        # the model's own quality metrics (e.g. the digit judge), of each side
        "model_quality": {"baseline": adapter.evaluate(base_images, inputs),
                          "cached": adapter.evaluate(cached_images, inputs)},
        "paper_metrics": evaluate_all({name: build(cfg.paper_metrics, name) for name in cfg.paper_metrics},
                                      base_images, cached_images, inputs),
        **stats.as_dict(),
        # how far the cached trajectory x_s is from the baseline's after each step
        "per_step_rel_l2": [relative_l2(c, b) for c, b in zip(cached_path, base_path)],
        "torch_threads": torch.get_num_threads(),
        "compile": OmegaConf.to_container(cfg.compile) if cfg.get("compile") else None,
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_bytes_atomic(out_dir / "per_step.png", per_step_plot(metrics))
    write_bytes_atomic(out_dir / "report.md",
                       run_report(OmegaConf.to_yaml(cfg), metrics, ["grid.png", "per_step.png"]).encode())
    full = set(metrics["full_steps"])
    for s, error in enumerate(metrics["per_step_rel_l2"]):
        sink.log({"schedule/full": int(s in full), "trajectory/rel_l2": error}, step=s)
    sink.log_image("samples/grid", grid_path, caption="baseline | cached | |difference|")
    sink.log_image("trajectory/per_step", out_dir / "per_step.png", caption="rel-L2 per step, full steps marked")
    sink.summary(flatten(metrics))
    print(summary_table(metrics))
    return metrics


def describe(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy) -> dict:
    """What a run's metrics.json says about its setup."""
    return {
        "model": cfg.model.name,
        "model_weights": adapter.description,
        "strategy": strategy.name,
        "granularity": strategy.granularity,
        "order": cfg.order,
        "interval": cfg.interval,
        "first_enhance": cfg.first_enhance,
        "num_steps": cfg.num_steps,
        "num_images": cfg.num_images,
        "seed": cfg.seed,
    }


def flatten(metrics: dict, prefix: str = "") -> dict:
    """{"flops": {"speedup": x}} -> {"flops/speedup": x}; lists are left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat
