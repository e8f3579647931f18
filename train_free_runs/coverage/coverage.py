"""Which caching tool works on which transformer class of diffusers: cachelab at every
granularity, diffusers' own hooks (TaylorSeer, FirstBlockCache) and cache-dit (DBCache), each on
every specimen of the zoo (:mod:`train_free_runs.coverage.zoo`), tiny and random, on CPU.

For each specimen and tool, on a fresh model: ``T`` steps over timesteps spread across the class's
range from the noisy end towards the clean end, inputs fixed except the timestep, one model call per
step (batch 2, one cache context); the bare model first, then the tool, then the model after the
tool is removed. A cell is

- ``works``: the tool hooked something, skipped compute on some steps, changed the output there
  (rel-L2 > 0) and left the model bit for bit as it was; for cachelab also its all-full schedule
  (``schedule="always"``) gives the bare model's outputs bit for bit;
- ``silent: <what>``: it ran without an error but one of those did not hold;
- ``fails: <error>``: it raised; ``unsupported: <why>``: the tool does not offer itself for the class.

A step "skipped compute" when fewer modules were called in it than in the bare model's call (a
global forward hook counts them): the same reading for every tool. The column ``module FLOPs covered``
gives, per stack, the share of its blocks' FLOPs that cachelab's module sites hold (what a forecast
step skips), counted with ``torch.utils.flop_counter`` (``handle.coverage``); ``whole``: a stack whose
attention and feed-forward modules hold under 90 % of its FLOPs, cached whole at module granularity. Where FBCache or DBCache skip no
step, the note gives what an infinite threshold skips (threshold or hooking to blame); where cache-dit
raises with its TaylorSeer calibrator, DBCache alone is measured and the note says so.

    python -m train_free_runs.coverage.coverage [--only Class1,Class2] [--steps 10] [--out results.md]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train_free_runs.coverage.zoo import UNSUPPORTED, Specimen, pipeline_transformer_classes, specimen

ROOT = Path(__file__).resolve().parents[2]
BATCH = 2
ORDER, INTERVAL, FIRST_ENHANCE = 2, 5, 1  # TaylorSeer for cachelab and diffusers' hook
GRANULARITIES = ("output", "block", "module", "stack")
FBCACHE_THRESHOLD = 0.5  # first-block residual change under which FBCache / DBCache skip (random weights)
DIFFUSERS_WARMUP = 1  # TaylorSeerCacheConfig.disable_cache_before_step: one full step first, as first_enhance=1
# Classes whose pipelines pass a time that grows towards the clean end (1 - t / 1000, or t with 1 = data):
CLEAN_AT_HIGH_END = {"LuminaNextDiT2DModel", "Lumina2Transformer2DModel", "ZImageTransformer2DModel",
                     "Ideogram4Transformer2DModel", "LongCatAudioDiTTransformer", "RFD4ProteinaTransformer"}
COLUMNS = [f"cachelab {g}" for g in GRANULARITIES] + ["diffusers TaylorSeer", "diffusers FBCache", "cache-dit DBCache"]
COVERED = "module FLOPs covered"  # the table's column after the tools'


# --------------------------------------------------------------------------- one trajectory


@dataclass
class Trajectory:
    """Every step's outputs (all tensors of the model's return value) and number of module calls."""

    outputs: list[list[torch.Tensor]]
    calls: list[int]


def timesteps(spec: Specimen, T: int) -> list[float]:
    """``T`` timesteps from the noisy end of the class's range towards its clean end (the clean end
    itself excluded, as the schedulers do)."""
    lo, hi = spec.timestep_range
    noisy, clean = (lo, hi) if spec.name.split("/")[0] in CLEAN_AT_HIGH_END else (hi, lo)
    return [noisy + (clean - noisy) * s / T for s in range(T)]


def tensors(out) -> list[torch.Tensor]:
    """The tensors of a return value (tuples, per-sample lists, output objects), in order, copied."""
    if isinstance(out, torch.Tensor):
        return [out.detach().clone()]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in tensors(item)]
    return []


@contextlib.contextmanager
def counting_calls() -> Iterator[list[int]]:
    """Count every module call in the block (``[n]``): a global forward hook."""
    count = [0]

    def hook(module, args, out):
        count[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def trajectory(model: torch.nn.Module, spec: Specimen, ts: list[float],
               before_step: Callable[[int, float], None] = lambda s, t: None,
               around_call: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Trajectory:
    """Call ``model`` once per timestep (``before_step(s, t)`` first, the call inside ``around_call()``)."""
    outputs, calls = [], []
    with torch.no_grad():
        for s, t in enumerate(ts):
            before_step(s, t)
            with around_call(), counting_calls() as count:
                out = model(**spec.inputs(BATCH, t), return_dict=False)
            outputs.append(tensors(out))
            calls.append(count[0])
    return Trajectory(outputs, calls)


def identical(a: Trajectory, b: Trajectory) -> bool:
    """Bit for bit the same outputs at every step."""
    return all(len(x) == len(y) and all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(x, y))
               for x, y in zip(a.outputs, b.outputs))


def rel_l2(cached: Trajectory, bare: Trajectory) -> float:
    """||cached - bare|| / ||bare|| over every output of every step."""
    diff = norm = 0.0
    for x, y in zip(cached.outputs, bare.outputs):
        for u, v in zip(x, y):
            diff += (u.double() - v.double()).square().sum().item()
            norm += v.double().square().sum().item()
    return math.sqrt(diff / norm) if norm else float("nan")


def skipped_steps(cached: Trajectory, bare: Trajectory) -> int:
    """Steps on which fewer modules ran than in the bare model."""
    return sum(c < b for c, b in zip(cached.calls, bare.calls))


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One tool on one class: its status and, when it ran, what it did."""

    status: str
    rel_l2: float | None = None
    skipped: int | None = None  # steps that ran fewer modules than the bare model
    forecasts: int | None = None  # cachelab's own count of forecast steps
    note: str = ""  # sites / hooked modules, fallbacks, route
    # cachelab: (stack, share, cached whole) per stack; None: FLOPs not countable
    coverage: list[tuple[str, float, bool]] | None = field(default_factory=list)

    def text(self, width: int = 90) -> str:
        parts = [self.status if len(self.status) <= width else self.status[: width - 1] + "…"]
        if self.rel_l2 is not None:
            parts.append(f"rel-L2 {self.rel_l2:.1e}")
        if self.forecasts is not None:
            parts.append(f"{self.forecasts} fc")
        if self.skipped is not None:
            parts.append(f"{self.skipped} skipped")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)


