"""Memory-bounded caching on the trained tiny models (issue 29 §3; docs/guides/memory.md, "Meeting a cache budget").

    python train_free_runs/memory/study.py --model tiny_dit --out train_free_runs/memory/tiny_dit
    python train_free_runs/memory/study.py --model tiny_flux_digits --out train_free_runs/memory/tiny_flux_digits
    python train_free_runs/memory/study.py --report train_free_runs/memory   # results.md from both

The reference is the unbounded TaylorSeer cache: order 2, module sites, fp32 factors, interval N
(first_enhance 2). At budgets of 100/50/25/10/5 % of its planned bytes, each *way* of meeting a
budget (one entry of :data:`WAYS`) proposes candidates; each is planned first (``cachelab.plan``:
exact bytes and FLOPs) and one over the budget is never run. Among the fitting ones the way keeps
the best PSNR on the selection images (seed 1), and that choice alone is measured on the held-out
images (seed 0): PSNR against the uncached images with a bootstrap interval over images, the
paired difference to the unbounded cache, the FLOPs speedup (planned: equal to the counted FLOPs,
tests/test_planner.py) and the cache bytes the run held (``stats().cache_bytes``, checked equal to
the plan). Per-site rankings (which sites lose least by a lower order, which blocks by being
cached whole) are measured on the selection images too. ``job=tune`` with ``cache.budget`` is the
tuner's combination (its own search on the selection images, then measured like the others).
Everything is written to ``<out>/study.json``; ``--report`` turns the folders into results.md and
plans the chosen settings on FLUX.1-dev 1024^2 and HunyuanVideo 720p x 129 (``cachelab.plan``).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import cachelab  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from cachelab.errors import ConfigError  # noqa: E402
from cachelab.evaluation.statistics import bootstrap_interval, per_image_mse, psnr_interval, psnr_of_mse  # noqa: E402
from cachelab.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from cachelab.jobs.base import build  # noqa: E402
from cachelab.jobs.plan import plan_keys, plan_target  # noqa: E402
from cachelab.jobs.presets import preset  # noqa: E402
from cachelab.jobs.runner import run  # noqa: E402
from cachelab.jobs.schema import compose_config  # noqa: E402
from cachelab.planner import size_text  # noqa: E402
from cachelab.strategies.taylor import TaylorSeer  # noqa: E402

BUDGETS = (0.25, 0.10, 1.0, 0.5, 0.05)  # of the unbounded order-2 module fp32 cache; the goal's first
# The factor codecs of the storage ways, in one place: the ones the predictor takes now, and the
# ones of the low-precision storage work (fp8 / int8, per derivative order: a list is D_0, D_1, ...);
# a codec the predictor refuses is reported as "not available in this checkout".
CODECS = ("fp32", "bf16", "fp16")
LATER_CODECS = ("fp8_e4m3", "fp8_e5m2", "int8_channel", "int8_token", ("bf16", "fp8_e4m3", "fp8_e4m3"))
TUNER_CODECS = ("fp32", "fp16", "fp8_e4m3", "int8_channel")  # one predictor family each in job=tune

log = logging.getLogger("memory-study")


def available(codec) -> bool:
    """Whether TaylorSeer takes ``codec`` as its ``factor_dtype`` in this checkout."""
    try:
        TaylorSeer(order=2, factor_dtype=list(codec) if isinstance(codec, tuple) else codec)
    except (ValueError, TypeError):
        return False
    return True


def codec_name(codec) -> str:
    return "/".join(codec) if isinstance(codec, tuple) else codec


@dataclass
class Candidate:
    """One configuration: ``cachelab.apply``'s preset name and keys."""

    label: str
    strategy: str = "taylor"
    keys: dict = field(default_factory=dict)


