"""``job=compare`` (the default): the full-compute baseline and a cached generation from the same
seeds, compared on FLOPs, wall-clock and quality; everything written into the run folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cachelab.analysis.sink import Sink
from cachelab.core.controller import CacheStats
from cachelab.core.strategy import Strategy
from cachelab.evaluation.flops import count_flops
from cachelab.evaluation.metrics import psnr, relative_l2, ssim
from cachelab.evaluation.paper_metrics import evaluate_all
from cachelab.io import finite_json, write_bytes_atomic, write_json_atomic
from cachelab.jobs.base import build, compiled_regions, describe, flatten, timed_generation
from cachelab.analysis.figures import png_bytes
from cachelab.jobs.report import comparison_grid, per_step_plot, run_report, run_title, summary_table
from cachelab.models.adapter import ModelAdapter

log = logging.getLogger(__name__)


class CompareJob:
    """Baseline vs cached over ``num_images`` in one batch; ``grid_rows`` samples in grid.png."""

    def __init__(self, grid_rows: int = 16):
        self.grid_rows = grid_rows

    def run(self, cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path) -> dict:
        return measure(cfg, adapter, strategy, sink, out_dir, self.grid_rows)


def measure(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path,
            grid_rows: int) -> dict:
    """Generate both sides, write grid, metrics, per-step plot and report; returns the metrics."""
    torch.manual_seed(cfg.seed)
    inputs = adapter.make_inputs(cfg.num_images, cfg.seed)
    handle = strategy.attach(adapter, group=adapter.parallel_group)
    try:
        base_flops = cached_flops = None
        label = (lambda what: what) if cfg.progress else (lambda what: None)
        flops_images = min(cfg.measure.flops_images or cfg.num_images, cfg.num_images)
        if cfg.measure.flops:  # counted passes; they also warm the process up before timing
            counted = adapter.make_inputs(flops_images, cfg.seed)
            _, base_flops = count_flops(lambda: adapter.generate(counted, progress=label("FLOPs baseline")))
            _, cached_flops = count_flops(lambda: adapter.generate(counted, handle, progress=label("FLOPs cached")))
            # FLOPs are linear in the batch (tests/test_measure.py): scaled to num_images
            base_flops, cached_flops = (round(f * cfg.num_images / flops_images) for f in (base_flops, cached_flops))
        base_path, cached_path = [], []
        # compiled (if asked) after the eager FLOPs count; one untimed generation per side compiles
        with compiled_regions(cfg.get("compile"), adapter, handle):
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
        "guard": strategy.guard,
    }
    metrics, flags = finite_json(metrics)  # NaN and Inf as null (strict JSON), named here
    metrics["non_finite"] = flags
    write_json_atomic(out_dir / "metrics.json", metrics)
    grid_path = out_dir / "grid.png"
    rows = min(grid_rows, len(base_images))
    write_bytes_atomic(grid_path, png_bytes(comparison_grid(base_images[:rows], cached_images[:rows],
                                                            f"{run_title(metrics)}; {rows} of them shown")))
    write_bytes_atomic(out_dir / "per_step.png", png_bytes(per_step_plot(metrics)))
    write_bytes_atomic(out_dir / "report.md",
                       run_report(OmegaConf.to_yaml(cfg), metrics, ["grid.png", "per_step.png"]).encode())
    full = set(metrics["full_steps"])
    for s, error in enumerate(metrics["per_step_rel_l2"]):
        sink.log({"schedule/full": int(s in full), "trajectory/rel_l2": error}, step=s)
    sink.log_image("samples/grid", grid_path, caption="baseline | cached | |difference| (scaled, see the header)")
    sink.log_image("trajectory/per_step", out_dir / "per_step.png", caption="rel-L2 per step, full steps marked")
    sink.artifact("grid", [grid_path, out_dir / "per_step.png"])
    sink.summary(flatten(metrics))
    log.info(summary_table(metrics))
    return metrics

