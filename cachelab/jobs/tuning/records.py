"""What the tuner measures and predicts, as typed records: candidates (:class:`Setting`), the
sensitivity tables (:class:`SensitivityTable` of :class:`ErrorCurves`), the references, the cost
and error models, the tries and the tuning's own cost."""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cachelab.analysis.sensitivity import Calibration, anchored, mse_from_psnr, psnr_from_mse
from cachelab.core.schedules import Interval
from cachelab.core.sites import select_sites
from cachelab.evaluation.flops import count_flops_per_call
from cachelab.evaluation.metrics import psnr, relative_l2

UNIFORM_ON = re.compile(r"uniform_(\d+)_images")  # the file's key of the uniform runs on n images


@dataclass
class Setting:
    """A candidate: predictor family and order, one interval per site (``choice``: per group);
    its predicted FLOPs speedup and squared errors before calibration (rel-L2 squared ``sq``,
    image MSE ``mse``: :func:`cachelab.analysis.sensitivity.anchored` from its uniform start ``base``)."""

    family: str
    order: int
    choice: dict[str, int]
    intervals: dict[str, int]
    speedup: float
    sq: float
    mse: float
    base: int = 1  # the uniform interval its search started from (1: all computed)
    measured: dict | None = None  # a uniform one: rel_l2 and psnr_db measured on the tuning's images

    @property
    def uniform(self) -> bool:
        return len(set(self.choice.values())) == 1

    def label(self) -> str:
        """``taylor o2 N=5`` or ``taylor o2 per-site N 2..8``."""
        values = sorted(set(self.intervals.values()))
        spread = f"N={values[0]}" if len(values) == 1 else f"per-site N {values[0]}..{values[-1]}"
        return f"{self.family} o{self.order} {spread}"


@dataclass
class ErrorCurves:
    """Squared output errors by interval: the latents' rel-L2 squared (``sq``) and the images'
    mean squared error (``mse``)."""

    sq: dict[int, float] = field(default_factory=dict)
    mse: dict[int, float] = field(default_factory=dict)

    def add(self, interval: int, quality: dict) -> None:
        """The squared errors of one run at ``interval`` of rel-L2 and PSNR ``quality``."""
        self.sq[interval], self.mse[interval] = quality["rel_l2"] ** 2, mse_from_psnr(quality["psnr_db"])

    def as_dict(self) -> dict:
        return {"sq": self.sq, "mse": self.mse}

    @classmethod
    def from_dict(cls, data: dict) -> ErrorCurves:
        """From :meth:`as_dict`'s JSON (interval keys are strings there)."""
        return cls(*({int(n): v for n, v in data[kind].items()} for kind in ("sq", "mse")))


