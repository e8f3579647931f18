"""``hydra/launcher=slurm``: a sweep's jobs as one SLURM job array (submitit), every job's end
recorded in its folder.

Hydra's submitit launcher submits the array and then waits for each job's result: a job that
SLURM ends without one (``scancel``, a node failure, the time limit) raises there and ends the
sweep before its report, and a request the cluster cannot meet is a traceback or a job that
never starts. :func:`launch` (the same submission, the same parameters; Hydra finds it as
``hydra_plugins.cachelab_launcher.slurm_launcher.SlurmLauncher``) instead

- checks the request against the partition before submitting (:func:`check_request`: CPUs,
  GPUs and memory per node, nodes, time limit), and turns sbatch's own refusal into one line:
  ``error: ...``, exit 2;
- waits on the result files and on SLURM's view of each job (``squeue``; ``sacct`` for a job
  squeue no longer shows): a job that ended without a result gets ``error.txt`` in its folder
  with SLURM's state (``cancelled by SLURM (job 12_3 CANCELLED)``), which ``sweep.md`` lists;
- keeps waiting on a requeued job (preemption, submitit's checkpoint before the time limit,
  ``scontrol requeue``): it runs again into its folder, and ``job=sample`` resumes there;
- skips the jobs a resumed sweep finished (no SLURM job for them), and cancels the jobs still
  queued or running when the launching process is interrupted (SIGINT, SIGTERM), as a local
  sweep stops its job: rerunning the command resumes the sweep.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict

from cachelab.errors import ConfigError
from cachelab.jobs.isolation import Outcome, one_line

log = logging.getLogger(__name__)
POLL_S = 1.0         # how often the result files are looked for
SCHEDULER_S = 5.0    # how often SLURM is asked about the jobs without one
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}  # SLURM's job states after which a job never runs again
GONE = "GONE"        # a job neither squeue nor sacct knows (any more)


def launch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """What ``hydra/launcher=slurm`` does (``launcher``: its Hydra plugin, a submitit
    ``SlurmLauncher`` with ``params``, ``config`` and ``hydra_context`` set up): check the request,
    submit the jobs as one array, wait for all of them, record in its folder why a job left no
    result; returns one Hydra ``JobReturn`` per job."""
    import submitit

    params = launcher.params
    try:
        check_request(params)
    except ConfigError as err:
        quit_with(f"error: {err}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params.get("max_num_timeout", 0))
    executor.update_parameters(**executor_parameters(params))
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    singleton = Singleton.get_state()
    calls, folders = [], {}
    for i, overrides in enumerate(job_overrides):
        num, overrides = initial_job_idx + i, list(overrides)
        folders[num] = job_folder(launcher, overrides, num)
        if why := done(folders[num], overrides):  # a resumed sweep: no SLURM job for it
            log.info(f"skipping job {num}: {why} ({folders[num]})")
        else:
            calls.append((overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", singleton))
    jobs = submit(executor, launcher, calls, params) if calls else []
    try:
        ends = wait(jobs)
    except BaseException:  # interrupted: no job of this sweep runs on without it
        cancel([job for job in jobs if not job.paths.result_pickle.exists()])
        raise
    for (_, _, num, _, _), end in zip(calls, ends):
        if end is not None:  # the job left no result: why, in its folder, for the sweep's report
            from cachelab.jobs.cli import record_failure

            folders[num].mkdir(parents=True, exist_ok=True)
            record_failure(folders[num], num, Outcome("failed", reason=end))
    # a failure is in its folder: Hydra re-raises a FAILED return, which would skip the sweep's report
    return [JobReturn(overrides=list(overrides), working_dir=str(folders[initial_job_idx + i]), status=JobStatus.COMPLETED)
            for i, overrides in enumerate(job_overrides)]


def done(folder: Path, overrides: list[str]) -> str | None:
    """Why the job needs no SLURM job (it finished with the same overrides, or it is the same
    run as another job of the sweep: ``skipped.txt``), else None."""
    from cachelab.analysis.sweep import SKIPPED
    from cachelab.jobs.cli import finished

    if finished(folder, overrides):
        return "finished with the same overrides"
    if (folder / SKIPPED).is_file():
        return (folder / SKIPPED).read_text().strip()
    return None


def submit(executor, launcher, calls: list[tuple], params: dict) -> list:
    """Submit ``launcher(*call)`` for every call as one array; sbatch's refusal is one line, exit 2."""
    import submitit

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal too: once is enough
            jobs = executor.map_array(launcher, *zip(*calls))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as err:
        quit_with(f"error: hydra/launcher=slurm: the jobs were not submitted: {submission_error(err)}")
    log.info(f"submitted {len(jobs)} SLURM job(s): {', '.join(job.job_id for job in jobs)} "
             f"(logs in {Path(params['submitit_folder']).parent})")
    return jobs


