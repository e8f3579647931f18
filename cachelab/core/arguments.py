"""What a constructor's argument allows, said once in its signature and checked when it is called:
``interval: Annotated[int, at_least(1)]`` on an ``__init__`` decorated with :func:`checked`. The
config layer reads the same signature for the argument's type and for what its messages allow, so
a schedule, predictor or token policy has no second description of its keys anywhere."""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, replace
from typing import Any, Callable

from cachelab.errors import ArgumentError


@dataclass(frozen=True)
class Allowed:
    """A rule for one argument: ``test(value)`` passes, ``text`` says what passes (for messages);
    None always passes (an optional argument's null)."""

    test: Callable[[Any], bool]
    text: str
    problem: str = "is out of range"

    def check(self, key: str, value) -> None:
        """An :class:`~cachelab.errors.ArgumentError` naming ``key`` where ``value`` fails."""
        if value is not None and not self.test(value):
            raise ArgumentError(key, value, self.text, self.problem)


def at_least(minimum: int) -> Allowed:
    """Integers ``>= minimum``."""
    return Allowed(lambda v: v >= minimum, f"integers >= {minimum}")


def between(low: int, high: int) -> Allowed:
    """Integers ``low..high``."""
    return Allowed(lambda v: low <= v <= high, f"integers {low}..{high}")


def above(bound: float) -> Allowed:
    """Numbers ``> bound``."""
    return Allowed(lambda v: v > bound, f"numbers > {bound:g}")


def in_range(low: float, high: float, closed: bool = True) -> Allowed:
    """Numbers in ``[low, high]`` (``closed=False``: ``[low, high)``)."""
    if closed:
        return Allowed(lambda v: low <= v <= high, f"numbers in [{low:g}, {high:g}]")
    return Allowed(lambda v: low <= v < high, f"numbers in [{low:g}, {high:g})")


def rules(function: Callable) -> dict[str, Allowed]:
    """Argument name -> its :class:`Allowed`, from ``Annotated`` hints (inside ``X | None`` too,
    where null is allowed as well)."""
    found = {}
    for name, hint in typing.get_type_hints(function, include_extras=True).items():
        for part in (hint, *typing.get_args(hint)):
            rule = next((m for m in getattr(part, "__metadata__", ()) if isinstance(m, Allowed)), None)
            if rule is not None:
                found[name] = rule if part is hint else replace(rule, text=f"{rule.text} or null")
                break
    return found


def checked(init: Callable) -> Callable:
    """Decorates an ``__init__``: every argument with a rule in its signature is checked before
    the body runs (the rules are read on the first call, once the module's names exist)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, rule in cached_rules(init).items():
            rule.check(name, bound.arguments[name])
        init(self, *args, **kwargs)

    return checked_init


@functools.cache
def cached_rules(function: Callable) -> dict[str, Allowed]:
    """:func:`rules`, read once per function."""
    return rules(function)
