"""A strategy from its preset name and the command line's keys, for ``cachelab.apply``: the same
composition of ``conf/`` as ``python run.py strategy=<name> <key>=<value>``, so a name or key
means the same in Python as on the command line."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, ValidationError, open_dict

from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError
from cachelab.jobs.base import build_strategy
from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.checks import SHORTHANDS, check_group_choices, check_ranges, check_strategy, reads_shorthand
from cachelab.jobs.components import check_types
from cachelab.jobs.refusals import type_error
from cachelab.jobs.schema import compose_config

TOP_LEVEL = (*SHORTHANDS, "num_steps", "guard")  # the keys of conf/config.yaml a preset takes


def preset(name: str, **overrides) -> Strategy:
    """``conf/strategy/<name>.yaml`` with ``overrides``: ``order``, ``interval``, ``first_enhance``,
    ``granularity``, ``whole_blocks`` (block regexes cached whole), ``tokens`` (a token selection policy name or None), ``schedule`` (a
    ``conf/schedule/`` name), ``guard`` (``fallback | raise | off``), and the schedule's, the predictor's or the token policy's own keys (``threshold``,
    ``calibration``, ``factor_dtype``, ``fresh_ratio``, ...)."""
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"strategy={name!r}: preset names are read from the conf/ folder of a cachelab checkout "
                          f"({CONFIG_DIR} is missing); pass a Strategy object instead")
    groups = [f"strategy={name}"] + ([f"schedule={overrides.pop('schedule')}"] if "schedule" in overrides else [])
    check_group_choices(groups, CONFIG_DIR)
    cfg = compose_config(groups)
    for key, value in overrides.items():
        path = where(cfg, key)
        try:
            with open_dict(cfg):
                OmegaConf.update(cfg, path, value, merge=False)
        except ValidationError as err:  # the schema's type for the key
            raise type_error(err) from None
    refuse_model_defaults(cfg, name)
    check_types(cfg)
    check_ranges(cfg)
    check_strategy(cfg)
    return build_strategy(cfg)


def command_line(name: str, **overrides) -> list[str]:
    """The ``python run.py`` arguments that compose what ``preset(name, **overrides)`` builds."""
    overrides = dict(overrides)
    groups = [f"strategy={name}"] + ([f"schedule={overrides.pop('schedule')}"] if "schedule" in overrides else [])
    check_group_choices(groups, CONFIG_DIR)
    cfg = compose_config(groups)
    return groups + [f"{where(cfg, key)}={cli_value(value)}" for key, value in overrides.items()]


def cli_value(value) -> str:
    """A value as Hydra's command line writes it: lists without spaces, None as null."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def refuse_model_defaults(cfg, name: str) -> None:
    """A schedule key whose default is read from the command line's model (``${model.name}``: e.g.
    MagCache's calibration curve) has no model to read it from here; a ConfigError asks for it."""
    raw = OmegaConf.to_container(cfg.schedule, resolve=False)
    for key, value in raw.items():
        if isinstance(value, str) and "${model." in value:
            raise ConfigError(f"strategy={name!r}: {key}= is required in cachelab.apply (on the command line it "
                              f"is the model's own, {value}); record it with `python run.py job=calibrate "
                              f"model=<model>` and pass {key}=<model name or file.json>")


def where(cfg, key: str) -> str:
    """The config path that ``key`` sets; an unknown key is a ConfigError naming the allowed ones."""
    if key in SHORTHANDS and key in cfg.schedule and not reads_shorthand(cfg, key):
        return f"schedule.{key}"  # the schedule keeps its own (schedule=toca: its interval)
    if key in TOP_LEVEL:
        return key
    if key in ("granularity", "tokens", "whole_blocks"):
        return f"strategy.{key}"
    if key in cfg.schedule and key != "_target_":
        return f"schedule.{key}"
    predictor = cfg.strategy.predictor
    if predictor is not None and key in predictor and key != "_target_":
        return f"strategy.predictor.{key}"
    tokens = cfg.strategy.get("tokens")
    tokens = tokens if isinstance(tokens, DictConfig) else {}
    if key in tokens and key != "_target_":
        return f"strategy.tokens.{key}"
    allowed = [*TOP_LEVEL, "granularity", "tokens", "whole_blocks", "schedule", *(k for k in cfg.schedule if k != "_target_"),
               *(k for k in (predictor or {}) if k != "_target_"), *(k for k in tokens if k != "_target_")]
    raise ConfigError(f"{key}= is not a key of strategy={cfg.strategy.name!r} with schedule "
                      f"{cfg.schedule._target_.rsplit('.', 1)[-1]}; allowed: {', '.join(dict.fromkeys(allowed))}")
