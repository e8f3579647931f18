"""``job=benchmark``: every tool over its whole knob grid, compared fairly.

``python run.py job=benchmark model=<m> job.grid=<name>`` reads ``conf/benchmark/<name>/``: one
file per peer tool and per cachelab preset (what each tool is given, readable as it is), and
``grid.yaml`` (the job's defaults for that grid). Each peer file lists every parameter its config
class documents, searched or, with a reason, not (:func:`cachelab.evaluation.peers.check_coverage`).

1. **Tuning split**: every point of every grid on tuning inputs (the first half of the model's
   prompts, or its classes drawn from ``tuning_seed``); FLOPs read from the calls
   (:class:`cachelab.evaluation.flops.CallFlops`, calibrated on full compute under the FLOP
   counter and checked against the counter on the first point of every tool file), PSNR per
   image against full compute. MagCache's ratios come from diffusers' calibration mode on the same inputs.
2. **Selection, on tuning only**: per tool, for each PSNR level and margin, the fastest (FLOPs)
   point whose tuning PSNR reaches level + margin.
3. **Held-out split**: the selected points and full compute on other inputs (the other half
   of the prompts, ``held_out_seed``): FLOPs, per-image PSNR with a percentile-bootstrap 95 %
   interval over images, the judge's class accuracy and FD; then wall time in ``rounds``
   alternating rounds in this process (full compute timed before every ``BASE_EVERY``-th point).
4. **Claims**: per level, cachelab's best speed over the best peer's (FLOPs and wall), with a
   paired bootstrap interval over the held-out images; "ahead"/"behind" only where the interval
   excludes 1, else parity.

A point that crashes or measures nonsense (:func:`cachelab.evaluation.statistics.nonsense`) is
kept in ``benchmark.csv`` with its ``flag`` and is never selected or plotted. Outputs in the run
folder: ``benchmark.csv`` (one row per point and split), ``benchmark.md``, ``benchmark.png``,
``held_out_mse.npz`` (per-image errors of the held-out points), ``metrics.json``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import logging
import math
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cachelab.analysis.figures import png_bytes, pyplot
from cachelab.errors import ConfigError
from cachelab.evaluation import peers
from cachelab.evaluation.flops import CallFlops, count_flops
from cachelab.evaluation.statistics import (best_speed_at_levels, frontier, level_ratios, nonsense, per_image_mse,
                                            percentile_interval, psnr_interval, resamples, verdict)
from cachelab.io import write_bytes_atomic, write_json_atomic, write_npz_atomic
from cachelab.jobs import CONFIG_DIR
from cachelab.models.diffusion import DDIMSchedule
from cachelab.models.pipelines.base import PromptInputs
from cachelab.models.pipelines.driver import scheduler_grid

log = logging.getLogger(__name__)

GRIDS_DIR = CONFIG_DIR / "benchmark"
GRID_SETTINGS = ("tuning_images", "held_out_images", "timing_images", "rounds")  # grid.yaml's defaults
DRIVERS = ("cachelab", "diffusers", "cache_dit")
OURS = "cachelab"  # the driver, and the tools: "cachelab" (its presets) and "cachelab <kind>" (e.g. job=tune's choices)
BASE_EVERY = 4  # timing: full compute before every 4th point of a round
COLUMNS = ["model", "tool", "source", "setting", "split", "images", "flops_speedup", "wall_speedup", "psnr",
           "psnr_low", "psnr_high", "class_accuracy", "feature_fd", "wall_s", "base_wall_s", "selected_for", "flag"]


# -- the grids ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GridPoint:
    """One tool at one setting: ``driver`` runs ``target`` (a cachelab preset, a diffusers or
    cache-dit config class) with ``knobs`` (``calibrator.*``: cache-dit's calibrator config);
    ``shown`` names the setting (the searched knobs and the bundles' labels)."""

    tool: str
    source: str
    driver: str
    target: str
    knobs: dict
    shown: str
    calibrator: str | None = None

    @property
    def setting(self) -> str:
        return f"{self.target}: {self.shown}"


def grid_names() -> list[str]:
    return sorted(p.name for p in GRIDS_DIR.iterdir() if (p / "grid.yaml").is_file()) if GRIDS_DIR.is_dir() else []


def grid_folder(name: str) -> Path:
    folder = GRIDS_DIR / name
    if not (folder / "grid.yaml").is_file():
        raise ConfigError(f"job.grid={name!r} is not a grid of {GRIDS_DIR}; allowed: {', '.join(grid_names())}")
    return folder


def read_tool(path: Path) -> dict:
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("tool", "driver", "grids"):
        if key not in spec:
            raise ConfigError(f"{path}: no {key}: key; a tool file has tool, driver, grids (and config or preset)")
    if spec["driver"] not in DRIVERS:
        raise ConfigError(f"{path}: driver={spec['driver']!r}; allowed: {', '.join(DRIVERS)}")
    return spec


def config_class(driver: str, name: str) -> type | None:
    """A peer's config class by name (None when cache-dit is not installed)."""
    if driver == "diffusers":
        import diffusers

        return getattr(diffusers, name)
    if not peers.cache_dit_available():
        return None
    return getattr(peers.import_cache_dit(), name)


def check_tool_coverage(spec: dict, source: str) -> None:
    """Every documented parameter of a peer's config class(es) is searched or explained
    (``not_searched``); cachelab's presets are composed by name and need no such list."""
    if spec["driver"] == OURS:
        return
    searched = set()
    for grid in spec["grids"]:
        searched |= set(grid.get("knobs", {}))
        for choices in grid.get("bundles", {}).values():
            for fields in choices.values():
                searched |= set(fields)
    not_searched = spec.get("not_searched") or {}
    unexplained = sorted(set(spec.get("fixed", {})) - set(not_searched))
    if unexplained:
        raise ConfigError(f"{source} ({spec['tool']}): fixed without a reason in not_searched: {', '.join(unexplained)}")
    classes = {"": spec["config"]} | ({"calibrator.": spec["calibrator"]} if spec.get("calibrator") else {})
    for prefix, name in classes.items():
        cls = config_class(spec["driver"], name)
        if cls is not None:
            peers.check_coverage(f"{source} ({spec['tool']})", cls, set(of_class(dict.fromkeys(searched), prefix)),
                                 of_class(not_searched, prefix))


def of_class(names: dict, prefix: str) -> dict:
    """The entries of ``names`` that belong to the config class of ``prefix`` ('' : the main one,
    no dot; ``calibrator.``: that one's, prefix stripped)."""
    if not prefix:
        return {k: v for k, v in names.items() if "." not in k}
    return {k[len(prefix):]: v for k, v in names.items() if k.startswith(prefix)}


def expand(spec: dict, source: str, model: str) -> list[GridPoint]:
    """The points of a tool file for ``model``: per grid (those whose ``models`` has it), the
    product of its knobs' values and its bundles' labelled choices, with the file's fixed knobs."""
    points = []
    for grid in spec["grids"]:
        if grid.get("models") and model not in grid["models"]:
            continue
        knobs = grid.get("knobs", {})
        bundles = grid.get("bundles", {})
        target = grid.get("preset", spec.get("preset") or spec.get("config"))
        for values in itertools.product(*knobs.values()):
            for choice in itertools.product(*(list(c.items()) for c in bundles.values())):
                chosen = {**spec.get("fixed", {}), **dict(zip(knobs, values))}
                for _, fields in choice:
                    chosen.update(fields)
                shown = [f"{k}={v}" for k, v in zip(knobs, values)]
                shown += [f"{bundle}={label}" for bundle, (label, _) in zip(bundles, choice)]
                points.append(GridPoint(spec["tool"], source, spec["driver"], target, chosen, " ".join(shown),
                                        spec.get("calibrator")))
    return points


def load_grid(name: str, model: str) -> tuple[list[GridPoint], dict]:
    """The points of grid ``name`` for ``model`` (each tool file's coverage checked) and the grid's settings."""
    folder = grid_folder(name)
    settings = OmegaConf.to_container(OmegaConf.load(folder / "grid.yaml"))
    points = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "grid.yaml":
            continue
        spec = read_tool(path)
        check_tool_coverage(spec, path.stem)
        points += expand(spec, path.stem, model)
    return points, settings


# -- running a point ---------------------------------------------------------------------
@dataclass
class Bench:
    """The model as the tools see it: the adapter (generation, decode, judge), the diffusers
    transformer the hooks go on, the current timestep (PAB's, FasterCache's callback), the
    MagCache calibration file (diffusers' ratios), the sampler's grid, the number of steps."""

    adapter: object
    transformer: torch.nn.Module
    timestep: object
    flops: CallFlops | None = None
    calibration: Path | None = None
    ratios: list = field(default_factory=list)
    grid: object = None  # () -> the sampler's StepGrid of the current generation (SeaCache's step coordinates)

    @property
    def steps(self) -> int:
        return self.adapter.num_steps


def bench_for(cfg: DictConfig, adapter) -> Bench:
    """The run's model with a diffusers transformer: a native DiT is converted
    (:class:`cachelab.models.convert_dit.ConvertedDiTAdapter`), so both tools run on the same one."""
    from cachelab.models.convert_dit import ConvertedDiTAdapter
    from cachelab.models.dit_adapter import DiTAdapter

    if isinstance(adapter, DiTAdapter) and not isinstance(adapter, ConvertedDiTAdapter):
        adapter = instantiate(OmegaConf.merge(cfg.model, {"_target_": f"{ConvertedDiTAdapter.__module__}.ConvertedDiTAdapter"}))
    pipe = getattr(adapter, "pipe", None)
    if pipe is not None:
        return Bench(adapter, adapter.model, lambda: pipe.current_timestep, CallFlops(adapter.model),
                     grid=lambda: scheduler_grid(pipe.scheduler))
    if not hasattr(adapter, "transformer"):
        raise ConfigError(f"job=benchmark needs a model with a diffusers transformer; model {adapter.name} has none; "
                          f"allowed: a diffusers pipeline model or a DiT (converted)")
    return Bench(adapter, adapter.transformer, lambda: adapter.model.current_timestep, CallFlops(adapter.model),
                 grid=lambda: DDIMSchedule.respaced(adapter.num_steps, precision=adapter.sampler_precision).grid())


def peer_value(key: str, value):
    """A YAML value as the config class takes it: ``torch.<dtype>`` strings as dtypes, ranges as tuples."""
    if isinstance(value, str) and value.startswith("torch."):
        return getattr(torch, value.split(".", 1)[1])
    if key.endswith("_range") and isinstance(value, list):
        return tuple(value)
    return value


def peer_config(bench: Bench, cls: type, knobs: dict):
    values = {k: peer_value(k, v) for k, v in knobs.items()}
    names = peers.documented_knobs(cls)
    if "current_timestep_callback" in names:
        values["current_timestep_callback"] = bench.timestep
    if "raw_vision_callback" in names:
        values["raw_vision_callback"] = peers.raw_vision
    if "mag_ratios" in names:
        values.update(mag_ratios=bench.ratios, num_inference_steps=bench.steps)
    elif "num_inference_steps" in names:
        values["num_inference_steps"] = bench.steps
    return cls(**values)


@contextlib.contextmanager
def enabled(bench: Bench, point: GridPoint) -> Iterator:
    """The point's tool on the model inside the block; yields cachelab's handle (None for a peer)."""
    knobs = point.knobs
    if point.driver == OURS:
        from cachelab.jobs.presets import preset

        overrides = {k: (str(bench.calibration) if v == "calibrated" else v) for k, v in knobs.items()}
        with hydra_set_aside():
            strategy = preset(point.target, **overrides)
        handle = strategy.attach(bench.adapter)
        try:
            yield handle
        finally:
            handle.remove()
    elif point.driver == "diffusers":
        config = peer_config(bench, config_class("diffusers", point.target), knobs)
        coordinates = (peers.step_coordinates(bench.transformer, bench.timestep, bench.grid)
                       if hasattr(config, "raw_vision_callback") else contextlib.nullcontext())
        with coordinates, peers.diffusers_hook(bench.transformer, config):
            yield None
    else:
        cache_dit = peers.import_cache_dit()
        cache = {k: v for k, v in knobs.items() if "." not in k}
        calibrator = {k.split(".", 1)[1]: v for k, v in knobs.items() if k.startswith("calibrator.")}
        configs = {"cache_config": peer_config(bench, getattr(cache_dit, point.target), cache)}
        if point.calibrator:
            configs["calibrator_config"] = peer_config(bench, getattr(cache_dit, point.calibrator), calibrator)
        with peers.cache_dit_enabled(bench.adapter.pipe, **configs):
            yield None


@contextlib.contextmanager
def hydra_set_aside() -> Iterator[None]:
    """Hydra's global state set aside (and put back) while a preset is composed inside this
    Hydra run: Hydra refuses to compose a config while its global state is initialized."""
    from hydra.core.global_hydra import GlobalHydra

    global_hydra = GlobalHydra.instance()
    saved = global_hydra.hydra
    global_hydra.clear()
    try:
        yield
    finally:
        global_hydra.hydra = saved


def needs_calibration(points: list[GridPoint]) -> bool:
    return any(p.target == "MagCacheConfig" or "calibrated" in p.knobs.values() for p in points)


# -- measuring ----------------------------------------------------------------------------
def split_inputs(adapter, n: int, seed: int, split: str):
    """``n`` inputs of ``split``: a prompt model's prompts are halved (tuning: the first half,
    held-out: the second), shuffled by ``seed`` (a few images still mix classes and phrasings)
    and cycled; ``seed`` draws the noise (and a class model's classes)."""
    prompts = getattr(adapter, "prompts", None)
    if prompts:
        half = len(prompts) // 2
        chosen = prompts[:half] if split == "tuning" else prompts[half:]
        order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed)).tolist()
        return PromptInputs([chosen[order[i % len(chosen)]] for i in range(n)], seed)
    return adapter.make_inputs(n, seed)


