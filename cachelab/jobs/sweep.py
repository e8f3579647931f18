"""Hydra callbacks around a run's folder and a sweep: the folder checked for writing before
Hydra writes into it, the sweep folder locked, and at the end of a sweep its report
(:func:`analysis.sweep.report`) and its table logged as one more logger run; the sweep fails
when a job did not finish."""
from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import instantiate

from analysis.sweep import COLUMNS, collect, lookup, report
from cachelab.errors import FolderLocked
from cachelab.jobs.lifecycle import SWEEP, SWEEP_LOCK, FolderLock, probe_writable, write_failure


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


def check_writable(folder: Path) -> None:
    """Exit 2 with one line when ``folder`` cannot be made or written (before Hydra writes its
    config and log into it, which would end in a traceback)."""
    try:
        probe_writable(folder)
    except OSError as err:
        named = Path(os.fsdecode(err.filename)) if err.filename is not None else None
        where = named if named is not None and (named == folder or named in folder.parents) else folder
        print(f"error: cannot write {where}: {err.strerror or err}", file=sys.stderr)
        sys.exit(2)


class RunFolderCheck(Callback):
    """Hydra callback: a single run's folder must be writable before the run starts."""

    def on_run_start(self, config, **kwargs) -> None:
        check_writable(Path(config.hydra.run.dir))


class SweepReport(Callback):
    """Hydra callback: before a multirun, the sweep folder writable and locked (one sweep per
    folder); after it, report the sweep and fail if a job did not finish."""

    lock: FolderLock | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        check_writable(sweep_dir)
        lock = FolderLock(sweep_dir, SWEEP_LOCK, what="sweep")
        try:
            lock.acquire()
        except FolderLocked as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        self.lock = lock
        atexit.register(lock.release)  # also when an interrupt ends the sweep before its end
        SWEEP["dir"] = sweep_dir       # an interrupt between jobs says how to resume

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            failed = report(sweep_dir, sweep_dir)
        except OSError as err:
            print(f"error: {write_failure(err, sweep_dir) or err}", file=sys.stderr)
            self.release()
            sys.exit(2)
        if config.get("logger"):
            try:
                log_table(config.logger, sweep_dir)
            except Exception as err:  # noqa: BLE001 -- the report is written; the logger is extra
                print(f"warning: the sweep table was not logged: {type(err).__name__}: {err}", file=sys.stderr)
        self.release()
        if failed:
            print(f"{len(failed)} job(s) did not finish (see {sweep_dir / 'sweep.md'}):", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            sys.exit(1)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
