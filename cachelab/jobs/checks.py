"""Early validation of a composed config: one line naming the key, the value, what is allowed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cachelab.core.guard import guard_policy
from cachelab.core.schedules import Interval
from cachelab.core.sites import GRANULARITIES
from cachelab.errors import ArgumentError, ConfigError
from cachelab.jobs.base import TOKEN_POLICIES, build, build_strategy
from cachelab.jobs.components import check_types
from cachelab.jobs.refusals import INTEGER_RANGES, allowed_values
from cachelab.jobs.tuning.targets import TARGETS, Target


SHORTHANDS = ("order", "interval", "first_enhance")  # conf/config.yaml's keys that configs interpolate


def reads_shorthand(cfg: DictConfig, key: str) -> bool:
    """Whether the composed strategy, its schedule or the job interpolates the top-level ``key``."""
    used = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["strategy", "schedule", "job"]), resolve=False)
    return "${" + key + "}" in json.dumps(used)


def unused_shorthands(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """One note per top-level shorthand set on the command line (``interval=3``) that neither the
    composed strategy, its schedule nor the job interpolates (``schedule=toca`` keeps its own
    ``schedule.interval``): the value changes nothing in this run, which the note says."""
    notes = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in SHORTHANDS and not reads_shorthand(cfg, key):
            where = ", ".join(f"{node}.{key}" for node in ("strategy", "schedule") if key in cfg.get(node, {}))
            notes.append(f"note: {override} has no effect here: neither strategy={cfg.strategy.get('name')} nor its "
                         f"schedule ({str(cfg.schedule.get('_target_', '')).rsplit('.', 1)[-1]}) reads the shorthand "
                         + (f"(set {where}={value} instead)" if where else f"(they take no {key})"))
    return notes


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value; builds the strategy (and job=tune's job)
    to let their constructors check their ranges, never the model. The types were checked when
    the config was composed (the schemas; the schedule, predictor and token policy again, for a
    config Hydra composed); here are the ranges and the rules that tie keys together."""
    check_device(cfg.device)
    guard_policy(cfg.get("guard", "fallback"))  # fallback | raise | off
    check_types(cfg)
    check_ranges(cfg)
    check_strategy(cfg)
    for key in missing_values(cfg):
        if key != "model.checkpoint":
            raise ConfigError(f"{key} is required (it is ??? in the config); allowed: {key}=<value>")
    build_strategy(cfg)  # the constructors' own checks, each refusal named by its config key
    if "checkpoint" in cfg.model.keys():  # `in cfg.model` is False while the value is ??? (missing)
        if OmegaConf.is_missing(cfg.model, "checkpoint"):
            raise ConfigError(f"model.checkpoint is required for model {cfg.model.name!r}; "
                              f"allowed: model.checkpoint=<path to the checkpoint file>")
        checkpoint = cfg.model.checkpoint
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ConfigError(f"model.checkpoint={checkpoint!r}: no such file; allowed: a path to an existing checkpoint")
    check_model_fit(cfg)
    check_forecasts(cfg)
    check_compile(cfg)
    if "target" in cfg.job:  # job=tune: its constructor checks the target and the options
        build(cfg, "job")
        if cfg.job.search == "sites" and cfg.strategy.granularity not in TUNE_GRANULARITIES:
            raise ConfigError(f"job=tune sets one interval per site: strategy.granularity={cfg.strategy.granularity!r} "
                              f"is not allowed; allowed: {', '.join(TUNE_GRANULARITIES)}")
        if cfg.strategy.get("whole_blocks"):
            raise ConfigError("job=tune tunes the sites of one granularity: strategy.whole_blocks is not allowed "
                              "there; allowed: strategy.whole_blocks=[] with strategy.granularity=module or block")


TUNE_GRANULARITIES = ("module", "block", "output")  # a stack site spans blocks: no per-site FLOPs


def check_target(target) -> Target:
    """``job.target``: exactly one of psnr, rel_l2, speedup, in its range (the Target's own check)."""
    given = {key: target.get(key) for key in TARGETS if target.get(key) is not None}
    keys = ", ".join(f"job.target.{key}" for key in TARGETS)
    if len(given) != 1:
        got = "none" if not given else " and ".join(f"job.target.{k}={v:g}" for k, v in given.items())
        raise ConfigError(f"job.target: give exactly one of {keys} (python -m cachelab.tune target.psnr=35), "
                          f"got {got}; allowed: one of {keys}")
    (key, value), = given.items()
    try:
        return TARGETS[key](value)
    except ArgumentError as err:
        raise err.renamed(f"job.target.{key}") from None


