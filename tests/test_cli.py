"""End-to-end: ``python run.py ...`` in a subprocess, single runs, sweeps and bad input.

Every run writes under pytest's tmp_path (``hydra.run.dir`` / ``hydra.sweep.dir``), never
into the repository, and is kept small (4 steps, 2 images, no FLOP counting unless needed).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cachelab.analysis.wandb_log import history, summary
from cachelab.assets import read_manifest
from cachelab.core.schedules import Interval

REPO = Path(__file__).resolve().parent.parent
FAST = {"num_steps": "4", "num_images": "2", "progress": "false", "measure.flops": "false"}
METRIC_KEYS = {"flops", "wall_s", "efficiency", "full_steps", "cache_bytes", "quality"}


def app_env(tmp: Path | None = None) -> dict[str, str]:
    """The environment without W&B credentials or mode (so the sink picks offline) and
    without HYDRA_FULL_ERROR (which would change what errors print)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "HYDRA_FULL_ERROR")}
    env["WANDB_SILENT"] = "true"
    if tmp is not None:  # keep W&B's own config/cache/artifact folders out of $HOME
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            env[var] = str(tmp / "wandb-home" / var.lower())
    return env


def overrides(*extra: str, fast: bool = True) -> list[str]:
    """``FAST`` merged with ``extra`` (an ``extra`` key replaces the FAST one)."""
    given = {arg.split("=", 1)[0] for arg in extra if "=" in arg}
    base = [f"{k}={v}" for k, v in FAST.items() if k not in given] if fast else []
    return [*base, *extra]


def run_app(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env if env is not None else app_env(), timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def job_overrides(job_dir: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()))


def repo_outputs() -> set[Path]:
    return {p for name in ("outputs", "multirun", "wandb") for p in (REPO / name).glob("**/*")}


def test_single_run_with_flops_writes_grid_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    before = repo_outputs()
    proc = run_app(overrides("strategy=taylor", "interval=2", "first_enhance=1", "logger=none",
                             "measure.flops=true", f"hydra.run.dir={run_dir}"))
    check_ok(proc)
    assert repo_outputs() == before  # nothing written into the repository

    # grid: one row per image, columns baseline | cached | |difference| x k (pixels shown 3x), headers above
    size = 3 * read_manifest("tiny_dit_mnist")["arch"]["input_size"]  # the default model
    with Image.open(run_dir / "grid.png") as grid:
        assert grid.format == "PNG"
        grid.load()
        assert grid.size[0] >= 3 * size and grid.size[1] > int(FAST["num_images"]) * size + 60

    metrics = read_metrics(run_dir)
    assert METRIC_KEYS <= metrics.keys()
    assert {"rel_l2", "psnr_db", "ssim"} <= metrics["quality"].keys()
    assert (metrics["strategy"], metrics["interval"], metrics["first_enhance"]) == ("taylor", 2, 1)
    num_steps = int(FAST["num_steps"])
    assert metrics["num_steps"] == num_steps
    assert metrics["full_steps"] == Interval(interval=2, first_enhance=1).full_steps(num_steps)
    assert metrics["num_full"] == len(metrics["full_steps"])
    assert metrics["num_forecast"] == num_steps - metrics["num_full"]
    assert metrics["cache_bytes"] > 0

    flops = metrics["flops"]
    assert flops["baseline"] > flops["cached"] > 0
    assert flops["speedup"] == pytest.approx(flops["baseline"] / flops["cached"])
    # forecast steps still cost something (embeddings, final layer), so below T / full steps
    assert 1 < flops["speedup"] < num_steps / metrics["num_full"]
    wall = metrics["wall_s"]
    assert wall["baseline"] > 0 and wall["cached"] > 0
    assert wall["speedup"] == pytest.approx(wall["baseline"] / wall["cached"])
    assert metrics["efficiency"] == pytest.approx(wall["speedup"] / flops["speedup"])

    assert set(metrics["model_quality"]["cached"]) == {"class_accuracy", "feature_fd", "num_samples"}
    quality = metrics["quality"]
    assert math.isfinite(quality["rel_l2"]) and quality["rel_l2"] > 0
    assert quality["psnr_db"] > 0
    assert "speedup" in proc.stdout  # the summary table, on the console and in the run's log
    assert "[cachelab.jobs.compare][INFO] model " in (run_dir / "run.log").read_text()


