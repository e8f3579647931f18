"""Structured config schemas: the type of every key of ``conf/config.yaml`` and of the job,
strategy, schedule, logger and compile groups, registered in Hydra's ConfigStore on import
(``cachelab/jobs/__init__.py`` imports this module, so any composition after importing the
jobs layer sees them). A config file uses its schema as the first entry of its defaults
list (``- /schema/job/sample@_here_``); the YAML gives the values, the schema the types, and
Hydra refuses a value of the wrong type while composing. :func:`compose_config` turns that
refusal into a one-line :class:`ConfigError` naming the key and the expected type.

The model group has no schema: each model config is the keyword arguments of its own
adapter class (``_target_``), different per family, and the class checks them when it is
built. The strategy's ``predictor`` node is untyped for the same reason (one class per
predictor). The registration lives in memory, not in ``conf/``: wherever the YAML files are
read from, the schemas are the same."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, DictConfig, ValidationError
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from cachelab.errors import ConfigError
from cachelab.jobs import CONFIG_DIR


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
class ConfigSchema:
    """The top level of ``conf/config.yaml``: the groups and the shorthands."""

    model: Any = MISSING
    schedule: Any = MISSING
    strategy: Any = MISSING
    logger: Any = MISSING
    job: Any = MISSING
    compile: Any = None
    order: int = MISSING
    interval: int = MISSING
    first_enhance: int = MISSING
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


@dataclass
class TuneJobSchema(Target):
    """``job=tune``: the fastest per-site interval configuration predicted to meet ``target``."""

    target: TuneTargetSchema = field(default_factory=TuneTargetSchema)
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
    """``strategy.*``; ``predictor`` is untyped (each predictor class has its own keys), and so is
    ``tokens`` (null, a policy name, or a node with ``_target_``: checked by ``checks.check_tokens``)."""

    name: str = MISSING
    granularity: str = MISSING
    predictor: Any = MISSING
    needs_schedule: Optional[str] = None
    tokens: Any = None


@dataclass
class IntervalSchema(Target):
    """``schedule=interval``: full every ``interval`` steps after ``first_enhance``."""

    interval: int = MISSING
    first_enhance: int = MISSING
    final_full: int = MISSING


@dataclass
class ToCaIntervalSchema(Target):
    """``schedule=toca``: ToCa's full steps, an interval that shrinks over the run."""

    interval: int = MISSING
    weight: float = MISSING


@dataclass
class MaskSchema(Target):
    """``schedule=mask``: the full steps given as a list of steps or a boolean mask."""

    full_steps: Optional[List[int]] = MISSING
    mask: Optional[List[bool]] = MISSING


@dataclass
class PerKindIntervalSchema(Target):
    """``schedule=pab``: one interval per site kind, inside a timestep window."""

    intervals: Dict[str, int] = MISSING
    window: Optional[List[float]] = MISSING


@dataclass
class PerSiteIntervalSchema(Target):
    """``schedule=per_site``: one interval per cache site (what ``job=tune`` writes)."""

    intervals: Dict[str, int] = MISSING
    first_enhance: int = MISSING
    final_full: int = MISSING


@dataclass
class AdaptiveSchema(Target):
    """What the signal-driven schedules share."""

    first_enhance: int = MISSING
    final_full: int = MISSING
    max_consecutive_forecasts: Optional[int] = MISSING


@dataclass
class TeaCacheSchema(AdaptiveSchema):
    """``schedule=teacache``: the rescaled accumulated input change against ``threshold``."""

    threshold: float = MISSING
    coefficients: List[float] = MISSING
    calibration: Optional[str] = MISSING


@dataclass
class FirstBlockCacheSchema(AdaptiveSchema):
    """``schedule=fbcache``: the first block residual's change against ``threshold``."""

    threshold: float = MISSING


@dataclass
class ErrorControlledSchema(AdaptiveSchema):
    """``schedule=error_controlled``: the predictor's error estimate against ``tolerance``."""

    tolerance: float = MISSING


@dataclass
class MagCacheSchema(Target):
    """``schedule=magcache``: the calibrated magnitude ratios' accumulated error against ``threshold``."""

    calibration: Optional[str] = MISSING
    threshold: float = MISSING
    max_skip: int = MISSING
    retention: float = MISSING


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
                   "benchmark": BenchmarkJobSchema},
    "schema/strategy": {"strategy": StrategySchema},
    "schema/schedule": {"always": Target, "interval": IntervalSchema, "toca": ToCaIntervalSchema, "mask": MaskSchema,
                        "pab": PerKindIntervalSchema, "per_site": PerSiteIntervalSchema, "teacache": TeaCacheSchema,
                        "fbcache": FirstBlockCacheSchema,
                        "error_controlled": ErrorControlledSchema, "magcache": MagCacheSchema},
    "schema/logger": {"none": Target, "wandb": WandbSchema},
    "schema/compile": {"compile": CompileSchema},
}


def register() -> None:
    """Store every schema of :data:`SCHEMAS` in Hydra's ConfigStore (done once, on import)."""
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            ConfigStore.instance().store(group=group, name=name, node=schema)


register()

TYPE_NAMES = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "a boolean"}
MESSAGE_TYPES = {"to Integer": "an integer", "to Float": "a number", "valid bool": "a boolean"}  # list elements


def compose_config(overrides: list[str] = (), config_dir: Path | None = None) -> DictConfig:
    """``config.yaml`` of ``config_dir`` (default: the project's ``conf/``) composed with
    ``overrides``, as ``run.py`` composes it; a value of the wrong type is a ConfigError."""
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except ConfigCompositionException as err:
        if isinstance(err.__cause__, ValidationError):
            raise type_error(err.__cause__) from None
        raise


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


def type_error(err: ValidationError):
    """One line for OmegaConf's refusal of a value: the key, the value, the expected type."""
    from cachelab.jobs.checks import allowed_values  # checks.py imports torch: only when needed

    key, value = err.full_key, err.value
    expected = next((name for kind, name in TYPE_NAMES.items() if isinstance(err.child_node, kind)),
                    next((name for words, name in MESSAGE_TYPES.items() if words in err.msg), None))
    if expected is None:  # a list, a dict or a string node refused the value
        return ConfigError(f"{key}={value!r} is not allowed; {err.msg.splitlines()[0]}")
    if expected == "a boolean":
        return ConfigError(f"{key}={value!r} is not allowed; allowed: true, false")
    optional = " or null" if err.child_node is not None and err.child_node._is_optional() else ""
    return ConfigError(f"{key}={value!r} is not {expected}; allowed: {allowed_values(key, expected)}{optional}")
