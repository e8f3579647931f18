"""Writes conf/benchmark/lead/: per model and PSNR level (30, 35, 40 dB), the point that a
recorded job.grid=full run found best on its held-out split (the fastest reaching the level, in
FLOPs and in wall time) among the peers and among cachelab's presets, each as a one-point grid of
its own tool file (the same tool, config class, fixed knobs and reasons as conf/benchmark/full/),
plus the tuner's choices (the benchmark_tool.yaml of each train_free_runs/search/<model>_<target>/
run) as cachelab_tuned.yaml.

Every point kept was selected on the full run's tuning split and is the held-out best of its side
at some level, so on the same inputs each side reaches at least the full run's best at every
level (chosen by held-out results: in the peers' favour) at a fraction of the cost.

    python train_free_runs/search/lead_grid.py          (from the repository root)
"""
from __future__ import annotations

import csv
import itertools
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FULL, LEAD = ROOT / "conf/benchmark/full", ROOT / "conf/benchmark/lead"
RUNS = {"tiny_dit": ROOT / "train_free_runs/benchmark/tiny_dit/benchmark.csv",
        "tiny_flux_digits": ROOT / "train_free_runs/benchmark/tiny_flux_digits/benchmark.csv"}
LEVELS = (30, 35, 40)


def selected() -> dict[tuple[str, str], set[str]]:
    """(model, tool) -> the settings of the held-out best points (peers, cachelab presets) per level and axis."""
    out: dict[tuple[str, str], set[str]] = {}
    for model, path in RUNS.items():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "held_out" and r["tool"] != "full compute"
                    and not r["flag"]]
        for level, axis, ours in itertools.product(LEVELS, ("flops_speedup", "wall_speedup"), (True, False)):
            side = [r for r in rows if (r["tool"] == "cachelab") == ours and float(r["psnr"]) >= level]
            if side:
                best = max(side, key=lambda r: float(r[axis]))
                out.setdefault((model, best["tool"]), set()).add(best["setting"])
    return out


def one_point_grids(spec: dict, chosen: dict[tuple[str, str], set[str]]) -> list[dict]:
    """Per model and per point of ``spec``'s grids that the full run selected: a grid of that point alone."""
    grids = []
    for grid in spec["grids"]:
        knobs, bundles = grid.get("knobs", {}), grid.get("bundles", {})
        target = grid.get("preset", spec.get("preset") or spec.get("config"))
        for model in grid.get("models") or RUNS:
            wanted = chosen.get((model, spec["tool"]), set())
            for values in itertools.product(*knobs.values()):
                for choice in itertools.product(*(list(c.items()) for c in bundles.values())):
                    shown = [f"{k}={v}" for k, v in zip(knobs, values)]
                    shown += [f"{bundle}={label}" for bundle, (label, _) in zip(bundles, choice)]
                    if f"{target}: {' '.join(shown)}" not in wanted:
                        continue
                    point = {"name": f"{model}: {' '.join(shown)}", "models": [model],
                             "knobs": {k: [v] for k, v in zip(knobs, values)}}
                    if "preset" in grid:
                        point["preset"] = grid["preset"]
                    if bundles:
                        point["bundles"] = {b: {label: fields} for b, (label, fields) in zip(bundles, choice)}
                    grids.append(point)
    return grids


def tuned() -> dict:
    """The tuner's choices, one grid each (train_free_runs/search/*/benchmark_tool.yaml)."""
    grids: dict[str, dict] = {}  # one grid per distinct model, preset and knobs (two targets may choose the same)
    for path in sorted((ROOT / "train_free_runs/search").glob("*/benchmark_tool.yaml")):
        for grid in yaml.safe_load(path.read_text())["grids"]:
            grids.setdefault(repr((grid["models"], grid["preset"], grid["knobs"])), grid)
    return {"tool": "cachelab tuned", "driver": "cachelab", "preset": "taylor", "grids": list(grids.values())}


def main() -> None:
    chosen = selected()
    LEAD.mkdir(exist_ok=True)
    for path in sorted(FULL.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if path.name == "grid.yaml":
            (LEAD / path.name).write_text("# job.grid=lead: the full grid's settings (train_free_runs/search/lead_grid.py)\n"
                                          + yaml.safe_dump(spec, sort_keys=False))
            continue
        spec["grids"] = one_point_grids(spec, chosen)
        if spec["grids"]:
            (LEAD / path.name).write_text(f"# {path.name} of conf/benchmark/full/, only the points its recorded run "
                                          f"selected (train_free_runs/search/lead_grid.py)\n"
                                          + yaml.safe_dump(spec, sort_keys=False))
    tool = tuned()
    if tool["grids"]:
        text = "# job=tune job.search=space's choices (train_free_runs/search/), one grid each\n"
        for folder in (LEAD, FULL):
            (folder / "cachelab_tuned.yaml").write_text(text + yaml.safe_dump(tool, sort_keys=False))


if __name__ == "__main__":
    main()
