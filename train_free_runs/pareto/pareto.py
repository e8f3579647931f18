"""Pareto study: cachelab's strategies against every peer preset that runs on the two trained
models, speed (FLOPs and wall time) against quality (PSNR to full compute, the digit judge's FD).

    python train_free_runs/pareto/pareto.py --model tiny_flux_digits --images 32 --repeats 1
    python train_free_runs/pareto/pareto.py --model tiny_dit --images 32 --repeats 1
    python train_free_runs/pareto/pareto.py --model tiny_dit --only diffusers-taylorseer,cachelab-taylor --repeats 3

One process per model, the same seeds for every point. Each point is one tool at one setting:
first one generation of ``--images`` images under a FLOP counter (its images give PSNR against
the full-compute images, the judge's class accuracy and FD, its count the FLOPs speedup), then
``--repeats`` timing rounds: a round times one generation of every point, the points of the
different tools interleaved, and full compute again before every ``BASE_EVERY``-th point, so
the machine's drift hits every tool alike; the wall speedup is the median full-compute time
over the median time of the point. With ``--only`` only those families run; their rows replace
the same families' rows in ``results_<model>.csv`` and the report is rebuilt from the whole file
(each row keeps the full-compute time of its own run). ``--repeats 0`` measures no wall time;
``--report`` measures nothing and rebuilds the Markdown and the figure from the CSV.

Models: ``tiny_flux_digits`` (the shipped trained ``FluxPipeline``), ``tiny_dit`` (the shipped
trained DiT converted to diffusers' ``DiTTransformer2DModel`` by
:mod:`cachelab.models.convert_dit` and sampled by the native DDIM loop: diffusers' hooks need
diffusers' block classes; both tools run on that same transformer). Peers: diffusers' hooks
(``enable_cache``) and, on FLUX, cache-dit (``pip install -e ".[peers]"``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from analysis.figures import png_bytes, pyplot  # noqa: E402
from cachelab.assets import load_calibration  # noqa: E402
from cachelab.evaluation.flops import count_flops  # noqa: E402
from cachelab.evaluation.judge import DigitJudge  # noqa: E402
from cachelab.evaluation.metrics import psnr  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.core.controller import attach  # noqa: E402
from cachelab.core.schedules import Mask  # noqa: E402
from cachelab.core.sites import SitePattern, select_sites  # noqa: E402
from cachelab.jobs.presets import preset  # noqa: E402
from strategies.taylor import TaylorSeer  # noqa: E402
from train_free_runs.bench import peers  # noqa: E402
from train_free_runs.bench.timing import machine, seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
BASE_EVERY = 8  # a full-compute timing before every 8th point of a round
LEVELS = (30.0, 35.0, 40.0)
PSNR_SLACK = 0.01  # dB: PSNRs this close count as equal in the dominance check  # PSNR levels (dB) of the summary table
CACHELAB = ("cachelab-taylor", "cachelab-warmup", "cachelab-mask", "cachelab-adaptive", "cachelab-predictors")
PEERS = ("diffusers-taylorseer", "diffusers-fbcache", "diffusers-magcache", "diffusers-pab", "cache-dit")
FAMILIES = CACHELAB + PEERS
TOOLS = {"diffusers-taylorseer": "diffusers TaylorSeer", "diffusers-fbcache": "diffusers FirstBlockCache",
         "diffusers-magcache": "diffusers MagCache", "diffusers-pab": "diffusers PAB", "cache-dit": "cache-dit DBCache"}


# diffusers' TaylorSeer hook: its default identifiers (None: every attention module, matched with
# re.fullmatch against `^transformer_blocks.*attn`) match FLUX's `attn` but never DiT's `attn1`, so on
# DiT the attention modules are named for it, and, as a further knob, the feed-forwards too.
TAYLORSEER_SITES = {"tiny_flux_digits": {"": None},
                    "tiny_dit": {" attn": [r"transformer_blocks\.\d+\.attn1"],
                                 " attn+ff": [r"transformer_blocks\.\d+\.(attn1|ff)"]}}


def tool_of(family: str) -> str:
    return "cachelab" if family in CACHELAB else TOOLS[family]


@dataclass(frozen=True)
class Point:
    """One tool at one setting: ``enabled()`` is a context manager inside which the tool caches
    (it yields cachelab's handle, or None for a peer, which hooks the model itself)."""

    family: str
    setting: str
    enabled: Callable[[], AbstractContextManager]

    @property
    def tool(self) -> str:
        return tool_of(self.family)


@dataclass
class Study:
    """A model and what the tools need of it: the adapter (generation, decode, judge), the
    diffusers transformer the peers hook, the current timestep (PAB's callback)."""

    name: str
    adapter: object
    transformer: torch.nn.Module
    timestep: Callable[[], object]


def make_study(model: str, steps: int) -> Study:
    judge = DigitJudge()
    if model == "tiny_flux_digits":
        from cachelab.models.pipelines.flux_digits import FluxDigitsAdapter

        adapter = FluxDigitsAdapter(model, judge=judge, num_steps=steps, guidance_scale=3.5)
        return Study(model, adapter, adapter.model, lambda: adapter.pipe.current_timestep)
    from cachelab.models.convert_dit import ConvertedDiTAdapter

    adapter = ConvertedDiTAdapter(model, weights="tiny_dit_mnist", judge=judge, num_steps=steps, guidance_scale=1.5)
    return Study(model, adapter, adapter.transformer, lambda: adapter.model.current_timestep)


# -- the points --------------------------------------------------------------------------
@contextlib.contextmanager
def cachelab_on(adapter, name: str, overrides: dict) -> Iterator:
    """cachelab's preset ``name`` with the command line's ``overrides`` on ``adapter``'s sites."""
    handle = preset(name, **overrides).attach(adapter)
    try:
        yield handle
    finally:
        handle.remove()


def ours(study: Study, family: str, setting: str, name: str, **overrides) -> Point:
    return Point(family, setting, lambda: cachelab_on(study.adapter, name, overrides))


def hooked(study: Study, family: str, setting: str, config: Callable[[], object]) -> Point:
    """A diffusers hook ``config()`` on the study's transformer; yields no handle."""
    @contextlib.contextmanager
    def enabled():
        with peers.diffusers_hook(study.transformer, config()):
            yield None

    return Point(family, setting, enabled)


@contextlib.contextmanager
def attention_only(study: Study, order: int, full_steps: list[int]) -> Iterator:
    """cachelab's TaylorSeer (derivatives from step 0, fp32 factors) on DiT's attention modules only."""
    sites = select_sites(study.adapter.model, [SitePattern(r"transformer\.transformer_blocks\.\d+\.attn1")])
    handle = attach(sites, TaylorSeer(order, first_enhance=1, factor_dtype="fp32"), Mask(full_steps=full_steps))
    try:
        yield handle
    finally:
        handle.remove()


def cachelab_points(study: Study, calibration: Path, full: bool) -> list[Point]:
    """TaylorSeer orders 1-3 x N 2..10 at module granularity, at block and stack granularity
    (orders 1-3 with ``full``, else order 2 at a few N), warm-up variants; the error-controlled,
    FirstBlockCache and MagCache schedules with TaylorSeer; TaylorSeer's Newton form and
    Adams-Bashforth at N 3-8, HiCache and least squares at N 5 (``full``: N 3-8); the non-uniform ``mask`` schedule. ``full``: the whole grid, else a smaller one."""
    points = []
    for granularity in ("module", "block", "stack"):
        for order in (1, 2, 3) if full or granularity == "module" else (2,):
            for n in range(2, 11) if full or granularity == "module" else (3, 5, 8):
                points.append(ours(study, "cachelab-taylor", f"taylor o{order} N={n} {granularity}", "taylor",
                                   order=order, interval=n, granularity=granularity))
    for fe in (3, 5) if full else (3,):
        for n in (4, 6, 8, 10) if full else (6, 10):
            points.append(ours(study, "cachelab-taylor", f"taylor o2 N={n} fe={fe} module", "taylor",
                               order=2, interval=n, first_enhance=fe))
    for order in (1, 2):  # three warm-up steps, as diffusers' TaylorSeer default D=3
        for n in (2, 3, 5, 8):
            points.append(ours(study, "cachelab-warmup", f"taylor o{order} N={n} fe=3 module", "taylor",
                               order=order, interval=n, first_enhance=3))
    for order in (1, 2):  # diffusers' TaylorSeer full steps (N, D=3) as a mask; derivatives from step 0
        for n in (2, 3, 5, 8):
            full_steps = peers.diffusers_taylorseer_steps(study.adapter.num_steps, n, 3)
            points.append(ours(study, "cachelab-mask", f"taylor o{order} mask of diffusers' N={n} D=3 module", "taylor",
                               order=order, schedule="mask", full_steps=full_steps, first_enhance=1,
                               factor_dtype="fp32"))
            if study.name == "tiny_dit" and n == 2:  # the attention modules only, as diffusers' hook by default
                points.append(Point("cachelab-mask", f"taylor o{order} mask of diffusers' N={n} D=3 attention",
                                    lambda order=order, full_steps=full_steps: attention_only(study, order, full_steps)))
    for granularity in ("module", "block") if full else ("module",):
        for tolerance in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4) if full else (0.02, 0.05, 0.1, 0.2):
            points.append(ours(study, "cachelab-adaptive", f"taylor o2 error-controlled tol={tolerance} {granularity}",
                               "taylor", order=2, granularity=granularity, schedule="error_controlled",
                               tolerance=tolerance))
    for threshold in (0.05, 0.1, 0.2, 0.3) if full else (0.1, 0.3):
        points.append(ours(study, "cachelab-adaptive", f"taylor o2 fbcache thr={threshold} stack", "taylor",
                           order=2, granularity="stack", schedule="fbcache", threshold=threshold, first_enhance=3))
    for threshold in (0.06, 0.12, 0.24, 0.5) if full else (0.12, 0.5):
        points.append(ours(study, "cachelab-adaptive", f"taylor o2 magcache thr={threshold} K=5 stack", "taylor",
                           order=2, granularity="stack", schedule="magcache", threshold=threshold, max_skip=5,
                           calibration=str(calibration), first_enhance=3))
    for order in (1, 2) if full else (2,):
        points.append(ours(study, "cachelab-adaptive", f"taylor o{order} mask (conf default) module", "taylor",
                           order=order, schedule="mask"))
    for name, order in (("taylor_newton", 2), ("adams_bashforth", 2), ("hicache", 2), ("least_squares", 2)):
        for n in (3, 5, 6, 7, 8) if full or name in ("taylor_newton", "adams_bashforth") else (5,):
            points.append(ours(study, "cachelab-predictors", f"{name} o{order} N={n} module", name,
                               order=order, interval=n))
    return points


