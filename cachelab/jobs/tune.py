"""``python run.py job=tune job.target.psnr=35`` (alias ``python -m cachelab.tune target.psnr=35``):
the fastest strategy predicted to meet a quality budget (or the best quality at a speed budget),
with one interval per cache site, verified by a real cached run.

1. Cost: one FLOP-counted full generation gives each site's FLOPs; a site forecast at ``f`` of
   ``T`` steps saves ``f / T`` of them (:class:`~cachelab.jobs.tuning.records.CostModel`), so a
   configuration's FLOPs speedup is a closed form.
2. Sensitivity: per predictor family, order, group of sites (a site, or a block with
   ``group=block``) and interval, one real cached run of ``sensitivity_images`` images that
   forecasts only that group gives the output's squared errors (latents' rel-L2 squared,
   images' mean squared error) that the group causes on its own, propagated through every later
   site and step.
3. Error: a configuration's squared errors are the sums of its groups' (independent errors add
   in squares: :func:`cachelab.analysis.sensitivity.additive`), mapped to the measured ones by a line in
   log-log (:class:`cachelab.analysis.sensitivity.Calibration`) fitted on ``calibration_runs`` real
   full-configuration runs of ``num_images`` images near the target.
4. Candidates: per family and order every uniform interval, and the greedy paths
   (:func:`cachelab.analysis.sensitivity.greedy_path`) from every uniform interval (1 included): lengthen
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
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cachelab.analysis.sink import Sink
from cachelab.core.schedules import PerSiteInterval
from cachelab.io import write_bytes_atomic, write_json_atomic
from cachelab.jobs.base import build_strategy
from cachelab.jobs.checks import check_target
from cachelab.jobs.compare import measure
from cachelab.jobs.plan import plan_keys, plan_target
from cachelab.jobs.tuning.budget import CacheBudget
from cachelab.jobs.tuning.records import Setting
from cachelab.core.arguments import Allowed
from cachelab.errors import ConfigError
from cachelab.jobs.tune_space import run_space_search
from cachelab.jobs.tuning.tuner import Bench, Tuner, TuneOptions, Verification
from cachelab.planner import parse_size, plan

log = logging.getLogger(__name__)

SCHEDULE = f"{PerSiteInterval.__module__}.{PerSiteInterval.__name__}"
SEARCHES = Allowed(lambda s: s in ("sites", "space"), "sites, space", "is not allowed")


class TuneJob:
    """``job=tune``: the config translated into a :class:`~cachelab.jobs.tuning.tuner.Tuner`'s plain
    values (``target`` -> a Target, ``predictors`` -> factories, the other keys -> TuneOptions),
    each candidate verified by ``job=compare``'s measurement into ``verify_<i>/``, and the chosen
    one written as ``conf/strategy/tuned.yaml`` and ``tuned_apply.json``."""

    def __init__(self, target, predictors: dict, grid_rows: int = 16, search: str = "sites", space: dict | None = None,
                 **options):
        SEARCHES.check("job.search", search)
        target = check_target(target)
        if search == "sites" and not target.predicted:
            raise ConfigError(f"job.target.{target.key} is measured, not predicted: job.search=sites cannot aim at it; "
                              f"allowed: job.search=space")
        self.tuner = Tuner(target, predictors, TuneOptions(**options))
        self.grid_rows, self.search = grid_rows, search
        self.space = OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else space

    def run(self, cfg: DictConfig, adapter, strategy, sink: Sink, out_dir: Path) -> dict:
        if self.search == "space":
            result = run_space_search(cfg, adapter, self.tuner.target, self.space, out_dir)
            sink.summary({"tune/met": int(result["met"]), "tune/runs": result["cost"]["total"]["runs"],
                          "tune/seconds": result["cost"]["total"]["seconds"]})
            log.info(f"tune: chosen {result['chosen']['setting'] if result['chosen'] else 'nothing'}")
            return result
        bench = Bench(adapter, strategy.granularity, cfg.seed, cfg.num_images,
                      min(cfg.measure.flops_images or cfg.num_images, cfg.num_images), strategy.guard, cfg.progress,
                      cache_budget(cfg, adapter))
        tuning = self.tuner.run(bench, partial(self.verify, cfg, bench, out_dir))
        result = tuning.result
        if bench.budget is not None and tuning.chosen is not None:  # the chosen one: planned and measured
            result["cache_budget"]["chosen"] = {
                "planned": bench.budget.planned(self.tuner.strategy(tuning.chosen, bench.granularity)),
                "measured": tuning.measured["cache_bytes"]}
        if tuning.chosen is not None:
            self.write_config(cfg, tuning.chosen, tuning.measured, strategy.granularity, out_dir)
            result["run_with"] = f"python run.py --config-dir {out_dir / 'conf'} strategy=tuned"
        write_json_atomic(out_dir / "tune.json", result)
        write_json_atomic(out_dir / "metrics.json", result)
        text = report(result)
        write_bytes_atomic(out_dir / "report.md", text.encode())
        sink.summary({"tune/met": int(result["met"]), "tune/tries": len(result["tries"]),
                      "tune/runs": result["cost"]["total"]["runs"], "tune/seconds": result["cost"]["total"]["seconds"],
                      **{f"tune/measured/{k}": v for k, v in (tuning.measured or {}).items()}})
        log.info(text.split("\n\n", 2)[1])
        if tuning.chosen is None:
            log.warning(f"tune: no verified candidate met {self.tuner.target} in {len(result['tries'])} tries; "
                        f"nothing written")
        return result

    def verify(self, cfg: DictConfig, bench: Bench, out_dir: Path, setting: Setting, attempt: int) -> Verification:
        """``job=compare``'s measurement of ``setting`` (on ``cfg`` with the tuned strategy) into
        ``verify_<attempt>/``."""
        vcfg = self.verification_config(cfg, setting, bench.granularity)
        name = f"verify_{attempt}"
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        metrics = measure(vcfg, bench.adapter, build_strategy(vcfg), Sink(), out_dir / name, self.grid_rows)
        return Verification({"speedup": metrics["flops"]["speedup"], "rel_l2": metrics["quality"]["rel_l2"],
                             "psnr_db": metrics["quality"]["psnr_db"], "cache_bytes": metrics["cache_bytes"]},
                            metrics["full_steps"], name)

    def strategy_nodes(self, cfg: DictConfig, setting: Setting, granularity: str) -> tuple[dict, dict]:
        """The ``strategy`` and ``schedule`` config nodes of ``setting`` (plain values)."""
        predictor = OmegaConf.to_container(cfg.job.predictors[setting.family], resolve=True)
        predictor.pop("_partial_", None)
        predictor["order"] = setting.order
        strategy = {"name": "tuned", "granularity": granularity, "predictor": predictor, "needs_schedule": SCHEDULE}
        schedule = {"_target_": SCHEDULE, "intervals": dict(setting.intervals),
                    "first_enhance": self.tuner.options.first_enhance, "final_full": 0}
        return strategy, schedule

    def verification_config(self, cfg: DictConfig, setting: Setting, granularity: str) -> DictConfig:
        """``cfg`` with the tuned strategy and schedule in place of the configured ones."""
        strategy, schedule = self.strategy_nodes(cfg, setting, granularity)
        vcfg = copy.deepcopy(cfg)
        with open_dict(vcfg):
            vcfg.strategy, vcfg.schedule, vcfg.order = strategy, schedule, setting.order
        return vcfg

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
                 "first_enhance": self.tuner.options.first_enhance, "schedule": "per_site",
                 "intervals": setting.intervals}
        write_bytes_atomic(out_dir / "tuned_apply.json", (json.dumps(apply, indent=1) + "\n").encode())


def cache_budget(cfg: DictConfig, adapter) -> CacheBudget | None:
    """``cache.budget`` for the tuner: the limit, and the planner on the run's model and generation
    (:func:`~cachelab.jobs.plan.plan_keys`, as the budget check of every other job plans)."""
    budget = cfg.get("cache", {}).get("budget")
    if budget is None:
        return None
    target, keys = plan_target(cfg, adapter), plan_keys(cfg, adapter)
    return CacheBudget(parse_size(budget, "cache.budget"), lambda strategy: plan(target, strategy, **keys).cache_bytes)


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
    budget = result.get("cache_budget")
    if budget:
        chosen = budget.get("chosen")
        lines += ["", f"Cache budget {budget['budget']} B: planned (every site at interval 1) "
                  + ", ".join(f"{k} {v} B" for k, v in budget["planned"].items())
                  + (f"; left out before any run: {', '.join(budget['excluded'])}" if budget["excluded"] else "")
                  + (f". Chosen: planned {chosen['planned']} B, measured {chosen['measured']} B." if chosen else ".")]
    if result.get("run_with"):
        lines += ["", f"Chosen: {result['chosen']}; run it: `{result['run_with']}`"]
    return "\n".join(lines) + "\n"
