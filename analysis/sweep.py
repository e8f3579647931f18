"""Collect a sweep folder's ``metrics.json`` files into a table and a quality/speed plot.

    python -m cachelab.analysis.sweep multirun/2026-11-26/14-00-00 [more sweep folders] [--out DIR]

Writes ``sweep.csv``, ``sweep.md``, ``pareto_psnr.png`` and, when the model has a judge,
``pareto_accuracy.png`` (quality against FLOPs speedup, one line per strategy/order) into
``--out`` (default: the sweep folder). Jobs that failed (an
``error.txt`` or no ``metrics.json``) are listed with their reason (the first line of
``error.txt``), not silently dropped.

``cachelab.jobs.sweep.SweepReport`` does the same at the end of every ``python run.py -m ...``
(a Hydra callback, see conf/config.yaml) and makes the sweep exit with status 1 when a job did
not finish.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

from cachelab.analysis.figures import png_bytes, pyplot
from cachelab.core.variables import VARIABLES
from cachelab.io import write_bytes_atomic

ERROR = "error.txt"      # in a job folder: why the job did not finish (its first line)
SKIPPED = "skipped.txt"  # in a job folder: the job was the same run as another (cachelab.jobs.sweep.claim)

COLUMNS = [  # (header, path into metrics.json, format)
    ("strategy", ("strategy",), "s"),
    ("granularity", ("granularity",), "s"),
    ("order", ("order",), "d"),
    ("N", ("interval",), "d"),
    ("schedule", ("schedule",), "s"),
    ("full", ("num_full",), "d"),
    ("FLOPs speedup", ("flops", "speedup"), ".2f"),
    ("wall speedup", ("wall_s", "speedup"), ".2f"),
    ("efficiency", ("efficiency",), ".2f"),
    ("rel-L2", ("quality", "rel_l2"), ".4f"),
    ("PSNR (dB)", ("quality", "psnr_db"), ".2f"),
    ("SSIM", ("quality", "ssim"), ".4f"),
    ("class acc.", ("model_quality", "cached", "class_accuracy"), ".3f"),
    ("feature FD", ("model_quality", "cached", "feature_fd"), ".2f"),
]


VARIABLE_COLUMN = ("variable", ("variable",), "s")  # shown after the order where a job expands in another than step
ORDERED = ("taylor", "taylorseer", "taylor_newton")  # strategies whose rows and lines are told apart by order
VARIABLE_ORDER = {name: i for i, name in enumerate(VARIABLES)}  # strategy.predictor.variable


def columns(rows: list[dict]) -> list[tuple]:
    """:data:`COLUMNS`, with the expansion variable after the order where some job has one other than step."""
    if all(m.get("variable") in (None, "step") for m in rows):
        return COLUMNS
    at = next(i for i, (header, _, _) in enumerate(COLUMNS) if header == "order") + 1
    return [*COLUMNS[:at], VARIABLE_COLUMN, *COLUMNS[at:]]


def lookup(metrics: dict, path: tuple[str, ...]):
    """The value at ``path``; a value metrics.json holds as null and flags in ``non_finite``
    (strict JSON) comes back as the float it was (``inf`` PSNR of identical images)."""
    value = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    flagged = (metrics.get("non_finite") or {}).get("/".join(path)) if value is None else None
    return float(flagged) if flagged else value


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (sorted), less the jobs skipped as the same run as another: a
    folder with Hydra's ``.hydra``, or with an ``error.txt`` alone (a job that a scheduler ended
    before it started, recorded by ``cachelab.jobs.slurm``)."""
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / ERROR).is_file())
                  and not (p / SKIPPED).is_file())


