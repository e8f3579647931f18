"""The command line: ``cachelab strategy=taylor order=3`` (installed console script) or
``python run.py strategy=taylor order=3`` from a checkout; Hydra, ``-m`` sweeps.

Exit status: 0 done; 2 a mistake the user can fix (one line ``error: ...``: a config value,
a folder another run holds, a folder that cannot be written, a launcher whose extra is not
installed); 1 a sweep with a failed job (each failed job's folder has ``error.txt``,
``sweep.md`` lists them); 130 / 143 interrupted by SIGINT / SIGTERM (one line saying where,
and how to resume where that is possible).

Each job of a sweep runs in a child process (:mod:`cachelab.jobs.isolation`): an exception, a
segfault, an OOM kill or ``job_timeout_s`` in one job is recorded in its folder and the sweep
goes on. A single run runs in this process (in a child too when ``job_timeout_s`` is set).
Messages go through :mod:`logging` (conf/hydra/job_logging/cachelab.yaml: the console and
the run folder's ``run.log``). Importing this module imports no torch: ``--help`` is quick.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cachelab.errors import ConfigError, UserError
from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.console import close_progress_bars, quiet_console
from cachelab.jobs.isolation import Outcome, run_isolated
from cachelab.jobs.listing import listing, package_version
from cachelab.jobs.lifecycle import (LOCK, PROGRESS, SWEEP, Interrupted, Owner, interruptible, interrupted_line,
                                     release_if_owned, slurm_job, write_failure)

FINISHED = "finished.json"  # written after a job's metrics.json: its overrides, for resuming sweeps
ERROR = "error.txt"         # a failed sweep job's reason (first line), last output lines, traceback
SLURM_RECORD = "slurm.json"  # under SLURM: the job that ran the run (lifecycle.slurm_job), one entry per run of it
# the Hydra plugin each launcher config builds on (its defaults), and the extra that installs it
LAUNCHER_PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher",
                    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
                    "submitit_local": "hydra_plugins.hydra_submitit_launcher"}
log = logging.getLogger(__name__)


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


def plugin_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all
        return False


def check_launcher(overrides: list[str], config_dir: Path = CONFIG_DIR, installed=plugin_installed) -> None:
    """``hydra/launcher=<name>`` whose plugin is not installed: a ConfigError naming the extra
    (instead of Hydra's composition error)."""
    for override in overrides:
        key, _, name = override.lstrip("+").partition("=")
        path = config_dir / "hydra" / "launcher" / f"{name}.yaml"
        if key != "hydra/launcher" or not path.is_file():
            continue
        bases = [d for d in OmegaConf.load(path).get("defaults", []) if isinstance(d, str)]
        for base in bases:
            plugin = LAUNCHER_PLUGINS.get(base)
            if plugin is not None and not installed(plugin):
                raise ConfigError(f"hydra/launcher={name} needs the {plugin.split('.')[-1]} plugin, which is not "
                                  f"installed; allowed: pip install 'cachelab[launchers]', or no hydra/launcher")


def run_job(cfg: DictConfig, out_dir: Path, overrides: list[str]) -> None:
    """The job, then ``finished.json`` (what a resumed sweep checks); under SLURM, first the
    job's id into ``slurm.json``."""
    from cachelab.io import write_json_atomic
    from cachelab.jobs.runner import run

    from cachelab.jobs.checks import unused_shorthands

    record_slurm_job(out_dir)
    for note in unused_shorthands(cfg, overrides):
        log.warning(note)
    run(cfg, out_dir)
    write_json_atomic(out_dir / FINISHED, {"overrides": overrides})


def record_slurm_job(out_dir: Path) -> None:
    """Append this process's SLURM job (if any) to ``slurm.json``: every run of a requeued job shows."""
    from cachelab.io import write_json_atomic

    job = slurm_job()
    if job is None:
        return
    path = out_dir / SLURM_RECORD
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError):
        runs = []
    write_json_atomic(path, {"id": job["id"], "runs": [*runs, job]})


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
    the sweep goes on; an interrupt stops the sweep. A job whose resolved config an earlier
    job of the sweep ran (a key its strategy does not use) is skipped with one line."""
    from cachelab.jobs.sweep import claim, sweep_group

    if finished(out_dir, overrides):  # a resumed sweep: this job is done
        log.info(f"skipping job {num}: finished with the same overrides ({out_dir})")
        return
    same = claim(sweep_dir, num, cfg, out_dir)
    if same is not None:
        log.info(f"skipping job {num} ({' '.join(overrides)}): the same run as job {same} "
                 f"(its strategy does not use the key that differs)")
        return
    if cfg.logger and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = sweep_group(sweep_dir)  # W&B runs grouped by sweep
    (out_dir / ERROR).unlink(missing_ok=True)  # from an earlier attempt
    try:
        from cachelab.jobs.checks import job_timeout

        timeout = job_timeout(cfg)
    except ConfigError as err:
        outcome = Outcome("failed", reason=str(err), exit_code=2, user_error=True)
    else:
        def job() -> None:
            quiet_console()  # the sweep shows its own progress; the job's messages go to its run.log
            cfg.progress = False
            run_job(cfg, out_dir, overrides)

        outcome = run_isolated(job, timeout, folder=out_dir)
        clear_stale_lock(out_dir)
    if outcome.status == "interrupted":
        which = f"job {num} ({out_dir})"
        where = f"{outcome.where} of {which}" if outcome.where.startswith("at ") else f"in {which} {outcome.where}".strip()
        line = interrupted_line(where, True, "hydra.sweep.dir", sweep_dir)
        raise Interrupted(outcome.signum, line)
    if outcome.status == "failed":
        record_failure(out_dir, num, outcome)


def record_failure(out_dir: Path, num: int, outcome: Outcome) -> None:
    """One line on stderr and the job's ``error.txt`` (which the sweep report lists)."""
    from cachelab.io import write_bytes_atomic

    log.error(f"error: job {num} ({out_dir}): {outcome.reason}")
    try:
        write_bytes_atomic(out_dir / ERROR, error_report(outcome).encode())
    except OSError as err:
        log.error(f"error: {write_failure(err, out_dir) or err}")