def peer_points(study: Study, calibration: Path, full: bool) -> list[Point]:
    """Every peer preset over its knobs (diffusers' hooks; cache-dit on FLUX); ``full``: the whole
    grid, else a smaller one."""
    from diffusers import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    steps, points = study.adapter.num_steps, []
    for sites, identifiers in TAYLORSEER_SITES[study.name].items():
        for order in (1, 2):
            for warmup in (1, 3) if full else (3,):
                for n in (2, 3, 4, 5, 6, 8, 10) if full else (2, 3, 5, 8):
                    points.append(hooked(study, "diffusers-taylorseer", f"TaylorSeer o{order} N={n} D={warmup}{sites}",
                                         lambda n=n, warmup=warmup, order=order, identifiers=identifiers:
                                         TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=warmup,
                                                               max_order=order, taylor_factors_dtype=torch.float32,
                                                               cache_identifiers=identifiers)))
    for n in ((3, 5, 8) if full else (3, 5)) if study.name == "tiny_flux_digits" else ():  # lite targets `proj_out`: DiT has none
        points.append(hooked(study, "diffusers-taylorseer", f"TaylorSeer lite o1 N={n} D=3",
                             lambda n=n: TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3,
                                                               taylor_factors_dtype=torch.float32,
                                                               use_lite_mode=True)))
    for threshold in (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.45) if full else (0.02, 0.05, 0.1, 0.2, 0.3, 0.45):
        points.append(hooked(study, "diffusers-fbcache", f"FBCache thr={threshold}",
                             lambda threshold=threshold: FirstBlockCacheConfig(threshold=threshold)))
    ratios = load_calibration(str(calibration))["ratios"]
    for threshold in (0.02, 0.06, 0.12, 0.24, 0.5) if full else (0.02, 0.06, 0.12, 0.24):
        for max_skip, retention in ((3, 0.2), (5, 0.1)) if full else ((3, 0.2),):
            points.append(hooked(study, "diffusers-magcache", f"MagCache thr={threshold} K={max_skip} r={retention}",
                                 lambda t=threshold, k=max_skip, r=retention: MagCacheConfig(
                                     threshold=t, max_skip_steps=k, retention_ratio=r, num_inference_steps=steps,
                                     mag_ratios=ratios)))
    for n in (2, 3, 4, 6) if full else (2, 3, 4):
        for window in ((100, 800), (0, 1000)) if full else ((100, 800),):
            points.append(hooked(study, "diffusers-pab", f"PAB N={n} t in {window}",
                                 lambda n=n, window=window: PyramidAttentionBroadcastConfig(
                                     spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=window,
                                     current_timestep_callback=study.timestep)))
    if study.name == "tiny_flux_digits" and peers.cache_dit_available():
        for threshold in (0.05, 0.1, 0.2, 0.3, 0.45) if full else (0.05, 0.1, 0.2, 0.45):
            for order in (None, 1, 2) if full else (None, 2):
                pair = peers.dbcache(study.adapter, threshold, order=order)
                points.append(Point("cache-dit", pair.setting.replace(" threshold ", " thr="), pair.peer))
    return points


