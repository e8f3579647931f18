"""Hydra callbacks around a run's folder and a sweep: the folder checked for writing before
Hydra writes into it, the sweep folder locked, and at the end of a sweep its report
(:func:`cachelab.analysis.sweep.report`), its table logged as one more logger run and its W&B Report
(:func:`cachelab.analysis.wandb_report.share`); the sweep fails when a job did not finish.

A sweep has one progress bar (its jobs) and one W&B group, ``<date>_<time>_<swept keys>``
(``sweep.json`` keeps it for a resumed sweep). A job whose resolved config an earlier job of
the sweep ran (``order=1,2`` with ``strategy=reuse``, which has no order) is skipped: its
fingerprint (:func:`fingerprint`) is claimed once in ``fingerprints/``."""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cachelab.analysis.sweep import SKIPPED, collect, columns, lookup, report
from cachelab.analysis.wandb_report import share
from cachelab.errors import FolderLocked
from cachelab.jobs.checks import SHORTHANDS
from cachelab.jobs.lifecycle import SWEEP, SWEEP_LOCK, FolderLock, probe_writable, write_failure

SWEEP_RECORD = "sweep.json"     # in the sweep folder: {"group": the W&B group of its runs}
FINGERPRINTS = "fingerprints"   # in the sweep folder: <fingerprint> holds the number of the job that runs it


def swept(config) -> list:
    """The sweep's overrides (command line and ``hydra.sweeper.params``), parsed."""
    params = config.hydra.sweeper.get("params") or {}
    given = [*config.hydra.overrides.task, *(f"{key}={value}" for key, value in params.items())]
    return OverridesParser.create().parse_overrides(given)


def group_name(started: datetime, overrides: list) -> str:
    """``2026-12-05_14-14-40_strategy-order``: when the sweep started and the keys it sweeps."""
    keys = [o.key_or_group.replace("/", ".") for o in overrides if o.is_sweep_override()]
    return f"{started:%Y-%m-%d_%H-%M-%S}_{'-'.join(keys) or 'sweep'}"


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of the sweep's runs (from ``sweep.json``; the folder's name without it)."""
    try:
        return json.loads((sweep_dir / SWEEP_RECORD).read_text())["group"]
    except (OSError, ValueError, KeyError):
        return sweep_dir.name


def fingerprint(cfg: DictConfig) -> str:
    """A job's resolved config without the shorthands (their values are where they are used):
    two jobs with the same fingerprint compute the same thing."""
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key in SHORTHANDS:
        resolved.pop(key, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def claim(sweep_dir: Path, num: int, cfg: DictConfig, out_dir: Path) -> int | None:
    """Claim the job's fingerprint for job ``num`` (atomically: parallel jobs race for it); the
    number of the job that holds it when that is another one (then ``skipped.txt`` names it in
    ``out_dir``), else None."""
    folder = sweep_dir / FINGERPRINTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fingerprint(cfg)
    fd, temporary = tempfile.mkstemp(dir=folder)
    try:
        os.write(fd, str(num).encode())
        os.close(fd)
        os.link(temporary, path)  # fails if another job holds it; the file is complete when it appears
    except FileExistsError:
        holder = int(path.read_text())
        if holder != num:
            (out_dir / SKIPPED).write_text(f"the same run as job {holder}\n")
            return holder
    finally:
        os.unlink(temporary)
    return None


def job_count(overrides: list) -> int:
    """How many jobs Hydra's basic sweeper makes of ``overrides``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def log_table(logger_cfg, sweep_dir: Path) -> None:
    """The sweep's table as one logger run (W&B: a Table in a run grouped by the sweep folder)."""
    rows, _ = collect(sweep_dir)
    group = sweep_group(sweep_dir)
    extra = {"group": group} if "group" in logger_cfg and logger_cfg.group is None else {}
    sink = instantiate(logger_cfg, **extra)
    sink.start(f"sweep-{group}", {"sweep_dir": str(sweep_dir), "jobs": len(rows)}, sweep_dir)
    try:
        shown = columns(rows)
        sink.table("sweep/summary", [header for header, _, _ in shown],
                   [[lookup(m, path) for _, path, _ in shown] for m in rows])
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
    folder), its W&B group named; a progress bar over its jobs (in-process launcher); after it,
    report the sweep, say where the report is, and fail if a job did not finish."""

    lock: FolderLock | None = None
    bar: tqdm | None = None

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
        overrides = swept(config)
        if not (sweep_dir / SWEEP_RECORD).is_file():  # a resumed sweep keeps its group
            (sweep_dir / SWEEP_RECORD).write_text(json.dumps({"group": group_name(datetime.now(), overrides)}) + "\n")
        if config.get("progress") and config.hydra.launcher._target_.endswith(".BasicLauncher"):
            self.bar = tqdm(total=job_count(overrides), desc="sweep", unit="job")

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if self.bar is not None:
            self.bar.close()
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
        try:
            line = share(sweep_dir)
        except Exception as err:  # noqa: BLE001 -- sweep.md is written; the W&B report is extra
            print(f"warning: no W&B report: {type(err).__name__}: {err}", file=sys.stderr)
        else:
            if line:
                print(line)
        self.release()
        plots = ", ".join(str(p) for p in sorted(sweep_dir.glob("*.png")))
        print(f"summary: {sweep_dir / 'sweep.md'} (and sweep.csv){'; plots: ' + plots if plots else ''}")
        if failed:
            print(f"{len(failed)} job(s) did not finish (see {sweep_dir / 'sweep.md'}):", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            sys.exit(1)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