def cancel(jobs: list) -> None:
    """scancel ``jobs`` (saying so on stderr)."""
    if jobs:
        ids = [job.job_id for job in jobs]
        _command(["scancel", *ids])
        print(f"cancelled the SLURM job(s) still queued or running: {', '.join(ids)}", file=sys.stderr)


def job_folder(launcher, overrides: list[str], num: int) -> Path:
    """The folder Hydra gives job ``num`` (``hydra.sweep.dir`` / ``hydra.sweep.subdir``)."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config.hydra.job):
        config.hydra.job.num = num
    return Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)


def quit_with(line: str):
    print(line, file=sys.stderr)
    sys.exit(2)


def executor_parameters(params: dict) -> dict:
    """The launcher's parameters as submitit's executor takes them (the shared ones by name,
    the others with ``slurm_``), as Hydra's submitit launcher passes them."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    return {key if key in shared else f"slurm_{key}": value for key, value in params.items()
            if key not in ("submitit_folder", "max_num_timeout")}


def submission_error(err: Exception) -> str:
    """sbatch's own error line (``sbatch: error: Batch job submission failed: ...``), else the first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [line for line in lines if "error:" in line]
    return said[-1] if said else one_line(str(err))


# ----------------------------------------------------------------------------- waiting

def wait(jobs: list, poll_s: float = POLL_S, scheduler_s: float = SCHEDULER_S) -> list[str | None]:
    """Wait until every job has a result file or SLURM says it ended; per job, None (a result:
    the job itself recorded how it went) or why it left none."""
    ends: dict[int, str | None] = {}
    last_asked, seen_ended = 0.0, {}
    while len(ends) < len(jobs):
        waiting = [i for i in range(len(jobs)) if i not in ends]
        for i in waiting:
            if jobs[i].paths.result_pickle.exists():
                ends[i] = result_failure(jobs[i])
        waiting = [i for i in waiting if i not in ends]
        if waiting and time.monotonic() - last_asked >= scheduler_s:
            last_asked = time.monotonic()
            states = job_states([jobs[i].job_id for i in waiting])
            for i in waiting:
                state = states.get(jobs[i].job_id, GONE)
                if state.split()[0] in ENDED or state == GONE:  # twice in a row: a result file may be on its way
                    if seen_ended.get(i) == state:
                        ends[i] = ended_without_result(jobs[i].job_id, state)
                    seen_ended[i] = state
                else:
                    seen_ended.pop(i, None)
        if len(ends) < len(jobs):
            time.sleep(poll_s)
    return [ends[i] for i in range(len(jobs))]


def result_failure(job) -> str | None:
    """None when the job's result file holds a result; else submitit's error, in one line."""
    try:
        job.results()
    except Exception as err:  # noqa: BLE001 -- submitit re-raises whatever the job's process raised
        lines = [line for line in str(err).splitlines() if line.strip()]
        return f"SLURM job {job.job_id} failed: {lines[-1].strip() if lines else type(err).__name__}"
    return None


def ended_without_result(job_id: str, state: str) -> str:
    """The one line a job's ``error.txt`` gets when SLURM ended it without a result."""
    word = state.split()[0]
    if word == "CANCELLED":
        return f"cancelled by SLURM (job {job_id} {state})"
    if word == GONE:
        return f"SLURM job {job_id} ended without a result (no longer in squeue, and no accounting to say how)"
    return f"SLURM job {job_id} ended as {state} without a result"


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job (``RUNNING``, ``CANCELLED by 0``, ...): squeue for the jobs it
    still shows (a few minutes after their end), sacct for the others where the cluster keeps
    accounting; a job neither knows is left out."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    shown = _command(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(arrays)])
    states = dict(line.split("|", 1) for line in shown.splitlines() if "|" in line)
    missing = [job_id for job_id in job_ids if job_id not in states]
    if missing:
        accounted = _command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", *(f"-j{i}" for i in missing)])
        states.update(line.split("|", 1) for line in accounted.splitlines() if "|" in line)
    return {job_id: states[job_id].strip() for job_id in job_ids if job_id in states}


def _command(command: list[str]) -> str:
    """A SLURM client's output; empty when it fails (no accounting, the controller busy: asked again later)."""
    return _answer(command)[0]