def error_cell(exc: BaseException) -> Cell:
    """``fails: <type>: <first line of the message>``."""
    lines = str(exc).strip().splitlines()
    return Cell(f"fails: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "))


def verdict(problems: list[str]) -> str:
    """``works`` without problems, else ``silent: <problems>``."""
    return "works" if not problems else "silent: " + "; ".join(problems)


# --------------------------------------------------------------------------- cachelab


def cachelab_cell(spec: Specimen, T: int, granularity: str) -> Cell:
    """cachelab's TaylorSeer at ``granularity``: all-full bit-identical, forecasts, restored by ``remove()``."""
    import cachelab

    ts = timesteps(spec, T)
    model = spec.build()
    bare = trajectory(model, spec, ts)
    settings = dict(order=ORDER, interval=INTERVAL, first_enhance=FIRST_ENHANCE, granularity=granularity,
                    on_undriven="raise")
    try:
        full = driven(model, spec, ts, cachelab.apply(model, "taylor", schedule="always", **settings))
        handle = cachelab.apply(model, "taylor", **settings)
        cached = driven(model, spec, ts, handle)
        after = trajectory(model, spec, ts)
    except Exception as exc:  # the cell reports it
        return error_cell(exc)
    stats, sites = handle.stats(), len(handle.inner.sites) if handle.inner else 0
    problems = []
    if sites == 0:
        problems.append("no site hooked")
    if not identical(full, bare):
        problems.append("all-full run not bit-identical")
    if not stats.forecast_steps:
        problems.append("no forecast step")
    elif skipped_steps(cached, bare) == 0:
        problems.append("forecast steps ran every module")
    elif rel_l2(cached, bare) == 0:
        problems.append("forecasts equal the uncached outputs")
    if not identical(after, bare):
        problems.append("not bit-identical after remove()")
    note = f"{sites} sites" + (f", {stats.fallbacks} fallbacks" if stats.fallbacks else "")
    return Cell(verdict(problems), rel_l2(cached, bare), skipped_steps(cached, bare), len(stats.forecast_steps), note,
                site_coverage(handle, granularity))


def site_coverage(handle, granularity: str) -> list[tuple[str, float, bool]] | None:
    """Per stack: the share of its blocks' FLOPs the sites hold, and whether discovery cached its blocks whole."""
    if handle.coverage is None:
        return None
    discovered, own = getattr(handle.sites, "discovered", None), getattr(handle.sites, "own", {})
    whole = {s.name for s in discovered.stacks if s.whole_blocks} if discovered and granularity not in own else set()
    return [(c.name, c.share, c.name in whole) for c in handle.coverage]


def coverage_text(cell: Cell) -> str:
    """``transformer_blocks 98%; single_transformer_blocks 100% whole``; ``-`` where nothing was counted."""
    if cell.coverage is None:
        return "FLOPs not countable"
    return "; ".join(f"{name} {share:.0%}" + (" whole" if whole else "") for name, share, whole in cell.coverage) or "-"


def driven(model: torch.nn.Module, spec: Specimen, ts: list[float], handle) -> Trajectory:
    """One generation driven by cachelab's ``handle`` step by step; the handle is removed after it."""
    try:
        with handle.generation(len(ts)):
            return trajectory(model, spec, ts, before_step=handle.step)
    finally:
        handle.remove()


# --------------------------------------------------------------------------- peers


class Unsupported(Exception):
    """The tool does not offer itself for this class (the message says why)."""


def peer_cell(spec: Specimen, T: int, enable: Callable, disable: Callable, hooked: Callable[[torch.nn.Module], int],
              around_call: Callable = lambda model: contextlib.nullcontext()) -> Cell:
    """A peer tool on a fresh model: bare run, ``target = enable(model)``, a run with it (each call
    inside ``around_call(model)``), ``disable(target)``, a run after. ``enable`` returns the note too."""
    ts = timesteps(spec, T)
    model = spec.build()
    bare = trajectory(model, spec, ts)
    try:
        target, note = enable(model)
        try:
            count = hooked(model)
            cached = trajectory(model, spec, ts, around_call=lambda: around_call(model))
        finally:
            disable(target)
        after = trajectory(model, spec, ts)
    except Unsupported as exc:
        return Cell(f"unsupported: {exc}")
    except Exception as exc:  # the cell reports it
        return error_cell(exc)
    problems = []
    if count == 0:
        problems.append("nothing hooked")
    if skipped_steps(cached, bare) == 0:
        problems.append("no step skipped")
    elif rel_l2(cached, bare) == 0:
        problems.append("outputs unchanged")
    if not identical(after, bare):
        problems.append("not bit-identical after disable_cache()")
    return Cell(verdict(problems), rel_l2(cached, bare), skipped_steps(cached, bare), note=note)


def adaptive_cell(run: Callable[[float], Cell]) -> Cell:
    """``run(FBCACHE_THRESHOLD)``; where it skipped no step, the note says whether an infinite
    threshold (skip whenever allowed) skips any: the threshold, or the hooking, is to blame."""
    cell = run(FBCACHE_THRESHOLD)
    if "no step skipped" in cell.status:
        probe = run(math.inf)
        cell.note = ", ".join(filter(None, [cell.note, f"threshold inf: {probe.skipped} skipped"]))
    return cell


# --------------------------------------------------------------------------- diffusers' hooks


