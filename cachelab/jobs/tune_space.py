"""``job=tune job.search=space``: the search over the whole strategy space
(:class:`~cachelab.jobs.tuning.search.SpaceSearch`), each candidate measured as the benchmark
measures a point (:mod:`cachelab.jobs.benchmark`: the same model, the tuning split's inputs,
FLOPs from the calls, PSNR of the decoded images to full compute), wall time paired with full
compute. Writes ``tune.json``, ``report.md``, ``tuned_apply.json``, ``tuned_command.txt`` and
``benchmark_tool.yaml`` (the chosen candidate as a ``conf/benchmark/<grid>/`` tool file, so
``job=benchmark`` reports it on held-out inputs)."""
from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import time
from pathlib import Path
from statistics import median

import torch
from omegaconf import OmegaConf

from cachelab.evaluation.metrics import relative_l2
from cachelab.evaluation.statistics import per_image_mse, psnr_of_mse
from cachelab.io import write_bytes_atomic, write_json_atomic
from cachelab.jobs.benchmark import (GridPoint, bench_for, enabled, generate_counted, hydra_set_aside, seconds,
                                     split_inputs)
from cachelab.jobs.presets import command_line
from cachelab.jobs.tuning.records import Clock
from cachelab.jobs.tuning.search import SCREEN, VERIFY, Found, SpaceSearch
from cachelab.jobs.tuning.space import PLACED, Candidate, Frame, Space
from cachelab.jobs.tuning.targets import Target

log = logging.getLogger(__name__)

TOOL = "cachelab tuned"  # the benchmark tool of the tuner's choices
SENSITIVITY = "sensitivity"  # the probe file's stage of the per-step sensitivity runs