def collect(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """Metrics of every finished job (sorted) and the names of jobs that did not finish (a job
    skipped as the same run as another is neither)."""
    rows, failed = [], []
    for job in job_dirs(sweep_dir):
        path = job / "metrics.json"
        if path.is_file():
            rows.append({"job": job.name, **json.loads(path.read_text())})
        else:
            failed.append(f"{job.name}: {failure_reason(job)}")
    return sort_rows(rows), failed


def failure_reason(job: Path) -> str:
    """Why a job did not finish: the first line of its ``error.txt`` (the lines after it hold
    its last output and traceback), else that it has no metrics.json."""
    try:
        lines = (job / ERROR).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no metrics.json"
    return lines[0].strip() if lines else "no metrics.json (an empty error.txt)"


def sort_rows(rows: list[dict]) -> list[dict]:
    """No caching first, then by strategy, Taylor order, expansion variable and N."""
    return sorted(rows, key=lambda m: (m["strategy"] != "none", m["strategy"],
                                       m["order"] if m["strategy"] in ORDERED else 0,
                                       VARIABLE_ORDER.get(m.get("variable"), -1), m["interval"]))


def fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def markdown(rows: list[dict], failed: list[str]) -> str:
    shown = columns(rows)
    lines = ["| " + " | ".join(h for h, _, _ in shown) + " |", "|" + "---|" * len(shown)]
    for m in rows:
        lines.append("| " + " | ".join(fmt(lookup(m, p), f) for _, p, f in shown) + " |")
    if failed:
        lines += ["", "Jobs that did not finish:", *[f"- {line}" for line in failed]]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    shown = columns(rows)
    writer.writerow(["job"] + [h for h, _, _ in shown])
    for m in rows:
        writer.writerow([m["job"]] + [lookup(m, p) for _, p, _ in shown])
    return buffer.getvalue()


def pareto_plot(rows: list[dict], quality: tuple[str, ...], label: str):
    """Figure: ``quality`` against FLOPs speedup, one line per strategy (and Taylor order), each
    point labelled with its interval N (or its adaptive schedule's knob); the title names the model(s), steps and samples."""
    plt = pyplot()
    series: dict[str, list[tuple[float, float, int]]] = {}
    for m in rows:
        x, y = lookup(m, ("flops", "speedup")), lookup(m, quality)
        if x is None or y is None or (isinstance(y, float) and math.isinf(y)):
            continue
        name = f"{m['strategy']} order {m['order']}" if m["strategy"] in ORDERED else m["strategy"]
        if m.get("variable") not in (None, "step"):
            name += f" in {m['variable']}"
        series.setdefault(name, []).append((x, y, point_label(m)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for x, y, text in points:
            ax.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("FLOPs speedup (×, baseline FLOPs / cached FLOPs)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if series:  # no points without FLOPs (measure.flops=false): no legend to draw
        ax.legend(fontsize=8, title="strategy")
    else:
        ax.text(0.5, 0.5, "no job has FLOPs (measure.flops=false) or a finite value", ha="center",
                transform=ax.transAxes, fontsize=9)
    ax.set_title(f"{label} against FLOPs speedup\n{sweep_description(rows)}", fontsize=9)
    return fig


def point_label(m: dict) -> str:
    """``N=5`` for a fixed interval; the knob of any other schedule (``threshold=0.05``)."""
    schedule = m.get("schedule") or f"Interval interval={m.get('interval')}"
    knobs = schedule.split(" ")[1:]
    if schedule.startswith("Interval ") and knobs[0].startswith("interval="):
        return "N=" + knobs[0].removeprefix("interval=")  # the schedule's own N (schedule.interval= may differ)
    return " ".join(knobs) or f"N={m.get('interval')}"


def sweep_description(rows: list[dict]) -> str:
    """``model tiny_dit, 50 steps, n=64 samples per job, 6 jobs`` (ranges where the jobs differ)."""
    def values(key):
        found = sorted({str(m.get(key)) for m in rows}, key=lambda v: (len(v), v))
        return "/".join(found) if found else "?"

    return (f"model {values('model')}, {values('num_steps')} steps, n={values('num_images')} samples per job, "
            f"{len(rows)} jobs")


def report(sweep_dirs: Path | list[Path], out: Path) -> list[str]:
    """Write the table, CSV and plots of one sweep folder (or several, merged: job names get
    their folder's name) into ``out``; returns the failed jobs."""
    dirs = [sweep_dirs] if isinstance(sweep_dirs, Path) else list(sweep_dirs)
    rows, failed = [], []
    for sweep_dir in dirs:
        found, missing = collect(sweep_dir)
        prefix = f"{sweep_dir.name}/" if len(dirs) > 1 else ""
        rows += [{**m, "job": prefix + m["job"]} for m in found]
        failed += [prefix + line for line in missing]
    rows = sort_rows(rows)
    table = markdown(rows, failed)
    write_bytes_atomic(out / "sweep.md", table.encode())
    write_bytes_atomic(out / "sweep.csv", to_csv(rows).encode())
    write_bytes_atomic(out / "pareto_psnr.png", png_bytes(pareto_plot(rows, ("quality", "psnr_db"), "PSNR vs full compute (dB)")))
    if any(lookup(m, ("model_quality", "cached", "class_accuracy")) is not None for m in rows):
        write_bytes_atomic(out / "pareto_accuracy.png",
                           png_bytes(pareto_plot(rows, ("model_quality", "cached", "class_accuracy"),
                                                     "class accuracy of the cached samples (judge)")))
    print(table, end="")
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="one sweep folder, or several to merge")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first sweep folder)")
    args = parser.parse_args(argv)
    report(args.sweep_dirs, args.out or args.sweep_dirs[0])


if __name__ == "__main__":
    main()