class Study:
    """One model's runs: plans and selection PSNRs (cached by label), held-out measurements."""

    def __init__(self, model: str, steps: int, interval: int, select_images: int, heldout_images: int):
        self.cfg = compose_config([f"model={model}", f"num_steps={steps}", "logger=none", "progress=false",
                                   "threads=1", f"interval={interval}", "first_enhance=2",
                                   f"num_images={heldout_images}"])
        self.model, self.steps, self.interval = model, steps, interval
        self.adapter = build(self.cfg, "model")
        self.base = {"order": 2, "interval": interval, "first_enhance": 2, "num_steps": steps}
        self.images = {"select": select_images, "heldout": heldout_images}
        self.inputs = {"select": self.adapter.make_inputs(select_images, 1),
                       "heldout": self.adapter.make_inputs(heldout_images, 0)}
        self.uncached = {k: self.adapter.decode(self.adapter.generate(v)) for k, v in self.inputs.items()}
        self.plans: dict[str, object] = {}
        self.select: dict[str, float] = {}
        self.runs = 0
        self.unbounded = Candidate("unbounded o2 module fp32", keys={"factor_dtype": "fp32"})
        self.reference_bytes = self.plan(self.unbounded).cache_bytes
        self.heldout_reference = self.heldout(self.unbounded)

    def keys(self, candidate: Candidate) -> dict:
        return {**self.base, **candidate.keys}

    def plan(self, candidate: Candidate):
        """The candidate planned for the held-out batch (cached)."""
        if candidate.label not in self.plans:
            self.plans[candidate.label] = self.plan_for(self.cfg, candidate)
        return self.plans[candidate.label]

    def plan_for(self, cfg, candidate: Candidate):
        """``candidate`` planned for ``cfg``'s generation (its ``num_images`` in one batch)."""
        keys = {k: v for k, v in self.keys(candidate).items() if k != "num_steps"}
        return cachelab.plan(plan_target(cfg, self.adapter), candidate.strategy, **plan_keys(cfg, self.adapter), **keys)

    def fits(self, candidate: Candidate, budget: int) -> bool:
        return self.plan(candidate).cache_bytes <= budget

    def generate(self, candidate: Candidate, split: str) -> tuple[torch.Tensor, int]:
        """Decoded images of a cached generation of ``split``'s inputs and the cache bytes it held."""
        keys = {k: v for k, v in self.keys(candidate).items() if k != "num_steps"}
        strategy = preset(candidate.strategy, num_steps=self.steps, **keys)
        handle = strategy.attach(self.adapter)
        try:
            latents = self.adapter.generate(self.inputs[split], handle)
            held = handle.stats().cache_bytes
        finally:
            handle.remove()
        self.runs += 1
        return self.adapter.decode(latents), held

    def selection_psnr(self, candidate: Candidate) -> float:
        if candidate.label not in self.select:
            images, _ = self.generate(candidate, "select")
            self.select[candidate.label] = psnr_of_mse(per_image_mse(images, self.uncached["select"]))
        return self.select[candidate.label]

    def heldout(self, candidate: Candidate) -> dict:
        """The held-out measurement: PSNR and its interval, the paired difference to the unbounded
        cache and its interval, FLOPs speedup, planned and measured cache bytes."""
        images, held = self.generate(candidate, "heldout")
        planned = self.plan(candidate)
        if held != planned.cache_bytes:
            raise AssertionError(f"{candidate.label}: measured {held} B of cache, planned {planned.cache_bytes} B")
        mse = per_image_mse(images, self.uncached["heldout"])
        psnr, low, high = psnr_interval(mse)
        out = {"label": candidate.label, "strategy": candidate.strategy, "keys": candidate.keys,
               "psnr_db": psnr, "psnr_interval": [low, high], "flops_speedup": planned.flops_speedup,
               "cache_bytes": held, "mse": mse.tolist()}
        reference = getattr(self, "heldout_reference", None)
        if reference is not None:
            ref = np.asarray(reference["mse"])
            index = np.arange(len(mse))
            gap = lambda idx: psnr_of_mse(mse[idx.astype(int)]) - psnr_of_mse(ref[idx.astype(int)])  # noqa: E731
            out["vs_unbounded_db"] = gap(index)
            out["vs_unbounded_interval"] = list(bootstrap_interval(index, gap))
        return out