def test_strategy_none_is_exact(tmp_path):
    run_dir = tmp_path / "run"
    check_ok(run_app(overrides("strategy=none", "logger=none", f"hydra.run.dir={run_dir}")))
    metrics = read_metrics(run_dir)
    assert metrics["strategy"] == "none"
    assert metrics["quality"]["rel_l2"] == 0
    # identical images: PSNR is infinite, written as null (strict JSON) and flagged
    assert metrics["quality"]["psnr_db"] is None and metrics["non_finite"]["quality/psnr_db"] == "inf"
    assert metrics["full_steps"] == list(range(int(FAST["num_steps"])))
    assert metrics["num_forecast"] == 0 and metrics["cache_bytes"] == 0
    assert metrics["flops"] == {"baseline": None, "cached": None, "speedup": None, "images": None}  # not counted
    assert metrics["efficiency"] is None
    assert (run_dir / "grid.png").stat().st_size > 0


def test_paper_metrics_without_weights_are_skipped_with_a_message(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(overrides("+paper_metrics.lpips._target_=cachelab.evaluation.paper_metrics.LPIPS",
                             "+paper_metrics.clip._target_=cachelab.evaluation.paper_metrics.CLIPScore",
                             "logger=none", f"hydra.run.dir={run_dir}"),
                   env={**app_env(tmp_path), "TORCH_HOME": str(tmp_path / "torch")})  # an empty weights cache
    check_ok(proc)
    skipped = read_metrics(run_dir)["paper_metrics"]
    assert skipped["lpips"]["skipped"].startswith("LPIPS skipped:") and "alex" in skipped["lpips"]["skipped"]
    assert skipped["clip"] == {"skipped": "CLIP score skipped: the model has no text prompts"}
    assert "warning: LPIPS skipped" in proc.stderr


def test_wandb_logger_without_key_writes_offline_run(tmp_path):
    run_dir = tmp_path / "run"
    check_ok(run_app(overrides("logger=wandb", f"hydra.run.dir={run_dir}"), env=app_env(tmp_path)))
    assert (run_dir / "metrics.json").is_file()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert not list((run_dir / "wandb").glob("run-*"))  # no online run
    # what was logged, read back from the run file itself
    metrics = read_metrics(run_dir)
    rows = history(files[0])
    steps = [row for row in rows if "schedule/full" in row]
    assert [row["schedule/full"] for row in steps] == [int(s in metrics["full_steps"]) for s in range(4)]
    assert [row["trajectory/rel_l2"] for row in steps] == pytest.approx(metrics["per_step_rel_l2"])
    images = {key for row in rows for key, value in row.items() if value == "image-file"}
    assert images == {"samples/grid/_type", "trajectory/per_step/_type"}
    logged = summary(files[0])
    assert logged["quality/rel_l2"] == pytest.approx(metrics["quality"]["rel_l2"])
    assert logged["num_full"] == metrics["num_full"] and logged["strategy"] == metrics["strategy"]
    # the cache next to FLOPs and quality: its peak and each site's, in metrics.json and on W&B
    assert logged["cache_bytes"] == metrics["cache_bytes"] > 0
    assert sum(metrics["site_bytes"].values()) == metrics["cache_bytes"]  # Taylor at module level: the sites' own
    assert {f"site_bytes/{site}": nbytes for site, nbytes in metrics["site_bytes"].items()}.items() <= logged.items()


PIPELINE_MODELS = ["tiny_diffusers_dit", "tiny_pixart", "tiny_sd3", "tiny_flux", "tiny_wan", "tiny_hunyuan_video"]


@pytest.mark.parametrize("model", PIPELINE_MODELS)
def test_diffusers_pipelines_run_end_to_end(model, tmp_path):
    """``python run.py model=tiny_flux strategy=taylor order=2``: the same outputs as the native DiT."""
    run_dir = tmp_path / "run"
    env = {**app_env(tmp_path), "CACHELAB_CACHE": str(tmp_path / "cache")}
    check_ok(run_app(overrides(f"model={model}", "strategy=taylor", "order=2", "interval=3", "num_steps=6",
                               "measure.flops=true", "logger=wandb", f"hydra.run.dir={run_dir}"), env=env))
    metrics = read_metrics(run_dir)
    assert metrics["model"] == model and metrics["full_steps"] == Interval(3, 2).full_steps(6)
    assert metrics["flops"]["speedup"] > 1 and metrics["fallbacks"] == 0
    assert 0 < metrics["quality"]["rel_l2"] < 1 and metrics["quality"]["psnr_db"] > 10
    assert (tmp_path / "cache" / model / "model_index.json").is_file()  # built once, loaded from the folder
    with Image.open(run_dir / "grid.png") as grid:
        assert grid.format == "PNG" and grid.size[0] > grid.size[1] / 16
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert summary(run_file)["flops/speedup"] == pytest.approx(metrics["flops"]["speedup"])


def test_atlas_entry_point_writes_arrays_figures_report_and_check(tmp_path):
    run_dir = tmp_path / "run"
    check_ok(run_app(overrides("job=atlas", "job.orders=[0,2]", "job.intervals=[2,3]",
                               "job.num_images=2", "num_steps=8", "strategy=taylor", "interval=3",
                               "logger=none", f"hydra.run.dir={run_dir}")))
    metrics = read_metrics(run_dir)
    assert set(metrics["mean_forecast_error"]) == {"taylor_o0_N2", "taylor_o0_N3", "taylor_o2_N2", "taylor_o2_N3",
                                                   "configured"}
    # the configured strategy (order 2, N 3) is one of the candidates: the same shadow errors
    assert metrics["mean_forecast_error"]["configured"] == pytest.approx(metrics["mean_forecast_error"]["taylor_o2_N3"])
    check = metrics["check"]
    assert check["steps"] == [s for s, full in enumerate(Interval(3, 2).mask(8)) if not full]
    first_site_atlas, first_site_measured = check["first_site_first_step"]
    assert first_site_atlas == pytest.approx(first_site_measured, rel=1e-9)
    arrays = np.load(run_dir / "atlas.npz")
    assert arrays["forecast_error/taylor_o2_N3"].shape == (len(metrics["sites"]), 8)
    for name in ("atlas_heatmaps.png", "atlas_error_vs_k.png", "atlas_derivatives.png", "atlas_check.png"):
        assert (run_dir / name).stat().st_size > 0 and f"({name})" in (run_dir / "report.md").read_text()


def test_trajectory_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    check_ok(run_app(overrides("job=trajectory", "job.num_images=2", "job.sketch_dim=4",
                               "logger=none", f"hydra.run.dir={run_dir}")))
    metrics = read_metrics(run_dir)
    arrays = np.load(run_dir / "trajectory.npz")
    assert arrays["rel_change"].shape == (len(metrics["sites"]), int(FAST["num_steps"]))
    assert (run_dir / "trajectory_pca.png").stat().st_size > 0 and (run_dir / "report.md").is_file()


def test_sweep_in_parallel_resumes_and_logs_a_table(tmp_path):
    sweep = tmp_path / "sweep"
    env = app_env(tmp_path)
    args = ["-m", "hydra/launcher=local", "logger=wandb", f"hydra.sweep.dir={sweep}"]
    check_ok(run_app([*args, *overrides("strategy=reuse,taylor")], env=env))
    first = {job: (job / "metrics.json").stat().st_mtime_ns for job in (sweep / "0", sweep / "1")}
    (table_run,) = sweep.glob("wandb/offline-run-*/run-*.wandb")  # the sweep's own run, with the table
    assert [row["sweep/summary/_type"] for row in history(table_run)] == ["table-file"]

    proc = run_app([*args, *overrides("strategy=reuse,taylor,none")], env=env)  # resume, one more job
    check_ok(proc)
    assert (proc.stdout + proc.stderr).count("skipping job") == 2
    assert {job: (job / "metrics.json").stat().st_mtime_ns for job in first} == first  # not rerun
    assert read_metrics(sweep / "2")["strategy"] == "none"
    assert "| none |" in (sweep / "sweep.md").read_text()


def test_multirun_sweeps_every_combination_once(tmp_path):
    """Four jobs, three runs: reuse has no order, so reuse order=2 is reuse order=1 (skipped, one
    line); the sweep names its W&B group and ends saying where its report is."""
    sweep = tmp_path / "sweep"
    proc = run_app(["-m", *overrides("strategy=reuse,taylor", "order=1,2", "logger=none", f"hydra.sweep.dir={sweep}")])
    check_ok(proc)
    jobs = sorted(p.parent for p in sweep.glob("*/.hydra"))
    assert len(jobs) == 4
    skipped = [job for job in jobs if (job / "skipped.txt").is_file()]
    assert [job.name for job in skipped] == ["1"] and job_overrides(skipped[0])["strategy"] == "reuse"
    assert job_overrides(skipped[0])["order"] == "2" and not (skipped[0] / "metrics.json").exists()
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("skipping job")]
    assert line.startswith("skipping job 1 (") and "strategy=reuse" in line and "order=2" in line
    assert line.endswith("the same run as job 0 (its strategy does not use the key that differs)")
    group = json.loads((sweep / "sweep.json").read_text())["group"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_strategy-order", group), group
    last = proc.stdout.splitlines()[-1]  # where the report is
    assert last.startswith(f"summary: {sweep / 'sweep.md'} (and sweep.csv); plots: ") and str(sweep / "pareto_psnr.png") in last
    seen = {}
    for job in (job for job in jobs if job not in skipped):
        requested = job_overrides(job)
        metrics = read_metrics(job)
        assert metrics["strategy"] == requested["strategy"]
        assert metrics["order"] == int(requested["order"])
        assert (job / "grid.png").is_file()
        seen[(metrics["strategy"], metrics["order"])] = metrics
    assert set(seen) == {("reuse", 1), ("taylor", 1), ("taylor", 2)}
    # the strategy took effect, not only its name: reuse and a first-order Taylor forecast differ
    assert seen[("reuse", 1)]["quality"]["rel_l2"] != seen[("taylor", 1)]["quality"]["rel_l2"]
    # the sweep report: one table row per job
    table = (sweep / "sweep.md").read_text()
    assert table.count("| reuse |") == 1 and table.count("| taylor |") == 2 and "did not finish" not in table
    assert (sweep / "sweep.csv").is_file() and (sweep / "pareto_psnr.png").is_file()


def test_multirun_records_a_bad_job_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(["-m", *overrides("order=1,-1", "logger=none", f"hydra.sweep.dir={sweep}")])
    # run.py: in a multirun a ConfigError goes to the job's error.txt and the sweep continues;
    # at the end the sweep report lists the failed job and the process fails
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "order=-1" in proc.stderr
    assert "1 job(s) did not finish" in proc.stderr
    table = (sweep / "sweep.md").read_text()
    assert "order=-1 is out of range" in table and table.count("| taylor |") == 1
    jobs = {job_overrides(p.parent)["order"]: p.parent for p in sweep.glob("*/.hydra")}
    assert set(jobs) == {"1", "-1"}
    good, bad = jobs["1"], jobs["-1"]
    assert read_metrics(good)["order"] == 1
    assert not (good / "error.txt").exists()
    error = (bad / "error.txt").read_text()
    assert "order" in error and "-1" in error
    assert not (bad / "metrics.json").exists() and not (bad / "grid.png").exists()


def test_cfg_flag_with_value_prints_config():
    """Hydra flags that take a value (``--cfg job``) are not overrides."""
    proc = run_app(["-cn", "config", "--cfg", "job", "order=3", "strategy=reuse"])
    check_ok(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["order"] == 3 and cfg["strategy"]["name"] == "reuse"


# (overrides, key the last stderr line must name, value it must name)
BAD_INPUT = [
    (["model=nope"], "model", "nope"),
    (["strategy=nope"], "strategy", "nope"),
    (["schedule=nope"], "schedule", "nope"),
    (["order=-1"], "order", "-1"),
    (["interval=0"], "interval", "0"),
    (["first_enhance=0"], "first_enhance", "0"),
    (["num_steps=0"], "num_steps", "0"),
    (["order=abc"], "order", "abc"),
    (["interval=2.5"], "interval", "2.5"),
    (["model=dit_xl_2"], "model.checkpoint", "dit_xl_2"),
    (["model=dit_xl_2", "model.checkpoint=/no/such.pt"], "model.checkpoint", "/no/such.pt"),
]
BAD_IDS = [" ".join(o) for o, _, _ in BAD_INPUT]
MALFORMED = ["order=[1", "strategy=reuse", "interval=3"]  # not parseable as a Hydra override


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """All bad-input runs, started on first use and run side by side (each is mostly imports)."""
    root = tmp_path_factory.mktemp("bad")
    cases = {**{case: o for case, (o, _, _) in zip(BAD_IDS, BAD_INPUT)}, "malformed": MALFORMED}

    @cache
    def results() -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
        def one(i, case):
            run_dir = root / str(i) / "run"
            # the default logger (wandb, offline here): a config error must come before it starts
            return run_app(overrides(*cases[case], f"hydra.run.dir={run_dir}"), env=app_env(root)), run_dir

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            return dict(zip(cases, pool.map(one, range(len(cases)), cases)))

    return results


def assert_nothing_written(run_dir: Path) -> None:
    for output in ("metrics.json", "grid.png", "wandb"):
        assert not (run_dir / output).exists(), output


@pytest.mark.parametrize(("case", "key", "value"), [(i, k, v) for i, (_, k, v) in zip(BAD_IDS, BAD_INPUT)],
                         ids=BAD_IDS)
def test_bad_input_is_one_line_error(bad_runs, case, key, value):
    proc, run_dir = bad_runs()[case]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert key in last and value in last, last
    if case != "model=dit_xl_2":  # the value given for the key is quoted next to it
        assert f"{key}={value}" in last or f"{key}={value!r}" in last, last
    assert "allowed" in last, last
    assert_nothing_written(run_dir)


def test_malformed_override_is_reported_by_hydra(bad_runs):
    """The early group-choice check leaves grammar errors to Hydra's own report (no traceback)."""
    proc, run_dir = bad_runs()["malformed"]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "[1" in proc.stderr
    assert_nothing_written(run_dir)