class SpaceBench:
    """Measures candidates on the benchmark's tuning split (``seed``): ``screen_images`` images to
    search, ``verify_images`` to verify, ``sensitivity_images`` for the per-step sensitivity;
    with ``wall``, each measurement also times the candidate against full compute in
    ``timing_rounds`` alternating pairs on ``timing_images`` images (wall speedup: the median of
    the pairs' ratios). Measurements are kept in ``probe_file`` (JSON; None: not kept) under the
    model, steps and images, so later targets reuse them."""

    def __init__(self, cfg, adapter, seed: int, screen_images: int, verify_images: int, sensitivity_images: int,
                 timing_images: int, timing_rounds: int, wall: bool, probe_file: str | None, clock: Clock):
        self.bench = bench_for(cfg, adapter)
        self.wall, self.rounds, self.clock = wall, timing_rounds, clock
        counts = {SCREEN: screen_images, VERIFY: verify_images, SENSITIVITY: sensitivity_images,
                  "timing": timing_images}
        self.inputs = {stage: split_inputs(self.bench.adapter, n, seed, "tuning") for stage, n in counts.items()}
        start = time.perf_counter()
        self.base = {stage: generate_counted(self.bench, inputs, None)[:2] for stage, inputs in self.inputs.items()}
        clock.add("full-compute references", start, len(counts))
        self.key = {"model": cfg.model.name, "num_steps": self.bench.steps, "seed": seed, **counts}
        self.path = None if probe_file is None else Path(probe_file)
        saved = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() else None
        self.probes: dict = saved["probes"] if saved is not None and saved["key"] == self.key else {}
        self.reused = 0

    def point(self, candidate: Candidate) -> GridPoint:
        """``candidate`` as a benchmark point of the tool ``cachelab tuned``."""
        return GridPoint(TOOL, "tune", "cachelab", candidate.preset, candidate.knobs(), candidate.label())

    def measure(self, candidate: Candidate, stage: str) -> dict | None:
        """FLOPs ``speedup``, ``psnr_db`` and ``rel_l2`` of the decoded images (and
        ``wall_speedup``) of ``candidate`` on the ``stage``'s images; None (and the reason kept)
        where the candidate cannot run."""
        key = f"{stage}{' wall' if self.wall else ''} {candidate.key()}"
        if key in self.probes:
            self.reused += 1
            return self.probes[key].get("values")
        start = time.perf_counter()
        point = self.point(candidate)
        base_images, base_flops = self.base[stage]
        try:
            images, flops, _ = generate_counted(self.bench, self.inputs[stage], point)
        except Exception as err:  # noqa: BLE001 -- a combination the preset refuses is recorded, not fatal
            self.probes[key] = {"setting": candidate.label(), "refused": f"{type(err).__name__}: {err}"[:300]}
            log.info(f"tune: {candidate.label()}: cannot run ({self.probes[key]['refused'][:120]})")
            return None
        values = {"speedup": base_flops / flops, "psnr_db": psnr_of_mse(per_image_mse(images, base_images)),
                  "rel_l2": relative_l2(images, base_images)}
        if self.wall:
            values["wall_speedup"] = self.wall_speedup(point)
        self.clock.add(stage, start)
        self.probes[key] = {"setting": candidate.label(), "values": values}
        log.info(f"tune: [{stage}] {candidate.label()}: FLOPs {values['speedup']:.2f}x, PSNR {values['psnr_db']:.2f} dB"
                 + (f", wall {values['wall_speedup']:.2f}x" if self.wall else ""))
        self.save()
        return values

    def wall_speedup(self, point: GridPoint) -> float:
        """The median over ``timing_rounds`` pairs of full compute's time over the point's, each pair
        timed back to back, the order alternating (the tool attached outside the timed call)."""
        adapter, inputs = self.bench.adapter, self.inputs["timing"]

        def full() -> float:
            return seconds(lambda: adapter.generate(inputs))

        def cached() -> float:
            with enabled(self.bench, point) as handle:
                return seconds(lambda: adapter.generate(inputs, handle))

        cached()  # warm-up: a strategy's first generation allocates its caches
        ratios = []
        for r in range(self.rounds):
            if r % 2 == 0:
                base, fast = full(), cached()
            else:
                fast, base = cached(), full()
            ratios.append(base / fast)
        return median(ratios)

    def sensitivity(self, frame: Frame) -> list[float]:
        """Per step ``t``, the decoded images' mean squared error when step ``t`` alone is forecast
        (every other step computed; step 0 always is: 0 there)."""
        T, out = self.bench.steps, [0.0]
        base_images, _ = self.base[SENSITIVITY]
        for t in range(1, T):
            candidate = Candidate(frame, 1, 0, PLACED, tuple(s for s in range(T) if s != t))
            key = f"{SENSITIVITY} {candidate.key()}"
            if key not in self.probes:
                start = time.perf_counter()
                images, _, _ = generate_counted(self.bench, self.inputs[SENSITIVITY], self.point(candidate))
                self.probes[key] = {"setting": candidate.label(),
                                    "values": {"mse": float(per_image_mse(images, base_images).mean())}}
                self.clock.add(SENSITIVITY, start)
            out.append(self.probes[key]["values"]["mse"])
        self.save()
        return out

    def save(self) -> None:
        """The probes written to ``probe_file`` (atomically), if one is given."""
        if self.path is not None:
            write_json_atomic(self.path, {"key": self.key, "probes": self.probes})


def space_of(options: dict, num_steps: int) -> Space:
    """The :class:`Space` of ``job.space``'s plain values."""
    return Space.of(options["families"], options["granularities"], options["intervals"], options["warm_ups"],
                    options["final_full"], num_steps, options.get("adaptive"))


def run_space_search(cfg, adapter, target: Target, options: dict, out_dir: Path) -> dict:
    """The search for ``target`` with ``options`` (``job.space``); writes its outputs into ``out_dir``."""
    clock = Clock()
    bench = SpaceBench(cfg, adapter, options["tuning_seed"], options["screen_images"], options["verify_images"],
                       options["sensitivity_images"], options["timing_images"], options["timing_rounds"],
                       target.key == "wall_speedup", options.get("probe_file"), clock)
    space = space_of(options, bench.bench.steps)
    sensitivities: dict[Frame, list[float]] = {}

    def sensitivity(frame: Frame) -> list[float]:
        sensitivities[frame] = bench.sensitivity(frame)
        return sensitivities[frame]

    search = SpaceSearch(target, space, bench.measure, sensitivity, options["keep"], options["verify"])
    chosen, found = search.run()
    result = {"target": target.as_dict(), "search": "space", "met": chosen is not None, "model": cfg.model.name,
              "num_steps": bench.bench.steps, "space": options, "frames": len(space.frames()),
              "found": [f.as_dict() for f in found],
              "sensitivity": {frame.label(): s for frame, s in sensitivities.items()},
              "probes": {"stored": sum(1 for p in bench.probes.values() if "values" in p), "reused": bench.reused,
                         "refused": sorted({p["setting"] for p in bench.probes.values() if "refused" in p})},
              "cost": clock.as_dict(), "machine": machine(),
              "chosen": None if chosen is None else chosen.as_dict()}
    if chosen is not None:
        write_chosen(cfg, target, chosen, out_dir)
        result["run_with"] = (out_dir / "tuned_command.txt").read_text().strip()
    write_json_atomic(out_dir / "tune.json", result)
    write_json_atomic(out_dir / "metrics.json", result)
    write_bytes_atomic(out_dir / "report.md", report(result).encode())
    return result


