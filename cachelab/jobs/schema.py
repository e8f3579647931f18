"""Structured config schemas: the type of every key of ``conf/config.yaml`` and of the job,
strategy, logger and compile groups, registered in Hydra's ConfigStore on import
(``cachelab/jobs/__init__.py`` imports this module, so any composition after importing the
jobs layer sees them). A config file uses its schema as the first entry of its defaults
list (``- /schema/job/sample@_here_``); the YAML gives the values, the schema the types, and
Hydra refuses a value of the wrong type while composing. :func:`compose_config` turns that
refusal into a one-line :class:`ConfigError` naming the key and the expected type.

The schedule, the strategy's predictor and its token policy have no schema here: their keys are
their class's constructor arguments, typed from its signature (:mod:`cachelab.jobs.components`).
The model group has none either: each model config is the keyword arguments of its own adapter
class (``_target_``), different per family, and the class checks them when it is built. The
registration lives in memory, not in ``conf/``: wherever the YAML files are read from, the
schemas are the same."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, DictConfig, ValidationError

from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.components import check_types
from cachelab.jobs.refusals import type_error


@dataclass
class MeasureSchema:
    """``measure.*``: what the compare job measures."""

    flops: bool = MISSING
    flops_images: Optional[int] = MISSING
    repeats: int = MISSING


@dataclass
class ParallelSchema:
    """``parallel.*``: the Ulysses and ring degrees of context parallelism (1: off)."""

    ulysses: int = MISSING
    ring: int = MISSING


@dataclass
class CacheSchema:
    """``cache.*``: bounds on what the caches hold."""

    budget: Optional[str] = MISSING
    offload: bool = MISSING


@dataclass
class PlanSchema:
    """``plan.*``: the generation ``job=plan`` and the budget check plan (null: the model's own)."""

    target: Optional[str] = MISSING
    height: Optional[int] = MISSING
    width: Optional[int] = MISSING
    num_frames: Optional[int] = MISSING
    batch_size: Optional[int] = MISSING
    guidance: Optional[float] = MISSING
    text_tokens: Optional[int] = MISSING
    dtype: Optional[str] = MISSING
    device_memory: Optional[str] = MISSING


@dataclass
class ConfigSchema:
    """The top level of ``conf/config.yaml``: the groups and the shorthands."""

    model: Any = MISSING
    schedule: Any = MISSING
    strategy: Any = MISSING
    logger: Any = MISSING
    job: Any = MISSING
    compile: Any = None
    order: Any = MISSING  # shorthands: typed and checked where they are used (strategy.predictor.order, ...)
    interval: Any = MISSING
    first_enhance: Any = MISSING
    num_steps: int = MISSING
    num_images: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    threads: Optional[int] = MISSING
    progress: bool = MISSING
    job_timeout_s: Optional[float] = MISSING
    guard: str = MISSING
    paper_metrics: Dict[str, Any] = field(default_factory=dict)
    measure: MeasureSchema = field(default_factory=MeasureSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    plan: PlanSchema = field(default_factory=PlanSchema)


@dataclass
class Target:
    """A node instantiated from ``_target_``."""

    _target_: str = MISSING


@dataclass
class CompareJobSchema(Target):
    """``job=compare``: the default job (baseline and cached run side by side)."""

    grid_rows: int = MISSING


@dataclass
class SampleJobSchema(Target):
    """``job=sample``: large evaluations in batches (FID and other paper metrics)."""

    batch_size: int = MISSING
    baseline_samples: bool = MISSING


@dataclass
class TrajectoryJobSchema(Target):
    """``job=trajectory``: per-site feature trajectories, sketched to ``sketch_dim``."""

    num_images: int = MISSING
    sketch_dim: int = MISSING


@dataclass
class AtlasJobSchema(Target):
    """``job=atlas``: per-site error of each predictor, order and interval (one full run
    shadowed by every candidate: predictor family x ``orders`` x ``intervals``)."""

    predictors: Dict[str, Any] = MISSING
    orders: List[int] = MISSING
    intervals: List[int] = MISSING
    first_enhance: int = MISSING
    num_images: int = MISSING
    derivative_orders: int = MISSING
    audit: bool = MISSING


@dataclass
class TuneTargetSchema:
    """``job.target.*`` of ``job=tune``: exactly one is given (checked in ``checks.py``)."""

    psnr: Optional[float] = None
    rel_l2: Optional[float] = None
    speedup: Optional[float] = None
    wall_speedup: Optional[float] = None


@dataclass
class TuneJobSchema(Target):
    """``job=tune``: the fastest per-site interval configuration predicted to meet ``target``."""

    target: TuneTargetSchema = field(default_factory=TuneTargetSchema)
    search: str = MISSING
    space: Dict[str, Any] = MISSING
    predictors: Dict[str, Any] = MISSING
    orders: List[int] = MISSING
    intervals: List[int] = MISSING
    first_enhance: int = MISSING
    group: str = MISSING
    sensitivity_images: int = MISSING
    sensitivity_file: Optional[str] = None
    calibration_runs: int = MISSING
    max_tries: int = MISSING
    grid_rows: int = MISSING


@dataclass
class BenchmarkJobSchema(Target):
    """``job=benchmark``: every tool over its grid, tuned and reported on separate inputs (null
    image counts and rounds: the grid's own, ``conf/benchmark/<grid>/grid.yaml``)."""

    grid: str = MISSING
    tuning_images: Optional[int] = None
    held_out_images: Optional[int] = None
    timing_images: Optional[int] = None
    rounds: Optional[int] = None
    tuning_seed: int = MISSING
    held_out_seed: int = MISSING
    levels: List[float] = MISSING
    margins_db: List[float] = MISSING
    bootstrap_draws: int = MISSING


@dataclass
class CalibrateJobSchema(Target):
    """``job=calibrate``: one full-compute run into ``calibration.json``."""

    num_images: int = MISSING


@dataclass
class StrategySchema:
    """``strategy.*``; ``predictor`` and ``tokens`` are typed by their class's signature
    (:mod:`cachelab.jobs.components`); ``tokens`` may also be null or a policy name (``checks.check_tokens``)."""

    name: str = MISSING
    granularity: str = MISSING
    predictor: Any = MISSING
    needs_schedule: Optional[str] = None
    tokens: Any = None
    whole_blocks: List[str] = field(default_factory=list)


@dataclass
class WandbSchema(Target):
    """``logger=wandb``: the W&B project, mode and group."""

    project: str = MISSING
    mode: Optional[str] = MISSING
    group: Optional[str] = MISSING


@dataclass
class CompileSchema:
    """``compile=inductor | cudagraphs``: torch.compile's arguments."""

    backend: str = MISSING
    mode: str = MISSING
    dynamic: bool = MISSING
    fullgraph: bool = MISSING


SCHEMAS = {  # ConfigStore group -> name -> schema; conf/ files name theirs in their defaults list
    "schema": {"config": ConfigSchema},
    "schema/job": {"compare": CompareJobSchema, "sample": SampleJobSchema, "trajectory": TrajectoryJobSchema,
                   "atlas": AtlasJobSchema, "calibrate": CalibrateJobSchema, "tune": TuneJobSchema,
                   "benchmark": BenchmarkJobSchema, "plan": Target},
    "schema/strategy": {"strategy": StrategySchema},
    "schema/logger": {"none": Target, "wandb": WandbSchema},
    "schema/compile": {"compile": CompileSchema},
}


def register() -> None:
    """Store every schema of :data:`SCHEMAS` in Hydra's ConfigStore (done once, on import)."""
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            ConfigStore.instance().store(group=group, name=name, node=schema)


register()

def compose_config(overrides: list[str] = (), config_dir: Path | None = None) -> DictConfig:
    """``config.yaml`` of ``config_dir`` (default: the project's ``conf/``) composed with
    ``overrides``, as ``run.py`` composes it; a value of the wrong type is a ConfigError (the
    schedule, predictor and token policy: :func:`~cachelab.jobs.components.check_types`)."""
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except ConfigCompositionException as err:
        if isinstance(err.__cause__, ValidationError):
            raise type_error(err.__cause__) from None
        raise
    check_types(cfg)
    return cfg


def check_override_types(overrides: list[str], config_dir: Path, searched: list[str] = ()) -> None:
    """Compose the config with the command line's ``overrides`` before Hydra does, so that a
    value of the wrong type is one line (Hydra's own report is several); a sweep's values are
    tried one by one. Any other composition problem is left to Hydra to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    search = [f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in searched)}]"] if searched else []
    first = [f"{o.input_line.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
             else o.input_line for o in parsed]
    trials = [first]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            key = override.input_line.split("=", 1)[0]
            trials += [first[:i] + [f"{key}={value}"] + first[i + 1:] for value in override.sweep_string_iterator()]
    for trial in trials:
        try:
            compose_config(search + trial, config_dir)
        except ConfigCompositionException:
            return