def interleaved(points: list[Point]) -> list[Point]:
    """The points family by family in turn (one of each, then the next of each...)."""
    by_family: dict[str, list[Point]] = {}
    for point in points:
        by_family.setdefault(point.family, []).append(point)
    return [p for group in zip_longest(*by_family.values()) for p in group if p is not None]


# -- measuring --------------------------------------------------------------------------------
def quality_run(study: Study, inputs, point: Point | None, base_images: torch.Tensor | None) -> dict:
    """One generation under a FLOP counter: its FLOPs, full steps (cachelab), PSNR against
    ``base_images``, the judge's class accuracy and FD; and the images."""
    adapter = study.adapter
    with (point.enabled() if point else contextlib.nullcontext()) as handle:
        latents, flops = count_flops(lambda: adapter.generate(inputs, handle))
        full = len(handle.stats().full_steps) if handle is not None else ""
    images = adapter.decode(latents)
    scores = adapter.evaluate(images, inputs)
    return {"flops": flops, "full_steps": full, "images": images,
            "psnr_db": math.inf if base_images is None else psnr(images, base_images),
            "class_accuracy": scores.get("class_accuracy"), "feature_fd": scores.get("feature_fd")}


def timing_rounds(study: Study, inputs, points: list[Point], repeats: int) -> tuple[list[float], dict[str, list[float]]]:
    """``repeats`` rounds, each timing one generation of every point in order, full compute
    before every ``BASE_EVERY``-th point and at the end; the tools are attached outside the timed call."""
    adapter, base, times = study.adapter, [], {p.setting: [] for p in points}
    for _ in range(repeats):
        for i, point in enumerate(points):
            if i % BASE_EVERY == 0:
                base.append(seconds(lambda: adapter.generate(inputs), CPU))
            with point.enabled() as handle:
                times[point.setting].append(seconds(lambda: adapter.generate(inputs, handle), CPU))
        base.append(seconds(lambda: adapter.generate(inputs), CPU))
    return base, times


