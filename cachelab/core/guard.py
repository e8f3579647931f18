"""The non-finite guard: what a forecast holding NaN or Inf does."""
from __future__ import annotations

import math
import warnings
import torch

from cachelab.errors import ConfigError, NonFiniteError
from cachelab.core.outputs import Parts

# what a forecast holding NaN or Inf does: the site computes for real, an error, or nothing checked
GUARDS = ("fallback", "raise", "off")


class Guard:
    """Checks every forecast tensor for NaN and Inf. ``fallback`` lets such a site compute for
    real at that step instead (its history is kept as it was; one warning per generation, see
    :meth:`reset`), ``raise`` raises :class:`~cachelab.errors.NonFiniteError` naming the step,
    site and context, ``off`` checks nothing. ``predictor``: the name the messages give."""

    def __init__(self, policy, predictor: str):
        self.policy, self.predictor = guard_policy(policy), predictor
        self.warned = False

    def reset(self) -> None:
        """A new generation: its first fallback warns again."""
        self.warned = False

    def passes(self, forecast: Parts, group, s: int, site: str, context: str) -> bool:
        """Whether ``forecast`` of ``site`` at step ``s`` in ``context`` may replace the site's
        computation: every tensor finite (or ``off``), on every rank of ``group`` (a site computing
        on one rank only would wait for the others' collectives)."""
        if self.policy == "off":
            return True
        if group.everywhere(all(f is None or all_finite(f) for f in forecast)):
            return True
        where = f"the {self.predictor} forecast at step {s}, site {site}, context {context!r}"
        if self.policy == "raise":
            raise NonFiniteError(f"{where} holds NaN or Inf (guard=raise); allowed: guard=fallback (such a site "
                                 f"computes for real) or guard=off")
        if not self.warned:
            self.warned = True
            warnings.warn(f"cachelab: {where} holds NaN or Inf; the site computed for real instead (guard=fallback); "
                          f"further ones in this generation are only counted (stats: guard_fallbacks)",
                          RuntimeWarning, stacklevel=2)
        return False


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite. A sum is finite only if every term is (NaN
    and Inf propagate through additions), so one reduction settles the usual case (fp16 summed
    in fp32, whose range its sums cannot leave); a non-finite sum (a NaN or Inf element, or
    finite elements overflowing) is decided element by element. On this CPU the sum costs a
    fraction of ``torch.isfinite(tensor).all()`` (40 us against 1.2 ms for 3 MB of fp32)."""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
    return math.isfinite(total.item()) or bool(torch.isfinite(tensor).all())


def guard_policy(guard) -> str:
    """``guard`` checked against :data:`GUARDS` (YAML's ``off`` is False: read as "off")."""
    guard = "off" if guard is False else guard
    if guard not in GUARDS:
        raise ConfigError(f"guard={guard!r} is not allowed; allowed: {', '.join(GUARDS)}")
    return guard
