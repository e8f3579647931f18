"""TaylorSeer (Liu et al., ICCV 2025): Taylor forecast on recursive finite differences.

Three ablations share its update and its Horner evaluation: ``difference="newton"`` (divided
differences on the actual step grid: exact polynomial extrapolation), ``damping`` of the
orders above one, and ``variable``: distances measured in the timestep, sigma or log-SNR
instead of the step index (:mod:`cachelab.core.variables`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import Annotated

import torch

from cachelab.core.arguments import Allowed, between, checked, in_range
from cachelab.core.predictor import Predictor, PredictorState, relative_norm
from cachelab.core.schedules import WarmUp
from cachelab.core.storage import CODECS, Codec, Stored, decode, held, is_storage
from cachelab.core.tokens import scatter_tokens
from cachelab.core.variables import check_variable
from cachelab.errors import ConfigError

STORAGE = Allowed(is_storage, f"null, one of {' | '.join(CODECS)}, or a list of them (one per derivative order, "
                              f"the last repeating)", "is not a factor storage")
_DIFFERENCES = ("official", "newton")
# Beyond this the finite differences of float features are noise (the paper uses 1-4), and every
# full step of every site would keep order + 1 factors: a larger order is refused, not truncated.
MAX_ORDER = 16


@dataclass
class TaylorState(PredictorState):
    """Taylor factors ``D_0..D_j`` of one site at its last full step; ``order``: the site's own
    (None: the predictor's)."""

    factors: list[Stored] = field(default_factory=list)
    last_step: int | None = None
    out_dtype: torch.dtype | None = None
    positions: Sequence[float] | None = None
    order: int | None = None

    def tensors(self) -> list[torch.Tensor]:
        return held(self.factors)

    @property
    def order_reached(self) -> int | None:
        """The highest factor held: ``D_0..D_j`` is order ``j`` (None before any full step)."""
        return len(self.factors) - 1 if self.factors else None


@dataclass
class NewtonState(TaylorState):
    """Factors ``D_i = i! f[x_0..x_i]`` (divided differences, newest step first: derivative
    estimates on the actual grid) and the positions ``x_0, x_1, ...`` they were taken at (the
    steps ``s_0, s_1, ...`` themselves for ``variable="step"``)."""

    steps: list[float] = field(default_factory=list)


class TaylorSeer(Predictor):
    """TaylorSeer of any order ``m >= 0``, the official rule (docs/library/taylorseer.md), and its ablations.

    At a full step ``s`` the new factors are ``D_0 = F`` and
    ``D_{i+1} = (new D_i - old D_i) / (s - s_last)`` for as long as the old factor
    exists (the order grows by at most one per full step) and derivatives are allowed
    (``s > first_enhance - 2``). A forecast ``k`` steps later is ``sum_i D_i k^i / i!``,
    evaluated by Horner's rule. Order 0 is reuse (FORA).

    ``difference="newton"`` takes the factors on the actual grid of the last ``m + 1`` full
    steps ``s_0 > s_1 > ...`` instead: ``D_{i+1} = (i + 1) (new D_i - old D_i) / (s - s_i)``,
    i.e. ``D_i = i! f[s_0..s_i]`` (the official factors on a uniform grid), and forecasts with
    the Newton form ``sum_i D_i / i! prod_{j<i} (s - s_j)``: the exact extrapolation of the
    polynomial of degree <= m through those values.
    ``damping`` multiplies the i-th order term of either forecast by ``damping**(i-1)`` for
    ``i >= 2`` (1.0 leaves it unchanged).

    ``variable`` (``step`` | ``timestep`` | ``sigma`` | ``logsnr``): every distance above is
    measured in ``x(s)``, the variable's value at step ``s`` (``state.position(s)``), instead of
    ``s``: the official rule divides by ``x(s) - x(s_last)`` and forecasts
    ``sum_i D_i (x(s) - x(s_last))^i / i!``; Newton takes its divided differences on the grid
    ``x(s_0), x(s_1), ...`` (exact for polynomials in ``x``). The warm-up (``first_enhance``)
    stays counted in steps. ``step`` computes exactly as without the knob.

    ``factor_dtype`` (:mod:`cachelab.core.storage`): how each factor is stored, a name for every
    order or a list with one per order (the last repeating): ``null`` keeps the module's dtype;
    a float dtype stores and computes in it; fp8 and int8 store scaled codes, and each factor is
    decoded to the module's dtype where it is used. The differences are taken between stored
    (decoded) factors, as with a float dtype.
    ``site_orders`` (order -> regexes of site names): a site whose name fully matches one of an
    order's patterns keeps that order instead of ``order`` (high orders only where they pay:
    ``{1: ["blocks\\.[4-7]\\..*"]}``; on the command line
    ``strategy.predictor.site_orders="{1: ['blocks\\.[4-7]\\..*']}"``). When the strategy is
    attached, a pattern that matches no site, or a site that patterns of two orders match, is refused.
    """

    @checked
    def __init__(self, order: Annotated[int, between(0, MAX_ORDER)], first_enhance: WarmUp = 1,
                 factor_dtype: Annotated[str | Sequence[str] | None, STORAGE] = None, difference: str = "official",
                 damping: Annotated[float, in_range(0, 1)] = 1.0, variable: str = "step",
                 site_orders: dict[int, list[str]] | None = None):
        if difference not in _DIFFERENCES:
            raise ValueError(f"difference must be one of {list(_DIFFERENCES)}, got {difference!r}")
        check_variable(variable)
        self.order = order
        self.first_enhance = first_enhance
        self.factor_dtype = storage_names(factor_dtype)
        self.newton = difference == "newton"
        self.damping = damping
        self.variable = variable
        self.site_orders = site_orders_checked(site_orders)

    def new_state(self) -> TaylorState:
        return NewtonState() if self.newton else TaylorState()

    def new_state_for(self, site: str) -> TaylorState:
        state = self.new_state()
        state.order = self.order_of(site)
        return state

    def orders_of(self, site: str) -> set[int]:
        """The ``site_orders`` orders with a pattern matching ``site``."""
        return {o for o, patterns in self.site_orders.items() if any(re.fullmatch(p, site) for p in patterns)}

    def order_of(self, site: str) -> int:
        """The order ``site`` keeps: the ``site_orders`` order matching it, else ``order``."""
        return min(self.orders_of(site), default=self.order)

    def check_sites(self, names: Sequence[str]) -> None:
        idle = [p for patterns in self.site_orders.values() for p in patterns
                if not any(re.fullmatch(p, name) for name in names)]
        if idle:
            raise ConfigError(f"strategy.predictor.site_orders: the pattern(s) {', '.join(map(repr, idle))} match no "
                              f"cache site; allowed: regexes matching site names, here {', '.join(names)}")
        both = [name for name in names if len(self.orders_of(name)) > 1]
        if both:
            raise ConfigError(f"strategy.predictor.site_orders: site {both[0]} is matched under orders "
                              f"{sorted(self.orders_of(both[0]))}; allowed: patterns giving each site one order")

    def derivatives_allowed(self, s: int) -> bool:
        return s > self.first_enhance - 2

    def codec(self, i: int) -> Codec | None:
        """How factor ``D_i`` is stored (None: as the module gives it)."""
        names = self.factor_dtype
        return None if names is None else CODECS[names[min(i, len(names) - 1)]]

    def encode(self, i: int, factor: torch.Tensor) -> Stored:
        """``D_i`` as it is stored."""
        codec = self.codec(i)
        return factor if codec is None else codec.encode(factor)

    @staticmethod
    def decoded(state: TaylorState) -> list[torch.Tensor]:
        """The factors as tensors (a float-stored factor is its own tensor)."""
        return [decode(f) for f in state.factors]

    def update(self, state: TaylorState, s: int, value: torch.Tensor) -> None:
        new = [self.encode(0, value)]
        order = self.order if state.order is None else state.order
        x = self.position(state, s)
        if state.has_history:
            self.gap(state, s)
            if self.derivatives_allowed(s):
                if self.newton:
                    spans = [(x - t) / (i + 1) for i, t in enumerate(state.steps)]
                else:
                    spans = [x - state.position(state.last_step)] * order
                old = state.factors
                count = min(len(old), order)
                # No allocation once the order is reached: D_1 goes into the dropped top factor's
                # memory, D_{i+1} into old D_i's (needed by nothing after this difference). Old D_0
                # is never written: it can be the model's own output tensor.
                buffers = [old[count] if len(old) > count else None, *old[1:count]]
                for i, span in enumerate(spans[:count]):
                    later, earlier = decode(new[i]), decode(old[i])
                    difference = torch.sub(later, earlier, out=reusable(buffers[i], later)).div_(span)
                    new.append(self.encode(i + 1, difference))
        state.factors = new
        state.last_step = s
        state.out_dtype = value.dtype
        if self.newton:
            state.steps = [x, *state.steps][: len(new)]

    def position(self, state: TaylorState, s: int) -> float:
        """``x(s)``; a variable other than ``step`` needs the positions the controller sets."""
        if self.variable != "step" and state.positions is None:
            raise ValueError(f"TaylorSeer(variable={self.variable!r}) has no {self.variable} values for its steps: "
                             f"the sampler gave none (handle.begin(T, grid) with a StepGrid)")
        return state.position(s)

    def refresh(self, state: TaylorState, index: torch.Tensor, values: torch.Tensor) -> None:
        """ToCa's and ClusCa's cache update: ``D_0`` takes the fresh tokens, the derivative factors
        and the last full step stay (a new tensor: ``D_0`` may be shown to observers)."""
        state.factors[0] = self.encode(0, scatter_tokens(decode(state.factors[0]), index, values))

    def multipliers(self, state: TaylorState, s: int, k: float, top: int) -> list[float]:
        """``a_1..a_top`` of the nested form ``D_0 + a_1 (D_1 + a_2 (D_2 + ...))``: ``k / i``
        (official; ``k = x(s) - x(s_last)``) or ``(x(s) - x_{i-1}) / i`` (newton), times
        ``damping`` for ``i >= 2``."""
        if self.newton:
            x = self.position(state, s)
            a = [(x - t) / i for i, t in enumerate(state.steps[:top], start=1)]
        else:
            a = [k / i for i in range(1, top + 1)]
        return [a[0]] + [x * self.damping for x in a[1:]]

    def predict(self, state: TaylorState, s: int) -> torch.Tensor:
        self.gap(state, s)
        k = self.position(state, s) - state.position(state.last_step)
        factors = self.decoded(state)
        if len(factors) == 1:
            return factors[0].to(state.out_dtype)
        # Horner: D0 + a1(D1 + a2(D2 + a3(...))); one fused op per order, one allocation (in the
        # widest of the factors' dtypes).
        top = len(factors) - 1
        a = self.multipliers(state, s, k, top)
        acc = torch.add(factors[top - 1], factors[top], alpha=a[top - 1])
        acc = acc.to(reduce(torch.promote_types, (f.dtype for f in factors)))
        for i in range(top - 2, -1, -1):
            torch.add(factors[i], acc, alpha=a[i], out=acc)
        return acc.to(state.out_dtype)

    def error_terms(self, state: TaylorState, s: int) -> torch.Tensor:
        """The sums behind :meth:`error_estimate`: ``[sum gap^2, sum D_0^2]`` (float64), where the
        gap is between the forecast from every factor and the one without the top factor (zero
        without any); sums add up over the shards of a context-parallel generation."""
        forecast = self.predict(state, s).double()
        lower = self.predict(replace(state, factors=state.factors[:-1]), s).double() if len(state.factors) > 1 else 0
        return torch.stack([(forecast - lower).square().sum(), decode(state.factors[0]).double().square().sum()])

    def error_estimate(self, state: TaylorState, s: int) -> float:
        """The forecast's own error estimate at step ``s``: the norm of the gap (:meth:`error_terms`)
        relative to the norm of the last full value ``D_0`` (what ``schedule=error_controlled`` reads)."""
        return float(relative_norm(self.error_terms(state, s)))


def site_orders_checked(site_orders) -> dict[int, list[str]]:
    """``site_orders`` as orders in 0..MAX_ORDER to lists of valid regexes (None: empty)."""
    out = {order: [patterns] if isinstance(patterns, str) else list(patterns)
           for order, patterns in (site_orders or {}).items()}
    for order, patterns in out.items():
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
            raise ValueError(f"site_orders: the order {order!r} is not allowed; allowed: integers 0..{MAX_ORDER}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"site_orders: {pattern!r} is not a regex ({err})") from None
    return out


def storage_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``factor_dtype`` as a tuple of storage names, one per order from 0 (the last repeating); None as is."""
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def reusable(buffer: Stored | None, like: torch.Tensor) -> torch.Tensor:
    """``buffer`` if it is a tensor that can hold a result shaped and typed like ``like``, else new memory."""
    if isinstance(buffer, torch.Tensor) and buffer.shape == like.shape and buffer.dtype == like.dtype:
        return buffer
    return torch.empty_like(like)