@dataclass
class Measured:
    """One point on one split: its row for the CSV and its per-image squared errors."""

    point: GridPoint | None
    row: dict
    mse: np.ndarray | None = None


def generate_counted(bench: Bench, inputs, point: GridPoint | None, check: bool = False
                     ) -> tuple[torch.Tensor, float, str]:
    """The decoded images and FLOPs of one generation: full compute (``point`` None) under the
    FLOP counter, which calibrates :class:`CallFlops`; a point by its calls, and with ``check``
    once more under the counter: a difference is returned as a flag ('' if none)."""
    adapter = bench.adapter
    if point is None:
        latents, flops = bench.flops.calibrate(lambda: adapter.generate(inputs))
        return adapter.decode(latents), flops, ""
    with enabled(bench, point) as handle:
        latents, flops = bench.flops.count(lambda: adapter.generate(inputs, handle))
    flag = ""
    if check:
        with enabled(bench, point) as handle:
            _, counted = count_flops(lambda: adapter.generate(inputs, handle))
        if abs(flops - counted) > 1e-9 * counted:
            flag = f"FLOPs from calls {flops:.4g} differ from the counter's {counted:.4g}"
    return adapter.decode(latents), flops, flag


def scores(bench: Bench, images: torch.Tensor, inputs) -> dict:
    got = bench.adapter.evaluate(images, inputs) or {}
    return {"class_accuracy": got.get("class_accuracy"), "feature_fd": got.get("feature_fd")}


