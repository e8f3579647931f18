"""The library table: every cachelab preset's held-out best point on both trained models, read from
the two ``job=benchmark job.grid=full`` runs in this folder (``<model>/benchmark.csv`` and
``metrics.json``), written to ``results.md`` and, shorter, to the README's library table. Run
from the repository root:

    python train_free_runs/library/table.py

Every number comes from those files; what a method is made of comes from composing its preset
(``conf/strategy/<preset>.yaml``); only the method names and citations are written here.
"""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from cachelab.jobs.schema import compose_config  # noqa: E402

MODELS = ("tiny_flux_digits", "tiny_dit")
# the supplements (run_supplement.sh <model>): tools whose grid was fixed after the main run
SUPPLEMENTS = {"tiny_flux_digits": "tiny_flux_digits_tokens", "tiny_dit": "tiny_dit_supplement"}
LEVELS = (30.0, 35.0, 40.0)
# benchmark tool -> (method, paper or source, preset and extra keys composed for "made of")
METHODS = {
    "cachelab fora": ("FORA", "Selvaraju et al. 2024, arXiv 2407.01425", "fora", {}),
    "cachelab reuse": ("reuse (order 0)", "FORA's rule on the stack / output", "reuse", {}),
    "cachelab taylorseer": ("TaylorSeer, the paper's settings", "Liu et al., ICCV 2025, arXiv 2503.06923",
                            "taylorseer", {}),
    "cachelab taylor": ("TaylorSeer, its grid", "Liu et al., ICCV 2025, arXiv 2503.06923", "taylor", {}),
    "cachelab taylorseer_lite": ("TaylorSeer-Lite", "Cache4Diffusion (code)", "taylorseer_lite", {}),
    "cachelab taylorseer_lite_stack": ("TaylorSeer-Lite on the stack", "FreqCa's one-residual layout",
                                       "taylorseer_lite_stack", {}),
    "cachelab hicache": ("HiCache", "Feng et al., ICLR 2026, arXiv 2508.16984", "hicache", {}),
    "cachelab teacache": ("TeaCache", "Liu et al., CVPR 2025, arXiv 2411.19108", "teacache", {}),
    "cachelab fbcache": ("FBCache (and Taylor on its schedule)", "ParaAttention / diffusers (code)", "fbcache", {}),
    "cachelab magcache": ("MagCache (and Taylor on its schedule)", "Ma et al., NeurIPS 2025, arXiv 2506.09045",
                          "magcache", {}),
    "cachelab pab": ("PAB", "Zhao et al., ICLR 2025, arXiv 2408.12588", "pab", {}),
    "cachelab foca": ("FoCa", "Zheng et al., AAAI 2026, arXiv 2508.16211", "foca", {}),
    "cachelab speca": ("SpeCa", "Liu et al., ACM MM 2025, arXiv 2509.11628", "speca", {}),
    "cachelab seacache": ("SeaCache", "arXiv 2602.18993", "seacache", {}),
    "cachelab freqca": ("FreqCa", "Liu et al. 2025, arXiv 2510.08669", "freqca", {}),
    "cachelab dmd": ("DMD", "Schmid 2010; cache-dit 1.5's DMD calibrator", "dmd", {}),
    "cachelab taylor_newton": ("Newton (ablation)", "this library", "taylor_newton", {}),
    "cachelab adams_bashforth": ("AB-Cache", "Yu et al. 2025, arXiv 2504.10540", "adams_bashforth", {}),
    "cachelab least_squares": ("least squares", "this library", "least_squares", {}),
    "cachelab exponential": ("exponential", "this library", "exponential", {}),
    "cachelab error_controlled": ("error-controlled Taylor", "this library", "taylor",
                                  {"schedule": "error_controlled"}),
    "cachelab toca": ("ToCa", "Zou et al., ICLR 2025, arXiv 2410.05317", "toca", {}),
    "cachelab duca": ("DuCa", "Zou et al. 2024, arXiv 2412.18911", "duca", {}),
    "cachelab clusca": ("ClusCa", "Zheng et al., ACM MM 2025, arXiv 2509.10312", "clusca", {}),
    "cachelab taylor_toca": ("TaylorSeer x ToCa", "this library", "taylor_toca", {}),
    "cachelab tuned": ("the tuner's choices", "`job=tune job.search=space` (train_free_runs/search/)", None, {}),
}


