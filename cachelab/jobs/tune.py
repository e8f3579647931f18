"""``python run.py job=tune job.target.psnr=35`` (alias ``python -m cachelab.tune target.psnr=35``):
the fastest strategy predicted to meet a quality budget (or the best quality at a speed budget),
with one interval per cache site, verified by a real cached run.

1. Cost: one FLOP-counted full generation gives each site's FLOPs; a site forecast at ``f`` of
   ``T`` steps saves ``f / T`` of them (:class:`CostModel`), so a configuration's FLOPs speedup
   is a closed form.
2. Sensitivity: per predictor family, order, group of sites (a site, or a block with
   ``group=block``) and interval, one real cached run of ``sensitivity_images`` images that
   forecasts only that group gives the output's squared errors (latents' rel-L2 squared,
   images' mean squared error) that the group causes on its own, propagated through every later
   site and step.
3. Error: a configuration's squared errors are the sums of its groups' (independent errors add
   in squares: :func:`analysis.sensitivity.additive`), mapped to the measured ones by a line in
   log-log (:class:`analysis.sensitivity.Calibration`) fitted on ``calibration_runs`` real
   full-configuration runs of ``num_images`` images near the target.
4. Candidates: per family and order every uniform interval, and the greedy paths
   (:func:`analysis.sensitivity.greedy_path`) from every uniform interval (1 included): lengthen
   the interval of the group whose added error per FLOP saved is lowest, one step at a time.
5. The fastest candidate predicted to meet the target is measured by ``job=compare``'s
   :func:`~cachelab.jobs.compare.measure`; if it misses, its measurement joins the calibration
   points, the model is refitted and the fastest candidate that is safer than every miss (a
   smaller additive error; for a speed target, a larger speedup) and predicted to meet the
   target is measured next (at most ``max_tries`` verifications).
6. Written: ``tune.json`` / ``metrics.json`` (candidates, sensitivities, calibration with the
   additivity check, tries: predicted vs measured, the tuning's cost in runs and seconds),
   ``report.md``, ``conf/strategy/tuned.yaml`` (``python run.py --config-dir <run folder>/conf
   strategy=tuned``) and ``tuned_apply.json`` (``cachelab.apply(pipe, **json.load(...))``), and
   each verification's compare folder ``verify_<i>/``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from analysis.sensitivity import Calibration, anchored, greedy_path, mse_from_psnr, psnr_from_mse
from analysis.sink import Sink
from cachelab.core.schedules import Interval, PerSiteInterval
from cachelab.core.sites import select_sites
from cachelab.errors import ConfigError
from cachelab.evaluation.flops import count_flops_per_call
from cachelab.evaluation.metrics import psnr, relative_l2
from cachelab.io import write_bytes_atomic, write_json_atomic
from cachelab.jobs.atlas import site_depth
from cachelab.jobs.base import build_strategy
from cachelab.jobs.checks import check_target
from cachelab.jobs.compare import measure

log = logging.getLogger(__name__)

SCHEDULE = f"{PerSiteInterval.__module__}.{PerSiteInterval.__name__}"
CALIBRATION_SPAN = 0.4  # decades of squared error around the target that the calibration runs cover
NEAR = 0.05  # decades: candidates this close to a calibration aim count as equally near (the fastest wins)


@dataclass
class Setting:
    """A candidate: predictor family and order, one interval per site (``choice``: per group);
    its predicted FLOPs speedup and squared errors before calibration (rel-L2 squared ``sq``,
    image MSE ``mse``: :func:`analysis.sensitivity.anchored` from its uniform start ``base``)."""

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

    def raw(self, key: str) -> float:
        """The additive squared error that ranks candidates for target ``key`` (rel-L2 squared
        for a rel-L2 target, the image MSE for PSNR and speed targets)."""
        return self.sq if key == "rel_l2" else self.mse


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
    :class:`~analysis.sensitivity.Calibration` fitted on real full-configuration runs."""

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


def slack(key: str, target: float, values: dict) -> float:
    """How far ``values`` (speedup, rel_l2, psnr_db) are inside the target (>= 0: met): dB for
    PSNR, decades for rel-L2 and speedup."""
    if key == "psnr":
        return values["psnr_db"] - target
    if key == "rel_l2":
        return math.log10(target) - math.log10(values["rel_l2"])
    return math.log10(values["speedup"]) - math.log10(target)


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