def measure_split(bench: Bench, points: list[GridPoint], inputs, split: str, n: int, draws: int, seed: int,
                  model: str) -> tuple[Measured, list[Measured]]:
    """Full compute and every point on ``inputs``: FLOPs speedup, PSNR with its bootstrap interval,
    the judge's scores, the nonsense flag; a point that raises is kept with its error as flag."""
    base_images, base_flops, _ = generate_counted(bench, inputs, None)
    common = {"model": model, "split": split, "images": n}
    base = Measured(None, {**common, "tool": "full compute", "source": "-", "setting": "full compute",
                           "flops_speedup": 1.0, "psnr": math.inf, "psnr_low": math.inf, "psnr_high": math.inf,
                           **scores(bench, base_images, inputs), "flag": ""}, np.zeros(n))
    measured, checked = [], set()
    for i, point in enumerate(points):
        row = {**common, "tool": point.tool, "source": point.source, "setting": point.setting}
        started = time.perf_counter()
        try:
            check = split == "tuning" and point.source not in checked  # one point per tool file
            checked.add(point.source)
            images, flops, mismatch = generate_counted(bench, inputs, point, check)
        except Exception as err:  # noqa: BLE001 -- a point that cannot run is reported, not dropped
            row["flag"] = f"crashed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            log.info(f"[{split} {i + 1}/{len(points)}] {point.tool} {point.setting}: {row['flag']}")
            measured.append(Measured(point, row))
            continue
        speedup = base_flops / flops if flops else math.inf
        flag = mismatch or nonsense(speedup, bench.steps, images, base_images)
        mse = per_image_mse(images, base_images) if not flag.startswith("non-finite") else None
        psnr, low, high = psnr_interval(mse, draws, seed) if mse is not None else (math.nan,) * 3
        row.update(flops_speedup=speedup, psnr=psnr, psnr_low=low, psnr_high=high, flag=flag,
                   **scores(bench, images, inputs))
        log.info(f"[{split} {i + 1}/{len(points)}] {point.tool:26s} {point.setting}: FLOPs {speedup:5.2f}x "
                 f"PSNR {psnr:6.2f} [{low:.2f}, {high:.2f}] dB {flag} ({time.perf_counter() - started:.1f} s)")
        measured.append(Measured(point, row, mse))
    return base, measured


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_points(bench: Bench, measured: list[Measured], inputs, rounds: int) -> float:
    """Wall speedups of ``measured`` (unflagged) in ``rounds`` rounds in this process, the order
    reversed every other round, full compute timed before every ``BASE_EVERY``-th point and at
    the end of a round; the tools attached outside the timed call. Fills wall_s, base_wall_s,
    wall_speedup (median full compute over the point's median)."""
    adapter = bench.adapter
    timed = [m for m in measured if not m.row["flag"]]
    base, times = [], {id(m): [] for m in timed}
    for r in range(rounds):
        for i, m in enumerate(timed if r % 2 == 0 else timed[::-1]):
            if i % BASE_EVERY == 0:
                base.append(seconds(lambda: adapter.generate(inputs)))
            with enabled(bench, m.point) as handle:
                times[id(m)].append(seconds(lambda: adapter.generate(inputs, handle)))
        base.append(seconds(lambda: adapter.generate(inputs)))
    base_wall = median(base) if base else math.nan
    for m in timed:
        if times[id(m)]:
            wall = median(times[id(m)])
            m.row.update(wall_s=wall, base_wall_s=base_wall, wall_speedup=base_wall / wall)
            m.row["flag"] = nonsense(m.row["flops_speedup"], bench.steps, None, None, m.row["wall_speedup"])
    return max(base) / min(base) - 1 if len(base) > 1 else 0.0


