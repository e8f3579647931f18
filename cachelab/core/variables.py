"""The expansion variable of a forecast: the value x(s) of each denoising step s.

A predictor measures the distance between steps in one variable (``Predictor.variable``):
``step`` (x = s, the default), ``timestep`` (the sampler's t), ``sigma`` (the noise-to-signal
ratio) or ``logsnr`` (the log signal-to-noise ratio). The sampler knows its schedule before
its loop: it hands a :class:`StepGrid` to ``handle.begin(T, grid)`` and the controller gives
the predictor's states the values of their variable (:func:`positions`).

Closed forms (float64): a variance-preserving sampler (DDIM) with cumulative alpha ``a`` has
``sigma = sqrt((1 - a) / a)`` and ``logsnr = log(a / (1 - a))``; flow matching
(``x = (1 - sigma) x0 + sigma noise``) has its own ``sigma`` and ``logsnr = 2 log((1 - sigma) / sigma)``.
``logsnr`` is infinite where ``a`` is 0 or 1 (flow matching: ``sigma`` is 1 at its first step,
0 at the end): it is clamped to ``[-LOGSNR_LIMIT, LOGSNR_LIMIT]``, beyond any finite value of the
usual schedules (DiT's linear betas over 1000 steps: -10.1 .. 9.2). An infinite ``sigma``
(a zero terminal SNR, ``a = 0``) is refused when asked for.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cachelab.errors import ConfigError

VARIABLES = ("step", "timestep", "sigma", "logsnr")
LOGSNR_LIMIT = 20.0  # |logsnr| at sigma = 1 or 0 (flow matching), a = 0 or 1 (DDIM); ~ a sigma of 4.5e-5


def clamped_log_ratio(p: float, q: float, scale: float = 1.0) -> float:
    """``scale * log(p / q)`` for ``p, q >= 0`` (infinite where one is 0), clamped to
    ``[-LOGSNR_LIMIT, LOGSNR_LIMIT]``."""
    value = -math.inf if p <= 0 else math.inf if q <= 0 else scale * (math.log(p) - math.log(q))
    return max(-LOGSNR_LIMIT, min(LOGSNR_LIMIT, value))


@dataclass(frozen=True)
class StepGrid:
    """The values of the expansion variables at each step of one generation (index ``s``
    counted up); a variable the sampler cannot give is None. ``source`` names the sampler
    (for messages)."""

    timestep: tuple[float, ...] | None = None
    sigma: tuple[float, ...] | None = None
    logsnr: tuple[float, ...] | None = None
    source: str = "the sampler"

    @classmethod
    def from_alpha_bar(cls, timesteps: Sequence[float], alpha_bar: Sequence[float], source: str = "DDIM") -> StepGrid:
        """A variance-preserving sampler's steps: their timesteps and cumulative alphas."""
        alpha_bar = [float(a) for a in alpha_bar]
        sigma = tuple(math.sqrt((1.0 - a) / a) if a > 0 else math.inf for a in alpha_bar)
        logsnr = tuple(clamped_log_ratio(a, 1.0 - a) for a in alpha_bar)
        return cls(tuple(float(t) for t in timesteps), sigma, logsnr, source)

    @classmethod
    def from_flow_sigmas(cls, timesteps: Sequence[float], sigmas: Sequence[float],
                         source: str = "flow matching") -> StepGrid:
        """A flow-matching sampler's steps: their timesteps and sigmas (``x = (1 - sigma) x0 + sigma noise``)."""
        sigma = tuple(float(v) for v in sigmas)
        logsnr = tuple(clamped_log_ratio(1.0 - v, v, scale=2.0) for v in sigma)
        return cls(tuple(float(t) for t in timesteps), sigma, logsnr, source)

    def subset(self, steps: Sequence[int]) -> StepGrid:
        """The grid of a generation that runs only ``steps`` (in order): one expert's part of the run."""
        pick = lambda values: None if values is None else tuple(values[s] for s in steps)  # noqa: E731
        return StepGrid(pick(self.timestep), pick(self.sigma), pick(self.logsnr), self.source)

    def supplied(self) -> list[str]:
        """The variables this grid gives (``step`` always)."""
        return ["step"] + [name for name in VARIABLES[1:] if getattr(self, name) is not None]


def check_variable(variable) -> str:
    """``variable`` if it is one of :data:`VARIABLES`, else a ConfigError naming the key."""
    if variable not in VARIABLES:
        raise ConfigError(f"strategy.predictor.variable={variable!r} is not allowed; allowed: {', '.join(VARIABLES)}")
    return variable


def positions(variable: str, T: int, grid: StepGrid | None) -> tuple[float, ...] | None:
    """``x(0..T-1)`` of ``variable`` for a generation of ``T`` steps (None for ``step``: x = s);
    a ConfigError naming ``strategy.predictor.variable`` where the grid cannot give it (no grid,
    no such values, too few, infinite, or two steps at the same value)."""
    check_variable(variable)
    if variable == "step":
        return None
    supplied = grid.supplied() if grid is not None else ["step"]
    source = grid.source if grid is not None else "the sampler (no per-step grid: handle.begin(T) without one)"
    values = getattr(grid, variable) if grid is not None else None
    refusal = f"strategy.predictor.variable={variable!r}: {source}"
    others = f"allowed here: {', '.join(name for name in supplied if name != variable)}"
    if values is None:
        raise ConfigError(f"{refusal} does not supply the {variable} of its steps; {others}")
    if len(values) < T:
        raise ConfigError(f"{refusal} gives {len(values)} values of {variable} for {T} steps; {others}")
    values = tuple(values[:T])
    bad = next((s for s, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise ConfigError(f"{refusal} has {variable}={values[bad]} at step {bad}; {others}")
    tied = next((s for s in range(1, T) if values[s] == values[s - 1]), None)
    if tied is not None:
        raise ConfigError(f"{refusal} has the same {variable} at steps {tied - 1} and {tied} (no distance to "
                          f"expand over); {others}")
    return values
