"""``python run.py job=tune job.target.psnr=35`` (alias ``python -m cachelab.tune target.psnr=35``):
the fastest strategy predicted to meet a quality budget (or the best quality at a speed budget),
with one interval per cache site, verified by a real cached run.

1. One full-compute generation shadowed by every candidate (predictor family x order x
   interval, the atlas: :func:`cachelab.jobs.base.observed_full_run`) gives each site's forecast
   error under each interval; one FLOP-counted full generation gives each site's FLOPs.
2. Cost: a site forecast at ``f`` of ``T`` steps saves ``f / T`` of its FLOPs
   (:class:`CostModel`), so a configuration's FLOPs speedup is a closed form.
3. Error: the *feature* of a configuration is the mean over sites of the site's forecast
   errors summed over its forecast steps (additive over sites, so per-site choices combine);
   :class:`ErrorModel` maps it to the output's rel-L2 and PSNR by a line in log-log (PSNR: in
   log10 of the feature), fitted by least squares on ``calibration_runs`` real cached runs.
4. Candidates: per predictor and order, the configurations that maximise saved FLOPs minus
   ``lambda`` x feature for a range of ``lambda`` (each site, or block with ``group=block``,
   takes its best interval, 1 = always computed), plus every uniform interval.
5. The fastest candidate predicted to meet the target is measured by ``job=compare``'s
   :func:`~cachelab.jobs.compare.measure`; if it misses, its measurement joins the calibration
   points, the error model is refitted and the fastest candidate that is safer than every miss
   (a smaller error feature; for a speed target, a larger speedup) and predicted to meet the
   target is measured next (at most ``max_tries`` verifications).
6. Written: ``tune.json`` / ``metrics.json`` (candidates, calibration, tries: predicted vs
   measured), ``report.md``, ``conf/strategy/tuned.yaml`` (``python run.py --config-dir
   <run folder>/conf strategy=tuned``) and ``tuned_apply.json`` (``cachelab.apply(pipe,
   **json.load(...))``), and each verification's compare folder ``verify_<i>/``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from analysis.atlas import Atlas
from analysis.sink import Sink
from cachelab.core.schedules import Interval, PerSiteInterval
from cachelab.core.sites import select_sites
from cachelab.errors import ConfigError
from cachelab.evaluation.flops import count_flops_per_call
from cachelab.evaluation.metrics import psnr, relative_l2
from cachelab.io import write_bytes_atomic, write_json_atomic
from cachelab.jobs.atlas import AtlasJob, site_depth
from cachelab.jobs.base import build_strategy, observed_full_run
from cachelab.jobs.checks import check_target
from cachelab.jobs.compare import measure

log = logging.getLogger(__name__)

SCHEDULE = f"{PerSiteInterval.__module__}.{PerSiteInterval.__name__}"
NUM_LAMBDAS = 160  # trade-off weights swept per predictor and order


@dataclass
class Setting:
    """A candidate: predictor family and order, one interval per site; its predicted FLOPs
    speedup and error feature (mean over sites of the summed per-step forecast errors)."""

    family: str
    order: int
    intervals: dict[str, int]
    speedup: float
    feature: float

    def label(self) -> str:
        """``taylor o2 N=5`` or ``taylor o2 per-site N 2..8``."""
        values = sorted(set(self.intervals.values()))
        spread = f"N={values[0]}" if len(values) == 1 else f"per-site N {values[0]}..{values[-1]}"
        return f"{self.family} o{self.order} {spread}"


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
    """The output's rel-L2 and PSNR from a configuration's error feature E: ``log10 rel_l2 =
    a + b log10 E`` and ``psnr = c + d log10 E``, least squares over real cached runs."""

    def __init__(self, points: list[dict]):
        x = np.log10([p["feature"] for p in points])
        if np.ptp(x) == 0:
            raise ValueError("the calibration runs need at least two different error features")
        self.points = points
        self.rel_l2_fit = np.polyfit(x, np.log10([p["rel_l2"] for p in points]), 1)
        self.psnr_fit = np.polyfit(x, [p["psnr_db"] for p in points], 1)

    def predict(self, feature: float) -> dict:
        """The predicted ``rel_l2`` and ``psnr_db`` at error feature ``feature``."""
        x = math.log10(feature)
        return {"rel_l2": float(10 ** np.polyval(self.rel_l2_fit, x)), "psnr_db": float(np.polyval(self.psnr_fit, x))}

    def as_dict(self) -> dict:
        """The fits and their points, for tune.json."""
        return {"log10_rel_l2": {"intercept": self.rel_l2_fit[1], "slope": self.rel_l2_fit[0]},
                "psnr_db": {"intercept": self.psnr_fit[1], "slope_per_decade": self.psnr_fit[0]},
                "points": self.points}


def slack(key: str, target: float, values: dict) -> float:
    """How far ``values`` (speedup, rel_l2, psnr_db) are inside the target (>= 0: met): dB for
    PSNR, decades for rel-L2 and speedup."""
    if key == "psnr":
        return values["psnr_db"] - target
    if key == "rel_l2":
        return math.log10(target) - math.log10(values["rel_l2"])
    return math.log10(values["speedup"]) - math.log10(target)


class TuneJob:
    """The fastest per-site interval configuration predicted to meet ``target`` (one of psnr,
    rel_l2, speedup), verified by ``job=compare``'s measurement (see the module docstring)."""

    def __init__(self, target, predictors: dict, orders: list[int], intervals: list[int], first_enhance: int,
                 group: str = "site", num_images: int = 16, calibration_runs: int = 4, max_tries: int = 3,
                 grid_rows: int = 16):
        self.target = check_target(target)
        self.atlas = AtlasJob(predictors, orders, intervals, first_enhance, derivative_orders=0, audit=False)
        self.group, self.num_images = group, num_images
        self.calibration_runs, self.max_tries, self.grid_rows = calibration_runs, max_tries, grid_rows

    def run(self, cfg: DictConfig, adapter, strategy, sink: Sink, out_dir: Path) -> dict:
        key, value = self.target
        T, granularity, first_enhance = adapter.num_steps, strategy.granularity, self.atlas.first_enhance
        inputs = adapter.make_inputs(self.num_images, cfg.seed)
        atlas = Atlas(self.atlas.candidates(), T)
        baseline = observed_full_run(adapter, granularity, atlas, inputs, "tune: shadowed full run" if cfg.progress else None)
        base_images = adapter.decode(baseline)
        counted = min(cfg.measure.flops_images or self.num_images, self.num_images)
        cost = CostModel.measure(adapter, granularity, counted, cfg.seed, first_enhance)
        settings = self.settings(atlas, cost)
        log.info(f"tune: {len(settings)} candidates from {len(atlas.candidates)} shadowed ones at "
                 f"{len(atlas.sites)} sites")
        picks = [settings[i] for i in sorted({round(i) for i in np.linspace(0, len(settings) - 1,
                                                                              self.calibration_runs)})]
        points = []
        for i, setting in enumerate(picks):
            points.append({"setting": setting.label(), "feature": setting.feature, "speedup": setting.speedup,
                           **self.cached_quality(cfg, adapter, setting, granularity, inputs, baseline, base_images,
                                                 f"tune: calibration {i + 1}/{len(picks)}")})
        model = ErrorModel(points)
        tries = []
        for attempt in range(self.max_tries):
            predicted = [{"speedup": s.speedup, **model.predict(s.feature)} for s in settings]
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
            metrics = measure(vcfg, adapter, build_strategy(vcfg), Sink(), folder(out_dir / f"verify_{attempt}"),
                              self.grid_rows)
            measured = {"speedup": metrics["flops"]["speedup"], "rel_l2": metrics["quality"]["rel_l2"],
                        "psnr_db": metrics["quality"]["psnr_db"]}
            met = slack(key, value, measured) >= 0
            tries.append({"index": index, "setting": setting.label(), "family": setting.family,
                          "order": setting.order, "intervals": setting.intervals, "feature": setting.feature,
                          "predicted": predicted[index], "measured": measured, "met": met,
                          "full_steps": metrics["full_steps"], "folder": f"verify_{attempt}"})
            log.info(f"tune: try {attempt + 1}: {setting.label()}: predicted {predicted[index]['speedup']:.2f}x, "
                     f"{predicted[index]['psnr_db']:.1f} dB; measured {measured['speedup']:.2f}x, "
                     f"{measured['psnr_db']:.1f} dB: {'meets' if met else 'misses'} {key} {value:g}")
            if met:
                break
            # the miss is one more calibration point, where it matters: refit, then a safer candidate
            points.append({"setting": setting.label(), "feature": setting.feature, "speedup": setting.speedup,
                           "rel_l2": measured["rel_l2"], "psnr_db": measured["psnr_db"]})
            model = ErrorModel(points)
        chosen = next((t for t in tries if t["met"]), None)
        result = {"target": {key: value}, "met": chosen is not None, "num_candidates": len(settings),
                  "sites": atlas.sites, "site_flops_share": {s: f / cost.total for s, f in cost.site_flops.items()},
                  "flops_full": cost.total, "error_model": model.as_dict(), "tries": tries,
                  "chosen": None if chosen is None else chosen["setting"]}
        if chosen is not None:
            self.write_config(cfg, settings[chosen["index"]], chosen["measured"], granularity, out_dir)
            result["run_with"] = f"python run.py --config-dir {out_dir / 'conf'} strategy=tuned"
        write_json_atomic(out_dir / "tune.json", result)
        write_json_atomic(out_dir / "metrics.json", result)
        text = report(result)
        write_bytes_atomic(out_dir / "report.md", text.encode())
        sink.summary({"tune/met": int(result["met"]), "tune/tries": len(tries),
                      **({f"tune/measured/{k}": v for k, v in chosen["measured"].items()} if chosen else {})})
        log.info(text.split("\n\n", 2)[1])
        if chosen is None:
            log.warning(f"tune: no verified candidate met {key} {value:g} in {len(tries)} tries; nothing written")
        return result

    def ladder(self, settings: list[Setting], predicted: list[dict], tries: list[dict]) -> list[int]:
        """The candidates predicted to meet the target, best first (the fastest for a quality
        target, the best quality for a speed target), each safer than every missed try."""
        key, value = self.target
        missed = [t["feature"] if key != "speedup" else -t["predicted"]["speedup"] for t in tries]
        ladder = [i for i in range(len(settings)) if slack(key, value, predicted[i]) >= 0
                  and all((settings[i].feature if key != "speedup" else -settings[i].speedup) < m for m in missed)]
        if key == "speedup":
            return sorted(ladder, key=lambda i: settings[i].feature)
        return sorted(ladder, key=lambda i: (-settings[i].speedup, settings[i].feature))

    def settings(self, atlas: Atlas, cost: CostModel) -> list[Setting]:
        """The candidates, sorted by error feature: per family and order the trade-off frontier
        of per-site (or per-block) intervals, and every uniform interval."""
        sites, groups = atlas.sites, {}
        for site in sites:
            groups.setdefault(site if self.group == "site" else site_depth(site), []).append(site)
        out: dict = {}
        for family in self.atlas.predictors:
            for order in self.atlas.orders:
                # per group and interval: (saved FLOPs share, error feature contribution)
                options = {g: {1: (0.0, 0.0)} for g in groups}
                for n in self.atlas.intervals:
                    errors = atlas.error_map(f"{family}_o{order}_N{n}")
                    for g, members in groups.items():
                        options[g][n] = (sum(cost.saving(s, n) for s in members),
                                         sum(float(np.nansum(errors[sites.index(s)])) for s in members) / len(sites))
                choices = [{g: n for g in groups} for n in self.atlas.intervals]
                ratios = [v / e for opts in options.values() for v, e in opts.values() if v > 0 and e > 0]
                for lam in np.geomspace(min(ratios) / 2, max(ratios) * 2, NUM_LAMBDAS):
                    choices.append({g: max(opts, key=lambda n: (opts[n][0] - lam * opts[n][1], -n))
                                    for g, opts in options.items()})
                for choice in choices:
                    intervals = {s: choice[g] for g, members in groups.items() for s in members}
                    feature = sum(options[g][n][1] for g, n in choice.items())
                    speedup = cost.speedup(intervals)
                    if speedup > 1 and feature > 0:
                        key = (family, order, tuple(intervals.values()))
                        out[key] = Setting(family, order, intervals, speedup, feature)
        return sorted(out.values(), key=lambda s: (s.feature, -s.speedup))

    def strategy_nodes(self, cfg: DictConfig, setting: Setting, granularity: str) -> tuple[dict, dict]:
        """The ``strategy`` and ``schedule`` config nodes of ``setting`` (plain values)."""
        predictor = OmegaConf.to_container(cfg.job.predictors[setting.family], resolve=True)
        predictor.pop("_partial_", None)
        predictor["order"] = setting.order
        strategy = {"name": "tuned", "granularity": granularity, "predictor": predictor, "needs_schedule": SCHEDULE}
        schedule = {"_target_": SCHEDULE, "intervals": dict(setting.intervals),
                    "first_enhance": self.atlas.first_enhance, "final_full": 0}
        return strategy, schedule

    def verification_config(self, cfg: DictConfig, setting: Setting, granularity: str) -> DictConfig:
        """``cfg`` with the tuned strategy and schedule in place of the configured ones."""
        strategy, schedule = self.strategy_nodes(cfg, setting, granularity)
        vcfg = copy.deepcopy(cfg)
        with open_dict(vcfg):
            vcfg.strategy, vcfg.schedule, vcfg.order = strategy, schedule, setting.order
        return vcfg

    def cached_quality(self, cfg, adapter, setting: Setting, granularity, inputs, baseline, base_images,
                       progress: str) -> dict:
        """rel-L2 and PSNR of one cached generation of ``inputs`` against the full-compute one."""
        handle = build_strategy(self.verification_config(cfg, setting, granularity)).attach(adapter)
        try:
            latents = adapter.generate(inputs, handle, progress=progress if cfg.progress else None)
        finally:
            handle.remove()
        return {"rel_l2": relative_l2(latents, baseline), "psnr_db": psnr(adapter.decode(latents), base_images)}

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
                 "first_enhance": self.atlas.first_enhance, "schedule": "per_site", "intervals": setting.intervals}
        write_bytes_atomic(out_dir / "tuned_apply.json", (json.dumps(apply, indent=1) + "\n").encode())