COLUMNS = ["model", "tool", "family", "setting", "flops_speedup", "wall_speedup", "wall_s", "base_wall_s",
           "psnr_db", "feature_fd", "class_accuracy", "full_steps", "error"]


def measure(study: Study, families: list[str], images: int, repeats: int, out: Path, full: bool,
            provisional: Callable[[list[dict]], None]) -> list[dict]:
    """Every point's quality run, then the timing rounds; ``provisional(rows)`` gets the rows
    (without wall times) between the two."""
    adapter = study.adapter
    inputs = adapter.make_inputs(images, seed=0)
    adapter.generate(adapter.make_inputs(2, seed=1))  # warm-up (and site discovery)
    base = quality_run(study, inputs, None, None)
    calibration = out / f"magcache_diffusers_{study.name}_{adapter.num_steps}.json"
    if not calibration.is_file():
        ratios = peers.diffusers_mag_ratios(adapter, inputs, study.transformer)
        peers.write_mag_ratios(calibration, adapter, ratios)
    points = [p for p in cachelab_points(study, calibration, full) + peer_points(study, calibration, full)
              if p.family in families]
    rows, runnable = [], []
    for point in interleaved(points):
        row = {"model": study.name, "tool": point.tool, "family": point.family, "setting": point.setting, "error": ""}
        start = time.perf_counter()
        try:
            q = quality_run(study, inputs, point, base["images"])
        except Exception as err:  # a peer preset that cannot run on this model: reported, not dropped
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            print(f"{point.setting}: {row['error']}", flush=True)
            rows.append(row)
            continue
        row.update(flops_speedup=base["flops"] / q["flops"], psnr_db=q["psnr_db"], feature_fd=q["feature_fd"],
                   class_accuracy=q["class_accuracy"], full_steps=q["full_steps"])
        print(f"{point.tool:26s} {point.setting:48s} FLOPs {row['flops_speedup']:5.2f}x  PSNR {q['psnr_db']:6.2f} dB "
              f"FD {q['feature_fd']:7.2f}  ({time.perf_counter() - start:.1f} s)", flush=True)
        rows.append(row)
        runnable.append(point)
    provisional([base_row(study, base, math.nan)] + rows)
    base_times, times = timing_rounds(study, inputs, runnable, repeats)
    base_wall = median(base_times) if base_times else math.nan  # --repeats 0: no timing
    for row in rows:
        if times.get(row["setting"]):
            row.update(wall_s=median(times[row["setting"]]), base_wall_s=base_wall)
            row["wall_speedup"] = base_wall / row["wall_s"]
    return [base_row(study, base, base_wall)] + rows