def select(measured: list[Measured], levels: list[float], margins: list[float]) -> dict[int, list[str]]:
    """Per tool, for each level and margin: the fastest (FLOPs) unflagged point whose PSNR reaches
    level + margin. Returns index into ``measured`` -> the labels it was selected for."""
    chosen: dict[int, list[str]] = {}
    for tool in dict.fromkeys(m.row["tool"] for m in measured):
        for level, margin in itertools.product(levels, margins):
            ok = [(m.row["flops_speedup"], -i, i) for i, m in enumerate(measured)
                  if m.row["tool"] == tool and not m.row["flag"] and m.row["psnr"] >= level + margin]
            if ok:
                chosen.setdefault(max(ok)[2], []).append(f"{level:g}+{margin:g}")
    return chosen


# -- reading the held-out split ----------------------------------------------------------------
def best_with_interval(mse: np.ndarray, speeds: np.ndarray, levels: list[float], draws: int, seed: int) -> list:
    """Per level: the best speed of these points at that PSNR (full compute 1.0) on all images and its interval."""
    n = mse.shape[1]
    point = best_speed_at_levels(mse, speeds, levels, np.arange(n)[None, :])[0]
    boot = best_speed_at_levels(mse, speeds, levels, resamples(n, draws, seed))
    return [(float(point[j]), *percentile_interval(boot[:, j])) for j in range(len(levels))]