def hooked_modules(names: tuple[str, ...]) -> Callable[[torch.nn.Module], int]:
    """Counter of the modules carrying one of diffusers' hooks ``names`` in their hook registry."""
    return lambda model: sum(any(n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for n in names)
                             for m in model.modules())


def enable_diffusers(config) -> Callable:
    """``model.enable_cache(config)``, or Unsupported where the class has no ``enable_cache``."""
    def enable(model):
        if not hasattr(model, "enable_cache"):
            raise Unsupported(f"{type(model).__name__} is no CacheMixin (no enable_cache)")
        model.enable_cache(config)
        return model, ""

    return enable


def diffusers_taylorseer_cell(spec: Specimen, T: int) -> Cell:
    """diffusers' TaylorSeer hook on its default identifiers (attention modules), through ``enable_cache``."""
    from diffusers import TaylorSeerCacheConfig

    config = TaylorSeerCacheConfig(cache_interval=INTERVAL, disable_cache_before_step=DIFFUSERS_WARMUP,
                                   max_order=ORDER, taylor_factors_dtype=torch.float32)
    return peer_cell(spec, T, enable_diffusers(config), lambda model: model.disable_cache(),
                     hooked_modules(("taylorseer_cache",)), lambda model: model.cache_context("cond"))


def diffusers_fbcache_cell(spec: Specimen, T: int) -> Cell:
    """diffusers' FirstBlockCache through ``enable_cache``."""
    from diffusers import FirstBlockCacheConfig

    def run(threshold: float) -> Cell:
        hooks = hooked_modules(("fbc_leader_block_hook", "fbc_block_hook"))
        return peer_cell(spec, T, enable_diffusers(FirstBlockCacheConfig(threshold=threshold)),
                         lambda model: model.disable_cache(), hooks, lambda model: model.cache_context("cond"))

    return adaptive_cell(run)


# --------------------------------------------------------------------------- cache-dit


def cache_dit_target(model: torch.nn.Module, pipelines: tuple[str, ...]):
    """What to give ``cache_dit.enable_cache``, and the route: the bare transformer when cache-dit's
    registry (class-name prefixes) matches its class, else the registered adapter of one of its
    pipelines built on the bare transformer."""
    from cache_dit.caching.block_adapters import BlockAdapterRegister, FakeDiffusionPipeline

    if BlockAdapterRegister.is_supported(model):
        return model, ""
    for pipe in pipelines:
        for prefix, make in BlockAdapterRegister._adapters.items():
            if pipe.startswith(prefix):
                return make(FakeDiffusionPipeline(model)), f"via the {prefix} pipeline adapter"
    raise Unsupported("cache-dit has no BlockAdapter registered for the class or its pipelines")


def cache_dit_configs(T: int, threshold: float, calibrator: bool) -> dict:
    """DBCache F1B0 (first block decides, no tail block always computed), and its TaylorSeer calibrator."""
    import cache_dit

    cache = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                    max_warmup_steps=FIRST_ENHANCE, num_inference_steps=T)
    taylor = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=ORDER) if calibrator else None
    return {"cache_config": cache, "calibrator_config": taylor}


def cache_dit_run(spec: Specimen, T: int, threshold: float, calibrator: bool) -> Cell:
    """cache-dit's DBCache F1B0 (with its TaylorSeer calibrator) on the bare transformer."""
    from train_free_runs.bench import peers

    cache_dit = peers.import_cache_dit()

    def enable(model):
        target, route = cache_dit_target(model, spec.pipelines)
        cache_dit.enable_cache(target, **cache_dit_configs(T, threshold, calibrator))
        return target, route

    return peer_cell(spec, T, enable, cache_dit.disable_cache, lambda model: int(getattr(model, "_is_cached", False)))


def cache_dit_cell(spec: Specimen, T: int) -> Cell:
    """DBCache with the TaylorSeer calibrator; where that raises, DBCache alone (the note says why)."""
    from train_free_runs.bench import peers

    if not peers.cache_dit_available():
        return Cell("not installed")
    with_calibrator = adaptive_cell(lambda threshold: cache_dit_run(spec, T, threshold, calibrator=True))
    if not with_calibrator.status.startswith("fails"):
        return with_calibrator
    alone = adaptive_cell(lambda threshold: cache_dit_run(spec, T, threshold, calibrator=False))
    if alone.status.startswith("fails"):
        return with_calibrator
    reason = f"DBCache alone (with the calibrator it {with_calibrator.status})"
    alone.note = ", ".join(filter(None, [alone.note, reason]))
    return alone


# --------------------------------------------------------------------------- one row


@dataclass
class Row:
    """One specimen: a cell per column and the seconds it took."""

    name: str
    pipelines: tuple[str, ...]
    cells: dict[str, Cell] = field(default_factory=dict)
    seconds: float = 0.0


def measure(spec: Specimen, T: int) -> Row:
    """Every tool on one specimen."""
    start, row = time.perf_counter(), Row(spec.name, spec.pipelines)
    tools: dict[str, Callable[[], Cell]] = {f"cachelab {g}": (lambda g=g: cachelab_cell(spec, T, g))
                                            for g in GRANULARITIES}
    tools["diffusers TaylorSeer"] = lambda: diffusers_taylorseer_cell(spec, T)
    tools["diffusers FBCache"] = lambda: diffusers_fbcache_cell(spec, T)
    tools["cache-dit DBCache"] = lambda: cache_dit_cell(spec, T)
    for column, tool in tools.items():
        try:
            row.cells[column] = tool()
        except Exception as exc:  # building or the bare run failed: the zoo's own check would say so
            row.cells[column] = error_cell(exc)
    row.seconds = time.perf_counter() - start
    return row


# --------------------------------------------------------------------------- report


def abbreviate(pipelines: tuple[str, ...]) -> str:
    """The shortest pipeline name without ``Pipeline``, and how many more."""
    if not pipelines:
        return "-"
    first = min(pipelines, key=len).removesuffix("Pipeline")
    return first + (f" +{len(pipelines) - 1}" if len(pipelines) > 1 else "")


def table(rows: list[Row]) -> list[str]:
    """The markdown table: a row per specimen, then the classes the zoo leaves out."""
    lines = ["| class | pipelines | " + " | ".join(COLUMNS + [COVERED]) + " |", "|" + "---|" * (len(COLUMNS) + 3)]
    for row in rows:
        cells = [row.cells[c].text().replace("|", "\\|") for c in COLUMNS] + [coverage_text(row.cells["cachelab module"])]
        lines.append(f"| {row.name} | {abbreviate(row.pipelines)} | " + " | ".join(cells) + " |")
    for cls, reason in UNSUPPORTED.items():
        pipes = abbreviate(pipeline_transformer_classes().get(cls, ()))
        cells = [f"not in the zoo: {reason}"] + [""] * len(COLUMNS)
        lines.append(f"| {cls} | {pipes} | " + " | ".join(cells) + " |")
    return lines


def kind(cell: Cell) -> str:
    """works, silent, fails, unsupported or not installed."""
    return cell.status.split(":")[0]


def totals(rows: list[Row]) -> list[str]:
    """Per column: how many specimens it works on, is silent on, fails on, does not support."""
    kinds = ("works", "silent", "fails", "unsupported", "not installed")
    lines = ["| tool | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for column in COLUMNS:
        counts = [sum(kind(r.cells[column]) == k for r in rows) for k in kinds]
        lines.append(f"| {column} | " + " | ".join(map(str, counts)) + " |")
    any_works = sum(any(kind(r.cells[f"cachelab {g}"]) == "works" for g in GRANULARITIES) for r in rows)
    all_work = sum(all(kind(r.cells[f"cachelab {g}"]) == "works" for g in GRANULARITIES) for r in rows)
    lines += ["", f"cachelab works at some granularity on {any_works} of {len(rows)} specimens, "
                  f"at all four on {all_work}."]
    counted = [r.cells["cachelab module"].coverage for r in rows if r.cells["cachelab module"].coverage]
    covered = sum(all(share >= 0.9 for _, share, _ in stacks) for stacks in counted)
    whole = sum(any(w for _, _, w in stacks) for stacks in counted)
    least = min((share, name) for stacks in counted for name, share, _ in stacks) if counted else (1.0, "-")
    lines += ["", f"Module sites hold at least 90 % of every stack's FLOPs on {covered} of the {len(counted)} "
                  f"specimens counted; discovery caches some stack's blocks whole on {whole}; the least share "
                  f"covered is {least[0]:.1%} ({least[1]})."]
    return lines


def problems(rows: list[Row], columns: list[str]) -> list[str]:
    """One line per (class, column) where the tool fails or is silent, with the reason."""
    lines = []
    for row in rows:
        for column in columns:
            cell = row.cells[column]
            if kind(cell) in ("fails", "silent"):
                lines.append(f"- {row.name}, {column}: {cell.text(width=400)}")
    return lines or ["- none"]


def machine() -> str:
    """The CPU model (``/proc/cpuinfo``), its cores and the threads torch uses."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = models[0] if models else platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def source() -> str:
    """The commit of the checkout, and whether cachelab/ differs from it: the library measured (read at the start)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "cachelab")
    return f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}" + (" + uncommitted changes" if dirty else "")


def header(T: int, seconds: float, library: str) -> list[str]:
    """The command, the versions, the machine and the settings."""
    import diffusers

    from train_free_runs.bench import peers

    cache_dit = peers.import_cache_dit().__version__ if peers.cache_dit_available() else "not installed"
    return [
        "# Caching coverage of diffusers' transformer classes",
        "",
        f"`python -m train_free_runs.coverage.coverage {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"diffusers {diffusers.__version__}, torch {torch.__version__}, cache-dit {cache_dit}; cachelab at {library}; "
        f"{machine()}; wall time {seconds:.0f} s.",
        "",
        f"{T} steps, batch {BATCH}, inputs fixed except the timestep. cachelab: `taylor` order {ORDER}, interval "
        f"{INTERVAL}, first_enhance {FIRST_ENHANCE}. diffusers TaylorSeer: cache_interval {INTERVAL}, max_order "
        f"{ORDER}, disable_cache_before_step {DIFFUSERS_WARMUP}, fp32 factors, default identifiers. diffusers FBCache "
        f"and cache-dit DBCache (F1B0, warm-up {FIRST_ENHANCE}, + TaylorSeer calibrator order {ORDER}): threshold "
        f"{FBCACHE_THRESHOLD}. rel-L2 over all outputs of all steps against the bare model; `fc`: cachelab's forecast "
        f"steps; `skipped`: steps that called fewer modules than the bare model.",
        "",
    ]


def report(rows: list[Row], T: int, seconds: float, library: str) -> str:
    """results.md: the settings, the table, the totals and the lists of failing or silent cells."""
    cachelab_columns = [f"cachelab {g}" for g in GRANULARITIES]
    peer_columns = [c for c in COLUMNS if c not in cachelab_columns]
    lines = header(T, seconds, library) + table(rows) + ["", "## Totals", ""] + totals(rows)
    lines += ["", "## Where cachelab fails or is silent", ""] + problems(rows, cachelab_columns)
    lines += ["", "## Where the peers fail or are silent", ""] + problems(rows, peer_columns)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def quiet() -> None:
    """Keep the log to one line per specimen: no library warnings or info lines."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated specimen names (default: all)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    from train_free_runs.coverage.zoo import SPECIMENS

    names = [n for n in args.only.split(",") if n] or list(SPECIMENS)
    library, start, rows = source(), time.perf_counter(), []
    for name in names:
        rows.append(measure(specimen(name), args.steps))
        row = rows[-1]
        print(f"{name} ({row.seconds:.0f} s): " + " | ".join(f"{c}: {row.cells[c].text(60)}" for c in COLUMNS),
              flush=True)
    seconds = time.perf_counter() - start
    Path(args.out).write_text(report(rows, args.steps, seconds, library))
    print(f"wrote {args.out} ({len(rows)} specimens, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