# -- the ways: each proposes the candidates that fit a budget (bytes) --------------------------
def storage_way(codecs):
    """Order 2, module sites, every factor in one codec (or one per derivative order)."""
    def way(study: Study, budget: int) -> list[Candidate]:
        usable = [c for c in codecs if available(c)]
        if not usable:
            return None  # not available in this checkout
        candidates = [Candidate(f"o2 module {codec_name(c)}", keys={"factor_dtype": list(c) if isinstance(c, tuple)
                                                                      else c}) for c in usable]
        return [c for c in candidates if study.fits(c, budget)]
    return way


def site_ranking(study: Study) -> list[str]:
    """The module sites holding bytes, least loss first when that site alone keeps order 1 (selection images)."""
    if not hasattr(study, "_site_ranking"):
        sites = [s.name for s in study.plan(study.unbounded).sites if s.nbytes]
        loss = {s: -study.selection_psnr(Candidate(f"o1 at {s}", keys={"factor_dtype": "fp32",
                                                                       "site_orders": {1: [re.escape(s)]}}))
                for s in sites}
        study._site_ranking = sorted(sites, key=lambda s: loss[s])
    return study._site_ranking


def order_sequence(study: Study) -> list[dict[str, int]]:
    """Per-site orders, most factors first: the ranking's first k sites at order 1 (k = 0..n), then
    with every site at 1 its first k at order 0."""
    ranked = site_ranking(study)
    out = [{s: (1 if i < k else 2) for i, s in enumerate(ranked)} for k in range(len(ranked) + 1)]
    out += [{s: (0 if i < k else 1) for i, s in enumerate(ranked)} for k in range(1, len(ranked) + 1)]
    return out


def site_orders_keys(orders: dict[str, int], whole: list[str] = ()) -> dict[int, list[str]]:
    """``site_orders`` for per-site ``orders`` of module sites; a whole block keeps the largest of its sites'."""
    kept = {s: o for s, o in orders.items() if not any(s.startswith(b + ".") for b in whole)}
    kept.update({b: max((o for s, o in orders.items() if s.startswith(b + ".")), default=2) for b in whole})
    keys: dict[int, list[str]] = {}
    for site, order in kept.items():
        if order != 2:
            keys.setdefault(order, []).append(re.escape(site))
    return keys


def orders_label(orders: dict[str, int]) -> str:
    counts = {o: sum(v == o for v in orders.values()) for o in (2, 1, 0)}
    return "orders " + " ".join(f"{n}xo{o}" for o, n in counts.items() if n)


def first_fitting(study: Study, candidates: list[Candidate], budget: int) -> list[Candidate]:
    """The first of ``candidates`` (bytes falling along the list) that fits, by bisection (few plans)."""
    if not candidates or not study.fits(candidates[-1], budget):
        return []
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if study.fits(candidates[middle], budget) else (middle + 1, high)
    return [candidates[low]]


def site_order_way(study: Study, budget: int) -> list[Candidate]:
    """Order 2 where it pays: the fewest sites lowered (least loss first) that fit."""
    return first_fitting(study, [Candidate(f"{orders_label(o)} module fp32", keys={
        "factor_dtype": "fp32", "site_orders": site_orders_keys(o)}) for o in order_sequence(study)], budget)


def block_ranking(study: Study) -> list[str]:
    """The blocks, least loss first when that block alone is cached whole (selection images)."""
    if not hasattr(study, "_block_ranking"):
        blocks = [s.name for s in study.plan(Candidate("o2 block fp32", keys={"factor_dtype": "fp32",
                                                                             "granularity": "block"})).sites]
        loss = {b: -study.selection_psnr(Candidate(f"whole {b}", keys={"factor_dtype": "fp32",
                                                                         "whole_blocks": [re.escape(b)]}))
                for b in blocks}
        study._block_ranking = sorted(blocks, key=lambda b: loss[b])
    return study._block_ranking


