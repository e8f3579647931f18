"""What every job shares: objects built from the config, timed generations, a run's description."""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from statistics import median

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cachelab.core.compiling import compiled_if_asked
from cachelab.core.controller import CacheHandle, attach
from cachelab.core.guard import guard_policy
from cachelab.core.schedules import Always
from cachelab.core.sites import select_sites
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError
from cachelab.jobs.components import refusal
from cachelab.jobs.lifecycle import slurm_job
from cachelab.models.adapter import Inputs, ModelAdapter
from cachelab.strategies.reuse import Reuse


# strategy.tokens=<name>: the token selection policies with their own defaults (conf/strategy/<name>.yaml
# presets set the papers' values as a node with _target_)
TOKEN_POLICIES = {"random": "cachelab.strategies.tokens.random_tokens.RandomTokens", "toca": "cachelab.strategies.tokens.toca.ToCa",
                  "duca": "cachelab.strategies.tokens.duca.DuCa", "clusca": "cachelab.strategies.tokens.clusca.ClusCa"}


def build(cfg: DictConfig, key: str, name: str | None = None):
    """``instantiate(cfg[key])`` with a constructor's refusal turned into a ConfigError naming the
    config key (:func:`~cachelab.jobs.components.refusal`; ``name``, default ``key``, is the node's
    config path); None where ``cfg`` has no ``key`` or it is null."""
    node = cfg.get(key)
    if node is None:
        return None
    try:
        return instantiate(node)
    except InstantiationException as err:
        raise refusal(err.__cause__ or err, node, name or key) from err


def build_strategy(cfg: DictConfig) -> Strategy:
    """The strategy of a checked config (``check_strategy``); ``strategy.tokens`` given by name is that
    policy with its own defaults."""
    node = cfg.strategy
    if isinstance(node.get("tokens"), str):
        node = OmegaConf.create({"tokens": {"_target_": TOKEN_POLICIES[node.tokens]}})
    tokens = build(node, "tokens", "strategy.tokens")
    return Strategy(cfg.strategy.name, build(cfg.strategy, "predictor", "strategy.predictor"), build(cfg, "schedule"),
                    cfg.strategy.granularity, guard=guard_policy(cfg.get("guard", "fallback")), tokens=tokens,
                    offload=bool(OmegaConf.select(cfg, "cache.offload", default=False)),
                    whole_blocks=tuple(cfg.strategy.get("whole_blocks") or ()))


def observed_full_run(adapter: ModelAdapter, granularity: str, observer, inputs: Inputs,
                      progress: str | None = None) -> torch.Tensor:
    """One full-compute generation of ``inputs`` with ``observer`` (what ``handle.observe`` takes:
    the atlas, a trajectory recorder, calibration norms) seeing every site of ``granularity``;
    returns the generation's latents, the full-compute result. The observers read one
    transformer's sites over the global steps: a model with several experts (Wan 2.2) is refused."""
    experts = getattr(adapter, "experts", None)
    if experts:
        raise ConfigError(f"this job observes one transformer's sites, and model {adapter.name} has the experts "
                          f"{', '.join(experts)} (Wan 2.2); allowed: job=compare or job=sample for this model")
    handle = attach(select_sites(adapter.model, adapter.site_patterns(granularity)), Reuse(), Always())
    handle.observe(observer)
    try:
        return adapter.generate(inputs, handle, progress=progress)
    finally:
        handle.remove()


@contextmanager
def compiled_regions(options, adapter: ModelAdapter, handle):
    """``compiled_if_asked`` (the run's ``compile`` options; none: eager) for every transformer:
    each expert of a model with several (Wan 2.2) with its own handle, else the adapter's model
    with ``handle``."""
    experts = getattr(adapter, "experts", None)
    regions = ([(source, None if handle is None else handle.handles[name]) for name, source in experts.items()]
               if experts else [(adapter, handle)])
    with ExitStack() as compiled:
        for source, each in regions:
            compiled.enter_context(compiled_if_asked(options, source.model, source.site_patterns("block"), each))
        yield


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


def describe(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy) -> dict:
    """What a run's metrics.json says about its setup."""
    return {
        "model": cfg.model.name,
        "model_weights": adapter.description,
        "strategy": strategy.name,
        "granularity": strategy.granularity,
        "tokens": None if strategy.tokens is None else type(strategy.tokens).__name__,  # token selection policy
        "order": OmegaConf.select(cfg, "strategy.predictor.order", default=cfg.order),  # a preset's own (ClusCa) wins
        "variable": getattr(strategy.predictor, "variable", None),  # what the forecast expands in
        "interval": OmegaConf.select(cfg, "schedule.interval", default=cfg.interval),  # schedule.interval= wins
        "first_enhance": cfg.first_enhance,
        "schedule": schedule_setting(cfg.schedule),
        "num_steps": cfg.num_steps,
        "num_images": cfg.num_images,
        "seed": cfg.seed,
        "parallel": OmegaConf.to_container(cfg.parallel),  # >1: FLOPs, times and cache bytes are rank 0's
        "slurm": slurm_job(),  # the SLURM job that ran it (None outside SLURM)
    }


SCHEDULE_KNOBS = ("interval", "intervals", "threshold", "tolerance", "full_steps")  # what tells two runs apart
RUN_NAME_TAGS = {"schedule.interval": "N", "schedule.threshold": "th", "schedule.tolerance": "tol",
                 "strategy.predictor.order": "o"}  # the keys a run name shows, in order, where the run has them


def schedule_setting(schedule: DictConfig) -> str:
    """``Interval interval=5``, ``FirstBlockCache threshold=0.05``: the schedule's class and its
    knob, so that sweep tables tell apart jobs that differ only in a threshold."""
    values = OmegaConf.to_container(schedule, resolve=True)
    knobs = [f"{key}={values[key]}" for key in SCHEDULE_KNOBS if key in values]
    calibrated = " (calibrated)" if values.get("calibration") else ""
    return " ".join([values["_target_"].rsplit(".", 1)[-1], *knobs]) + calibrated


def flatten(metrics: dict, prefix: str = "") -> dict:
    """{"flops": {"speedup": x}} -> {"flops/speedup": x}; lists are left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat
