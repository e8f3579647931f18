"""The hook registry: hooks wrap a method in the order their ranks declare, whatever the order of
installation; removing them (in any order) leaves the object exactly as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cachelab.core import hooks


def tagging(calls: list, tag: str):
    """A wrapper that notes ``tag`` on the way in and adds nothing to the result."""
    def wrap(inner):
        def tagged(*args, **kwargs):
            calls.append(tag)
            return inner(*args, **kwargs)
        return tagged
    return wrap


def test_ranks_declare_the_order_whatever_the_installation_order():
    layer, calls = nn.Linear(3, 3), []
    hooks.install(layer, "forward", "driver", tagging(calls, "driver"), hooks.DRIVER)
    hooks.install(layer, "forward", "site", tagging(calls, "site"), hooks.SITE)
    hooks.install(layer, "forward", "handle", tagging(calls, "handle"), hooks.HANDLE)
    layer(torch.ones(1, 3))
    assert calls == ["driver", "handle", "site"]
    assert [hook.name for hook in hooks.hooks(layer, "forward")] == ["site", "handle", "driver"]


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a"), ("b", "a", "c")])
def test_removal_in_any_order_restores_the_module_exactly(order):
    torch.manual_seed(0)
    layer, calls = nn.Linear(4, 4), []
    x = torch.randn(2, 4)
    bare, before = layer(x), dict(vars(layer))
    for name, rank in zip("abc", (hooks.SITE, hooks.HANDLE, hooks.DRIVER)):
        hooks.install(layer, "forward", name, tagging(calls, name), rank)
    removed = []
    for name in order:
        hooks.remove(layer, "forward", name)
        removed.append(name)
        calls.clear()
        assert torch.equal(layer(x), bare)
        assert calls == [n for n in "cba" if n not in removed]  # the others keep their order
    assert vars(layer) == before and "forward" not in vars(layer)


def test_an_instance_attribute_the_object_had_is_put_back():
    layer = nn.Identity()
    own = layer.forward = lambda x: 2 * x
    hooks.install(layer, "forward", "site", lambda inner: lambda x: inner(x) + 1, hooks.SITE)
    assert layer(torch.tensor(1.0)) == 3
    hooks.remove(layer, "forward", "site")
    assert vars(layer)["forward"] is own and hooks.hooks(layer) == []


def test_a_second_hook_of_one_name_is_refused():
    layer = nn.Identity()
    hooks.install(layer, "forward", "site", lambda inner: inner, hooks.SITE)
    with pytest.raises(RuntimeError, match="already has the hook 'site'"):
        hooks.install(layer, "forward", "site", lambda inner: inner, hooks.SITE)
    hooks.remove(layer, "forward", "site")
    assert "forward" not in vars(layer)


def test_a_method_replaced_by_someone_else_is_not_overwritten():
    layer = nn.Identity()
    hooks.install(layer, "forward", "site", lambda inner: inner, hooks.SITE)
    foreign = layer.forward = lambda x: x
    with pytest.raises(RuntimeError, match="was replaced after cachelab hooked it"):
        hooks.install(layer, "forward", "driver", lambda inner: inner, hooks.DRIVER)
    assert vars(layer)["forward"] is foreign and [hook.name for hook in hooks.hooks(layer)] == ["site"]


def test_rewrap_keeps_the_place_and_rebuilds_only_the_hooks_above():
    layer, calls, built = nn.Identity(), [], []

    def counting(tag):
        def wrap(inner):
            built.append(tag)
            return tagging(calls, tag)(inner)
        return wrap

    hooks.install(layer, "forward", "handle", counting("handle"), hooks.HANDLE)
    hooks.install(layer, "forward", "site", counting("site"), hooks.SITE)
    hooks.install(layer, "forward", "driver", counting("driver"), hooks.DRIVER)
    assert built == ["handle", "site", "handle", "driver"]  # the site went beneath the handle
    built.clear()
    hooks.rewrap(layer, "forward", "handle", counting("handle2"))
    assert built == ["handle2", "driver"]
    layer(torch.zeros(1))
    assert calls == ["driver", "handle2", "site"]
