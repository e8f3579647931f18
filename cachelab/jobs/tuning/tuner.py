"""The tuner on plain values: the fastest per-site interval configuration predicted to meet a
:class:`~cachelab.jobs.tuning.targets.Target`, verified by a caller's measurement (the method:
:mod:`cachelab.jobs.tune`'s docstring)."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cachelab.analysis.sensitivity import greedy_path, psnr_from_mse
from cachelab.core.arguments import Allowed
from cachelab.core.predictor import Predictor
from cachelab.core.schedules import PerSiteInterval
from cachelab.core.strategy import Strategy
from cachelab.errors import ConfigError
from cachelab.io import write_json_atomic
from cachelab.jobs.atlas import site_depth
from cachelab.jobs.tuning.budget import CacheBudget
from cachelab.jobs.tuning.records import (Clock, CostModel, ErrorCurves, ErrorModel, Reference, SensitivityTable,
                                          Setting, Try)
from cachelab.jobs.tuning.targets import Target

log = logging.getLogger(__name__)

CALIBRATION_SPAN = 0.4  # decades of squared error around the target that the calibration runs cover
NEAR = 0.05  # decades: candidates this close to a calibration aim count as equally near (the fastest wins)
GROUPINGS = Allowed(lambda group: group in ("site", "block"), "site, block", "is not allowed")  # a site alone, a block


@dataclass(frozen=True)
class TuneOptions:
    """How the tuner searches: the predictor ``orders`` and per-site ``intervals`` tried (1, always
    computing, is always one), the warm-up, ``group`` (``site`` | ``block``: what shares one
    interval), the images of each sensitivity run, the file the sensitivities are kept in (None:
    none), the real runs that calibrate the error model and the verifications at most."""

    orders: Sequence[int]
    intervals: Sequence[int]
    first_enhance: int
    group: str = "site"
    sensitivity_images: int = 2
    sensitivity_file: str | None = None
    calibration_runs: int = 2
    max_tries: int = 3

    def __post_init__(self):
        GROUPINGS.check("group", self.group)
        object.__setattr__(self, "orders", tuple(self.orders))
        object.__setattr__(self, "intervals", tuple(sorted(set(self.intervals) - {1})))


@dataclass(frozen=True)
class Bench:
    """What the tuner measures on: the model adapter, the sites' granularity, the images' seed,
    the tuning's number of images and of images counted for FLOPs, the NaN guard of the cached
    runs, whether generations show progress and the cache budget (None: none)."""

    adapter: object
    granularity: str
    seed: int
    num_images: int
    flops_images: int
    guard: str = "fallback"
    progress: bool = False
    budget: CacheBudget | None = None


@dataclass(frozen=True)
class Verification:
    """A verifier's measurement of a candidate: ``speedup``, ``rel_l2``, ``psnr_db`` (``measured``),
    its full steps and the folder it wrote."""

    measured: dict
    full_steps: list[int]
    folder: str


Verifier = Callable[[Setting, int], Verification]  # (candidate, attempt) -> its measurement


@dataclass
class Tuning:
    """What a tuning found: ``result`` (tune.json's content) and the verified candidate with its
    measurement, where one met the target."""

    result: dict
    chosen: Setting | None
    measured: dict | None


class Tuner:
    """The search (module docstring of :mod:`cachelab.jobs.tune`) for ``target``, over ``families``
    (name -> predictor factory called with ``order=``) and ``options``."""

    def __init__(self, target: Target, families: Mapping[str, Callable[..., Predictor]], options: TuneOptions):
        self.target, self.families, self.options = target, dict(families), options

    def run(self, bench: Bench, verify: Verifier) -> Tuning:
        """Measure, search, calibrate, verify (at most ``max_tries`` times); returns the tuning."""
        clock = Clock()
        cost, small, full = self.references(bench, clock)
        groups = self.groups(list(cost.site_flops))
        pairs, budget = self.pairs(), None
        if bench.budget is not None:  # planned before any cached run: a pair over it is never run
            pairs, budget = bench.budget.fitting(lambda s: self.strategy(s, bench.granularity), pairs,
                                                 list(cost.site_flops))
        tables, reused = self.sensitivity_tables(bench, groups, small, full, clock, pairs)
        settings = self.settings(tables, groups, cost, full.count)
        log.info(f"tune: {len(settings)} candidates from {reused['runs']} sensitivity runs "
                 f"({'reused from ' + str(reused['file']) if reused['file'] else 'measured'}) "
                 f"at {len(groups)} groups of {len(cost.site_flops)} sites")
        runs = self.options.calibration_runs
        points = [self.point(bench, setting, full, small, clock, f"tune: calibration {i + 1}/{runs}")
                  for i, setting in enumerate(self.calibration_picks(settings))]
        tries, model, predicted = self.verified(settings, ErrorModel(points), verify, clock)
        chosen = next((t for t in tries if t.met), None)
        uniform = next((settings[i] for i in self.ladder(settings, predicted, []) if settings[i].uniform), None)
        result = {"target": self.target.as_dict(), "met": chosen is not None, "num_candidates": len(settings),
                  "num_uniform_candidates": sum(s.uniform for s in settings), "groups": groups,
                  "site_flops_share": {s: f / cost.total for s, f in cost.site_flops.items()},
                  "flops_full": cost.total, "sensitivity_images": self.options.sensitivity_images,
                  "sensitivity": {f"{f}_o{o}": t.as_dict() for (f, o), t in tables.items()},
                  "sensitivity_measured": reused, "error_model": model.as_dict(),
                  "tries": [t.as_dict() for t in tries], "cost": clock.as_dict(),
                  "best_uniform_candidate": None if uniform is None else
                  {"setting": uniform.label(), "predicted": model.predict(uniform)},
                  "chosen": None if chosen is None else chosen.setting.label(), "cache_budget": budget}
        return Tuning(result, None if chosen is None else chosen.setting, None if chosen is None else chosen.measured)

    def references(self, bench: Bench, clock: Clock) -> tuple[CostModel, Reference, Reference]:
        """The cost model, and the full-compute references of the sensitivity runs and of the tuning."""
        start = time.perf_counter()
        cost = CostModel.measure(bench.adapter, bench.granularity, bench.flops_images, bench.seed,
                                 self.options.first_enhance)
        small = Reference.generate(bench.adapter, self.options.sensitivity_images, bench.seed)
        full = Reference.generate(bench.adapter, bench.num_images, bench.seed)
        clock.add("full-compute references and FLOPs count", start, 3)
        return cost, small, full

    def verified(self, settings: list[Setting], model: ErrorModel, verify: Verifier,
                 clock: Clock) -> tuple[list[Try], ErrorModel, list[dict]]:
        """Verify the best candidate predicted to meet the target until one does (at most
        ``max_tries``): a miss is one more calibration point, the model is refitted and a safer
        candidate is tried next. Returns the tries, the last model and the last try's predictions."""
        tries: list[Try] = []
        predicted = [model.predict(s) for s in settings]
        for attempt in range(self.options.max_tries):
            predicted = [model.predict(s) for s in settings]
            ladder = self.ladder(settings, predicted, tries)
            if not ladder:
                if tries:
                    break
                raise self.unreachable(predicted)
            index = ladder[0]
            setting = settings[index]
            start = time.perf_counter()
            verification = verify(setting, attempt)
            clock.add("verification (job=compare)", start, 4)  # counted and timed, both sides
            measured = verification.measured
            tries.append(Try(index, setting, predicted[index], measured, self.target.met(measured),
                             verification.full_steps, verification.folder))
            log.info(f"tune: try {attempt + 1}: {setting.label()}: predicted {predicted[index]['speedup']:.2f}x, "
                     f"{predicted[index]['psnr_db']:.1f} dB; measured {measured['speedup']:.2f}x, "
                     f"{measured['psnr_db']:.1f} dB: {'meets' if tries[-1].met else 'misses'} {self.target}")
            if tries[-1].met:
                break
            model = ErrorModel([*model.points, {"setting": setting.label(), "sq": setting.sq, "mse": setting.mse,
                                                "speedup": setting.speedup, "rel_l2": measured["rel_l2"],
                                                "psnr_db": measured["psnr_db"]}])
        return tries, model, predicted

    def unreachable(self, predicted: list[dict]) -> ConfigError:
        """No candidate is predicted to meet the target: the closest, and what to loosen."""
        key, value = self.target.key, self.target.value
        best = max(predicted, key=self.target.slack)
        return ConfigError(f"job.target.{key}={value:g}: no candidate is predicted to meet it (closest: speedup "
                           f"{best['speedup']:.2f}x, PSNR {best['psnr_db']:.1f} dB, rel-L2 {best['rel_l2']:.3g}); "
                           f"allowed: a looser job.target.{key}, or more job.orders / job.intervals")

    def pairs(self) -> list[tuple[str, int]]:
        """Every (family, order) the options search."""
        return [(family, order) for family in self.families for order in self.options.orders]

    def groups(self, sites: list[str]) -> dict[str, list[str]]:
        """Group name -> its sites: each site alone, or (``group=block``) the sites of a block."""
        if self.options.group == "site":
            return {site: [site] for site in sites}
        out: dict[str, list[str]] = {}
        for site in sites:
            out.setdefault(f"block {site_depth(site)}", []).append(site)
        return out

    def sensitivity_tables(self, bench: Bench, groups: dict[str, list[str]], small: Reference, full: Reference,
                           clock: Clock, pairs: list[tuple[str, int]] | None = None
                           ) -> tuple[dict[tuple[str, int], SensitivityTable], dict]:
        """The sensitivity tables of the (family, order) ``pairs`` (default: :meth:`pairs`), read
        from ``sensitivity_file`` when it was written for the same model, steps, seed, images,
        sites and candidates (then no run is repeated), else measured (:meth:`sensitivities`)
        and written there; and how they were measured (runs, seconds, the file they were reused
        from)."""
        o = self.options
        key = {"model": bench.adapter.name, "num_steps": bench.adapter.num_steps, "seed": bench.seed,
               "granularity": bench.granularity, "sensitivity_images": o.sensitivity_images,
               "first_enhance": o.first_enhance, "groups": groups, "families": list(self.families),
               "orders": list(o.orders), "intervals": list(o.intervals)}
        pairs = self.pairs() if pairs is None else pairs
        path = None if o.sensitivity_file is None else Path(o.sensitivity_file)
        saved = json.loads(path.read_text()) if path is not None and path.is_file() else None
        if saved is not None and saved["key"] != key:
            log.info(f"tune: {path} was measured for another setup; measuring the sensitivities again")
            saved = None
        tables = {} if saved is None else {(f, n): SensitivityTable.from_dict(saved["tables"][f"{f}_o{n}"])
                                           for f, n in pairs if f"{f}_o{n}" in saved["tables"]}
        cost = {"runs": 0, "seconds": 0.0} if saved is None else saved["cost"]
        start = dict(clock.phases.get("sensitivity", {"runs": 0, "seconds": 0.0}))
        self.sensitivities(bench, groups, small, full, clock, tables, pairs)
        new = {k: clock.phases.get("sensitivity", start)[k] - start[k] for k in ("runs", "seconds")}
        cost = {k: cost[k] + new[k] for k in ("runs", "seconds")}
        if path is not None and new["runs"]:
            kept = {} if saved is None else saved["tables"]  # the pairs a budget left out this time
            write_json_atomic(path, {"key": key, "cost": cost, "tables": {
                **kept, **{f"{f}_o{n}": t.as_dict() for (f, n), t in tables.items()}}})
        return tables, {**cost, "file": str(path) if saved is not None else None, "runs_now": new["runs"]}

    def sensitivities(self, bench: Bench, groups: dict[str, list[str]], small: Reference, full: Reference,
                      clock: Clock, tables: dict[tuple[str, int], SensitivityTable],
                      pairs: list[tuple[str, int]]) -> None:
        """Fills in what ``tables`` lacks: per (family, order) of ``pairs``, one real cached run of the small
        reference per group and interval in which only that group forecasts, and one per interval
        in which every group does, on the small reference and on the full one."""
        every = [s for members in groups.values() for s in members]
        for family, order in pairs:
            table = tables.setdefault((family, order), SensitivityTable())
            if not table.groups:
                table.groups = {g: self.curves(bench, family, order, members, small, clock)
                                for g, members in groups.items()}
            if table.uniform is None:
                table.uniform = self.curves(bench, family, order, every, small, clock)
            if full.count not in table.uniform_on:
                table.uniform_on[full.count] = self.curves(bench, family, order, every, full, clock)

    def curves(self, bench: Bench, family: str, order: int, sites: list[str], reference: Reference,
               clock: Clock) -> ErrorCurves:
        """The squared errors, at every interval, of real cached runs in which ``sites`` forecast."""
        curves = ErrorCurves()
        for n in self.options.intervals:
            start = time.perf_counter()
            setting = Setting(family, order, {}, {s: n for s in sites}, 1.0, 0.0, 0.0)
            curves.add(n, self.cached_quality(bench, setting, reference, None))
            clock.add("sensitivity", start)
        return curves

    def settings(self, tables: dict[tuple[str, int], SensitivityTable], groups: dict[str, list[str]],
                 cost: CostModel, full_images: int | None = None) -> list[Setting]:
        """The candidates, fastest first: per family and order every uniform interval and the
        greedy paths (on the target's additive error) from every uniform interval, 1 included;
        the uniform ones carry their measurement on ``full_images`` images where it is there."""
        savings = {g: {n: sum(cost.saving(s, n) for s in members) for n in self.options.intervals}
                   for g, members in groups.items()}
        out: dict = {}
        for (family, order), table in tables.items():
            errors = table.errors(self.target.curve)
            measured = table.uniform_on.get(full_images)
            for n in [1, *self.options.intervals]:  # increasing: a configuration keeps its nearest uniform start
                for choice in greedy_path(errors, savings, {g: n for g in groups}):
                    intervals = {s: choice[g] for g, members in groups.items() for s in members}
                    speedup = cost.speedup(intervals)
                    if speedup > 1:
                        setting = Setting(family, order, choice, intervals, speedup, *table.anchored(n, choice), n)
                        if measured is not None and choice == {g: n for g in groups}:
                            setting.measured = {"rel_l2": math.sqrt(measured.sq[n]),
                                                "psnr_db": psnr_from_mse(measured.mse[n])}
                        out[family, order, tuple(intervals.values())] = setting
        return sorted(out.values(), key=lambda s: (-s.speedup, s.sq))

    def calibration_picks(self, settings: list[Setting]) -> list[Setting]:
        """``calibration_runs`` candidates whose additive error spans the target's aim
        (:meth:`Target.aim`), ``CALIBRATION_SPAN`` decades either side; at each aim the fastest
        candidate within ``NEAR`` decades, else the nearest."""
        settings = [s for s in settings if s.measured is None]  # the measured ones need no calibration
        if not settings:
            return []
        centre, error = self.target.aim(settings), self.target.error
        picks: list[Setting] = []
        for offset in np.linspace(-CALIBRATION_SPAN, CALIBRATION_SPAN, self.options.calibration_runs):
            distance = {id(s): abs(math.log10(max(error(s), 1e-30) / centre) - offset) for s in settings
                        if s not in picks}
            near = [s for s in settings if distance.get(id(s), math.inf) <= NEAR]
            picks.append(near[0] if near else min((s for s in settings if id(s) in distance),
                                                    key=lambda s: distance[id(s)]))
        return picks

    def point(self, bench: Bench, setting: Setting, full: Reference, small: Reference, clock: Clock,
              progress: str) -> dict:
        """One calibration point: ``setting`` measured on the full reference, and on the small
        one (the sensitivity runs' images) to check the additive rule where it was measured."""
        start = time.perf_counter()
        measured = self.cached_quality(bench, setting, full, progress)
        clock.add("calibration", start)
        start = time.perf_counter()
        alone = self.cached_quality(bench, setting, small, None)
        clock.add("additivity check", start)
        return {"setting": setting.label(), "sq": setting.sq, "mse": setting.mse, "speedup": setting.speedup,
                **measured, "additivity": {"predicted_rel_l2": math.sqrt(setting.sq),
                                           "predicted_psnr_db": psnr_from_mse(setting.mse), **alone}}

    def ladder(self, settings: list[Setting], predicted: list[dict], tries: list[Try]) -> list[int]:
        """The candidates predicted to meet the target, best first (:meth:`Target.best_first`),
        each measured or safer than every missed try (:meth:`Target.risk`); after misses the last
        try is a measured (uniform) one where one meets the target."""
        missed = [self.target.risk(t.setting) for t in tries]
        ladder = [i for i, setting in enumerate(settings) if self.target.met(predicted[i])
                  and (setting.measured is not None or all(self.target.risk(setting) < m for m in missed))]
        if tries and len(tries) == self.options.max_tries - 1 and any(settings[i].measured is not None for i in ladder):
            ladder = [i for i in ladder if settings[i].measured is not None]  # the last try: a measured one
        return self.target.best_first(ladder, settings, predicted)

    def strategy(self, setting: Setting, granularity: str, guard: str = "fallback") -> Strategy:
        """The strategy of ``setting``: its family's predictor at its order, its per-site intervals."""
        schedule = PerSiteInterval(setting.intervals, self.options.first_enhance, 0)
        return Strategy("tuned", self.families[setting.family](order=setting.order), schedule, granularity,
                        guard=guard)

    def cached_quality(self, bench: Bench, setting: Setting, reference: Reference, progress: str | None) -> dict:
        """rel-L2 and PSNR of one cached generation of the reference's inputs against it."""
        handle = self.strategy(setting, bench.granularity, bench.guard).attach(bench.adapter)
        try:
            latents = bench.adapter.generate(reference.inputs, handle, progress=progress if bench.progress else None)
        finally:
            handle.remove()
        return reference.quality(bench.adapter, latents)
