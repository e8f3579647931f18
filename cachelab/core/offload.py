"""Host offload of the predictor states between their uses (``cache.offload=true``).

:class:`HostOffload` wraps any predictor. Each site's state (every tensor it holds, whichever
predictor made it: Taylor factors, stored codes and scales, window values) lives in host memory
and is on the device only while the predictor uses it (``update``, ``predict``, ``refresh``,
``error_terms``). On CUDA the host memory is pinned, the copies are ``non_blocking``, and after a
site is used the state that followed it last time (the next site: the order is learned from the
calls, so it holds for every schedule, granularity and context) is copied to the device on a
side stream, while the model computes up to that site. The device then holds the state in use
and one prefetched state, instead of every site's.

Nothing moves where the values are not on CUDA (the CPU, meta tensors): there the wrapper only
follows the calls, and every result is bit for bit the wrapped predictor's. The planner passes
its own transfers (:class:`cachelab.planner.MetaCopies`), so a plan moves the states as CUDA does. The
bookkeeping lives beside each state and is dropped with it: nothing outlives a generation.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cachelab.core.predictor import PredictorState

STATE_READS = ("error_terms", "error_estimate")  # predictor methods that read a state (first argument)


class Transfers:
    """Copies between the host and one CUDA device: pinned host memory, ``non_blocking`` copies,
    prefetches on a side stream that the device's current stream waits for before using them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def prefetch(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        """Device copies of ``tensors`` made on the side stream (after what the current stream has
        queued: the host copies they read), and the event that marks them done."""
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            copies = [self.to_device(t) for t in tensors]
        return copies, self.side.record_event()

    def ready(self, copies: list[torch.Tensor], event) -> None:
        """The current stream waits for ``event``; the copies are used on it from now on."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for copy in copies:
            copy.record_stream(current)


def cuda_transfers(device: torch.device) -> Transfers | None:
    """:class:`Transfers` for a CUDA device; None (nothing moves) for any other."""
    return Transfers(device) if device.type == "cuda" else None


@dataclass
class Slot:
    """What the wrapper keeps beside one state: its device, the state used after it last time,
    and the device copies prefetched for it (host tensor id -> (host tensor, copy)) with their event."""

    device: torch.device | None = None
    following: weakref.ref | None = None
    prefetched: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    event: object = None