def clear_stale_lock(out_dir: Path) -> None:
    """A job process killed while holding the folder's lock leaves it behind: remove it
    (a lock is the pid of the process holding it; a dead one can no longer)."""
    owner = Owner.read(out_dir / LOCK)
    if owner is not None and not owner.running():
        release_if_owned(out_dir / LOCK, owner.pid)


def single_run(cfg: DictConfig, out_dir: Path, overrides: list[str]) -> None:
    """A single run in this process (in a child with ``job_timeout_s``); exits 2 with one line
    for a mistake the user can fix, 130/143 when interrupted."""
    from cachelab.jobs.checks import job_timeout

    try:
        timeout = job_timeout(cfg)
    except ConfigError as err:
        log.error(f"error: {err}")
        sys.exit(2)
    if timeout is not None:
        outcome = run_isolated(lambda: run_job(cfg, out_dir, overrides), timeout, folder=out_dir)
        clear_stale_lock(out_dir)
        if outcome.status == "interrupted":
            raise Interrupted(outcome.signum, interrupted_line(outcome.where, outcome.resumable, "hydra.run.dir", out_dir))
        if outcome.status == "failed":
            if outcome.details and not outcome.user_error:
                log.error(outcome.details.rstrip())
            log.error(f"error: {outcome.reason}")
            sys.exit(2 if outcome.user_error else 1)
        return
    try:
        run_job(cfg, out_dir, overrides)
    except UserError as err:
        log.error(f"error: {err}")
        sys.exit(2)
    except OSError as err:
        message = write_failure(err, out_dir)
        if message is None:
            raise
        log.error(f"error: {message}")
        sys.exit(2)
    except Interrupted as stop:
        stop.message = interrupted_line(PROGRESS.where(), PROGRESS.resumable, "hydra.run.dir", out_dir)
        raise


def check_command_line(argv: list[str]) -> None:
    """The overrides' group choices, types and launcher, before Hydra composes (one line, exit 2)."""
    command_line = [a for a in argv if "=" in a and not a.startswith("-")]  # not flags, nor `--cfg job`'s job
    if not command_line:
        return  # nothing to check (and --help stays quick: no torch import)
    from cachelab.jobs.checks import check_group_choices
    from cachelab.jobs.schema import check_override_types

    try:
        check_group_choices(command_line, CONFIG_DIR, config_dirs(argv))
        check_override_types(command_line, CONFIG_DIR, config_dirs(argv))  # the schemas' types
        check_launcher(command_line)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OverrideParseException:
        pass  # a malformed override: Hydra parses them again below and reports it without a traceback


def answer(text: str) -> None:
    """Print ``text`` on stdout; a reader that stopped early (``cachelab --list | head``) ends the
    process quietly, as a Unix tool does, instead of with a BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a process a closed pipe stopped


def console() -> None:
    """The ``cachelab`` console script (and ``python run.py``); ``--version`` and ``--list`` answer
    before Hydra starts."""
    if sys.argv[1:] == ["--version"]:
        answer(f"cachelab {package_version()}")
        return
    if sys.argv[1:] == ["--list"]:
        answer(listing(Path(CONFIG_DIR)))
        return
    with interruptible():  # SIGINT/SIGTERM raise Interrupted: every cleanup runs, one line at the end
        try:
            check_command_line(sys.argv[1:])
            main()
        except Interrupted as stop:
            if stop.message is None and "dir" in SWEEP:  # in the sweep's own code, between jobs
                stop.message = interrupted_line("", True, "hydra.sweep.dir", SWEEP["dir"])
            close_progress_bars()  # the line starts a line, wherever the signal stopped a bar
            print(stop.line, file=sys.stderr)
            sys.exit(stop.exit_code)
