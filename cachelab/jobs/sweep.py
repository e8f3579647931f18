"""The end of a sweep (``python run.py -m ...``): its report (:func:`analysis.sweep.report`)
and its table logged as one more logger run; the sweep fails when a job did not finish."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import instantiate

from analysis.sweep import COLUMNS, collect, lookup, report


def log_table(logger_cfg, sweep_dir: Path) -> None:
    """The sweep's table as one logger run (W&B: a Table in a run grouped by the sweep folder)."""
    rows, _ = collect(sweep_dir)
    extra = {"group": sweep_dir.name} if "group" in logger_cfg and logger_cfg.group is None else {}
    sink = instantiate(logger_cfg, **extra)
    sink.start(f"sweep-{sweep_dir.name}", {"sweep_dir": str(sweep_dir), "jobs": len(rows)}, sweep_dir)
    try:
        sink.table("sweep/summary", [header for header, _, _ in COLUMNS],
                   [[lookup(m, path) for _, path, _ in COLUMNS] for m in rows])
    finally:
        sink.finish()


class SweepReport(Callback):
    """Hydra callback: after a multirun, report the sweep and fail if a job did not finish."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = report(sweep_dir, sweep_dir)
        if config.get("logger"):
            log_table(config.logger, sweep_dir)
        if failed:
            print(f"{len(failed)} job(s) did not finish (see {sweep_dir / 'sweep.md'}):", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            sys.exit(1)
