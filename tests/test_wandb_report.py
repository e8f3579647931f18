"""W&B Reports of sweeps (analysis/wandb_report.py): one real offline sweep (tiny random DiT,
6 steps, 2 images; two strategies, and a job of each that raises) whose report definition must
name only keys its runs logged, leave out the failed jobs' runs, load back in W&B's report
library and publish into the given entity and project; the CLI's mistakes are one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachelab.analysis.wandb_log import history, read_records, summary
from cachelab.analysis.wandb_report import REPORT, main

wr = pytest.importorskip("wandb_workspaces.reports.v2")

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "model=tiny_dit_random", "num_steps=6", "num_images=2", "progress=false", "threads=1",
         "logger=wandb", "model._target_=train_free_runs.faults.faulty.FaultyDiT", "+model.seed=${seed}",
         "strategy=reuse,taylor", "seed=0,1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The sweep folder (jobs with seed 1 raise) and its process."""
    from train_free_runs.faults.faulty import FAULTS

    tmp = tmp_path_factory.mktemp("wandb_report")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_DIR", "HYDRA_FULL_ERROR")}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", FAULTS: "1=raise",
                "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])})
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb-home" / var.lower())
    folder = tmp / "sweep"
    proc = subprocess.run([sys.executable, "run.py", *SWEEP, f"hydra.sweep.dir={folder}"], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)
    return folder, proc


def run_file(job: Path) -> Path:
    (found,) = job.glob("wandb/offline-run-*/run-*.wandb")
    return found


def panels(definition: dict) -> list[dict]:
    (grid,) = [b for b in definition["spec"]["blocks"] if b["type"] == "panel-grid"]
    return grid["metadata"]["panelBankSectionConfig"]["panels"]


def test_report_panels_name_keys_the_runs_logged(sweep):
    folder, proc = sweep
    finished = sorted(p.parent for p in folder.glob("*/metrics.json"))
    assert len(finished) == 2, proc.stderr
    definition = json.loads((folder / REPORT).read_text())
    line = f"W&B report: {folder / REPORT}; to share it: wandb sync {folder}/*/wandb/offline-run-* && " \
           f"python -m cachelab.analysis.wandb_report publish {folder} --entity ENTITY --project cachelab"
    assert line in proc.stdout.splitlines()

    # what the finished jobs' runs logged, read back from their offline run files
    files = [run_file(job) for job in finished]
    rows = [row for path in files for row in history(path)]
    curves = {k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("_")}
    images = {k[: -len("/_type")] for row in rows for k, v in row.items() if v == "image-file"}
    summaries = {k for path in files for k in summary(path)}

    by_type: dict[str, list[dict]] = {}
    for panel in panels(definition):
        by_type.setdefault(panel["viewType"], []).append(panel["config"])
    scatters = {(c["xAxis"], c["yAxis"]) for c in by_type["Scatter Plot"]}
    assert ("summary:flops/speedup", "summary:quality/psnr_db") in scatters  # the Pareto view
    assert ("summary:wall_s/speedup", "summary:quality/psnr_db") in scatters
    assert {axis.removeprefix("summary:") for pair in scatters for axis in pair} <= summaries
    lines = {metric for c in by_type["Run History Line Plot"] for metric in c["metrics"]}
    assert {"trajectory/rel_l2", "schedule/full"} <= lines <= curves
    assert {c["xAxis"] for c in by_type["Run History Line Plot"]} == {"_step"}
    media = {key for c in by_type["Media Browser"] for key in c["mediaKeys"]}
    assert "samples/grid" in media and media <= images
    assert len(by_type["Run Comparer"]) == 1

    # the runset: the sweep's group and the finished jobs' runs, named by strategy, N and order (reuse has none)
    runs = [next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run") for path in files]
    (grid,) = [b for b in definition["spec"]["blocks"] if b["type"] == "panel-grid"]
    filters = {f["key"]["name"]: f["value"] for f in grid["metadata"]["runSets"][0]["filters"]["filters"]}
    assert filters == {"group": sorted({run.run_group for run in runs}), "name": [run.run_id for run in runs]}
    assert sorted(run.display_name for run in runs) == ["tiny_dit_random-reuse-N5", "tiny_dit_random-taylor-N5-o2"]
    (text,) = [b["content"] for b in definition["spec"]["blocks"] if b["type"] == "markdown-block"]
    assert text == (folder / "sweep.md").read_text()

    # the grid came with its run as an artifact
    artifacts = [r.artifact for r in read_records(files[0]) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, sorted(e.path for e in a.manifest.contents)) for a in artifacts] == [
        ("grid", ["grid.png", "per_step.png"])]


