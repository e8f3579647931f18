"""Ordered, named wrappers of an object's methods (a module's ``forward``, a scheduler's ``step``),
installed and removed one by one, the object restored exactly once the last one is gone.

Every object keeps one registry (the instance attribute ``_cachelab_hooks``, present only while a
hook is installed). A hook is a name, a rank and ``wrap(inner) -> callable``: on one method, a hook
of a higher rank wraps every hook of a lower one (equal ranks: the later one outside), whatever the
order of installation, so the order is declared by the ranks below and never arranged by
reinstalling. Installing or removing a hook rebuilds only the hooks above it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ATTRIBUTE = "_cachelab_hooks"
_MISSING = object()

# the ranks, innermost first: a cache site, a FLOP tally of the sites, an applied handle, a pipeline's driver
SITE, TALLY, HANDLE, DRIVER = 0, 10, 20, 30


@dataclass
class Hook:
    """One wrapper of a method: ``wrap(inner)`` gives the callable that replaces ``inner``;
    ``by`` is whoever installed it (named when a hook is refused)."""

    name: str
    rank: int
    wrap: Callable[[Callable], Callable]
    by: object = None
    built: Callable | None = None  # wrap(the hooks beneath), as installed now


class MethodHooks:
    """The hooks of one method of one object, innermost first, above the computation that the
    object had when the first one was installed (``base``)."""

    def __init__(self, owner, method: str):
        self.owner, self.method = owner, method
        self.original = vars(owner).get(method, _MISSING)  # an instance attribute, or none (the class's)
        self.base = getattr(owner, method)
        self.hooks: list[Hook] = []
        self.current = self.original  # what the object holds: the original, or the outermost hook's callable

    def find(self, name: str) -> int:
        for index, hook in enumerate(self.hooks):
            if hook.name == name:
                return index
        raise KeyError(f"{type(self.owner).__name__}.{self.method} has no hook {name!r}; it has: "
                       f"{', '.join(hook.name for hook in self.hooks) or 'none'}")

    def rebuild(self, start: int) -> None:
        """Wrap again every hook from ``start`` outward and set the outermost on the object; the
        object's own attribute is restored when no hook is left. Refused when something else
        replaced the method since (it would be lost)."""
        if vars(self.owner).get(self.method, _MISSING) is not self.current:
            raise RuntimeError(f"{type(self.owner).__name__}.{self.method} was replaced after cachelab hooked it; "
                               f"remove that wrapper first")
        call = self.base if start == 0 else self.hooks[start - 1].built
        for hook in self.hooks[start:]:
            call = hook.built = hook.wrap(call)
        self.current = call if self.hooks else self.original
        if self.current is _MISSING:
            delattr(self.owner, self.method)
        else:
            setattr(self.owner, self.method, self.current)


def _registry(owner, create: bool = False) -> dict[str, MethodHooks] | None:
    registry = vars(owner).get(ATTRIBUTE)
    if registry is None and create:
        registry = vars(owner)[ATTRIBUTE] = {}
    return registry


def install(owner, method: str, name: str, wrap: Callable[[Callable], Callable], rank: int, by=None) -> None:
    """Wrap ``owner.method`` by ``wrap`` at ``rank``; a second hook named ``name`` on it is refused."""
    registry = _registry(owner, create=True)
    chain = registry.get(method) or registry.setdefault(method, MethodHooks(owner, method))
    if any(hook.name == name for hook in chain.hooks):
        raise RuntimeError(f"{type(owner).__name__}.{method} already has the hook {name!r}")
    index = sum(1 for hook in chain.hooks if hook.rank <= rank)
    chain.hooks.insert(index, Hook(name, rank, wrap, by))
    try:
        chain.rebuild(index)
    except RuntimeError:  # the method was replaced by someone else: leave everything as it was
        del chain.hooks[index]
        if not chain.hooks:
            _drop(owner, method)
        raise


def rewrap(owner, method: str, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace the wrapper of hook ``name`` on ``owner.method``, keeping its place."""
    chain = _registry(owner)[method]
    index = chain.find(name)
    chain.hooks[index].wrap = wrap
    chain.rebuild(index)


def remove(owner, method: str, name: str) -> None:
    """Take hook ``name`` off ``owner.method``; after the last one ``owner`` is as it was."""
    chain = _registry(owner)[method]
    index = chain.find(name)
    removed = chain.hooks.pop(index)
    try:
        chain.rebuild(index)
    except RuntimeError:
        chain.hooks.insert(index, removed)
        raise
    if not chain.hooks:
        _drop(owner, method)


def _drop(owner, method: str) -> None:
    registry = _registry(owner)
    del registry[method]
    if not registry:
        del vars(owner)[ATTRIBUTE]


def hooks(owner, method: str | None = None) -> list[Hook]:
    """The hooks on ``owner.method`` (every method: None), innermost first."""
    registry = _registry(owner) or {}
    chains = registry.values() if method is None else [registry[method]] if method in registry else []
    return [hook for chain in chains for hook in chain.hooks]


def base(owner, method: str) -> Callable:
    """The computation beneath every hook of ``owner.method`` (the method itself when unhooked)."""
    chain = (_registry(owner) or {}).get(method)
    return getattr(owner, method) if chain is None else chain.base