def whole_candidate(k: int, ranked: list[str], codec="fp32", orders: dict[str, int] | None = None) -> Candidate:
    whole = ranked[:k]
    keys = {"factor_dtype": list(codec) if isinstance(codec, tuple) else codec,
            "whole_blocks": [re.escape(b) for b in whole]}
    label = f"{k}/{len(ranked)} blocks whole"
    if orders is not None:
        keys["site_orders"] = site_orders_keys(orders, whole)
        label += f", {orders_label(orders)}"
    return Candidate(f"{label} {codec_name(codec)}", keys=keys)


def granularity_way(study: Study, budget: int) -> list[Candidate]:
    """Module sites where they pay: the fewest blocks cached whole (least loss first) that fit."""
    ranked = block_ranking(study)
    return first_fitting(study, [whole_candidate(k, ranked) for k in range(len(ranked) + 1)], budget)


def lite_way(study: Study, budget: int) -> list[Candidate]:
    """TaylorSeer-Lite on the model output and on the stack's residual, orders 2 and 1."""
    candidates = [Candidate(f"{name} o{o} fp32", name, {"order": o, "factor_dtype": "fp32"})
                  for name in ("taylorseer_lite", "taylorseer_lite_stack") for o in (2, 1)]
    return [c for c in candidates if study.fits(c, budget)]