def test_a_sweep_with_failed_jobs_still_gets_its_report(sweep):
    folder, proc = sweep
    assert proc.returncode == 1 and "2 job(s) did not finish" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "warning: no W&B report" not in proc.stderr
    failed = [p.parent for p in folder.glob("*/error.txt")]
    assert len(failed) == 2 and all(list(job.glob("wandb/offline-run-*")) for job in failed)  # they had runs
    definition = json.loads((folder / REPORT).read_text())
    (grid,) = [b for b in definition["spec"]["blocks"] if b["type"] == "panel-grid"]
    ids = {f["key"]["name"]: f["value"] for f in grid["metadata"]["runSets"][0]["filters"]["filters"]}["name"]
    assert len(ids) == 2 and not {run_file(job).stem.removeprefix("run-") for job in failed} & set(ids)
    (text,) = [b["content"] for b in definition["spec"]["blocks"] if b["type"] == "markdown-block"]
    assert "Jobs that did not finish" in text and "the test's fault" in text


def test_publish_loads_the_definition_into_the_entity_and_project(sweep, monkeypatch, capsys):
    folder, _ = sweep
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, **kwargs: saved.append(self))
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.test/{self.entity}/{self.project}"))
    main(["publish", str(folder), "--entity", "lab", "--project", "caching"])
    assert capsys.readouterr().out == "https://wandb.test/lab/caching\n"
    (report,) = saved
    runsets = [rs for block in report.blocks for rs in getattr(block, "runsets", [])]
    assert len(runsets) == 1 and (runsets[0].entity, runsets[0].project) == ("lab", "caching")
    assert report.title.startswith("cachelab sweep ")


@pytest.mark.parametrize("args, message", [
    (["publish", "{folder}"], "the following arguments are required: --entity"),
    (["publish", "{folder}/nowhere", "--entity", "lab"], "nowhere is not a folder"),
    (["publish", "{folder}", "--entity", "lab"], f"{REPORT} does not exist: run a sweep with logger=wandb"),
    (["build", "{folder}"], "no finished job of {folder} has a W&B run file"),
])
def test_cli_mistakes_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main([arg.format(folder=tmp_path) for arg in args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message.format(folder=tmp_path) in err and "Traceback" not in err


def test_artifact_files_above_the_threshold_go_by_reference(tmp_path, monkeypatch):
    """``WandbSink.artifact``: small files are copied into the artifact, large ones referenced.
    The artifact is read as the sink hands it to ``run.log_artifact`` (an offline run's file gets
    its artifact record from W&B's service process, which has, rarely, not written it by the time
    ``finish`` returns: a flaky read, not the sink's doing)."""
    import cachelab.analysis.wandb_sink as wandb_sink

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(wandb_sink, "REFERENCE_BYTES", 100)
    (tmp_path / "grid.png").write_bytes(b"x" * 100)
    (tmp_path / "samples.npz").write_bytes(b"x" * 101)
    sink = wandb_sink.WandbSink(mode="offline")
    sink.start("artifact-test", {}, tmp_path)
    logged, log_artifact = [], sink.run.log_artifact
    monkeypatch.setattr(sink.run, "log_artifact", lambda artifact: logged.append(artifact) or log_artifact(artifact))
    try:
        sink.artifact("samples", [tmp_path / "grid.png", tmp_path / "samples.npz"], {"images": {"cached": 2}})
    finally:
        sink.finish()
    (artifact,) = logged
    assert artifact.type == "samples" and artifact.metadata == {"images": {"cached": 2}}
    refs = {path: entry.ref for path, entry in artifact.manifest.entries.items()}
    assert refs == {"grid.png": None, "samples.npz": (tmp_path / "samples.npz").resolve().as_uri()}
