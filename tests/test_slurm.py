"""Sweeps through ``hydra/launcher=slurm`` on a real (one-node) SLURM cluster: every job a SLURM
job, the report once, failures and cancellations listed, resumed sweeps, a requeued sampling
job that resumes byte for byte, requests larger than the cluster refused in one line.

The cluster is the session's ``slurm_cluster`` fixture (conftest.py, tests/slurm_cluster.py);
without it these tests skip with one line (fail under ``CACHELAB_REQUIRE_SLURM=1``, as in CI).
Jobs are tiny (the embedded DiT, 4 steps, 2 images, 1 CPU each: two run at a time). The pure
pieces (the request check, SLURM's time and GPU formats) are tested without a cluster.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachelab.errors import ConfigError
from cachelab.jobs.slurm import Partition, check_request, describe_partition, ended_without_result, gpu_count, minutes
from slurm_cluster import memory_mb
from test_cli import REPO, app_env, check_ok, job_overrides, overrides, read_metrics, run_app

# what the test cluster offers a job: 1 of its CPUs, no GPU, little memory, a time limit under the partition's
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30", "threads=1"]
JOB_ID = re.compile(r"\d+(_\d+)?")


def slurm_ids(folder: Path) -> tuple[str, dict]:
    """The SLURM job id in a job's folder (``slurm.json``) and the one its metrics.json holds."""
    recorded = json.loads((folder / "slurm.json").read_text())
    return recorded["id"], read_metrics(folder)["slurm"]


def start_app(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, what: str, timeout_s: float = 180.0, process: subprocess.Popen | None = None,
             logs: Path | None = None):
    """Wait until ``condition()``; a failure says what the sweep printed and, given the sweep's
    folder ``logs``, the tail of every SLURM job's own stderr (what a job that died left)."""
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended before {what}: rc={process.returncode}\n{out}\n{err}{job_logs(logs)}")
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s{job_logs(logs)}"
        time.sleep(0.1)
    return found


def job_logs(sweep: Path | None, lines: int = 40) -> str:
    """The last ``lines`` of each SLURM job's stderr under ``sweep`` (submitit's logs), for a failure message."""
    if sweep is None:
        return ""
    tails = [f"\n--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
             for path in sorted((sweep / ".submitit").glob("*/*_log.err"))]
    return "".join(tails) or f"\n(no job logs under {sweep / '.submitit'})"


def finish(process: subprocess.Popen, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout_s)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def chunks(folder: Path) -> int:
    return len(list((folder / "samples" / "cached").glob("*.npz")))


def restarts(folder: Path) -> int:
    try:
        return json.loads((folder / "slurm.json").read_text())["runs"][-1]["restarts"]
    except (OSError, ValueError, KeyError, IndexError):
        return -1