def made_of(preset: str | None, extra: dict) -> str:
    """predictor / schedule / granularity / tokens of a preset, from its composed config."""
    if preset is None:
        return "per choice (its setting below)"
    groups = [f"strategy={preset}"] + [f"{k}={v}" for k, v in extra.items()]
    cfg = compose_config(groups)

    def short(path):
        target = OmegaConf.select(cfg, path)
        return target.rsplit(".", 1)[-1] if target else "—"
    predictor = short("strategy.predictor._target_")
    difference = OmegaConf.select(cfg, "strategy.predictor.difference")
    if difference not in (None, "official"):
        predictor += f" ({difference} differences)"
    return " / ".join([predictor, short("schedule._target_"),
                       str(cfg.strategy.get("granularity")), short("strategy.tokens._target_")])


def read_run(name: str) -> dict | None:
    folder = HERE / name
    if not (folder / "metrics.json").exists():
        return None
    with open(folder / "benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("flops_speedup", "wall_speedup", "psnr", "psnr_low", "psnr_high"):
            r[key] = float(r[key]) if r[key] not in ("", None) else math.nan
    metrics = json.loads((folder / "metrics.json").read_text())
    header = (folder / "benchmark.md").read_text().split("\n", 1)[0]
    return {"rows": rows, "summary": metrics["summary"], "metrics": metrics, "header": header, "name": name}


def usable(run: dict | None, tool: str) -> bool:
    return run is not None and any(r["tool"] == tool and not r["flag"] for r in run["rows"])


def run_of(runs: dict, model: str, tool: str) -> dict | None:
    """The model's supplement where the tool ran there, else its main run."""
    main, extra = runs[model], runs.get(SUPPLEMENTS.get(model, ""))
    return extra if usable(extra, tool) else main


def best_point(run: dict, tool: str, level: float) -> dict | None:
    """The held-out point of ``tool`` that is fastest (FLOPs) at PSNR >= level, as the summary picks it."""
    ok = [r for r in run["rows"] if r["split"] == "held_out" and r["tool"] == tool and not r["flag"]
          and r["psnr"] >= level]
    return max(ok, key=lambda r: r["flops_speedup"]) if ok else None


def best_psnr(run: dict, tool: str, split: str) -> dict | None:
    ok = [r for r in run["rows"] if r["split"] == split and r["tool"] == tool and not r["flag"]]
    return max(ok, key=lambda r: r["psnr"]) if ok else None


def cell(run: dict | None, tool: str, j: int) -> str:
    if run is None:
        return "not run"
    per_tool = run["summary"]["flops_speedup"]["per_tool"]
    if not any(r["tool"] == tool for r in run["rows"]):
        return "not run on this model"
    if not usable(run, tool):
        return "crashed"
    if tool not in per_tool:
        return "none selected"
    best, low, high = per_tool[tool][j]
    if best_point(run, tool, LEVELS[j]) is None:
        return "—"
    return f"{best:.2f}× [{low:.2f}, {high:.2f}]" + (" †" if run["name"] in SUPPLEMENTS.values() else "")


def setting(r: dict) -> str:
    return re.sub(r"\s+", " ", r["setting"]).replace("|", "/")


def details(run: dict, tools: list[str]) -> list[str]:
    """Per tool and level: the held-out best point (FLOPs, wall, PSNR with intervals, setting) and
    the tool over the best peer (paired interval); or the best PSNR it reached."""
    flops = run["summary"]["flops_speedup"]
    wall = run["summary"]["wall_speedup"]
    lines = ["| tool | PSNR ≥ | FLOPs × [95 %] | wall × | held-out PSNR (dB) [95 %] | setting | / best peer, FLOPs [95 %] |",
             "| --- " * 7 + "|"]
    for tool in tools:
        if not any(r["tool"] == tool for r in run["rows"]):
            continue
        if not usable(run, tool):
            flags = sorted({r["flag"].split(":")[0] for r in run["rows"] if r["tool"] == tool})
            lines.append(f"| {tool} | every point flagged | | | | {'; '.join(flags)} (rerun in a supplement when one "
                         f"has it, below) | |")
            continue
        any_point = False
        for j, level in enumerate(LEVELS):
            r = best_point(run, tool, level)
            if r is None:
                continue
            any_point = True
            b, lo, hi = flops["per_tool"][tool][j]
            ratio = flops.get("ratio_per_tool", {}).get(tool, [])  # cachelab's tools only
            vs = f"{ratio[j]['ratio']:.2f} [{ratio[j]['low']:.2f}, {ratio[j]['high']:.2f}] {ratio[j]['verdict']}" \
                if ratio else ""
            w = wall["per_tool"].get(tool)
            lines.append(f"| {tool} | {level:g} | {b:.2f} [{lo:.2f}, {hi:.2f}] | "
                         f"{w[j][0]:.2f} | {r['psnr']:.2f} [{r['psnr_low']:.2f}, {r['psnr_high']:.2f}] | "
                         f"{setting(r)} | {vs} |")
        if not any_point:
            held, tuned = best_psnr(run, tool, "held_out"), best_psnr(run, tool, "tuning")
            if held is not None:
                lines.append(f"| {tool} | none reached | {held['flops_speedup']:.2f} (its best PSNR point) | "
                             f"{held['wall_speedup']:.2f} | {held['psnr']:.2f} [{held['psnr_low']:.2f}, "
                             f"{held['psnr_high']:.2f}] | {setting(held)} | |")
            elif tuned is not None:
                lines.append(f"| {tool} | none selected | {tuned['flops_speedup']:.2f} (its best tuning-split PSNR "
                             f"point, 8 images) | | {tuned['psnr']:.2f} (tuning) | {setting(tuned)} | |")
    return lines


def lead_rows(run: dict) -> list[str]:
    lines = []
    for axis, name in (("flops_speedup", "FLOPs"), ("wall_speedup", "wall")):
        ratio = run["summary"][axis]["ratio"]
        lines.append(f"| all cachelab tools / best peer, {name} | " + " | ".join(
            f"**{r['ratio']:.2f}** [{r['low']:.2f}, {r['high']:.2f}] {r['verdict']}" for r in ratio) + " |")
        tuned = run["summary"][axis].get("ratio_per_tool", {}).get("cachelab tuned")
        if tuned:
            lines.append(f"| cachelab tuned / best peer, {name} | " + " | ".join(
                f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}] {r['verdict']}" for r in tuned) + " |")
    return lines


README_START = "<!-- the library table: written by python train_free_runs/library/table.py -->"
README_END = "<!-- end of the library table -->"


def readme_table(runs: dict) -> list[str]:
    """The README's short table: per method its paper, what it is made of, its preset and its
    held-out best FLOPs speedup at 30 / 35 / 40 dB on each model (no intervals: results.md has them)."""
    def best(run: dict | None, tool: str, j: int) -> str:
        text = cell(run, tool, j)
        if "×" in text:
            return text.split("×")[0] + "×" + (" †" if text.endswith("†") else "")
        return "—" if text == "none selected" else text  # "crashed", "not run" stay what they say

    lines = ["| method | paper / source | made of here | preset | FLUX: 30 / 35 / 40 dB | DiT: 30 / 35 / 40 dB |",
             "| --- " * 6 + "|"]
    for tool, (method, paper, preset, extra) in METHODS.items():
        if preset is None:
            continue
        name = f"`{preset}`" + "".join(f" {k}={v}" for k, v in extra.items())
        cells = [" / ".join(best(run_of(runs, m, tool), tool, j) for j in range(len(LEVELS))) for m in MODELS]
        lines.append(f"| {method} | {paper} | {made_of(preset, extra)} | {name} | " + " | ".join(cells) + " |")
    return lines


def write_readme_table(runs: dict, readme: Path) -> None:
    """Replace the README's library table (between its two markers) with :func:`readme_table`."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no library table markers ({README_START} ... {README_END})")
    head, _, rest = text.partition(README_START + "\n")
    _, _, tail = rest.partition(README_END)
    readme.write_text(head + README_START + "\n" + "\n".join(readme_table(runs)) + "\n" + README_END + tail)


def read_runs() -> dict:
    return {name: read_run(name) for name in (*MODELS, *SUPPLEMENTS.values())}


def main() -> None:
    runs = read_runs()
    ours = list(METHODS)
    log = (HERE / "runs.log").read_text().splitlines() if (HERE / "runs.log").exists() else []
    out = ["# The whole library on held-out inputs", "",
           "Generated by `python train_free_runs/library/table.py` from the runs in this folder",
           "(`python run.py job=benchmark model=<m> job.grid=full logger=none threads=1`, each preset",
           "its own tool: the fastest point of its grid selected on the tuning split per PSNR level and",
           "margin, measured again on held-out inputs). Cells: the held-out best FLOPs speedup at",
           "PSNR ≥ level with its percentile-bootstrap 95 % interval over images (— : none of its",
           "selected points reached the level on held-out inputs; its best PSNR point is in the",
           "per-model tables). Made of: predictor / schedule / granularity / tokens of the preset's",
           "defaults (the grids also vary granularity and schedule: see each point's setting).", "",
           "Runs and machine load (`uptime` at each start and end):", ""]
    out += [f"    {line}" for line in log if " start " in line or " end " in line]
    out += [""] + [f"- `{m}`: {runs[m]['header']}" if runs[m] else f"- `{m}`: not run" for m in runs] + [""]
    out += ["† from a supplement run (`tiny_flux_digits_tokens/`, `tiny_dit_supplement/`: `run_supplement.sh <model>`),",
            "the same splits, seeds and image counts as the main runs, for the tools whose",
            "grid was fixed after the main run (ToCa, DuCa, TaylorSeer x ToCa, PAB: see the script). Their ratios to",
            "the best peer are not measured (no peer in those runs); their main-run rows stay in the main folders.", ""]
    out += ["## The table", "",
            "| method | paper / source | made of here | tool (preset) | FLUX ≥ 30 dB | FLUX ≥ 35 dB | FLUX ≥ 40 dB "
            "| DiT ≥ 30 dB | DiT ≥ 35 dB | DiT ≥ 40 dB |", "| --- " * 10 + "|"]
    for tool, (method, paper, preset, extra) in METHODS.items():
        name = f"`{preset}`" + (" " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "") \
            if preset else "`cachelab_tuned.yaml`"
        cells = [cell(run_of(runs, m, tool), tool, j) for m in MODELS for j in range(len(LEVELS))]
        out.append(f"| {method} | {paper} | {made_of(preset, extra)} | {name} | " + " | ".join(cells) + " |")
    peers = sorted({r["tool"] for run in runs.values() if run for r in run["rows"]
                    if r["tool"] != "full compute" and not r["tool"].startswith("cachelab")})
    out += ["", "The peers, on the same runs (their whole documented grids, `conf/benchmark/full/`):", "",
            "| peer tool | FLUX ≥ 30 dB | FLUX ≥ 35 dB | FLUX ≥ 40 dB | DiT ≥ 30 dB | DiT ≥ 35 dB | DiT ≥ 40 dB |",
            "| --- " * 7 + "|"]
    for tool in peers:
        out.append(f"| {tool} | " + " | ".join(cell(runs[m], tool, j) for m in MODELS for j in range(len(LEVELS)))
                   + " |")
    for m in runs:
        run = runs[m]
        if run is None:
            continue
        out += ["", f"## `{m}`: every tool's held-out best points"]
        if run["summary"]["flops_speedup"]["ratio"]:  # a supplement has no peer
            out += ["", "| over the best peer (paired bootstrap interval) | " + " | ".join(
                f"≥ {lv:g} dB" for lv in LEVELS) + " |", "| --- " * (len(LEVELS) + 1) + "|"] + lead_rows(run)
        out += ["", f"Wall speedups: full compute's own timings spread {run['metrics']['wall_noise']:.0%} in this run "
                "(a wall claim needs its interval beyond that).", ""]
        out += details(run, ours + peers)
    (HERE / "results.md").write_text("\n".join(out) + "\n")
    write_readme_table(runs, HERE.parents[1] / "README.md")
    print(f"wrote {HERE / 'results.md'} and the table in README.md")


if __name__ == "__main__":
    main()