def is_ours(tool: str) -> bool:
    """Whether ``tool`` is cachelab's (its presets, or a tool named ``cachelab <kind>``)."""
    return tool.split(" ", 1)[0] == OURS


def level_summary(held: list[Measured], levels: list[float], draws: int, seed: int, wall_noise: float) -> dict:
    """Per speed axis (flops, wall): per tool, the best speed at each level with its interval; and
    cachelab over the best peer (every peer tool's points together) with a paired interval and
    verdict (on wall time, outside the timing noise too: the interval covers the images only)."""
    usable = [m for m in held if not m.row["flag"] and m.mse is not None and m.point is not None]
    tools = list(dict.fromkeys(m.row["tool"] for m in usable))
    summary = {}
    for axis in ("flops_speedup", "wall_speedup"):
        rows = [m for m in usable if isinstance(m.row.get(axis), float)]

        def of(select_tool):
            chosen = [m for m in rows if select_tool(m.row["tool"])]
            n = len(held[0].mse) if held and held[0].mse is not None else 0
            mse = np.array([m.mse for m in chosen]).reshape(len(chosen), -1) if chosen else np.zeros((0, n))
            return mse, np.array([m.row[axis] for m in chosen], dtype=float)

        per_tool = {tool: best_with_interval(*of(lambda t, tool=tool: t == tool), levels, draws, seed) for tool in tools}
        theirs = of(lambda t: not is_ours(t))

        def over_peers(select_ours, name: str) -> list[dict]:
            """``select_ours``'s tools over the best peer, per level, paired interval and verdict."""
            ours = of(select_ours)
            ratios = level_ratios(*ours, *theirs, levels, draws, seed) if len(ours[1]) and len(theirs[1]) else []
            return [{"level": lv, "ratio": r, "low": lo, "high": hi,
                     "verdict": verdict(lo, hi, name, wall_noise if axis == "wall_speedup" else 0)}
                    for lv, (r, lo, hi) in zip(levels, ratios)]

        mine = [tool for tool in tools if is_ours(tool)]
        summary[axis] = {"per_tool": per_tool, "ratio": over_peers(is_ours, OURS),
                         "ratio_per_tool": {tool: over_peers(lambda t, tool=tool: t == tool, tool) for tool in mine}
                         if len(mine) > 1 else {}}
    return summary