def release(cluster, job_id: str, sweep: Path) -> None:
    """A requeued job waits about two minutes (SLURM's own delay, its BeginTime) before it may
    start again: start it as soon as SLURM holds it back and its node is idle again (the earlier
    run's processes gone, slurmstepd included, as they are long before SLURM's own delay ends)."""
    def held() -> bool:
        return cluster.run("squeue", "-h", "-j", job_id, "-o", "%T %r").stdout.split() == ["PENDING", "BeginTime"]

    wait_for(lambda: held() and cluster.idle() and not cluster.job_processes(),
             f"job {job_id} pending again, its earlier run's processes gone, after its requeue", 60, logs=sweep)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def test_a_sweep_runs_as_slurm_jobs_reports_once_lists_a_failure_and_resumes(slurm_cluster, tmp_path):
    """``strategy=reuse,taylor order=2,-1``: four jobs, one the same run as another (reuse has no
    order), one failing (taylor order=-1)."""
    sweep, env = tmp_path / "sweep", app_env(tmp_path)
    args = ["-m", *SLURM, "logger=wandb", f"hydra.sweep.dir={sweep}", *overrides("strategy=reuse,taylor", "order=2,-1")]
    proc = run_app(args, env=env, timeout=600)
    assert proc.returncode == 1, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    jobs = {(o["strategy"], o["order"]): folder for folder in sweep.glob("*/.hydra")
            for o in [job_overrides(folder.parent)] for folder in [folder.parent]}
    assert len(jobs) == 4
    ran = [folder for folder in jobs.values() if not (folder / "skipped.txt").is_file()]
    assert len(ran) == 3
    for folder in ran:  # each ran as a SLURM job of the sweep's array, whose log folder is beside it
        job_id = json.loads((folder / "slurm.json").read_text())["id"]
        assert JOB_ID.fullmatch(job_id) and (sweep / ".submitit" / job_id).is_dir(), job_id
    finished = [jobs[("taylor", "2")], next(f for f in ran if job_overrides(f)["strategy"] == "reuse")]
    for folder in finished:
        recorded, in_metrics = slurm_ids(folder)
        assert in_metrics["id"] == recorded and in_metrics["node"] == slurm_cluster.host
    failed = jobs[("taylor", "-1")]
    assert not (failed / "metrics.json").exists()
    assert "order=-1" in (failed / "error.txt").read_text().splitlines()[0]
    table = (sweep / "sweep.md").read_text()
    assert table.count("| reuse |") == 1 and table.count("| taylor |") == 1
    assert f"- {failed.name}: " in table and "1 job(s) did not finish" in proc.stderr

    # the report, the plots and the W&B report definition: once, by the launching process, after every job
    assert proc.stdout.count("summary: ") == 1 and str(sweep / "pareto_psnr.png") in proc.stdout
    logs = "".join(path.read_text() for path in (sweep / ".submitit").glob("*/*_log.*"))
    assert "summary: " not in logs and "sweep.md" not in logs
    assert (sweep / "sweep.md").stat().st_mtime_ns >= max((f / "metrics.json").stat().st_mtime_ns for f in finished)
    assert (sweep / "wandb_report.json").is_file() and not list(sweep.glob("*/wandb_report.json"))
    assert len(list(sweep.glob("wandb/offline-run-*"))) == 1  # the sweep's table run; the jobs' runs are in their folders
    assert all(list(folder.glob("wandb/offline-run-*")) for folder in finished)

    # the same command again: the finished jobs (and the one that was the same run) are not submitted
    before = {folder: (folder / "metrics.json").stat().st_mtime_ns for folder in finished}
    again = run_app(args, env=env, timeout=600)
    assert again.returncode == 1, again.stderr
    said = again.stdout + again.stderr
    assert said.count("skipping job") == 3 and "submitted 1 SLURM job(s)" in said, said
    assert {folder: (folder / "metrics.json").stat().st_mtime_ns for folder in finished} == before
    assert f"- {failed.name}: " in (sweep / "sweep.md").read_text()


