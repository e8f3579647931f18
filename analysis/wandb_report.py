"""A sweep as a W&B Report, built with W&B's report library (``wandb-workspaces``, extra ``reports``).

    python -m cachelab.analysis.wandb_report build <sweep folder>
    python -m cachelab.analysis.wandb_report publish <sweep folder> --entity E [--project P]

``build`` writes ``wandb_report.json`` next to ``sweep.md``: the report in the library's own
serialised form (the view spec that ``Report.save()`` uploads), for the runs of the sweep's
finished jobs. Every panel names a key that those runs logged, read back from their run files
(``<job>/wandb/*run-*/run-*.wandb``): quality against FLOPs and wall-clock speedup (the Pareto
view, from the summary), each per-step history key (``trajectory/rel_l2``, the full-step mask
``schedule/full``) one line per run, each logged image (the grids) side by side, a run comparer
of the configs, and ``sweep.md`` as text. The runs are selected by their W&B group and run
ids (a failed job's run is in the group too). ``publish`` uploads the definition, once the
runs are synced (``wandb sync``), and prints its URL; :func:`share` does either at the end of
a sweep.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from cachelab.analysis.sweep import job_dirs
from cachelab.analysis.wandb_log import history, read_records, summary
from cachelab.io import write_bytes_atomic

REPORT = "wandb_report.json"
INSTALL = "W&B reports need wandb-workspaces: pip install -e '.[reports]'"
SPEEDS = ("flops/speedup", "wall_s/speedup")                          # summary keys, x of the Pareto view
QUALITY = ("quality/", "model_quality/cached/", "paper_metrics/")    # summary key prefixes, its y
TITLES = {"trajectory/rel_l2": "rel-L2 to full compute after each step",
          "schedule/full": "full-step mask (1 full, 0 forecast)"}
PANEL = {"w": 12, "h": 8}


@dataclass
class LoggedRun:
    """One job's W&B run as its run file holds it: who it is and which keys it logged."""

    job: str
    run_id: str
    name: str
    group: str
    project: str
    online: bool
    curves: set[str]    # numeric history keys (one value per step)
    media: set[str]     # image keys
    summary: dict


def read_run(path: Path, job: str) -> LoggedRun:
    """The run in one run file (``run-<id>.wandb``)."""
    run = next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")
    rows = history(path)
    objects = {k[: -len("_type")]: v for row in rows for k, v in row.items() if k.endswith("/_type")}  # images, tables
    curves = {k for row in rows for k, v in row.items()
              if not k.startswith("_") and number(v) and not any(k.startswith(o) for o in objects)}
    media = {key.rstrip("/") for key, kind in objects.items() if kind == "image-file"}
    return LoggedRun(job, run.run_id, run.display_name, run.run_group, run.project,
                     not path.parent.name.startswith("offline-"), curves, media, summary(path))


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def logged_runs(sweep_dir: Path) -> list[LoggedRun]:
    """The latest W&B run of every finished job (a ``metrics.json``) of the sweep folder."""
    runs = []
    for job in (p for p in job_dirs(sweep_dir) if (p / "metrics.json").is_file()):
        files = sorted(job.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name.split("run-", 1)[1])
        if files:
            runs.append(read_run(files[-1], job.name))
    return runs


