"""The config nodes built from a class (``_target_``): the schedule, the strategy's predictor and its
token policy. Their keys are the constructor's arguments, so their schema is the constructor's
signature (:func:`schema_of`: the type hints and the ``Annotated`` rules of
:mod:`cachelab.core.arguments`), never a second description: a new schedule needs only its class
and its YAML. :func:`check_types` refuses an unknown key or a value of the wrong type; a value out
of range is refused by the constructor itself, and :func:`refusal` names the config key that gave
it (``interval`` for ``schedule.interval: ${interval}``)."""
from __future__ import annotations

import collections.abc
import functools
import inspect
import re
import types
import typing
from dataclasses import field, make_dataclass
from typing import Any, Dict, List, Optional

from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError

from cachelab.core.arguments import Allowed, rules
from cachelab.errors import ArgumentError, ConfigError
from cachelab.jobs.refusals import type_error

COMPONENTS = ("schedule", "strategy.predictor", "strategy.tokens")  # config paths of nodes typed by their class
INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")  # ${key}: a plain reference to another key


@functools.cache
def signature_of(cls: type) -> tuple[dict[str, Any], dict[str, Allowed], bool]:
    """``cls``'s constructor arguments -> type hint, their rules, and whether it takes any other
    keyword (``**keys`` are followed to the base class's constructor, as ``super().__init__`` does)."""
    hints: dict[str, Any] = {}
    found: dict[str, Allowed] = {}
    for klass in cls.__mro__[:-1]:  # object's own constructor takes nothing
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        own = typing.get_type_hints(init, include_extras=True)
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                hints.setdefault(p.name, own.get(p.name, Any))
        found = {**rules(init), **found}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return hints, found, False
    return hints, found, cls.__init__ is not object.__init__


@functools.cache
def schema_of(cls: type) -> type:
    """The structured-config schema of ``cls``'s constructor: one field per argument, typed as
    OmegaConf can check it (:func:`config_type`)."""
    hints, _, _ = signature_of(cls)
    return make_dataclass(f"{cls.__name__}Arguments",
                          [(name, config_type(hint), field(default=MISSING)) for name, hint in hints.items()])


def config_type(hint) -> Any:
    """The OmegaConf type of a type hint: ``Annotated`` unwrapped, ``X | None`` as Optional, any
    sequence as a list and any mapping as a dict; what OmegaConf cannot type is Any."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return config_type(args[0])
    if hint in (int, float, bool, str):
        return hint
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = config_type(rest[0]) if len(rest) == 1 else Any
        return Any if inner is Any else Optional[inner]
    if origin in (list, tuple, collections.abc.Sequence) and args:
        return List[config_type(args[0])]
    if origin in (dict, collections.abc.Mapping) and len(args) == 2:
        return Dict[config_type(args[0]), config_type(args[1])]
    return Any


def check_types(cfg: DictConfig) -> None:
    """Every node of :data:`COMPONENTS` that names a class: its keys are that class's arguments and
    its values have their types, or a one-line ConfigError naming the key and what is allowed."""
    for path in COMPONENTS:
        node = OmegaConf.select(cfg, path, throw_on_missing=False)
        if isinstance(node, DictConfig) and "_target_" in node:
            check_node(node, path)


def check_node(node: DictConfig, path: str) -> None:
    """:func:`check_types` for one node at config path ``path``."""
    try:
        cls = get_class(node._target_)
    except ImportError as err:
        raise ConfigError(f"{path}._target_={node._target_!r} cannot be imported ({err}); allowed: an "
                          f"importable class") from None
    hints, found, open_keys = signature_of(cls)
    given = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    unknown = [k for k in given if k not in hints]
    if unknown and not open_keys:
        raise ConfigError(f"{path}.{unknown[0]} is not an argument of {cls.__name__}; allowed: "
                          f"{', '.join(hints) or 'no keys'}")
    try:
        OmegaConf.merge(OmegaConf.structured(schema_of(cls)), {k: v for k, v in given.items() if k in hints})
    except ValidationError as err:
        argument = re.split(r"[.\[]", err.full_key, maxsplit=1)[0]
        key = config_key(node, path, argument) + err.full_key[len(argument):]
        rule = found.get(argument)
        raise type_error(err, key, None if rule is None else rule.text) from None


def config_key(node: DictConfig, path: str, argument: str) -> str:
    """The config key that sets ``argument`` of the node at ``path``: the key its value refers to
    (``interval`` for ``${interval}``), else ``<path>.<argument>``."""
    raw = OmegaConf.to_container(node, resolve=False).get(argument)
    match = INTERPOLATION.match(raw) if isinstance(raw, str) else None
    return match.group(1) if match else f"{path}.{argument}"


def refusal(err: Exception, node: DictConfig, path: str) -> ConfigError:
    """A constructor's refusal of the node at ``path`` as one ConfigError: an out-of-range argument
    under its config key, another ConfigError as it is, anything else prefixed with ``path``."""
    if isinstance(err, ArgumentError):
        return err.renamed(config_key(node, path, err.key))
    if isinstance(err, ConfigError):
        return err
    return ConfigError(f"{path}: {err}")