def base_row(study: Study, base: dict, wall: float) -> dict:
    return {"model": study.name, "tool": "full compute", "family": "-", "setting": "full compute",
            "flops_speedup": 1.0, "wall_speedup": 1.0, "wall_s": wall, "base_wall_s": wall, "psnr_db": math.inf,
            "feature_fd": base["feature_fd"], "class_accuracy": base["class_accuracy"],
            "full_steps": study.adapter.num_steps, "error": ""}


# -- reading ----------------------------------------------------------------------------------
def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def frontier(points: list[tuple[float, float]], higher_quality_better: bool = True) -> list[tuple[float, float]]:
    """The (quality, speed) points no other point beats on both axes, by quality from best to worst."""
    ordered = sorted(points, key=lambda p: (-p[0] if higher_quality_better else p[0], -p[1]))
    front, fastest = [], -math.inf
    for q, s in ordered:
        if s > fastest:
            front.append((q, s))
            fastest = s
    return front


def best_at(points: list[tuple[float, float]], level: float) -> float | None:
    """The best speed among points of quality at least ``level`` (None when none reaches it)."""
    speeds = [s for q, s in points if q >= level]
    return max(speeds) if speeds else None


def measured(rows: list[dict], tool: str, speed: str = "flops_speedup", quality: str = "psnr_db"
             ) -> list[tuple[float, float]]:
    return [(number(r[quality]), number(r[speed])) for r in rows
            if r["tool"] == tool and number(r.get(speed)) is not None and number(r.get(quality)) is not None]