def folder(path: Path) -> Path:
    """``path``, created if needed."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def report(result: dict) -> str:
    """``report.md``: the target, the tries (predicted vs measured) and the calibration."""
    (key, value), = result["target"].items()
    lines = [f"# Tune: {key} target {value:g}", "",
             "| try | configuration | predicted FLOPs | measured FLOPs | predicted PSNR | measured PSNR | "
             "predicted rel-L2 | measured rel-L2 | met |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, t in enumerate(result["tries"]):
        p, m = t["predicted"], t["measured"]
        lines.append(f"| {i + 1} | {t['setting']} | {p['speedup']:.2f}x | {m['speedup']:.2f}x | {p['psnr_db']:.1f} dB "
                     f"| {m['psnr_db']:.1f} dB | {p['rel_l2']:.3g} | {m['rel_l2']:.3g} | "
                     f"{'yes' if t['met'] else 'no'} |")
    fit = result["error_model"]
    lines += ["", f"{result['num_candidates']} candidates. Error model (least squares over the calibration runs): "
              f"PSNR = {fit['psnr_db']['intercept']:.2f} + {fit['psnr_db']['slope_per_decade']:.2f} log10 E, "
              f"log10 rel-L2 = {fit['log10_rel_l2']['intercept']:.3f} + {fit['log10_rel_l2']['slope']:.3f} log10 E", "",
              "| calibration run | E | FLOPs (predicted) | rel-L2 | PSNR |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {p['setting']} | {p['feature']:.3g} | {p['speedup']:.2f}x | {p['rel_l2']:.3g} "
              f"| {p['psnr_db']:.1f} dB |" for p in fit["points"]]
    if result.get("run_with"):
        lines += ["", f"Chosen: {result['chosen']}; run it: `{result['run_with']}`"]
    return "\n".join(lines) + "\n"