@dataclass
class SensitivityTable:
    """One predictor family at one order: each group's squared errors when it alone forecasts
    (``groups``), and those of every group forecasting at once (the uniform runs) on the
    sensitivity images (``uniform``) and on the tuning's ``n`` images (``uniform_on[n]``: the
    uniform candidates are measured, not predicted)."""

    groups: dict[str, ErrorCurves] = field(default_factory=dict)
    uniform: ErrorCurves | None = None
    uniform_on: dict[int, ErrorCurves] = field(default_factory=dict)

    def errors(self, pick: Callable[[ErrorCurves], dict[int, float]]) -> dict[str, dict[int, float]]:
        """Group -> interval -> the error ``pick`` takes from each group's curves."""
        return {g: pick(curves) for g, curves in self.groups.items()}

    def anchored(self, start: int, choice: dict[str, int]) -> tuple[float, float]:
        """The additive ``sq`` and ``mse`` of ``choice`` from the uniform interval ``start``."""
        return tuple(anchored(self.errors(pick), pick(self.uniform), start, choice)
                     for pick in (lambda c: c.sq, lambda c: c.mse))

    def as_dict(self) -> dict:
        """The file's form: ``sq`` and ``mse`` (group -> interval -> error), ``uniform`` and
        ``uniform_<n>_images``."""
        out = {"sq": {g: c.sq for g, c in self.groups.items()}, "mse": {g: c.mse for g, c in self.groups.items()}}
        if self.uniform is not None:
            out["uniform"] = self.uniform.as_dict()
        return {**out, **{f"uniform_{n}_images": c.as_dict() for n, c in self.uniform_on.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityTable:
        """From :meth:`as_dict`'s JSON."""
        groups = {g: ErrorCurves.from_dict({"sq": data["sq"][g], "mse": data["mse"][g]}) for g in data.get("sq", {})}
        uniform_on = {int(m.group(1)): ErrorCurves.from_dict(data[m.string]) for m in map(UNIFORM_ON.fullmatch, data)
                      if m}
        uniform = ErrorCurves.from_dict(data["uniform"]) if "uniform" in data else None
        return cls(groups, uniform, uniform_on)


@dataclass
class Reference:
    """Inputs and their full-compute latents and images, to score cached generations against."""

    inputs: object
    latents: object
    images: object

    @classmethod
    def generate(cls, adapter, num_images: int, seed: int) -> Reference:
        inputs = adapter.make_inputs(num_images, seed)
        latents = adapter.generate(inputs)
        return cls(inputs, latents, adapter.decode(latents))

    @property
    def count(self) -> int:
        """How many images it holds."""
        return len(self.latents)

    def quality(self, adapter, latents) -> dict:
        """rel-L2 of ``latents`` and PSNR of their images against the full-compute ones."""
        return {"rel_l2": relative_l2(latents, self.latents), "psnr_db": psnr(adapter.decode(latents), self.images)}


class CostModel:
    """Predicted FLOPs speedup of per-site intervals: each forecast step of a site saves that
    site's per-step FLOPs, measured once with ``torch.utils.flop_counter`` on a full generation."""

    def __init__(self, total: int, site_flops: dict[str, int], T: int, first_enhance: int):
        self.total, self.site_flops, self.T, self.first_enhance = total, dict(site_flops), T, first_enhance

    @classmethod
    def measure(cls, adapter, granularity: str, images: int, seed: int, first_enhance: int) -> CostModel:
        """Count a full generation of ``images`` images, the FLOPs inside every site on its own
        (a skip site's count towards its consumer, which decides for it)."""
        sites = select_sites(adapter.model, adapter.site_patterns(granularity))
        inputs = adapter.make_inputs(images, seed)
        _, total, counts = count_flops_per_call(lambda: adapter.generate(inputs),
                                                {site.name: (site.owner, site.method) for site in sites})
        site_flops: dict[str, int] = {}
        for site in sites:
            site_flops[site.decision_name] = site_flops.get(site.decision_name, 0) + counts[site.name]
        return cls(total, site_flops, adapter.num_steps, first_enhance)

    def forecasts(self, interval: int) -> int:
        """Forecast steps of one site at ``interval``."""
        return self.T - sum(Interval(interval, self.first_enhance).mask(self.T))

    def saving(self, site: str, interval: int) -> float:
        """The share of the full generation's FLOPs that ``site`` at ``interval`` saves."""
        return self.site_flops[site] * self.forecasts(interval) / self.T / self.total

    def speedup(self, intervals: dict[str, int]) -> float:
        """The predicted FLOPs speedup of ``intervals`` (site -> N; unnamed sites always compute)."""
        return 1 / (1 - sum(self.saving(site, n) for site, n in intervals.items()))


class ErrorModel:
    """A configuration's output rel-L2 and PSNR from its additive squared errors, each through a
    :class:`~cachelab.analysis.sensitivity.Calibration` fitted on real full-configuration runs."""

    def __init__(self, points: list[dict]):
        self.points = points
        self.sq = Calibration([(p["sq"], p["rel_l2"] ** 2) for p in points])
        self.mse = Calibration([(p["mse"], mse_from_psnr(p["psnr_db"])) for p in points])

    def predict(self, setting: Setting) -> dict:
        """The predicted ``speedup``, ``rel_l2`` and ``psnr_db`` of ``setting`` (a measured
        uniform one: its measurement)."""
        if setting.measured is not None:
            return {"speedup": setting.speedup, **setting.measured}
        return {"speedup": setting.speedup, "rel_l2": math.sqrt(self.sq(setting.sq)),
                "psnr_db": psnr_from_mse(self.mse(setting.mse))}

    def as_dict(self) -> dict:
        """The fits and their points, for tune.json."""
        return {"rel_l2_squared": self.sq.as_dict(), "image_mse": self.mse.as_dict(), "points": self.points}


@dataclass
class Try:
    """One verification: the candidate (``index`` in the candidate list), its prediction, the
    measurement, whether it met the target, its full steps and its compare folder."""

    index: int
    setting: Setting
    predicted: dict
    measured: dict
    met: bool
    full_steps: list[int]
    folder: str

    def as_dict(self) -> dict:
        """The try as tune.json lists it."""
        s = self.setting
        return {"index": self.index, "setting": s.label(), "family": s.family, "order": s.order, "uniform": s.uniform,
                "intervals": s.intervals, "sq": s.sq, "mse": s.mse, "predicted": self.predicted,
                "measured": self.measured, "met": self.met, "full_steps": self.full_steps, "folder": self.folder}


class Clock:
    """The tuning's cost: real generations and seconds, per phase."""

    def __init__(self):
        self.phases: dict[str, dict] = {}

    def add(self, phase: str, start: float, runs: int = 1) -> None:
        entry = self.phases.setdefault(phase, {"runs": 0, "seconds": 0.0})
        entry["runs"] += runs
        entry["seconds"] += time.perf_counter() - start

    def as_dict(self) -> dict:
        return {**self.phases, "total": {"runs": sum(p["runs"] for p in self.phases.values()),
                                         "seconds": sum(p["seconds"] for p in self.phases.values())}}