def check_compile(cfg: DictConfig) -> None:
    """``compile.mode`` must be one torch.compile knows; CUDA graphs need a CUDA device."""
    from cachelab.core.compiling import COMPILE_MODES
    from cachelab.core.compiling import CUDA_GRAPH_MODES

    options = cfg.get("compile")
    if not options:
        return
    mode = options.get("mode", "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile.mode={mode!r} is not allowed; allowed: {', '.join(COMPILE_MODES)}")
    if mode in CUDA_GRAPH_MODES and not str(cfg.device).startswith("cuda"):
        raise ConfigError(f"compile.mode={mode!r} uses CUDA graphs and needs device=cuda, got device={cfg.device!r}; "
                          f"allowed on {cfg.device!r}: compile.mode=default or max-autotune-no-cudagraphs")


def check_ranges(cfg: DictConfig) -> None:
    """Every integer key of :data:`INTEGER_RANGES` that ``cfg`` has lies in its range."""
    for key, (minimum, maximum) in INTEGER_RANGES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is not None and (value < minimum or (maximum is not None and value > maximum)):
            raise ConfigError(f"{key}={value} is out of range; allowed: {allowed_values(key, 'an integer')}")


def check_strategy(cfg: DictConfig) -> None:
    """The granularity, the schedule's values and the preset's pairing with its schedule
    (what ``cachelab.apply`` checks too, before it knows the model)."""
    granularity = cfg.strategy.granularity
    if granularity not in GRANULARITIES:
        raise ConfigError(f"strategy.granularity={granularity!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")
    schedule, T = cfg.schedule, cfg.num_steps
    if schedule.get("mask") is not None and len(schedule.mask) != T:
        raise ConfigError(f"schedule.mask has {len(schedule.mask)} entries but num_steps={T}; allowed: a mask of "
                          f"exactly num_steps entries, or schedule.full_steps")
    beyond = [s for s in schedule.get("full_steps") or () if s >= T]
    if beyond:
        raise ConfigError(f"schedule.full_steps {beyond} are beyond the last step of num_steps={T}; "
                          f"allowed: step indices 0..{T - 1}")
    check_tokens(cfg.strategy)
    if cfg.strategy.predictor is None:  # no caching: the schedule is never asked
        return
    needed = cfg.strategy.get("needs_schedule")
    if needed is not None and cfg.schedule._target_ != needed:
        raise ConfigError(f"strategy={cfg.strategy.name!r} needs schedule._target_={needed}, got "
                          f"schedule._target_={cfg.schedule._target_}; allowed: the paired override in "
                          f"conf/strategy/{cfg.strategy.name}.yaml (schedule={cfg.strategy.name})")


def check_tokens(strategy: DictConfig) -> None:
    """``strategy.tokens``: null, a policy name of :data:`TOKEN_POLICIES` (that policy with its own
    defaults), or a node with ``_target_`` (the presets; ``strategy.tokens.<key>=`` tunes it)."""
    tokens = strategy.get("tokens")
    allowed = f"null, {', '.join(TOKEN_POLICIES)}, or a node with _target_"
    if tokens is None:
        return
    if isinstance(tokens, str):
        if tokens not in TOKEN_POLICIES:
            raise ConfigError(f"strategy.tokens={tokens!r} is not allowed; allowed: {allowed}")
    elif not isinstance(tokens, DictConfig) or "_target_" not in tokens:
        raise ConfigError(f"strategy.tokens={OmegaConf.to_container(tokens) if isinstance(tokens, DictConfig) else tokens!r}"
                          f" is not allowed; allowed: {allowed}")


def check_model_fit(cfg: DictConfig) -> None:
    """Whether the model can serve the strategy: the schedule's signals and its calibration."""
    if cfg.strategy.predictor is None:  # no caching: the schedule is never asked
        return
    check_signals(cfg)
    schedule, T = cfg.schedule, cfg.num_steps
    if schedule.get("calibration") is not None:
        from cachelab.assets import load_calibration

        recorded = load_calibration(schedule.calibration).get("model")
        if recorded != cfg.model.name:
            raise ConfigError(f"schedule.calibration={schedule.calibration!r} was recorded for model {recorded!r}, "
                              f"not model.name={cfg.model.name!r}; allowed: a calibration of this model "
                              f"(`python run.py job=calibrate model=<this model> num_steps={T}`)")


