"""A tuning budget: one measured quantity and its threshold. Each kind says when a measurement
meets it, which additive error ranks the candidates, where the calibration runs aim and which
candidate is tried first."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

from cachelab.analysis.sensitivity import mse_from_psnr
from cachelab.core.arguments import Allowed
from cachelab.errors import ConfigError


class Target(ABC):
    """``value`` of the quantity :attr:`key` (a measurement or prediction holds ``speedup``,
    ``rel_l2`` and ``psnr_db``); the constructor refuses a value outside :attr:`allowed`."""

    key: ClassVar[str]
    allowed: ClassVar[Allowed]
    ranked_by_rel_l2: ClassVar[bool] = False  # the candidates' additive error: rel-L2 squared, else image MSE
    gentle_meets: ClassVar[bool] = True  # a quality budget: gentler settings meet it (a speed budget: faster ones)
    predicted: ClassVar[bool] = True  # the per-site search predicts it (else it is measured only: job.search=space)

    def __init__(self, value: float):
        self.allowed.check(self.key, value)
        self.value = float(value)

    @abstractmethod
    def slack(self, values: dict) -> float:
        """How far ``values`` are inside the target (>= 0: met): dB for PSNR, decades otherwise."""

    def met(self, values: dict) -> bool:
        """Whether ``values`` (measured or predicted) meet the target."""
        return self.slack(values) >= 0

    def error(self, setting) -> float:
        """The additive squared error that ranks ``setting`` (a :class:`~cachelab.jobs.tuning.records.Setting`)."""
        return setting.sq if self.ranked_by_rel_l2 else setting.mse

    def curve(self, curves) -> dict[int, float]:
        """The ranking error's curve (interval -> value) of :class:`~cachelab.jobs.tuning.records.ErrorCurves`."""
        return curves.sq if self.ranked_by_rel_l2 else curves.mse

    @abstractmethod
    def aim(self, settings: list) -> float:
        """The additive error the calibration runs are centred on (candidates fastest first)."""

    def risk(self, setting) -> float:
        """What a missed try bounds: a next candidate must be lower (safer) than every miss."""
        return self.error(setting)

    def best_first(self, ladder: list[int], settings: list, predicted: list[dict]) -> list[int]:
        """The candidates of ``ladder`` (indices), the one to try first first: the fastest, then
        the best predicted quality."""
        return sorted(ladder, key=lambda i: (-settings[i].speedup, -self.slack(predicted[i])))

    def objective(self, values: dict) -> float:
        """What the space search maximises among the settings that meet the target: the FLOPs speedup."""
        return values["speedup"]

    def as_dict(self) -> dict[str, float]:
        """``{key: value}``, as ``job.target`` gives it."""
        return {self.key: self.value}

    def __repr__(self) -> str:
        return f"{self.key} {self.value:g}"


class PsnrTarget(Target):
    """At least ``value`` dB of PSNR of the cached images against the full-compute ones."""

    key = "psnr"
    allowed = Allowed(lambda v: v > 0, "numbers > 0 (dB, PSNR of the cached images against the full-compute ones)")

    def slack(self, values: dict) -> float:
        return values["psnr_db"] - self.value

    def aim(self, settings: list) -> float:
        return mse_from_psnr(self.value)


class RelL2Target(Target):
    """At most ``value`` relative L2 of the cached result against the full-compute one."""

    key = "rel_l2"
    allowed = Allowed(lambda v: 0 < v < 1, "numbers between 0 and 1 (relative L2 against the full-compute result)")
    ranked_by_rel_l2 = True

    def slack(self, values: dict) -> float:
        return math.log10(self.value) - math.log10(values["rel_l2"])

    def aim(self, settings: list) -> float:
        return self.value ** 2


class SpeedupTarget(Target):
    """At least ``value`` FLOPs speedup; among those, the best predicted quality."""

    key = "speedup"
    allowed = Allowed(lambda v: v > 1, "numbers > 1 (FLOPs speedup)")
    gentle_meets = False

    def objective(self, values: dict) -> float:
        return values["psnr_db"]

    def slack(self, values: dict) -> float:
        return math.log10(values["speedup"]) - math.log10(self.value)

    def aim(self, settings: list) -> float:
        fast = [s for s in settings if s.speedup >= self.value] or settings[:1]
        return min(self.error(s) for s in fast)

    def risk(self, setting) -> float:
        return -setting.speedup

    def best_first(self, ladder: list[int], settings: list, predicted: list[dict]) -> list[int]:
        return sorted(ladder, key=lambda i: -predicted[i]["psnr_db"])


class WallSpeedupTarget(SpeedupTarget):
    """At least ``value`` wall-time speedup on this machine (each try timed against full compute in
    alternating pairs); among those, the best measured quality. Measured, never predicted."""

    key = "wall_speedup"
    allowed = Allowed(lambda v: v > 0, "numbers > 0 (wall-time speedup on this machine)")
    predicted = False

    def slack(self, values: dict) -> float:
        return math.log10(values["wall_speedup"]) - math.log10(self.value)

    def aim(self, settings: list) -> float:
        raise ConfigError(f"job.target.{self.key} is measured, not predicted; allowed with job.search=space")


TARGETS = {kind.key: kind for kind in (PsnrTarget, RelL2Target, SpeedupTarget, WallSpeedupTarget)}  # job.target.<key>