def test_a_cancelled_job_is_listed_as_cancelled_and_the_others_finish(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    process = start_app(["-m", *SLURM, "logger=none", f"hydra.sweep.dir={sweep}", *overrides("num_steps=4,4000")],
                        app_env(tmp_path))
    slow = sweep / "1"  # num_steps=4000: minutes; cancelled once it runs
    wait_for(lambda: (slow / "slurm.json").is_file() and (slow / "run.lock").is_file(), "running slow job",
             process=process, logs=sweep)
    job_id = json.loads((slow / "slurm.json").read_text())["id"]
    slurm_cluster.run("scancel", job_id)
    proc = finish(process)
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert read_metrics(sweep / "0")["num_steps"] == 4 and read_metrics(sweep / "0")["slurm"]["id"] != job_id
    reason = (slow / "error.txt").read_text().splitlines()[0]
    assert reason.startswith(f"cancelled by SLURM (job {job_id} CANCELLED"), reason
    assert f"- 1: {reason}" in (sweep / "sweep.md").read_text()
    assert not (slow / "run.lock").exists()  # the cancelled job ended cleanly: its lock released
    assert not slurm_cluster.run("squeue", "-h").stdout.strip()


def test_an_interrupted_sweep_cancels_its_jobs(slurm_cluster, tmp_path):
    """Ctrl-C on the login node stops the sweep's SLURM jobs, as it stops a local sweep's job."""
    sweep = tmp_path / "sweep"
    process = start_app(["-m", *SLURM, "logger=none", f"hydra.sweep.dir={sweep}", *overrides("num_steps=4000,4001")],
                        app_env(tmp_path))
    for job in (sweep / "0", sweep / "1"):
        wait_for(lambda: (job / "slurm.json").is_file(), f"running job {job.name}", process=process, logs=sweep)
    process.send_signal(signal.SIGINT)
    proc = finish(process, 60)
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("cancelled the SLURM job(s) still queued or running: ")
    assert lines[-1] == f"interrupted; rerun the same command into the same folder (hydra.sweep.dir={sweep}) to resume"
    wait_for(lambda: not slurm_cluster.run("squeue", "-h").stdout.strip(), "empty queue", 30)
    assert not (sweep / "0" / "metrics.json").exists() and not (sweep / "sweep.lock").exists()


def test_a_requeued_sample_job_resumes_from_its_last_chunk_byte_for_byte(slurm_cluster, tmp_path):
    """Interrupted twice: ``scontrol requeue`` (SIGTERM to the job), then SIGUSR2 as a preempting
    SLURM sends it (submitit checkpoints and requeues the job itself); each run resumes from the
    chunks the earlier ones finished, and ``samples.npz`` is the uninterrupted run's, byte for byte."""
    settings = overrides("job=sample", "num_images=6", "job.batch_size=1", "num_steps=150", "logger=none", "threads=1")
    env = app_env(tmp_path)
    whole = start_app([*settings, f"hydra.run.dir={tmp_path / 'whole'}"], env)  # meanwhile, outside SLURM
    sweep = tmp_path / "sweep"
    process = start_app(["-m", *SLURM, f"hydra.sweep.dir={sweep}", *settings], env)
    job = sweep / "0"
    wait_for(lambda: chunks(job) >= 2, "two chunks", process=process, logs=sweep)
    job_id = json.loads((job / "slurm.json").read_text())["id"]
    slurm_cluster.run("scontrol", "requeue", job_id)
    release(slurm_cluster, job_id, sweep)
    wait_for(lambda: restarts(job) == 1 and chunks(job) >= 4, "two more chunks after the requeue", process=process,
             logs=sweep)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    release(slurm_cluster, job_id, sweep)
    proc = finish(process)
    check_ok(proc)
    check_ok(finish(whole))
    metrics = read_metrics(job)
    assert metrics["slurm"]["id"] == job_id and metrics["slurm"]["restarts"] == 2
    assert [run["restarts"] for run in json.loads((job / "slurm.json").read_text())["runs"]] == [0, 1, 2]
    assert metrics["chunks_resumed"] >= 4 and metrics["chunks_generated"] == 6 - metrics["chunks_resumed"]
    assert (job / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()
    log = (job / "run.log").read_text()
    assert "this job is preempted" in log and "Requeued job" in log  # submitit's checkpoint did the second requeue
    errors = (sweep / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()  # every run's, appended
    assert "Traceback" not in errors and "interrupted at step " in errors  # the requeue's SIGTERM: one line


@pytest.mark.parametrize("request_, said", [
    ("hydra.launcher.cpus_per_task=64", "error: hydra.launcher.cpus_per_task=64 asks for more than the cluster has: "
                                        "64 CPUs per node (1 task(s)); the largest node of partition debug has 2;"),
    ("hydra.launcher.constraint=nosuchfeature", "error: hydra/launcher=slurm: the jobs were not submitted: sbatch: "
                                                "error: Batch job submission failed: Invalid feature specification"),
])
def test_a_request_the_cluster_cannot_meet_is_one_line(slurm_cluster, tmp_path, request_, said):
    """Checked before submitting (CPUs), or refused by sbatch (an unknown feature): one line, exit 2, nothing queued."""
    sweep = tmp_path / "sweep"
    proc = run_app(["-m", *SLURM, request_, "logger=none", f"hydra.sweep.dir={sweep}", *overrides("order=1,2")],
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(said), proc.stderr
    assert not slurm_cluster.run("squeue", "-h").stdout.strip() and not (sweep / "sweep.lock").exists()


def test_the_partition_is_read_from_the_cluster(slurm_cluster):
    """What check_request compares with: the test cluster's one node and its partition's time limit."""
    assert describe_partition(None) == describe_partition("debug") == Partition(
        "debug", nodes=1, cpus=slurm_cluster.cpus, memory_mb=memory_mb(), gpus=0, max_minutes=60)
    with pytest.raises(ConfigError, match=r"^hydra.launcher.partition=gpu: no such partition; allowed: debug$"):
        describe_partition("gpu")
    with pytest.raises(ConfigError, match=r"^hydra.launcher.timeout_min=600 .*: partition debug allows at most 60 minutes;"):
        check_request({"timeout_min": 600})


# ----------------------------------------------------------------------------- without a cluster

NODE = Partition("gpu", nodes=2, cpus=16, memory_mb=64000, gpus=4, max_minutes=120)


def test_a_request_that_fits_passes_and_each_excess_names_its_key():
    fits = {"cpus_per_task": 8, "tasks_per_node": 2, "gpus_per_node": 4, "mem_gb": 62, "timeout_min": 120, "nodes": 2}
    check_request(fits, NODE)
    for key, value, what in [("cpus_per_task", 9, "18 CPUs per node (2 task(s)); the largest node of partition gpu has 16"),
                             ("gpus_per_node", 5, "5 GPUs per node; the largest node of partition gpu has 4"),
                             ("mem_gb", 63, "64512 MB per node; the largest node of partition gpu has 64000 MB"),
                             ("timeout_min", 121, "partition gpu allows at most 120 minutes"),
                             ("nodes", 3, "partition gpu has 2 node(s)")]:
        with pytest.raises(ConfigError) as refused:
            check_request({**fits, key: value}, NODE)
        assert str(refused.value).startswith(f"hydra.launcher.{key}={value} asks for more than the cluster has: {what};")
    with pytest.raises(ConfigError, match=r"^hydra.launcher.gpus_per_task=3 .* 6 GPUs per node"):
        check_request({"tasks_per_node": 2, "gpus_per_task": 3}, NODE)
    check_request({"timeout_min": 10**6}, Partition("long", 1, 1, 1, 0, max_minutes=None))  # no time limit


def test_slurm_formats_read_as_slurm_writes_them():
    assert minutes("1:00:00") == 60 and minutes("2-00:30:00") == 2 * 1440 + 30 and minutes("00:00:30") == 0.5
    assert minutes("UNLIMITED") is None and minutes("") is None
    assert gpu_count("(null)") == 0 and gpu_count("gpu:4") == 4
    assert gpu_count("gpu:a100:4(S:0-1),gpu:v100:2") == 6 and gpu_count("mps:100,gpu:1") == 1
    assert ended_without_result("12_3", "CANCELLED by 0") == "cancelled by SLURM (job 12_3 CANCELLED by 0)"
    assert ended_without_result("5", "NODE_FAIL") == "SLURM job 5 ended as NODE_FAIL without a result"


def test_no_slurm_to_ask_is_one_line(tmp_path, monkeypatch):
    """Not a SLURM cluster's login node: no SLURM commands."""
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing in it
    with pytest.raises(ConfigError, match=r"^hydra/launcher=slurm: SLURM does not answer \(.+'scontrol'\); allowed: "):
        describe_partition(None)


def test_a_missing_or_failing_sinfo_is_one_line(tmp_path, monkeypatch):
    """scontrol answers, but sinfo is missing or fails: a ConfigError naming it, not a traceback."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'PartitionName=debug Default=YES MaxTime=1:00:00'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # scontrol alone
    with pytest.raises(ConfigError, match=r"^hydra/launcher=slurm: SLURM does not answer \(.+'sinfo'\); allowed: "):
        describe_partition(None)
    sinfo = tmp_path / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller' >&2\nexit 1\n")
    sinfo.chmod(0o755)
    with pytest.raises(ConfigError, match=r"^hydra/launcher=slurm: SLURM does not answer \(sinfo: error: Unable to "
                                          r"contact slurm controller\); allowed: "):
        describe_partition(None)