def tools_in(rows: list[dict]) -> list[str]:
    return [t for t in dict.fromkeys(r["tool"] for r in rows) if t != "full compute"]


def level_table(rows: list[dict], speed: str) -> list[str]:
    tools = tools_in(rows)
    lines = ["| tool | " + " | ".join(f"≥ {level:.0f} dB" for level in LEVELS) + " |", "| --- " * (len(LEVELS) + 1) + "|"]
    best = {tool: [best_at(measured(rows, tool, speed), level) for level in LEVELS] for tool in tools}
    for tool in tools:
        lines.append(f"| {tool} | " + " | ".join("—" if b is None else f"{b:.2f}×" for b in best[tool]) + " |")
    ratio = []
    for i in range(len(LEVELS)):
        peer = [best[t][i] for t in tools if t != "cachelab" and best[t][i] is not None]
        ours_ = best.get("cachelab", [None] * len(LEVELS))[i]
        ratio.append("—" if not peer or ours_ is None else f"**{ours_ / max(peer):.2f}**")
    lines.append("| cachelab / best peer | " + " | ".join(ratio) + " |")
    return lines


def dominance(rows: list[dict]) -> list[str]:
    """Each peer point against cachelab's points: is one at least as fast (FLOPs) with no lower PSNR?
    Full compute counts as cachelab's (1.00×, identical images: ``schedule=always``); PSNR within
    ``PSNR_SLACK`` counts as equal (the same computation in another order differs by float rounding)."""
    ours_ = measured(rows, "cachelab") + [(math.inf, 1.0)]
    peer_rows = [r for r in rows if r["tool"] not in ("cachelab", "full compute") and number(r.get("flops_speedup"))]
    missed = [r for r in peer_rows
              if not any(s >= number(r["flops_speedup"]) and q >= number(r["psnr_db"]) - PSNR_SLACK for q, s in ours_)]
    lines = [f"{len(peer_rows) - len(missed)} of {len(peer_rows)} peer points have a cachelab point at least as fast "
             f"(FLOPs) with no lower PSNR (within {PSNR_SLACK} dB; full compute, 1.00× at identical images, "
             f"counted as cachelab's)."]
    lines += [f"- not matched: {r['tool']} {r['setting']}: {number(r['flops_speedup']):.2f}× at "
              f"{number(r['psnr_db']):.1f} dB" for r in missed]
    return lines


