"""One run: check the config, build the model, the strategy, the job and the logger, run the job
into the run folder (``job=compare | sample | trajectory | atlas | calibrate``).

The run holds the folder's lock (``run.lock``, :class:`cachelab.jobs.lifecycle.FolderLock`)
from the end of the config check to its end, errors and interrupts included, and counts its
generations and steps into :data:`cachelab.jobs.lifecycle.PROGRESS`."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cachelab.analysis.sink import Sink
from cachelab.jobs.base import RUN_NAME_TAGS, build, build_strategy
from cachelab.jobs.checks import check_config
from cachelab.jobs.lifecycle import PROGRESS, FolderLock, track_generations
from cachelab.jobs.plan import check_cache_budget
from cachelab.jobs.parallel import check_parallel, degree, is_rank, join, launch, rank_folder, writes
from cachelab.jobs.sample import SampleJob
from cachelab.models.adapter import ModelAdapter

RESUMABLE_JOBS = (SampleJob,)  # a rerun into the same folder continues them (finished chunks are kept)


def run(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the configured job into ``out_dir``; returns what its metrics.json holds."""
    out_dir = Path(out_dir)
    check_config(cfg)
    check_parallel(cfg)
    if degree(cfg) > 1 and not is_rank():  # parallel.*: the ranks run this command under torchrun
        return launch(cfg, out_dir)
    with rank_folder(out_dir) as out_dir, FolderLock(out_dir):
        PROGRESS.reset(out_dir)
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        strategy = build_strategy(cfg)
        adapter: ModelAdapter = build(cfg, "model")
        join(cfg, adapter)  # as a rank: the process group, context parallelism on the model
        check_cache_budget(cfg, adapter, strategy)  # cache.budget: refused before any generation
        job = build(cfg, "job")
        PROGRESS.resumable = isinstance(job, RESUMABLE_JOBS)
        track_generations(adapter)
        sink: Sink = build(cfg, "logger") if writes() else Sink()  # rank 0 alone logs
        sink.start(run_name(cfg, strategy.name), OmegaConf.to_container(cfg, resolve=True), out_dir)
        failed = True
        try:
            metrics = job.run(cfg, adapter, strategy, sink, out_dir)
            failed = False
            return metrics
        finally:
            sink.finish(failed=failed)


def run_name(cfg: DictConfig, strategy: str) -> str:
    """``tiny_dit-taylor-N5-o2``, ``tiny_dit-fbcache-th0.08``: the interval, threshold, tolerance
    and order only where the schedule and the predictor have them (reuse has no order)."""
    used = ((tag, OmegaConf.select(cfg, key)) for key, tag in RUN_NAME_TAGS.items())
    return "-".join([cfg.model.name, strategy] + [f"{tag}{value}" for tag, value in used if value is not None])
