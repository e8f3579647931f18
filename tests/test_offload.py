"""Host offload (cachelab/core/offload.py): bit for bit the predictor's results, on the CPU where
nothing moves and through real copies to a stand-in device; states on the host between uses, the
next site's prefetched, and nothing kept after a generation."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import cachelab
from cachelab.core.controller import attach, controller_signals
from cachelab.core.offload import HostOffload, mapped, tensors_in
from cachelab.core.schedules import Interval
from cachelab.core.sites import select_sites
from cachelab.core.storage import Scaled
from cachelab.strategies.dmd import DMD
from cachelab.strategies.exponential import Exponential
from cachelab.strategies.foca import FoCa
from cachelab.strategies.least_squares import LeastSquares
from cachelab.strategies.taylor import TaylorSeer
from tests.conftest import tiny_adapter


class Copies:
    """A stand-in device on the CPU: every transfer is a copy (``clone``), each one remembered as
    a host or a device tensor, and prefetches are counted."""

    def __init__(self):
        self.hosts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> tensor
        self.devices: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.prefetched = self.used = 0

    def to_host(self, tensor):
        copy = tensor.clone()
        self.hosts[id(copy)] = copy
        return copy

    def to_device(self, tensor):
        copy = tensor.clone()
        self.devices[id(copy)] = copy
        return copy

    def on_host(self, tensor) -> bool:
        return self.hosts.get(id(tensor)) is tensor

    def on_device(self, tensor) -> bool:
        return self.devices.get(id(tensor)) is tensor

    def prefetch(self, tensors):
        self.prefetched += 1
        return [self.to_device(t) for t in tensors], None

    def ready(self, copies, event):
        self.used += 1


class Watched:
    """A predictor that checks, whenever it is used, that the state's tensors are device copies."""

    def __init__(self, inner, copies: Copies):
        self.inner, self.copies, self.uses = inner, copies, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _check(self, state):
        self.uses += 1
        assert all(self.copies.on_device(t) for t in state.tensors())

    def update(self, state, s, value):
        self._check(state)
        self.inner.update(state, s, value)

    def predict(self, state, s):
        self._check(state)
        return self.inner.predict(state, s)


def generate(adapter, predictor, steps: int = 10, seed: int = 0, **attach_keys):
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), predictor,
                    Interval(3, first_enhance=2), **attach_keys)
    try:
        return adapter.generate(adapter.make_inputs(3, seed=seed), handle), handle
    finally:
        handle.remove()


PREDICTORS = {"taylor o2": lambda: TaylorSeer(2), "taylor int8 and fp8": lambda: TaylorSeer(2, factor_dtype=[
    "int8_token", "fp8_e4m3"]), "least squares": lambda: LeastSquares(2, window=4), "exponential": Exponential,
              "foca": FoCa, "dmd": DMD}  # FoCa's and DMD's predict change their states (the window, the fit)


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_offload_on_the_cpu_is_bit_identical_and_moves_nothing(name):
    adapter = tiny_adapter()
    expected, _ = generate(adapter, PREDICTORS[name]())
    offloaded, handle = generate(adapter, HostOffload(PREDICTORS[name]()))
    assert torch.equal(offloaded, expected)
    assert handle.predictor._transfers == {torch.device("cpu"): None}  # nothing to move on the CPU


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_through_real_copies_the_states_wait_on_the_host_and_the_results_are_the_same(name):
    adapter = tiny_adapter()
    expected, _ = generate(adapter, PREDICTORS[name]())
    copies = Copies()
    watched = Watched(PREDICTORS[name](), copies)
    offload = HostOffload(watched, transfers=lambda device: copies)
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), offload,
                    Interval(3, first_enhance=2))
    step = handle.step

    def checked_step(s, t=None, **signals):
        # between steps: every state's tensors are host copies, and at most one state is prefetched
        for caches in handle._caches.values():
            for cache in caches.values():
                assert all(all(copies.on_host(t) for t in state.tensors()) for state in cache.states)
        assert sum(bool(slot.prefetched) for slot in offload._slots.values()) <= 1
        return step(s, t, **signals)

    handle.step = checked_step
    out = adapter.generate(adapter.make_inputs(3, seed=0), handle)
    handle.remove()
    assert torch.equal(out, expected)
    sites, steps = len(select_sites(adapter.model, adapter.site_patterns("module"))), adapter.num_steps
    assert watched.uses == sites * steps  # every site's state used once a step (CFG in the batch)
    # the next site's state was prefetched for every use from the second step on, and used
    assert copies.used >= sites * (steps - 2)