def fmt(value, spec: str) -> str:
    v = number(value)
    return "" if v is None else ("inf" if math.isinf(v) else format(v, spec))


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "Best FLOPs speedup at PSNR ≥ level (the best measured point meeting it):", ""]
    lines += level_table(rows, "flops_speedup")
    lines += ["", "Best wall speedup at PSNR ≥ level:", ""] + level_table(rows, "wall_speedup")
    lines += ["", *dominance(rows), "", "| tool | setting | FLOPs speedup | wall speedup | wall (s) | PSNR (dB) | "
              "FD | class acc. | full steps | error |", "| --- " * 10 + "|"]
    for r in sorted(rows, key=lambda r: (r["tool"] != "full compute", r["tool"], -(number(r.get("psnr_db")) or -1e9))):
        lines.append(f"| {r['tool']} | {r['setting']} | {fmt(r.get('flops_speedup'), '.2f')} | "
                     f"{fmt(r.get('wall_speedup'), '.2f')} | {fmt(r.get('wall_s'), '.3f')} | {fmt(r.get('psnr_db'), '.2f')} | "
                     f"{fmt(r.get('feature_fd'), '.1f')} | {fmt(r.get('class_accuracy'), '.3f')} | {r.get('full_steps', '')} | "
                     f"{r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str):
    """Three panels: FLOPs and wall speedup against PSNR, FLOPs speedup against FD; every point
    faint, each tool's frontier as a line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [("psnr_db", "flops_speedup", True, "PSNR to full compute (dB)", "FLOPs speedup (×)"),
              ("psnr_db", "wall_speedup", True, "PSNR to full compute (dB)", "wall speedup (×)"),
              ("feature_fd", "flops_speedup", False, "judge feature FD (lower is better)", "FLOPs speedup (×)")]
    for ax, (quality, speed, higher, xlabel, ylabel) in zip(axes, panels):
        for i, tool in enumerate(tools_in(rows)):
            pts = [(q, s) for q, s in measured(rows, tool, speed, quality) if math.isfinite(q)]
            if not pts:
                continue
            colour = colours[i % len(colours)]
            ax.scatter([q for q, _ in pts], [s for _, s in pts], s=10, alpha=0.3, color=colour)
            front = sorted(frontier(pts, higher))  # by quality ascending: the line is the best speed at quality x
            ax.plot([q for q, _ in front], [s for _, s in front], marker="o", ms=4, color=colour, label=tool,
                    drawstyle="steps-pre" if higher else "steps-post", lw=2 if tool == "cachelab" else 1.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if higher:
            for level in LEVELS:
                ax.axvline(level, color="0.6", ls=":", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 200), fontsize=9)
    return fig


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def merged(path: Path, rows: list[dict], families: list[str]) -> list[dict]:
    """``rows`` with the rows of ``path`` (if any) of the other families (and its full-compute row when
    this run has none of its own)."""
    if not path.is_file():
        return rows
    with path.open() as f:
        kept = [r for r in csv.DictReader(f) if r["family"] not in families and (r["family"] != "-" or not rows)]
    return rows[:1] + kept + rows[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny_flux_digits", "tiny_dit"], required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"families, comma-separated: {','.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: rebuild results_<model>.md and the plot from results_<model>.csv")
    parser.add_argument("--grid", choices=["small", "full"], default="small",
                        help="small: the grid measured in the README; full: every knob value listed in the code")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; allowed: {', '.join(FAMILIES)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    csv_path = args.out / f"results_{args.model}.csv"
    if args.report:
        families = []  # every row of the CSV is kept

    def report(rows: list[dict], stage: str) -> str:
        rows = merged(csv_path, rows, families)
        write_bytes_atomic(csv_path, to_csv(rows).encode())
        rows = list(csv.DictReader(io.StringIO(to_csv(rows))))
        header = (f"{args.model}: the rows of {csv_path.name} (the runs' settings: the folder's README)" if args.report else
                  f"{args.model}: {args.steps} steps, {args.images} images per point, {args.grid} grid, "
                  f"{args.repeats} timing round(s); {machine(CPU)}, torch {torch.__version__}; {stage} after "
                  f"{time.perf_counter() - started:.0f} s ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                  f"families {','.join(families)}).")
        write_bytes_atomic(args.out / f"results_{args.model}.md", markdown(rows, header).encode())
        write_bytes_atomic(args.out / f"pareto_{args.model}.png", png_bytes(plot(rows, header)))
        return markdown(rows, header)

    if args.report:
        print(report([], "report rebuilt from the CSV"))
        return
    rows = measure(make_study(args.model, args.steps), families, args.images, args.repeats, args.out, args.grid == "full",
                   lambda rows: report(rows, "quality measured, timing not yet"))
    print(report(rows, "done"))


if __name__ == "__main__":
    main()