class HostOffload:
    """``predictor`` with its states in host memory between uses (module docstring). Every
    attribute but the calls that use a state is the wrapped predictor's own. ``transfers``: the
    copies for a device (:func:`cuda_transfers`; None where nothing moves)."""

    def __init__(self, predictor, transfers: Callable[[torch.device], Transfers | None] = cuda_transfers):
        self.inner = predictor
        self._transfers_for = transfers
        self._transfers: dict[torch.device, Transfers | None] = {}
        self._slots: dict[int, Slot] = {}
        self._last: weakref.ref | None = None  # the state used last
        self._pending: weakref.ref | None = None  # the state whose copies are prefetched

    def __getattr__(self, name: str):
        if "inner" not in self.__dict__:  # while being copied
            raise AttributeError(name)
        attribute = getattr(self.inner, name)
        if name in STATE_READS:
            return lambda state, *args, **kwargs: self._use(state, lambda: attribute(state, *args, **kwargs),
                                                            learn=False)
        return attribute

    def __repr__(self) -> str:
        return f"HostOffload({self.inner!r})"

    def update(self, state: PredictorState, s: int, value: torch.Tensor) -> None:
        self._use(state, lambda: self.inner.update(state, s, value), device=value.device, writes=True)

    def predict(self, state: PredictorState, s: int) -> torch.Tensor:
        return self._use(state, lambda: self.inner.predict(state, s))

    def refresh(self, state: PredictorState, index: torch.Tensor, values: torch.Tensor) -> None:
        self._use(state, lambda: self.inner.refresh(state, index, values), writes=True)

    def host_nbytes(self, state: PredictorState) -> int:
        """The bytes of ``state`` waiting in host memory: all of them where they move, none where
        nothing moves."""
        slot = self._slots.get(id(state))
        return state.nbytes if slot is not None and self._transfers_of(slot.device) is not None else 0

    @property
    def prefetched_nbytes(self) -> int:
        """The bytes of the device copies prefetched for the next state."""
        pending = self._pending() if self._pending is not None else None
        copies = [] if pending is None else self._slot(pending).prefetched.values()
        return sum(copy.numel() * copy.element_size() for _, copy in copies)

    # -- the state's way to the device and back ---------------------------------------------------
    def _use(self, state: PredictorState, call: Callable, device: torch.device | None = None, writes: bool = False,
             learn: bool = True):
        """``call()`` with ``state``'s tensors on its device; afterwards back on the host: copied
        there when ``call`` may have changed them (``writes``), else the host tensors restored
        (:func:`restore`: what the call replaced goes to the host too)."""
        slot = self._slot(state)
        slot.device = device or slot.device
        transfers = self._transfers_of(slot.device)
        if transfers is None:
            result = call()
        else:
            held = dict(vars(state))
            self._fetch(state, slot, transfers)
            fetched = dict(vars(state))
            try:
                result = call()
            finally:
                if writes:
                    to_host = once(transfers.to_host)
                    for name, value in vars(state).items():
                        setattr(state, name, mapped(value, to_host))
                else:
                    restore(state, held, fetched, transfers)
        if learn:
            self._follow(state, slot, transfers)
        return result

    def _fetch(self, state: PredictorState, slot: Slot, transfers: Transfers) -> None:
        """Replace ``state``'s host tensors by device copies (the prefetched ones where made)."""
        prefetched, slot.prefetched = slot.prefetched, {}
        if prefetched:
            transfers.ready([copy for _, copy in prefetched.values()], slot.event)

        @once
        def to_device(tensor: torch.Tensor) -> torch.Tensor:
            host, copy = prefetched.get(id(tensor), (None, None))
            return copy if host is tensor else transfers.to_device(tensor)

        for name, value in vars(state).items():
            setattr(state, name, mapped(value, to_device))

    def _follow(self, state: PredictorState, slot: Slot, transfers: Transfers | None) -> None:
        """Learn that ``state`` follows the last state used; prefetch the state that followed it."""
        last = self._last() if self._last is not None else None
        if last is not None and last is not state:
            self._slot(last).following = weakref.ref(state)
        self._last = weakref.ref(state)
        following = slot.following() if slot.following is not None else None
        if transfers is not None and following is not None:
            self._prefetch(following, transfers)

    def _prefetch(self, state: PredictorState, transfers: Transfers) -> None:
        """Copy ``state``'s tensors to the device ahead of its use (dropping copies made for another
        state and not used: one prefetched state at a time)."""
        pending = self._pending() if self._pending is not None else None
        if pending is not None and pending is not state:
            self._slot(pending).prefetched = {}
        slot = self._slot(state)
        if not slot.prefetched:
            hosts = list({id(t): t for t in tensors_in(list(vars(state).values()))}.values())
            copies, slot.event = transfers.prefetch(hosts)
            slot.prefetched = {id(host): (host, copy) for host, copy in zip(hosts, copies)}
        self._pending = weakref.ref(state)

    def _slot(self, state: PredictorState) -> Slot:
        key = id(state)
        if key not in self._slots:
            self._slots[key] = Slot()
            weakref.finalize(state, self._slots.pop, key, None)
        return self._slots[key]

    def _transfers_of(self, device: torch.device | None) -> Transfers | None:
        if device is None:
            return None
        if device not in self._transfers:
            self._transfers[device] = self._transfers_for(device)
        return self._transfers[device]


def restore(state: PredictorState, held: dict, fetched: dict, transfers: Transfers) -> None:
    """``state`` back on the host after a call that reads it: each attribute as it was before
    ``fetched`` (its device copies) replaced it, unless the call replaced it in turn (FoCa's forecast
    window, DMD's fit): then the fetched copies in it are their host tensors again and its new
    tensors are copied to the host."""
    replaced = {name: value for name, value in vars(state).items() if value is not fetched.get(name)}
    vars(state).update(held)
    if not replaced:
        return
    hosts = {id(copy): (copy, host) for name in held
             for host, copy in zip(tensors_in(held[name]), tensors_in(fetched[name]))}

    @once
    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        copy, host = hosts.get(id(tensor), (None, None))
        return host if copy is tensor else transfers.to_host(tensor)

    for name, value in replaced.items():
        setattr(state, name, mapped(value, to_host))


def once(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` called once per tensor: a tensor met again (a state holding it twice, as FoCa's anchors
    and window or DMD's values and Taylor factors do) gets the first result, so one copy moves."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        seen, result = done.get(id(tensor), (None, None))
        if seen is not tensor:
            result = fn(tensor)
            done[id(tensor)] = (tensor, result)
        return result

    return apply


def mapped(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``value`` with ``fn`` applied to every tensor in it (inside lists, tuples and dataclasses,
    e.g. stored codes and their scales); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        new = [mapped(v, fn) for v in value]
        return value if all(n is v for n, v in zip(new, value)) else type(value)(new)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        new = {f.name: mapped(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return value if all(new[k] is getattr(value, k) for k in new) else dataclasses.replace(value, **new)
    return value


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor in ``value``, in the order :func:`mapped` visits them."""
    found: list[torch.Tensor] = []
    mapped(value, lambda t: found.append(t) or t)
    return found