def machine() -> str:
    """The processor, cores, torch, threads and the load average when the search ended."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), load {' '.join(f'{x:.1f}' for x in load)} at the end")


def write_chosen(cfg, target: Target, chosen: Found, out_dir: Path) -> None:
    """``tuned_apply.json`` (``cachelab.apply(pipe, **json.load(...))``), ``tuned_command.txt``
    (``python run.py`` with the same strategy) and ``benchmark_tool.yaml``."""
    c = chosen.candidate
    knobs = c.knobs()
    apply = json.dumps({"strategy": c.preset, **knobs}, indent=1) + "\n"
    write_bytes_atomic(out_dir / "tuned_apply.json", apply.encode())
    with hydra_set_aside():
        args = command_line(c.preset, **knobs)
    write_bytes_atomic(out_dir / "tuned_command.txt",
                       (f"python run.py model={cfg.model.name} num_steps={cfg.num_steps} "
                        + " ".join(shlex.quote(a) for a in args) + "\n").encode())
    (key, value), = target.as_dict().items()
    tool = {"tool": TOOL, "driver": "cachelab", "preset": c.preset,
            "grids": [{"name": f"{key} {value:g}: {c.label()}", "models": [cfg.model.name], "preset": c.preset,
                       "knobs": {k: [v] for k, v in knobs.items()}}]}
    header = (f"# job=tune job.search=space, target {key} {value:g} on {cfg.model.name}: {c.label()}\n"
              f"# (tuning split: FLOPs {chosen.verified['speedup']:.2f}x, PSNR {chosen.verified['psnr_db']:.2f} dB)\n")
    write_bytes_atomic(out_dir / "benchmark_tool.yaml", (header + OmegaConf.to_yaml(OmegaConf.create(tool))).encode())


def report(result: dict) -> str:
    """``report.md``: every axis's best (screened and verified) and the search's cost."""
    (key, value), = result["target"].items()
    lines = [f"# Tune (space search): {key} target {value:g} on {result['model']}", "",
             f"{result['frames']} frames; {result['cost']['total']['runs']} generations run, "
             f"{result['probes']['reused']} measurements reused from the probe file "
             f"({result['probes']['stored']} stored there); machine: {result['machine']}.", "",
             "| found by | setting | screened FLOPs | screened PSNR | verified FLOPs | verified PSNR | wall |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in result["found"]:
        s, v = f["screened"], f["verified"]
        verified = f"{v['speedup']:.2f}x | {v['psnr_db']:.2f} dB" if v else "- | -"
        wall = (v or s).get("wall_speedup")
        lines.append(f"| {f['found_by']} | {f['setting']} | {s['speedup']:.2f}x | {s['psnr_db']:.2f} dB | {verified} | "
                     f"{'-' if wall is None else f'{wall:.2f}x'} |")
    lines += ["", "| tuning cost | real generations | seconds |", "| --- | --- | --- |"]
    lines += [f"| {phase} | {c['runs']} | {c['seconds']:.1f} |" for phase, c in result["cost"].items()]
    chosen = result["chosen"]
    lines += ["", f"Chosen: {chosen['setting']}; run it: `{result['run_with']}`" if chosen else
              f"No verified candidate met {key} {value:g}."]
    return "\n".join(lines) + "\n"