class TuneJob:
    """The fastest per-site interval configuration predicted to meet ``target`` (one of psnr,
    rel_l2, speedup), verified by ``job=compare``'s measurement (see the module docstring)."""

    def __init__(self, target, predictors: dict, orders: list[int], intervals: list[int], first_enhance: int,
                 group: str = "site", sensitivity_images: int = 2, sensitivity_file: str | None = None,
                 calibration_runs: int = 2, max_tries: int = 3, grid_rows: int = 16):
        self.target = check_target(target)
        self.families, self.orders, self.intervals = list(predictors), list(orders), sorted(set(intervals) - {1})
        self.first_enhance, self.group, self.sensitivity_images = first_enhance, group, sensitivity_images
        self.sensitivity_file = sensitivity_file
        self.calibration_runs, self.max_tries, self.grid_rows = calibration_runs, max_tries, grid_rows

    def run(self, cfg: DictConfig, adapter, strategy, sink: Sink, out_dir: Path) -> dict:
        key, value = self.target
        granularity, clock = strategy.granularity, Clock()
        start = time.perf_counter()
        counted = min(cfg.measure.flops_images or cfg.num_images, cfg.num_images)
        cost = CostModel.measure(adapter, granularity, counted, cfg.seed, self.first_enhance)
        groups = self.groups(list(cost.site_flops))
        small = Reference.generate(adapter, self.sensitivity_images, cfg.seed)
        full = Reference.generate(adapter, cfg.num_images, cfg.seed)
        clock.add("full-compute references and FLOPs count", start, 3)
        tables, reused = self.sensitivity_tables(cfg, adapter, granularity, groups, small, full, clock)
        settings = self.settings(tables, groups, cost, uniform_key(full))
        log.info(f"tune: {len(settings)} candidates from {reused['runs']} sensitivity runs "
                 f"({'reused from ' + str(self.sensitivity_file) if reused['file'] else 'measured'}) "
                 f"at {len(groups)} groups of {len(cost.site_flops)} sites")
        points = []
        for i, setting in enumerate(self.calibration_picks(settings)):
            points.append(self.point(cfg, adapter, setting, granularity, full, small, clock,
                                     f"tune: calibration {i + 1}/{self.calibration_runs}"))
        model = ErrorModel(points)
        tries = []
        for attempt in range(self.max_tries):
            predicted = [model.predict(s) for s in settings]
            ladder = self.ladder(settings, predicted, tries)
            if not ladder:
                if tries:
                    break
                best = max(predicted, key=lambda p: slack(key, value, p))
                raise ConfigError(f"job.target.{key}={value:g}: no candidate is predicted to meet it (closest: "
                                  f"speedup {best['speedup']:.2f}x, PSNR {best['psnr_db']:.1f} dB, rel-L2 "
                                  f"{best['rel_l2']:.3g}); allowed: a looser job.target.{key}, or more job.orders / "
                                  f"job.intervals")
            index = ladder[0]
            setting = settings[index]
            vcfg = self.verification_config(cfg, setting, granularity)
            start = time.perf_counter()
            metrics = measure(vcfg, adapter, build_strategy(vcfg), Sink(), folder(out_dir / f"verify_{attempt}"),
                              self.grid_rows)
            clock.add("verification (job=compare)", start, 4)  # counted and timed, both sides
            measured = {"speedup": metrics["flops"]["speedup"], "rel_l2": metrics["quality"]["rel_l2"],
                        "psnr_db": metrics["quality"]["psnr_db"]}
            met = slack(key, value, measured) >= 0
            tries.append({"index": index, "setting": setting.label(), "family": setting.family,
                          "order": setting.order, "uniform": setting.uniform, "intervals": setting.intervals,
                          "sq": setting.sq, "mse": setting.mse, "predicted": predicted[index], "measured": measured,
                          "met": met, "full_steps": metrics["full_steps"], "folder": f"verify_{attempt}"})
            log.info(f"tune: try {attempt + 1}: {setting.label()}: predicted {predicted[index]['speedup']:.2f}x, "
                     f"{predicted[index]['psnr_db']:.1f} dB; measured {measured['speedup']:.2f}x, "
                     f"{measured['psnr_db']:.1f} dB: {'meets' if met else 'misses'} {key} {value:g}")
            if met:
                break
            # the miss is one more calibration point, where it matters: refit, then a safer candidate
            points.append({"setting": setting.label(), "sq": setting.sq, "mse": setting.mse,
                           "speedup": setting.speedup, "rel_l2": measured["rel_l2"], "psnr_db": measured["psnr_db"]})
            model = ErrorModel(points)
        chosen = next((t for t in tries if t["met"]), None)
        uniform = next((settings[i] for i in self.ladder(settings, predicted, []) if settings[i].uniform), None)
        result = {"target": {key: value}, "met": chosen is not None, "num_candidates": len(settings),
                  "num_uniform_candidates": sum(s.uniform for s in settings), "groups": groups,
                  "site_flops_share": {s: f / cost.total for s, f in cost.site_flops.items()},
                  "flops_full": cost.total, "sensitivity_images": self.sensitivity_images,
                  "sensitivity": {f"{f}_o{o}": t for (f, o), t in tables.items()}, "sensitivity_measured": reused,
                  "error_model": model.as_dict(), "tries": tries, "cost": clock.as_dict(),
                  "best_uniform_candidate": None if uniform is None else
                  {"setting": uniform.label(), "predicted": model.predict(uniform)},
                  "chosen": None if chosen is None else chosen["setting"]}
        if chosen is not None:
            self.write_config(cfg, settings[chosen["index"]], chosen["measured"], granularity, out_dir)
            result["run_with"] = f"python run.py --config-dir {out_dir / 'conf'} strategy=tuned"
        write_json_atomic(out_dir / "tune.json", result)
        write_json_atomic(out_dir / "metrics.json", result)
        text = report(result)
        write_bytes_atomic(out_dir / "report.md", text.encode())
        sink.summary({"tune/met": int(result["met"]), "tune/tries": len(tries),
                      "tune/runs": result["cost"]["total"]["runs"], "tune/seconds": result["cost"]["total"]["seconds"],
                      **({f"tune/measured/{k}": v for k, v in chosen["measured"].items()} if chosen else {})})
        log.info(text.split("\n\n", 2)[1])
        if chosen is None:
            log.warning(f"tune: no verified candidate met {key} {value:g} in {len(tries)} tries; nothing written")
        return result

    def groups(self, sites: list[str]) -> dict[str, list[str]]:
        """Group name -> its sites: each site alone, or (``group=block``) the sites of a block."""
        if self.group == "site":
            return {site: [site] for site in sites}
        out: dict[str, list[str]] = {}
        for site in sites:
            out.setdefault(f"block {site_depth(site)}", []).append(site)
        return out

    def sensitivity_tables(self, cfg, adapter, granularity, groups: dict[str, list[str]], small: Reference,
                           full: Reference, clock: Clock) -> tuple[dict, dict]:
        """The sensitivity tables, read from ``sensitivity_file`` when it was written for the
        same model, steps, seed, images, sites and candidates (then no run is repeated), else
        measured (:meth:`sensitivities`) and written there; and how they were measured (runs,
        seconds, the file they were reused from)."""
        key = {"model": cfg.model.name, "num_steps": cfg.num_steps, "seed": cfg.seed, "granularity": granularity,
               "sensitivity_images": self.sensitivity_images, "first_enhance": self.first_enhance,
               "groups": groups, "families": self.families, "orders": self.orders, "intervals": self.intervals}
        path = None if self.sensitivity_file is None else Path(self.sensitivity_file)
        saved = json.loads(path.read_text()) if path is not None and path.is_file() else None
        if saved is not None and saved["key"] != key:
            log.info(f"tune: {path} was measured for another setup; measuring the sensitivities again")
            saved = None
        tables = {} if saved is None else {
            (f, o): {kind: {g: {int(n): v for n, v in row.items()} for g, row in table.items()}
                     for kind, table in saved["tables"][f"{f}_o{o}"].items()}
            for f in self.families for o in self.orders}
        cost = {"runs": 0, "seconds": 0.0} if saved is None else saved["cost"]
        start = dict(clock.phases.get("sensitivity", {"runs": 0, "seconds": 0.0}))
        self.sensitivities(cfg, adapter, granularity, groups, small, full, clock, tables)
        new = {k: clock.phases.get("sensitivity", start)[k] - start[k] for k in ("runs", "seconds")}
        cost = {k: cost[k] + new[k] for k in ("runs", "seconds")}
        if path is not None and new["runs"]:
            write_json_atomic(path, {"key": key, "cost": cost,
                                     "tables": {f"{f}_o{o}": t for (f, o), t in tables.items()}})
        return tables, {**cost, "file": str(path) if saved is not None else None, "runs_now": new["runs"]}

    def sensitivities(self, cfg, adapter, granularity, groups: dict[str, list[str]], small: Reference,
                      full: Reference, clock: Clock, tables: dict) -> None:
        """Fills in what ``tables`` lacks: (family, order) -> {"sq": group -> interval -> rel-L2
        squared, "mse": ... image MSE, "uniform": {"sq": interval -> ..., "mse": ...}}, one real
        cached run of the small reference per family, order, group and interval in which only
        that group forecasts, and one per family, order and interval in which every group does,
        on the small reference ("uniform") and on the full one ("uniform_<num_images>"): the
        uniform candidates are measured, not predicted."""
        for family in self.families:
            for order in self.orders:
                table = tables.setdefault((family, order), {})
                every = [s for members in groups.values() for s in members]
                wanted = [] if "sq" in table else [(g, members, small) for g, members in groups.items()]
                wanted += [(name, every, reference) for name, reference in
                           [("uniform", small), (uniform_key(full), full)] if name not in table]
                for g, members, reference in wanted:
                    sq, mse = {}, {}
                    for n in self.intervals:
                        start = time.perf_counter()
                        setting = Setting(family, order, {g: n}, {s: n for s in members}, 1.0, 0.0, 0.0)
                        quality = self.cached_quality(cfg, adapter, setting, granularity, reference, None)
                        clock.add("sensitivity", start)
                        sq[n], mse[n] = quality["rel_l2"] ** 2, mse_from_psnr(quality["psnr_db"])
                    if g.startswith("uniform"):
                        table[g] = {"sq": sq, "mse": mse}
                    else:
                        table.setdefault("sq", {})[g], table.setdefault("mse", {})[g] = sq, mse

    def settings(self, tables: dict, groups: dict[str, list[str]], cost: CostModel,
                 full_key: str | None = None) -> list[Setting]:
        """The candidates, fastest first: per family and order every uniform interval and the
        greedy paths (on the target's additive error) from every uniform interval, 1 included;
        the uniform ones carry their measurement on ``full_key``'s images where it is there."""
        key = self.target[0]
        savings = {g: {n: sum(cost.saving(s, n) for s in members) for n in self.intervals}
                   for g, members in groups.items()}
        out: dict = {}
        for (family, order), table in tables.items():
            errors = table["sq" if key == "rel_l2" else "mse"]
            for n in [1, *self.intervals]:  # increasing: a configuration keeps its nearest uniform start
                for choice in greedy_path(errors, savings, {g: n for g in groups}):
                    intervals = {s: choice[g] for g, members in groups.items() for s in members}
                    speedup = cost.speedup(intervals)
                    if speedup > 1:
                        sq, mse = (anchored(table[kind], table["uniform"][kind], n, choice) for kind in ("sq", "mse"))
                        setting = Setting(family, order, choice, intervals, speedup, sq, mse, n)
                        if full_key in table and len(set(choice.values())) == 1 and choice == {g: n for g in groups}:
                            measured = table[full_key]
                            setting.measured = {"rel_l2": math.sqrt(measured["sq"][n]),
                                                "psnr_db": psnr_from_mse(measured["mse"][n])}
                        out[family, order, tuple(intervals.values())] = setting
        return sorted(out.values(), key=lambda s: (-s.speedup, s.sq))

    def calibration_picks(self, settings: list[Setting]) -> list[Setting]:
        """``calibration_runs`` candidates whose additive error spans the target's (a quality
        target) or the best one's at the target speed, ``CALIBRATION_SPAN`` decades either side;
        at each aim the fastest candidate within ``NEAR`` decades, else the nearest."""
        key, value = self.target
        settings = [s for s in settings if s.measured is None]  # the measured ones need no calibration
        if not settings:
            return []
        if key == "speedup":
            fast = [s for s in settings if s.speedup >= value] or settings[:1]
            centre = min(s.raw(key) for s in fast)
        else:
            centre = value ** 2 if key == "rel_l2" else mse_from_psnr(value)
        picks: list[Setting] = []
        for offset in np.linspace(-CALIBRATION_SPAN, CALIBRATION_SPAN, self.calibration_runs):
            distance = {id(s): abs(math.log10(max(s.raw(key), 1e-30) / centre) - offset) for s in settings
                        if s not in picks}
            near = [s for s in settings if distance.get(id(s), math.inf) <= NEAR]
            picks.append(near[0] if near else min((s for s in settings if id(s) in distance),
                                                    key=lambda s: distance[id(s)]))
        return picks

    def point(self, cfg, adapter, setting: Setting, granularity, full: Reference, small: Reference, clock: Clock,
              progress: str) -> dict:
        """One calibration point: ``setting`` measured on the full reference, and on the small
        one (the sensitivity runs' images) to check the additive rule where it was measured."""
        start = time.perf_counter()
        measured = self.cached_quality(cfg, adapter, setting, granularity, full, progress)
        clock.add("calibration", start)
        start = time.perf_counter()
        alone = self.cached_quality(cfg, adapter, setting, granularity, small, None)
        clock.add("additivity check", start)
        return {"setting": setting.label(), "sq": setting.sq, "mse": setting.mse, "speedup": setting.speedup,
                **measured, "additivity": {"predicted_rel_l2": math.sqrt(setting.sq),
                                           "predicted_psnr_db": psnr_from_mse(setting.mse), **alone}}

    def ladder(self, settings: list[Setting], predicted: list[dict], tries: list[dict]) -> list[int]:
        """The candidates predicted to meet the target, best first (the fastest for a quality
        target, then the best predicted quality; the best predicted PSNR for a speed target),
        each measured or safer than every missed try; after misses the last try is a measured
        (uniform) one where one meets the target."""
        key, value = self.target
        missed = [t["sq" if key == "rel_l2" else "mse"] if key != "speedup" else -t["predicted"]["speedup"]
                  for t in tries]
        ladder = [i for i in range(len(settings)) if slack(key, value, predicted[i]) >= 0
                  and (settings[i].measured is not None or
                       all((settings[i].raw(key) if key != "speedup" else -settings[i].speedup) < m for m in missed))]
        if tries and len(tries) == self.max_tries - 1 and any(settings[i].measured is not None for i in ladder):
            ladder = [i for i in ladder if settings[i].measured is not None]  # the last try: a measured one
        if key == "speedup":
            return sorted(ladder, key=lambda i: -predicted[i]["psnr_db"])
        return sorted(ladder, key=lambda i: (-settings[i].speedup, -slack(key, value, predicted[i])))

    def strategy_nodes(self, cfg: DictConfig, setting: Setting, granularity: str) -> tuple[dict, dict]:
        """The ``strategy`` and ``schedule`` config nodes of ``setting`` (plain values)."""
        predictor = OmegaConf.to_container(cfg.job.predictors[setting.family], resolve=True)
        predictor.pop("_partial_", None)
        predictor["order"] = setting.order
        strategy = {"name": "tuned", "granularity": granularity, "predictor": predictor, "needs_schedule": SCHEDULE}
        schedule = {"_target_": SCHEDULE, "intervals": dict(setting.intervals),
                    "first_enhance": self.first_enhance, "final_full": 0}
        return strategy, schedule

    def verification_config(self, cfg: DictConfig, setting: Setting, granularity: str) -> DictConfig:
        """``cfg`` with the tuned strategy and schedule in place of the configured ones."""
        strategy, schedule = self.strategy_nodes(cfg, setting, granularity)
        vcfg = copy.deepcopy(cfg)
        with open_dict(vcfg):
            vcfg.strategy, vcfg.schedule, vcfg.order = strategy, schedule, setting.order
        return vcfg

    def cached_quality(self, cfg, adapter, setting: Setting, granularity, reference: Reference,
                       progress: str | None) -> dict:
        """rel-L2 and PSNR of one cached generation of the reference's inputs against it."""
        handle = build_strategy(self.verification_config(cfg, setting, granularity)).attach(adapter)
        try:
            latents = adapter.generate(reference.inputs, handle, progress=progress if cfg.progress else None)
        finally:
            handle.remove()
        return reference.quality(adapter, latents)

    def write_config(self, cfg: DictConfig, setting: Setting, measured: dict, granularity: str,
                     out_dir: Path) -> None:
        """``conf/strategy/tuned.yaml`` (a strategy for ``run.py``) and ``tuned_apply.json``
        (the keyword form of ``cachelab.apply``)."""
        strategy, schedule = self.strategy_nodes(cfg, setting, granularity)
        node = OmegaConf.create({"defaults": ["/schema/strategy/strategy@strategy", {"override /schedule": "per_site"},
                                              "_self_"],
                                 "strategy": strategy, "schedule": schedule, "order": setting.order})
        header = (f"# @package _global_\n# job=tune: {setting.label()}, verified: FLOPs "
                  f"{measured['speedup']:.2f}x, PSNR {measured['psnr_db']:.1f} dB; run it with\n"
                  f"#   python run.py --config-dir {out_dir / 'conf'} strategy=tuned\n")
        write_bytes_atomic(out_dir / "conf" / "strategy" / "tuned.yaml", (header + OmegaConf.to_yaml(node)).encode())
        apply = {"strategy": setting.family, "order": setting.order, "granularity": granularity,
                 "first_enhance": self.first_enhance, "schedule": "per_site", "intervals": setting.intervals}
        write_bytes_atomic(out_dir / "tuned_apply.json", (json.dumps(apply, indent=1) + "\n").encode())