def _answer(command: list[str]) -> tuple[str, str | None]:
    """A SLURM client's output and, where it failed (missing, past its 60 s, an error status), why in one line."""
    try:
        shown = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return "", one_line(str(err))
    if shown.returncode:
        return shown.stdout, one_line(shown.stderr) or f"{command[0]} exited with status {shown.returncode}"
    return shown.stdout, None


def _asked(command: list[str]) -> str:
    """A SLURM client's output the request check needs; a ConfigError in one line where it fails."""
    shown, failure = _answer(command)
    if failure is not None:
        raise ConfigError(f"hydra/launcher=slurm: SLURM does not answer ({failure}); allowed: a SLURM cluster's "
                          f"login node, or another hydra/launcher")
    return shown


# ----------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class Partition:
    """What a partition offers: its name, nodes, the largest node's CPUs, memory (MB) and GPUs,
    and its time limit in minutes (None: none)."""

    name: str
    nodes: int
    cpus: int
    memory_mb: int
    gpus: int
    max_minutes: float | None


def check_request(params: dict, partition: Partition | None = None) -> None:
    """A ConfigError naming the first ``hydra.launcher.*`` key that asks for more than the
    partition has (a job that would never start); ``partition`` defaults to SLURM's answer."""
    partition = partition or describe_partition(params.get("partition"))
    tasks = params.get("tasks_per_node") or 1
    cpus = tasks * (params.get("cpus_per_task") or 1)
    gpus = params.get("gpus_per_node") or tasks * (params.get("gpus_per_task") or 0)
    memory = (params.get("mem_gb") or 0) * 1024
    where = f"partition {partition.name}"
    asked = [("nodes", params.get("nodes") or 1, partition.nodes, f"{where} has {partition.nodes} node(s)"),
             ("cpus_per_task", cpus, partition.cpus,
              f"{cpus} CPUs per node ({tasks} task(s)); the largest node of {where} has {partition.cpus}"),
             ("gpus_per_node" if params.get("gpus_per_node") else "gpus_per_task", gpus, partition.gpus,
              f"{gpus} GPUs per node; the largest node of {where} has {partition.gpus}"),
             ("mem_gb", memory, partition.memory_mb,
              f"{memory} MB per node; the largest node of {where} has {partition.memory_mb} MB"),
             ("timeout_min", params.get("timeout_min") or 0, partition.max_minutes,
              f"{where} allows at most {partition.max_minutes:g} minutes" if partition.max_minutes else "")]
    for key, value, limit, what in asked:
        if limit is not None and value > limit:
            raise ConfigError(f"hydra.launcher.{key}={params.get(key)} asks for more than the cluster has: {what}; "
                              f"allowed: a request that fits a node of {where} (hydra.launcher.partition=...)")


def describe_partition(name: str | None) -> Partition:
    """SLURM's description of partition ``name`` (None: the default partition)."""
    shown = _asked(["scontrol", "show", "partition", "-o"])
    partitions = [dict(_fields(line)) for line in shown.splitlines() if line.startswith("PartitionName=")]
    names = [p["PartitionName"] for p in partitions]
    chosen = [p for p in partitions if p["PartitionName"] == name or (name is None and p.get("Default") == "YES")]
    if not chosen:
        raise ConfigError(f"hydra.launcher.partition={name or 'null'}: "
                          f"{'no such partition' if name else 'the cluster has no default partition'}; "
                          f"allowed: {', '.join(names) or '(none)'}")
    partition = chosen[0]
    nodes = _asked(["sinfo", "-h", "-N", "-p", partition["PartitionName"], "-o", "%N|%c|%m|%G"]).split()
    rows = {row.split("|")[0]: row.split("|")[1:] for row in nodes if row.count("|") == 3}
    return Partition(partition["PartitionName"], len(rows), max((int(c) for c, _, _ in rows.values()), default=0),
                     max((int(m) for _, m, _ in rows.values()), default=0),
                     max((gpu_count(g) for _, _, g in rows.values()), default=0), minutes(partition.get("MaxTime", "")))


def _fields(line: str):
    for field in line.split():
        key, _, value = field.partition("=")
        yield key, value


def gpu_count(gres: str) -> int:
    """The GPUs of a node's generic resources (``gpu:a100:4(S:0-1),gpu:v100:2`` -> 6)."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def minutes(limit: str) -> float | None:
    """A SLURM time limit (``[days-]hours:minutes:seconds``, ``UNLIMITED``) in minutes (None: none)."""
    found = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", limit.strip())
    if found is None:
        return None
    days, hours, mins, secs = (int(part or 0) for part in found.groups())
    return days * 1440 + hours * 60 + mins + secs / 60
