"""``python run.py model=tiny_flux parallel.ulysses=2``: one generation on several processes
(diffusers context parallelism, :mod:`cachelab.models.parallel`).

A run asked for ``parallel.ulysses * parallel.ring`` > 1 processes that is not yet one of them
starts them with ``torchrun``'s own launcher (``python -m torch.distributed.run --standalone
--nproc-per-node=<n> run.py <the same overrides>``, into the same run folder) and waits; a
command already started by ``torchrun`` runs as its rank. Every rank runs the whole job (the
collectives need them all); rank 0 alone writes the run folder and logs, the others write into
a scratch folder that is deleted. Single runs of ``job=compare`` only: sweeps (``-m``) and the
multirun launchers start ordinary single-process jobs.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from cachelab.errors import ConfigError
from cachelab.jobs.compare import CompareJob
from cachelab.models.adapter import ModelAdapter
from cachelab.models.parallel import enable_context_parallel

TIMEOUT = timedelta(minutes=10)  # a collective waiting longer than this fails instead of hanging


def degree(cfg: DictConfig) -> int:
    """How many processes share each generation (1: no parallelism)."""
    return cfg.parallel.ulysses * cfg.parallel.ring


def check_parallel(cfg: DictConfig) -> None:
    """One line naming the key for what ``parallel.*`` cannot do."""
    if degree(cfg) > 1 and cfg.job.get("_target_") != f"{CompareJob.__module__}.{CompareJob.__qualname__}":
        raise ConfigError(f"parallel.ulysses={cfg.parallel.ulysses} parallel.ring={cfg.parallel.ring}: context "
                          f"parallelism runs job=compare only; allowed: job=compare, or parallel.ulysses=1 parallel.ring=1")
    if cfg.parallel.ring > 1 and not str(cfg.device).startswith("cuda"):
        raise ConfigError(f"parallel.ring={cfg.parallel.ring}: ring attention runs on GPUs only in diffusers' "
                          f"native attention backend; allowed with device={cfg.device}: parallel.ulysses")


def is_rank() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def writes() -> bool:
    """Whether this process writes the run folder: rank 0, or a process without ranks."""
    return int(os.environ.get("RANK", 0)) == 0


def launch(cfg: DictConfig, out_dir: Path) -> dict:
    """Run this command again as ``degree(cfg)`` ranks under ``torch.distributed.run``, into
    ``out_dir``; returns rank 0's metrics. A failed rank fails the run with its exit status."""
    own = [arg for arg in sys.argv if not arg.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree(cfg)}",
               "--local-ranks-filter=0", *own, f"hydra.run.dir={out_dir}", "hydra.output_subdir=null"]
    code = subprocess.run(command).returncode
    if code:
        raise SystemExit(code)
    return json.loads((out_dir / "metrics.json").read_text())


@contextmanager
def rank_folder(out_dir: Path) -> Iterator[Path]:
    """The folder this process writes: ``out_dir`` on rank 0 (and without ranks), a scratch
    folder, deleted afterwards, on the others (whose log lines stay out of the run's log file)."""
    if writes():
        yield out_dir
        return
    for handler in [h for h in logging.root.handlers if isinstance(h, logging.FileHandler)]:
        logging.root.removeHandler(handler)
    with tempfile.TemporaryDirectory(prefix="cachelab-rank") as scratch:
        yield Path(scratch)


def join(cfg: DictConfig, adapter: ModelAdapter) -> None:
    """As a rank: join the process group (NCCL on GPUs, one per local rank; gloo on CPU) and
    enable context parallelism on the adapter's transformer. Nothing without ranks."""
    if not is_rank():
        return
    cuda = str(cfg.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(dist.destroy_process_group)
    enable_context_parallel(adapter.model, ulysses=cfg.parallel.ulysses, ring=cfg.parallel.ring)