def uniform_key(reference: Reference) -> str:
    """The sensitivity table entry of the uniform runs on ``reference``'s images."""
    return f"uniform_{len(reference.latents)}_images"


def folder(path: Path) -> Path:
    """``path``, created if needed."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def report(result: dict) -> str:
    """``report.md``: the target, the tries (predicted vs measured), the calibration with the
    additivity check, and the tuning's cost."""
    (key, value), = result["target"].items()
    lines = [f"# Tune: {key} target {value:g}", "",
             "| try | configuration | predicted FLOPs | measured FLOPs | predicted PSNR | measured PSNR | "
             "predicted rel-L2 | measured rel-L2 | met |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, t in enumerate(result["tries"]):
        p, m = t["predicted"], t["measured"]
        lines.append(f"| {i + 1} | {t['setting']} | {p['speedup']:.2f}x | {m['speedup']:.2f}x | {p['psnr_db']:.1f} dB "
                     f"| {m['psnr_db']:.1f} dB | {p['rel_l2']:.3g} | {m['rel_l2']:.3g} | "
                     f"{'yes' if t['met'] else 'no'} |")
    uniform = result["best_uniform_candidate"]
    if uniform:
        lines += ["", f"Best uniform candidate predicted to meet the target: {uniform['setting']} "
                  f"({uniform['predicted']['speedup']:.2f}x, {uniform['predicted']['psnr_db']:.1f} dB predicted)."]
    fit, n = result["error_model"], result["sensitivity_images"]
    lines += ["", f"{result['num_candidates']} candidates ({result['num_uniform_candidates']} uniform). Error model: "
              f"the squared errors of the uniform start plus the groups' own changes (measured on {n} images), "
              f"calibrated on the calibration runs: log10 MSE = {fit['image_mse']['intercept']:.3f} + "
              f"{fit['image_mse']['slope']:.3f} log10 MSE_predicted, log10 rel-L2^2 = "
              f"{fit['rel_l2_squared']['intercept']:.3f} + {fit['rel_l2_squared']['slope']:.3f} "
              f"log10 rel-L2^2_predicted", "",
              f"| calibration run | FLOPs (predicted) | uncalibrated PSNR ({n} images) | measured PSNR ({n} images) "
              f"| uncalibrated rel-L2 ({n} images) | measured rel-L2 ({n} images) | measured PSNR | measured rel-L2 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in fit["points"]:
        a = p.get("additivity")
        check = (f"{a['predicted_psnr_db']:.1f} dB | {a['psnr_db']:.1f} dB | {a['predicted_rel_l2']:.3g} | "
                 f"{a['rel_l2']:.3g}" if a else "- | - | - | -")  # a missed try: measured on the full images only
        lines.append(f"| {p['setting']} | {p['speedup']:.2f}x | {check} | {p['psnr_db']:.1f} dB | {p['rel_l2']:.3g} |")
    lines += ["", "| tuning cost | real generations | seconds |", "| --- | --- | --- |"]
    lines += [f"| {phase} | {c['runs']} | {c['seconds']:.1f} |" for phase, c in result["cost"].items()]
    if result.get("run_with"):
        lines += ["", f"Chosen: {result['chosen']}; run it: `{result['run_with']}`"]
    return "\n".join(lines) + "\n"