def test_nothing_outlives_a_generation():
    adapter = tiny_adapter()
    copies = Copies()
    offload = HostOffload(TaylorSeer(2), transfers=lambda device: copies)
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), offload,
                    Interval(3, first_enhance=2))
    first = adapter.generate(adapter.make_inputs(3, seed=0), handle)
    gc.collect()
    assert offload._slots == {} and offload._last() is None and offload._pending() is None
    second = adapter.generate(adapter.make_inputs(3, seed=0), handle)
    handle.remove()
    assert torch.equal(first, second)  # the second generation starts from nothing, as the first


def test_apply_and_the_config_offload_every_predictor_bit_for_bit():
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(3, seed=0)
    outs = []
    for offload in (False, True):
        with cachelab.apply(adapter.model, "taylor", offload=offload, factor_dtype="fp8_e4m3",
                            schedule="error_controlled") as handle:
            outs.append(adapter.generate(inputs, handle))
            assert isinstance(handle.inner.predictor, HostOffload) == offload
    assert torch.equal(*outs)

    from cachelab.jobs.base import build_strategy
    from cachelab.jobs.schema import compose_config

    assert build_strategy(compose_config(["cache.offload=true"])).offload
    assert not build_strategy(compose_config([])).offload


def test_the_wrapper_is_the_predictor_in_everything_but_its_state_calls():
    taylor, exponential = HostOffload(TaylorSeer(2, variable="sigma")), HostOffload(Exponential())
    assert taylor.variable == "sigma" and taylor.order == 2
    own = controller_signals(Exponential())  # what the controller gives every predictor
    assert controller_signals(taylor) == own | {"error_estimate"} and controller_signals(exponential) == own


def test_mapped_reaches_tensors_in_lists_and_stored_codes():
    scaled = Scaled(torch.zeros(2, dtype=torch.int8), torch.ones(1), torch.float32)
    value = [torch.ones(2), scaled, 3.0]
    assert len(tensors_in(value)) == 3
    doubled = mapped(value, lambda t: t * 2)
    assert doubled[1] is not scaled and doubled[1].scale.item() == 2 and doubled[2] == 3.0
    floats = [1.0, 2.0]
    assert mapped(floats, lambda t: t * 2) is floats  # nothing to map: the same object


@pytest.mark.parametrize("name", ["taylor o2", "dmd"])
def test_the_device_bytes_are_what_stays_on_the_device_and_the_host_bytes_the_rest(name):
    """With the states offloaded, ``cache_bytes`` (the device's) is the copies prefetched for the next
    site at a step's end and ``host_bytes`` the states waiting in host memory: the whole cache of the
    same run without offload; on the CPU, where nothing moves, everything stays on the device."""
    adapter = tiny_adapter()
    _, alone = generate(adapter, PREDICTORS[name]())
    _, cpu = generate(adapter, HostOffload(PREDICTORS[name]()))
    copies = Copies()
    offload = HostOffload(PREDICTORS[name](), transfers=lambda device: copies)
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), offload,
                    Interval(3, first_enhance=2))
    step, device = handle.step, []

    def step_counting_the_prefetched(s, t=None, **signals):  # at the previous step's end
        device.append(sum(copy.numel() * copy.element_size() for slot in offload._slots.values()
                          for _, copy in slot.prefetched.values()))
        return step(s, t, **signals)

    handle.step = step_counting_the_prefetched
    adapter.generate(adapter.make_inputs(3, seed=0), handle)
    stats = handle.stats()
    handle.remove()
    assert alone.stats().host_bytes == cpu.stats().host_bytes == 0
    assert cpu.stats().cache_bytes == alone.stats().cache_bytes > 0
    assert stats.host_bytes == alone.stats().cache_bytes
    assert 0 < stats.cache_bytes == max(device) == max(stats.site_bytes.values())  # one site's state at most
    assert stats.as_dict()["host_bytes"] == stats.host_bytes
