"""cachelab entry point: ``python run.py strategy=taylor order=3`` (Hydra; ``-m`` sweeps).

Exit status: 0 done; 2 a mistake the user can fix (one line ``error: ...``: a config value,
a folder another run holds, a folder that cannot be written); 1 a sweep with a failed job
(each failed job's folder has ``error.txt``, ``sweep.md`` lists them); 130 / 143 interrupted
by SIGINT / SIGTERM (one line saying where, and how to resume where that is possible).

Each job of a sweep runs in a child process (:mod:`cachelab.jobs.isolation`): an exception, a
segfault, an OOM kill or ``job_timeout_s`` in one job is recorded in its folder and the sweep
goes on. A single run runs in this process (in a child too when ``job_timeout_s`` is set).
"""
from __future__ import annotations

import signal
import sys
import traceback

if __name__ == "__main__":  # until the handlers below are installed (the imports take seconds)
    def _stop_early(signum, frame):
        print("interrupted; nothing of this run was kept beyond the files already complete", file=sys.stderr)
        sys.exit(128 + signum)

    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stop_early)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import OverrideParseException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cachelab.errors import ConfigError, UserError  # noqa: E402
from cachelab.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from cachelab.jobs.checks import CONFIG_DIR, check_group_choices, job_timeout  # noqa: E402
from cachelab.jobs.isolation import Outcome, run_isolated  # noqa: E402
from cachelab.jobs.lifecycle import (LOCK, PROGRESS, SWEEP, Interrupted, Owner, interruptible,  # noqa: E402
                                     interrupted_line, release_if_owned, write_failure)

FINISHED = "finished.json"  # written after a job's metrics.json: its overrides, for resuming sweeps
ERROR = "error.txt"         # a failed sweep job's reason (first line), last output lines, traceback


def finished(out_dir: Path, overrides: list[str]) -> bool:
    """A job folder holds a valid ``metrics.json`` from a run with the same overrides."""
    try:
        done = json.loads((out_dir / FINISHED).read_text())
        json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return done.get("overrides") == overrides


def config_dirs(argv: list[str]) -> list[str]:
    """The folders given with ``--config-dir`` / ``-cd`` (Hydra searches them before conf/)."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            found.append(arg.split("=", 1)[1])
    return found


def run_job(cfg: DictConfig, out_dir: Path, overrides: list[str]) -> None:
    """The job, then ``finished.json`` (what a resumed sweep checks)."""
    from cachelab.jobs.runner import run

    run(cfg, out_dir)
    write_json_atomic(out_dir / FINISHED, {"overrides": overrides})


def error_report(outcome: Outcome) -> str:
    """``error.txt``: the reason on the first line, then the last lines of output and the traceback."""
    text = outcome.reason + "\n"
    if outcome.tail:
        text += "\nlast lines of output:\n" + "\n".join(outcome.tail) + "\n"
    if outcome.details:
        text += "\n" + outcome.details.rstrip() + "\n"
    return text


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        try:
            sweep_job(cfg, out_dir, overrides, Path(hydra_cfg.sweep.dir), hydra_cfg.job.num)
        except Exception as err:  # noqa: BLE001 -- a failure of this process's own bookkeeping: still one job's
            record_failure(out_dir, hydra_cfg.job.num, Outcome("failed", reason=f"{type(err).__name__}: {err}",
                                                               details=traceback.format_exc()))
    else:
        single_run(cfg, out_dir, overrides)


def sweep_job(cfg: DictConfig, out_dir: Path, overrides: list[str], sweep_dir: Path, num: int) -> None:
    """One job of a sweep, in a child process: a failure is written to its ``error.txt`` and
    the sweep goes on; an interrupt stops the sweep."""
    if finished(out_dir, overrides):  # a resumed sweep: this job is done
        print(f"skipping {out_dir}: finished with the same overrides", file=sys.stderr)
        return
    if cfg.logger and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = sweep_dir.name  # W&B runs grouped by sweep
    (out_dir / ERROR).unlink(missing_ok=True)  # from an earlier attempt
    try:
        timeout = job_timeout(cfg)
    except ConfigError as err:
        outcome = Outcome("failed", reason=str(err), exit_code=2, user_error=True)
    else:
        outcome = run_isolated(lambda: run_job(cfg, out_dir, overrides), timeout, folder=out_dir)
        clear_stale_lock(out_dir)
    if outcome.status == "interrupted":
        job = f"job {num} ({out_dir})"
        where = f"{outcome.where} of {job}" if outcome.where.startswith("at ") else f"in {job} {outcome.where}".strip()
        line = interrupted_line(where, True, "hydra.sweep.dir", sweep_dir)
        raise Interrupted(outcome.signum, line)
    if outcome.status == "failed":
        record_failure(out_dir, num, outcome)


def record_failure(out_dir: Path, num: int, outcome: Outcome) -> None:
    """One line on stderr and the job's ``error.txt`` (which the sweep report lists)."""
    print(f"error: job {num} ({out_dir}): {outcome.reason}", file=sys.stderr)
    try:
        write_bytes_atomic(out_dir / ERROR, error_report(outcome).encode())
    except OSError as err:
        print(f"error: {write_failure(err, out_dir) or err}", file=sys.stderr)


def clear_stale_lock(out_dir: Path) -> None:
    """A job process killed while holding the folder's lock leaves it behind: remove it
    (a lock is the pid of the process holding it; a dead one can no longer)."""
    owner = Owner.read(out_dir / LOCK)
    if owner is not None and not owner.running():
        release_if_owned(out_dir / LOCK, owner.pid)


def single_run(cfg: DictConfig, out_dir: Path, overrides: list[str]) -> None:
    """A single run in this process (in a child with ``job_timeout_s``); exits 2 with one line
    for a mistake the user can fix, 130/143 when interrupted."""
    try:
        timeout = job_timeout(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if timeout is not None:
        outcome = run_isolated(lambda: run_job(cfg, out_dir, overrides), timeout, folder=out_dir)
        clear_stale_lock(out_dir)
        if outcome.status == "interrupted":
            raise Interrupted(outcome.signum, interrupted_line(outcome.where, outcome.resumable, "hydra.run.dir", out_dir))
        if outcome.status == "failed":
            if outcome.details and not outcome.user_error:
                print(outcome.details, end="", file=sys.stderr)
            print(f"error: {outcome.reason}", file=sys.stderr)
            sys.exit(2 if outcome.user_error else 1)
        return
    try:
        run_job(cfg, out_dir, overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        message = write_failure(err, out_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        stop.message = interrupted_line(PROGRESS.where(), PROGRESS.resumable, "hydra.run.dir", out_dir)
        raise


if __name__ == "__main__":
    try:
        # overrides only: not flags, nor flag values such as the `job` of `--cfg job`
        check_group_choices([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")], CONFIG_DIR,
                            config_dirs(sys.argv[1:]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OverrideParseException:
        pass  # a malformed override: Hydra parses them again below and reports it without a traceback
    try:
        with interruptible():  # SIGINT/SIGTERM raise Interrupted: every cleanup runs, one line at the end
            main()
    except Interrupted as stop:
        if stop.message is None and "dir" in SWEEP:  # in the sweep's own code, between jobs
            stop.message = interrupted_line("", True, "hydra.sweep.dir", SWEEP["dir"])
        print(stop.line, file=sys.stderr)
        sys.exit(stop.exit_code)