def markdown(header: str, rows: list[dict], summary: dict, levels: list[float]) -> str:
    lines = [header, ""]
    for axis, name in (("flops_speedup", "FLOPs"), ("wall_speedup", "wall")):
        part = summary[axis]
        lines += [f"Held-out best {name} speedup at PSNR ≥ level (95 % bootstrap interval over images; the points "
                  f"selected on the tuning split; full compute counts as 1.00×):", "",
                  "| tool | " + " | ".join(f"≥ {lv:g} dB" for lv in levels) + " |", "| --- " * (len(levels) + 1) + "|"]
        for tool, cells in part["per_tool"].items():
            lines.append(f"| {tool} | " + " | ".join(f"{b:.2f}× [{lo:.2f}, {hi:.2f}]" for b, lo, hi in cells) + " |")
        lines.append("| **cachelab / best peer** | " + " | ".join(
            f"**{r['ratio']:.2f}** [{r['low']:.2f}, {r['high']:.2f}] {r['verdict']}" for r in part["ratio"]) + " |")
        for tool, ratios in part.get("ratio_per_tool", {}).items():
            lines.append(f"| {tool + ' presets' if tool == OURS else tool} / best peer | " + " | ".join(
                f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}] {r['verdict']}" for r in ratios) + " |")
        lines.append("")
    lines += ["| tool | setting | split | FLOPs × | wall × | PSNR (dB) [95 %] | class acc. | FD | selected for | flag |",
              "| --- " * 10 + "|"]
    for r in rows:
        if r["split"] != "held_out":
            continue
        lines.append(f"| {r['tool']} | {r['setting']} | {r['split']} | {fmt(r.get('flops_speedup'))} | "
                     f"{fmt(r.get('wall_speedup'))} | {fmt(r.get('psnr'))} [{fmt(r.get('psnr_low'))}, "
                     f"{fmt(r.get('psnr_high'))}] | {fmt(r.get('class_accuracy'), '.3f')} | "
                     f"{fmt(r.get('feature_fd'), '.1f')} | {r.get('selected_for', '')} | {r.get('flag', '')} |")
    flagged = [r for r in rows if r.get("flag")]
    lines += ["", f"{len(flagged)} flagged rows (never selected or plotted):", ""]
    lines += [f"- {r['split']} {r['tool']} {r['setting']}: {r['flag']}" for r in flagged]
    return "\n".join(lines) + "\n"


def fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value is not None else ""


def plot(rows: list[dict], title: str):
    """FLOPs and wall speedup against held-out PSNR, each point with its 95 % interval (error
    bars), each tool's frontier as a line; tuning points faint; flagged points never drawn."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=100, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tools = [t for t in dict.fromkeys(r["tool"] for r in rows) if t != "full compute"]
    for ax, axis, label in ((axes[0], "flops_speedup", "FLOPs speedup (×)"), (axes[1], "wall_speedup", "wall speedup (×)")):
        for i, tool in enumerate(tools):
            colour = colours[i % len(colours)]
            good = [r for r in rows if r["tool"] == tool and not r.get("flag") and isinstance(r.get(axis), float)
                    and math.isfinite(r.get("psnr", math.nan))]
            tuning = [r for r in good if r["split"] == "tuning"]
            ax.scatter([r["psnr"] for r in tuning], [r[axis] for r in tuning], s=6, alpha=0.15, color=colour)
            held = [r for r in good if r["split"] == "held_out"]
            if not held:
                continue
            ax.errorbar([r["psnr"] for r in held], [r[axis] for r in held], fmt="o", ms=4, color=colour, capsize=2,
                        xerr=[[r["psnr"] - r["psnr_low"] for r in held], [r["psnr_high"] - r["psnr"] for r in held]])
            front = sorted(frontier([(r["psnr"], r[axis]) for r in held]))
            ax.plot([q for q, _ in front], [s for _, s in front], color=colour, label=tool, drawstyle="steps-pre",
                    lw=2 if is_ours(tool) else 1.2)
        ax.set_xlabel("PSNR to full compute (dB); held-out points with 95 % intervals, tuning points faint")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for level in (30, 35, 40):
            ax.axvline(level, color="0.6", ls=":", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 190), fontsize=8)
    return fig


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class BenchmarkJob:
    """Every tool of ``conf/benchmark/<grid>/`` over its grid: tuned on one split, reported on
    another (see the module's docstring); the image counts and rounds default to the grid's."""

    def __init__(self, grid: str, tuning_seed: int, held_out_seed: int, levels: list, margins_db: list,
                 bootstrap_draws: int, tuning_images: int | None = None, held_out_images: int | None = None,
                 timing_images: int | None = None, rounds: int | None = None):
        self.grid, self.tuning_seed, self.held_out_seed = grid, tuning_seed, held_out_seed
        self.levels, self.margins, self.draws = list(levels), list(margins_db), bootstrap_draws
        self.given = {"tuning_images": tuning_images, "held_out_images": held_out_images,
                      "timing_images": timing_images, "rounds": rounds}

    def run(self, cfg: DictConfig, adapter, strategy, sink, out_dir: Path) -> dict:
        started = time.perf_counter()
        points, settings = load_grid(self.grid, cfg.model.name)
        n = {key: self.given[key] if self.given[key] is not None else settings[key] for key in GRID_SETTINGS}
        for key, value in n.items():
            if not isinstance(value, int) or value < (0 if key == "rounds" else 1):
                raise ConfigError(f"job.{key}={value!r} is not allowed; allowed: an integer >= {0 if key == 'rounds' else 1}")
        bench = bench_for(cfg, adapter)
        model = cfg.model.name
        tuning = split_inputs(bench.adapter, n["tuning_images"], self.tuning_seed, "tuning")
        bench.adapter.generate(split_inputs(bench.adapter, 1, self.tuning_seed + 1, "tuning"))  # warm-up, site discovery
        if needs_calibration(points):
            bench.ratios = peers.diffusers_mag_ratios(bench.adapter, tuning, bench.transformer)
            bench.calibration = peers.write_mag_ratios(out_dir / "magcache_ratios.json", bench.adapter, bench.ratios)
        log.info(f"benchmark {self.grid} on {model}: {len(points)} points, {n}")
        base_t, tuned = measure_split(bench, points, tuning, "tuning", n["tuning_images"], self.draws, 0, model)
        chosen = select(tuned, self.levels, self.margins)
        for i, labels in chosen.items():
            tuned[i].row["selected_for"] = " ".join(labels)
        selected = [tuned[i].point for i in sorted(chosen)]
        held_inputs = split_inputs(bench.adapter, n["held_out_images"], self.held_out_seed, "held_out")
        base_h, held = measure_split(bench, selected, held_inputs, "held_out", n["held_out_images"], self.draws, 0, model)
        for m, i in zip(held, sorted(chosen)):
            m.row["selected_for"] = tuned[i].row["selected_for"]
        timing = split_inputs(bench.adapter, n["timing_images"], self.held_out_seed, "held_out")
        wall_noise = time_points(bench, held, timing, n["rounds"])
        base_h.row.update(wall_speedup=1.0)
        rows = [base_t.row] + [m.row for m in tuned] + [base_h.row] + [m.row for m in held]
        summary = level_summary([base_h] + held, self.levels, self.draws, 0, wall_noise)
        header = (f"{model}, grid {self.grid}: {len(points)} points on the tuning split ({n['tuning_images']} images, "
                  f"seed {self.tuning_seed}), {len(held)} selected on the held-out split ({n['held_out_images']} images, "
                  f"seed {self.held_out_seed}); wall time over {n['rounds']} alternating round(s) of "
                  f"{n['timing_images']} held-out images (full compute's timings spread {wall_noise:.0%}: a wall claim "
                  f"needs its interval beyond that), torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
                  f"{bench.steps} steps; {time.perf_counter() - started:.0f} s "
                  f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).")
        write_bytes_atomic(out_dir / "benchmark.csv", to_csv(rows).encode())
        write_npz_atomic(out_dir / "held_out_mse.npz", {f"{i}": m.mse for i, m in enumerate([base_h] + held)
                                                         if m.mse is not None})
        write_bytes_atomic(out_dir / "benchmark.md", markdown(header, rows, summary, self.levels).encode())
        write_bytes_atomic(out_dir / "benchmark.png", png_bytes(plot(rows, header)))
        metrics = {"model": model, "grid": self.grid, "points": len(points), "selected": len(held), **n,
                   "flagged": sum(1 for r in rows if r.get("flag")), "wall_noise": wall_noise, "summary": summary}
        write_json_atomic(out_dir / "metrics.json", metrics)
        sink.summary({f"{axis}/ratio_{r['level']:g}dB": r["ratio"] for axis in summary for r in summary[axis]["ratio"]})
        log.info(markdown(header, [], summary, self.levels))
        return metrics
