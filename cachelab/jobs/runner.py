"""One run: check the config, build the model, the strategy, the job and the logger, run the job
into the run folder (``job=compare | sample | trajectory | atlas | calibrate``).

The run holds the folder's lock (``run.lock``, :class:`cachelab.jobs.lifecycle.FolderLock`)
from the end of the config check to its end, errors and interrupts included, and counts its
generations and steps into :data:`cachelab.jobs.lifecycle.PROGRESS`."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from analysis.sink import Sink
from cachelab.jobs.base import build, build_strategy
from cachelab.jobs.checks import check_config
from cachelab.jobs.lifecycle import PROGRESS, FolderLock, track_generations
from cachelab.jobs.sample import SampleJob
from cachelab.models.adapter import ModelAdapter

RESUMABLE_JOBS = (SampleJob,)  # a rerun into the same folder continues them (finished chunks are kept)


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the configured job into ``out_dir``; returns what its metrics.json holds."""
    out_dir = Path(out_dir)
    check_config(cfg)
    with FolderLock(out_dir):
        PROGRESS.reset(out_dir)
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        strategy = build_strategy(cfg)
        adapter: ModelAdapter = build(cfg, "model")
        job = build(cfg, "job")
        PROGRESS.resumable = isinstance(job, RESUMABLE_JOBS)
        track_generations(adapter)
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