def combination_way(study: Study, budget: int) -> list[Candidate]:
    """Every available codec x no, half or every block cached whole (least loss first), with the
    fewest sites lowered that fit."""
    ranked, sequence = block_ranking(study), order_sequence(study)
    out = []
    for codec in [c for c in (*CODECS, *LATER_CODECS) if available(c)]:
        for k in sorted({0, len(ranked) // 2, len(ranked)}):
            out += first_fitting(study, [whole_candidate(k, ranked, codec, o) for o in sequence], budget)
    return out


def tuner_way(study: Study, budget_fraction: float, out: Path) -> list[Candidate]:
    """``job=tune`` with ``cache.budget`` and one predictor family per available codec, target: the
    unbounded cache's FLOPs speedup; its search and verification on the selection images."""
    n = study.images["select"]
    args = [f"model={study.model}", f"num_steps={study.steps}", "logger=none", "progress=false", "threads=1",
            "first_enhance=2", "seed=1", f"num_images={n}", f"measure.flops_images={n}"]
    budget = int(budget_fraction * study.plan_for(compose_config(args), study.unbounded).cache_bytes)
    speedup = study.plan(study.unbounded).flops_speedup
    families = {f"taylor_{codec_name(c).replace('/', '_')}": c for c in TUNER_CODECS if available(c)}
    cfg = compose_config(args + ["job=tune", f"job.target.speedup={speedup * 0.999:.4f}", "job.orders=[0,1,2]",
                                 "job.intervals=[3,5,8]", "job.group=block", "job.sensitivity_images=1",
                                 "job.calibration_runs=2", "job.max_tries=2", f"cache.budget={budget}",
                                 f"job.sensitivity_file={out / 'tune_sensitivity.json'}"])
    with open_dict(cfg):
        cfg.job.predictors = {name: {"_target_": "cachelab.strategies.taylor.TaylorSeer", "_partial_": True,
                                     "first_enhance": 2, "factor_dtype": list(c) if isinstance(c, tuple) else c}
                              for name, c in families.items()}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            result = run(cfg, Path(scratch))
        except ConfigError as err:  # no candidate fits the budget: reported as such
            log.info(f"tuner at {budget_fraction:.0%}: {err}")
            return []
        folder = out / f"tune_{round(100 * budget_fraction)}"
        for name in ("tune.json", "report.md"):
            write_bytes_atomic(folder / name, (Path(scratch) / name).read_bytes())
    if not result["met"]:
        return []
    chosen = result["tries"][-1]
    codec = families[chosen["family"]]
    return [Candidate(f"tuned {chosen['setting']} {codec_name(codec)}", keys={
        "order": chosen["order"], "factor_dtype": list(codec) if isinstance(codec, tuple) else codec,
        "schedule": "per_site", "intervals": chosen["intervals"]})]


WAYS = {"storage": storage_way(CODECS), "storage (fp8 / int8 codecs)": storage_way(LATER_CODECS),
        "per-site order": site_order_way, "per-site granularity": granularity_way, "lite": lite_way,
        "combination": combination_way}


def study_model(args) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    study = Study(args.model, args.steps, args.interval, args.select_images, args.heldout_images)
    out = Path(args.out)
    cells: dict[str, dict[str, dict | None | str]] = {}
    measured: dict[str, dict] = {study.unbounded.label: study.heldout_reference}
    for fraction in BUDGETS:
        budget = int(fraction * study.reference_bytes)
        row = cells.setdefault(f"{round(100 * fraction)}", {})
        ways = dict(WAYS)
        if round(100 * fraction) in args.tuner_budgets:
            ways["tuner (job=tune, cache.budget)"] = lambda s, b, f=fraction: tuner_way(s, f, out)
        for name, way in ways.items():
            candidates = way(study, budget)
            if candidates is None:
                row[name] = "not available in this checkout"
                continue
            if not candidates:
                row[name] = None
                continue
            best = max(candidates, key=lambda c: (study.selection_psnr(c) if len(candidates) > 1 else 0,
                                                  study.plan(c).flops_speedup))
            if best.label not in measured:
                measured[best.label] = study.heldout(best)
            row[name] = {"label": best.label, "candidates": len(candidates),
                         "selection_psnr_db": study.select.get(best.label)}
            log.info(f"{args.model} {fraction:.0%} {name}: {best.label} "
                     f"{measured[best.label]['psnr_db']:.2f} dB, {study.plan(best).cache_bytes} B")
        write_json_atomic(out / "study.json", summary(args, study, cells, measured, started))
    return summary(args, study, cells, measured, started)


def summary(args, study: Study, cells, measured, started) -> dict:
    return {"model": args.model, "num_steps": args.steps, "interval": args.interval, "first_enhance": 2,
            "select_images": args.select_images, "heldout_images": args.heldout_images,
            "reference": study.unbounded.label, "reference_bytes": study.reference_bytes,
            "budgets": list(BUDGETS), "cells": cells, "measured": measured,
            "site_ranking": getattr(study, "_site_ranking", None), "block_ranking": getattr(study, "_block_ranking", None),
            "selection_psnr_db": study.select, "runs": study.runs, "seconds": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(), "tuner_budgets": args.tuner_budgets}


# -- the report -------------------------------------------------------------------------------
PROJECTIONS = {"FLUX.1-dev 1024^2, 50 steps": dict(target="flux.1-dev", num_inference_steps=50, height=1024,
                                                   width=1024, first_enhance=3),
               "HunyuanVideo 720p x 129, 50 steps": dict(target="hunyuanvideo", num_inference_steps=50, height=720,
                                                        width=1280, num_frames=129, first_enhance=1)}


def general(keys: dict, stacks: dict[str, int]) -> dict:
    """A tiny FLUX's chosen keys for any model of the same family: a stack's blocks are whole, or a
    stack's sites of one kind keep an order, where the choice held for every block of that stack
    on the tiny model (``stacks``: stack name -> its number of blocks there)."""
    out = {k: v for k, v in keys.items() if k not in ("whole_blocks", "site_orders", "intervals", "schedule")}
    whole = [re.sub(r"\\", "", p) for p in keys.get("whole_blocks", [])]
    out["whole_blocks"] = [rf"{stack}\.\d+" for stack, n in stacks.items()
                           if sum(re.fullmatch(rf"{stack}\.\d+", b) is not None for b in whole) == n]
    orders = {re.sub(r"\\", "", p): int(o) for o, patterns in keys.get("site_orders", {}).items() for p in patterns}
    general_orders: dict[int, list[str]] = {}
    for name, order in orders.items():
        parts = name.split(".")
        stack, kind = parts[0], ".".join(parts[2:])
        pattern = rf"{stack}\.\d+" + (rf"\.{kind}" if kind else "")
        same = [o for n, o in orders.items() if re.fullmatch(pattern, n)]
        if len(same) == stacks.get(stack, 0) and len(set(same)) == 1 and pattern not in general_orders.get(order, []):
            general_orders.setdefault(order, []).append(pattern)
    if general_orders:
        out["site_orders"] = general_orders
    if not out["whole_blocks"]:
        del out["whole_blocks"]
    return out


def report(folder: Path) -> str:
    studies = [json.loads(p.read_text()) for p in sorted(folder.glob("*/study.json"))]
    lines = ["# Memory-bounded caching: results", "",
             "Written by `python train_free_runs/memory/study.py --report train_free_runs/memory`; the method, "
             "the sizes and what the grid reduced: README.md next to this file.", ""]
    for s in studies:
        ref = s["measured"][s["reference"]]
        lines += [f"## {s['model']}", "",
                  f"{s['num_steps']} steps, interval N={s['interval']}, first_enhance 2; reference: {s['reference']}, "
                  f"{size_text(s['reference_bytes'])} ({s['reference_bytes']} B) for {s['heldout_images']} held-out "
                  f"images, {ref['flops_speedup']:.2f}x FLOPs, PSNR {ref['psnr_db']:.2f} dB "
                  f"[{ref['psnr_interval'][0]:.2f}, {ref['psnr_interval'][1]:.2f}]. Selection on "
                  f"{s['select_images']} images (seed 1), held-out {s['heldout_images']} images (seed 0); "
                  f"{s['runs']} cached generations, {s['seconds'] / 60:.1f} min.", "",
                  "| budget | way | chosen | cache (planned = measured) | FLOPs | PSNR held-out [95 % CI] "
                  "| vs unbounded [95 % CI] |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for budget, row in sorted(s["cells"].items(), key=lambda item: -int(item[0])):
            for way, cell in row.items():
                if not isinstance(cell, dict):
                    lines.append(f"| {budget} % | {way} | {cell or 'nothing fits'} | | | | |")
                    continue
                m = s["measured"][cell["label"]]
                gap = (f"{m['vs_unbounded_db']:+.2f} dB [{m['vs_unbounded_interval'][0]:+.2f}, "
                       f"{m['vs_unbounded_interval'][1]:+.2f}]")
                lines.append(f"| {budget} % | {way} | {cell['label']} | {size_text(m['cache_bytes'])} "
                             f"({100 * m['cache_bytes'] / s['reference_bytes']:.1f} %) | {m['flops_speedup']:.2f}x "
                             f"| {m['psnr_db']:.2f} [{m['psnr_interval'][0]:.2f}, {m['psnr_interval'][1]:.2f}] "
                             f"| {gap} |")
        lines.append("")
    lines += projection(studies)
    return "\n".join(lines) + "\n"


def projection(studies: list[dict]) -> list[str]:
    """The chosen settings of tiny_flux_digits (the FLUX family: the same site names) planned on
    FLUX.1-dev and HunyuanVideo (bf16 weights; 32- and 16-bit factors planned in the weights' bf16,
    which holds the same bytes as fp16; fp8 / int8 codecs as chosen)."""
    flux = next((s for s in studies if s["model"] == "tiny_flux_digits"), None)
    if flux is None:
        return []
    every = [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]
    chosen = {"unbounded o2 module (factors in the weights' dtype)": {},
              "rule: every block whole (both stacks), o2": {"whole_blocks": every},
              "rule: every block whole, o1": {"whole_blocks": every, "order": 1},
              "rule: lite, model output, o2": {"strategy": "taylorseer_lite"},
              "rule: lite, the stack's residual, o2": {"strategy": "taylorseer_lite_stack"}}
    for budget in ("25", "10"):
        for way, cell in flux["cells"].get(budget, {}).items():
            if isinstance(cell, dict) and not way.startswith("tuner"):
                keys = dict(flux["measured"][cell["label"]]["keys"])
                if keys.get("factor_dtype") in ("fp32", "bf16", "fp16"):
                    keys.pop("factor_dtype")  # the big models' weights are bf16: fp32 was "no rounding", fp16 the same bytes
                strategy = flux["measured"][cell["label"]]["strategy"]
                chosen[f"{budget} %: {way}: {cell['label']}"] = {"strategy": strategy, **keys}
    lines = ["## Projection (cachelab.plan on the shipped configs, meta device)", "",
             "| setting (chosen on tiny_flux_digits) | generalised keys | model | cache | weights + cache "
             "+ activations | FLOPs | fits 80 GB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    stacks = {"transformer_blocks": 2, "single_transformer_blocks": 2}
    for label, keys in chosen.items():
        keys = dict(keys)
        strategy = keys.pop("strategy", "taylor")
        if not label.startswith(("rule:", "unbounded")):  # a tiny choice: per stack, where it held for the whole stack
            per_block = {"whole_blocks", "site_orders"} & set(keys)
            keys = general(keys, stacks)
            if per_block and not per_block & set(keys):
                lines.append(f"| {label} | no per-stack form (its choices differ between the blocks of a stack): "
                             f"see the rule rows | | | | | |")
                continue
        for model in PROJECTIONS:
            p = projected(model, strategy, keys)
            if "refused" in p:
                lines.append(f"| {label} | `{keys}` | {model} | refused: {p['refused']} | | | |")
                continue
            lines.append(f"| {label} | `{keys}` | {model} | {size_text(p['cache_bytes'])} | "
                         f"{size_text(p['peak_bytes'])} | {p['flops_speedup']:.2f}x | {'yes' if p['fits'] else 'no'} |")
    return lines


PROJECTED = ROOT / "train_free_runs" / "memory" / "projection.json"  # plans kept: each takes ~30 s or more


def projected(model: str, strategy: str, keys: dict) -> dict:
    """The plan of ``strategy`` with ``keys`` on a :data:`PROJECTIONS` model (N=5, order 2 unless
    given, 80 GB device), read from :data:`PROJECTED` when planned before, else planned and kept."""
    kept = json.loads(PROJECTED.read_text()) if PROJECTED.is_file() else {}
    name = json.dumps([model, strategy, keys], sort_keys=True)
    if name not in kept:
        setting = dict(PROJECTIONS[model])
        target = setting.pop("target")
        try:
            p = cachelab.plan(target, strategy, interval=5, device_memory="80GB", **{"order": 2, **setting, **keys})
            kept[name] = {"cache_bytes": p.cache_bytes, "peak_bytes": p.peak_bytes, "weight_bytes": p.weight_bytes,
                          "activation_bytes": p.activation_bytes, "flops_speedup": p.flops_speedup, "fits": p.fits,
                          "seconds": p.seconds}
        except ConfigError as err:
            kept[name] = {"refused": str(err)}
        kept = {**(json.loads(PROJECTED.read_text()) if PROJECTED.is_file() else {}), name: kept[name]}
        write_json_atomic(PROJECTED, kept)
    return kept[name]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_dit")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--select-images", type=int, default=4)
    parser.add_argument("--heldout-images", type=int, default=16)
    parser.add_argument("--tuner-budgets", type=int, nargs="*", default=[],
                        help="the budgets (%%) at which job=tune runs too, e.g. --tuner-budgets 25 10")
    parser.add_argument("--report", default=None, help="a folder of <model>/study.json: write its results.md")
    args = parser.parse_args()
    if args.report:
        folder = Path(args.report)
        write_bytes_atomic(folder / "results.md", report(folder).encode())
        return
    args.out = args.out or str(ROOT / "train_free_runs" / "memory" / args.model)
    study_model(args)


if __name__ == "__main__":
    main()
