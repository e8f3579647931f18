"""One run: check the config, build the model, the strategy, the job and the logger, run the job
into the run folder (``job=compare | sample | trajectory | atlas | calibrate``)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from analysis.sink import Sink
from cachelab.jobs.base import build, build_strategy
from cachelab.jobs.checks import check_config
from cachelab.models.adapter import ModelAdapter


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the configured job into ``out_dir``; returns what its metrics.json holds."""
    out_dir = Path(out_dir)
    check_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    strategy = build_strategy(cfg)
    adapter: ModelAdapter = build(cfg, "model")
    job = build(cfg, "job")
    sink: Sink = build(cfg, "logger")
    run_name = f"{cfg.model.name}-{strategy.name}-N{cfg.interval}-o{cfg.order}"
    sink.start(run_name, OmegaConf.to_container(cfg, resolve=True), out_dir)
    failed = True
    try:
        metrics = job.run(cfg, adapter, strategy, sink, out_dir)
        failed = False
        return metrics
    finally:
        sink.finish(failed=failed)