def reports_library():
    """``wandb_workspaces.reports.v2``, or an ImportError that says how to install it."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return wr


def panels(runs: list[LoggedRun]) -> list:
    """The panels of what the runs logged: Pareto scatters, per-step curves, images, configs."""
    wr = reports_library()
    layout = lambda: wr.Layout(**PANEL)  # noqa: E731
    logged = {k: v for run in runs for k, v in run.summary.items() if number(v)}
    speeds = [key for key in SPEEDS if key in logged]
    quality = sorted((key for key in logged if key.startswith(QUALITY) and not key.endswith("num_samples")),
                     key=lambda key: ([key.startswith(p) for p in QUALITY].index(True), key))
    found = []
    if speeds:
        found += [wr.ScatterPlot(title=f"{q} vs {speeds[0]}", x=speeds[0], y=q, layout=layout()) for q in quality]
        found += [wr.ScatterPlot(title=f"{quality[0]} vs {x}", x=x, y=quality[0], layout=layout())
                  for x in speeds[1:] if quality]
    curves = sorted({k for run in runs for k in run.curves})
    found += [wr.LinePlot(title=TITLES.get(key, key), x="Step", y=[key], layout=layout()) for key in curves]
    media = sorted({k for run in runs for k in run.media})
    found += [wr.MediaBrowser(title=key, media_keys=[key], gallery_axis="run", num_columns=4, layout=layout())
              for key in media]
    found.append(wr.RunComparer(diff_only="split", layout=wr.Layout(w=24, h=12)))
    return found


def build(sweep_dir: Path, runs: list[LoggedRun]):
    """The sweep's report (a ``wandb_workspaces`` ``Report``; entity left empty until publishing)."""
    wr = reports_library()
    from wandb_workspaces import expr

    groups = sorted({run.group for run in runs} - {""})
    selected = [expr.Metric("Group").isin(groups)] if groups else []  # a failed job's run is in the group too
    runset = wr.Runset(name=", ".join(groups) or sweep_dir.name,
                       filters=[*selected, expr.Metric("ID").isin([run.run_id for run in runs])])
    table = sweep_dir / "sweep.md"
    blocks = [
        wr.P(f"The {len(runs)} finished jobs of the sweep {sweep_dir.name} (W&B group {', '.join(groups) or 'none'}): "
             + ", ".join(f"{run.name} (job {run.job})" for run in runs) + "."),
        wr.PanelGrid(runsets=[runset], panels=panels(runs)),
        wr.H2("Sweep table (sweep.md)"),
        wr.MarkdownBlock(text=table.read_text() if table.is_file() else "(no sweep.md)"),
    ]
    title = f"cachelab sweep {groups[0] if len(groups) == 1 else sweep_dir.name}"
    return wr.Report(entity="", project=runs[0].project, title=title[:128], blocks=blocks,
                     description="Quality against speedup by strategy, per-step error and full steps, grids, configs.")


def definition(report) -> str:
    """The report as the library serialises it (the view spec that ``Report.save()`` uploads)."""
    return report._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1) + "\n"


def load(sweep_dir: Path):
    """The report of a sweep folder's ``wandb_report.json``."""
    wr = reports_library()
    from wandb_workspaces.reports.v2.internal import ReportViewspec

    path = sweep_dir / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run a sweep with logger=wandb, or "
                                f"python -m cachelab.analysis.wandb_report build {sweep_dir}")
    return wr.Report._from_model(ReportViewspec.model_validate_json(path.read_text()))


def publish(sweep_dir: Path, entity: str | None = None, project: str | None = None) -> str:
    """Upload the sweep's report (its runs already on W&B) into ``entity``/``project`` (default:
    the logged-in user's entity, the runs' project); returns its URL."""
    report = load(sweep_dir)
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    report.entity, report.project = entity, project or report.project
    for block in report.blocks:
        for runset in getattr(block, "runsets", []):
            runset.entity, runset.project = report.entity, report.project
    report.save()
    return report.url


def write(sweep_dir: Path) -> list[LoggedRun]:
    """Write ``wandb_report.json`` into the sweep folder; returns the runs it shows (none: no file)."""
    runs = logged_runs(sweep_dir)
    if runs:
        write_bytes_atomic(sweep_dir / REPORT, definition(build(sweep_dir, runs)).encode())
    return runs


def share(sweep_dir: Path) -> str | None:
    """At the end of a sweep: the definition written and, when the runs went online, published.
    Returns the one line to print (None: no job logged to W&B)."""
    runs = write(sweep_dir)
    if not runs:
        return None
    if all(run.online for run in runs):
        return f"W&B report: {publish(sweep_dir, project=runs[0].project)}"
    return (f"W&B report: {sweep_dir / REPORT}; to share it: wandb sync {sweep_dir}/*/wandb/offline-run-* && "
            f"python -m cachelab.analysis.wandb_report publish {sweep_dir} --entity ENTITY --project {runs[0].project}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cachelab.analysis.wandb_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="write wandb_report.json from the runs' files").add_argument(
        "sweep_dir", type=Path, help="a sweep folder (python run.py -m ... logger=wandb)")
    publishing = commands.add_parser("publish", help="upload wandb_report.json (after wandb sync) and print its URL")
    publishing.add_argument("sweep_dir", type=Path, help="a sweep folder holding wandb_report.json")
    publishing.add_argument("--entity", required=True, help="the W&B entity (user or team) the runs were synced to")
    publishing.add_argument("--project", default=None, help="the W&B project (default: the runs' project)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    try:
        if args.command == "build":
            runs = write(args.sweep_dir)
            if not runs:
                parser.error(f"no finished job of {args.sweep_dir} has a W&B run file (run the sweep with logger=wandb)")
            print(f"{args.sweep_dir / REPORT}: {len(runs)} runs")
        else:
            print(publish(args.sweep_dir, args.entity, args.project))
    except (ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 -- the server or the credentials: one line, not a traceback
        print(f"error: publishing failed: {type(err).__name__}: {err} (log in with wandb login; "
              f"sync the runs first: wandb sync {args.sweep_dir}/*/wandb/offline-run-*)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