def check_signals(cfg: DictConfig) -> None:
    """An adaptive schedule's signals must come from a probe the model's adapter offers at
    the strategy's granularity, or from the predictor (``error_estimate``)."""
    from hydra.utils import get_class

    from cachelab.core.controller import controller_signals

    signals = get_class(cfg.schedule._target_).signals
    if not signals:
        return
    if "verification_error" in signals and cfg.strategy.granularity in ("stack", "output"):
        raise ConfigError(f"schedule._target_={cfg.schedule._target_} computes one cache site for real on its checked "
                          f"forecast steps; at strategy.granularity={cfg.strategy.granularity!r} that site is the whole "
                          f"step; allowed: strategy.granularity in module, block")
    adapter_sites = getattr(get_class(cfg.model._target_), "sites", {})
    own = controller_signals(get_class(cfg.strategy.predictor._target_))
    granularity = cfg.strategy.granularity
    if not hasattr(adapter_sites.get(granularity), "probes"):  # probes discovered: the controller checks at attach
        return

    def provided(g: str) -> set[str]:
        return set(getattr(adapter_sites.get(g), "probes", {})) | own

    missing = [signal for signal in signals if signal not in provided(granularity)]
    if missing:
        allowed = [g for g in GRANULARITIES if set(signals) <= provided(g)]
        raise ConfigError(
            f"schedule._target_={cfg.schedule._target_} reads the signal(s) {', '.join(missing)}, which neither "
            f"model {cfg.model.name!r} at strategy.granularity={granularity!r} nor strategy.predictor "
            f"({cfg.strategy.predictor._target_}) provides; allowed: strategy.granularity in "
            f"{', '.join(allowed) or 'none (another strategy or schedule)'}")


def missing_values(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (mandatory, not given)."""
    keys = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            keys.append(full)
        elif isinstance(node._get_node(key), DictConfig) and node[key] is not None:
            keys.extend(missing_values(node[key], f"{full}."))
    return keys


def job_timeout(cfg: DictConfig) -> float | None:
    """``job_timeout_s``: null or a number of seconds > 0 (run.py reads it before a run starts)."""
    value = cfg.get("job_timeout_s")
    if value is not None and not value > 0:
        raise ConfigError(f"job_timeout_s={value:g} is not allowed; allowed: null or a number of seconds > 0")
    return value


def check_device(device) -> None:
    """``device`` must name a torch device that this machine has."""
    allowed = "cpu, cuda, cuda:<index>, mps"
    try:
        parsed = torch.device(str(device))
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device; allowed: {allowed}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if parsed.type not in available:
        raise ConfigError(f"device={device!r} is not supported; allowed: {allowed}")
    if not available[parsed.type]:
        raise ConfigError(f"device={device!r} is not available on this machine (torch sees no {parsed.type} device); "
                          f"allowed here: cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_forecasts(cfg: DictConfig) -> None:
    """A fixed interval that leaves no forecast step is refused; one that leaves only the warm-up
    steps full is said once on stderr (both name what will happen)."""
    schedule, T = cfg.schedule, cfg.num_steps
    if cfg.strategy.predictor is None or schedule.get("_target_") != f"{Interval.__module__}.Interval":
        return
    mask = Interval(schedule.interval, schedule.first_enhance, schedule.get("final_full", 0)).mask(T)
    full = sum(mask)
    if full == T:
        raise ConfigError(f"no forecast step: first_enhance={schedule.first_enhance} with num_steps={T} (and "
                          f"interval={schedule.interval}) makes every step full; allowed: first_enhance < num_steps")
    if schedule.interval > T - schedule.first_enhance:
        print(f"warning: interval={schedule.interval} with num_steps={T}: after the {schedule.first_enhance} warm-up "
              f"steps every step is forecast ({full} full steps of {T})", file=sys.stderr)


def check_group_choices(overrides: list[str], config_dir: Path, searched: list[str] = ()) -> None:
    """Reject ``group=name`` command-line choices with no ``<dir>/group/name.yaml`` in
    ``config_dir`` or the ``searched`` folders (``--config-dir``, ``hydra.searchpath``'s
    ``file://`` entries), before Hydra composes anything (sweeps ``a,b`` are checked value by
    value). A ``pkg://`` search path cannot be listed: then Hydra alone decides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    searched = list(searched)
    for override in parsed:
        if override.key_or_group == "hydra.searchpath":
            searched += list(override.value())
    if any(not str(path).startswith("file://") and "://" in str(path) for path in searched):
        return
    dirs = [config_dir] + [Path(str(path).removeprefix("file://")) for path in searched]
    for override in parsed:
        group_dirs = [d / override.key_or_group for d in dirs if (d / override.key_or_group).is_dir()]
        if override.package is not None or not group_dirs or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        allowed = sorted({p.stem for d in group_dirs for p in d.glob("*.yaml")})
        for value in values:
            if str(value) not in allowed:
                raise ConfigError(f"{override.key_or_group}={value!r} is unknown; allowed: {', '.join(allowed)}")
