"""The sweep aggregator: every finished job in the table, every unfinished one listed."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from cachelab.analysis.sweep import collect, main, point_label
from cachelab.jobs.base import schedule_setting


def job(root, name, metrics=None, error=None):
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.txt").write_text(error)


def metrics(strategy, order, interval, speedup, psnr, schedule=None):
    return {"strategy": strategy, "granularity": "module", "order": order, "interval": interval, "num_full": 11,
            "schedule": schedule or f"Interval interval={interval}",
            "flops": {"speedup": speedup}, "wall_s": {"speedup": speedup * 0.9}, "efficiency": 0.9,
            "quality": {"rel_l2": 0.01, "psnr_db": psnr}, "model_quality": {"baseline": {}, "cached": {}}}


def test_collect_table_and_plot(tmp_path):
    job(tmp_path, "0", metrics("taylor", 2, 5, 4.5, 30.0))
    job(tmp_path, "1", metrics("reuse", 2, 5, 4.5, 20.0))
    job(tmp_path, "2", metrics("none", 2, 5, 1.0, float("inf")))
    job(tmp_path, "3", error="order=-1 is out of range")
    job(tmp_path, "4")
    job(tmp_path, "5", metrics("fbcache", 2, 5, 2.0, 35.0, schedule="FirstBlockCache threshold=0.05"))
    (tmp_path / "not-a-job").mkdir()
    rows, failed = collect(tmp_path)
    assert [r["strategy"] for r in rows] == ["none", "fbcache", "reuse", "taylor"]
    assert failed == ["3: order=-1 is out of range", "4: no metrics.json"]
    main([str(tmp_path)])
    table = (tmp_path / "sweep.md").read_text()
    assert "| taylor | module | 2 | 5 | Interval interval=5 | 11 | 4.50 | 4.05 | 0.90 | 0.0100 | 30.00 | n/a | n/a |" in table
    assert "| none | module | 2 | 5 | Interval interval=5 | 11 | 1.00 | 0.90 | 0.90 | 0.0100 | inf |" in table
    assert "| fbcache | module | 2 | 5 | FirstBlockCache threshold=0.05 | 11 | 2.00 |" in table
    assert "- 3: order=-1 is out of range" in table
    assert (tmp_path / "pareto_psnr.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 5


def test_point_labels_name_the_interval_or_the_adaptive_knob():
    assert point_label(metrics("taylor", 2, 5, 4.5, 30.0)) == "N=5"
    assert point_label(metrics("fbcache", 2, 5, 2.0, 35.0, schedule="FirstBlockCache threshold=0.05")) == "threshold=0.05"
    assert point_label({"interval": 3}) == "N=3"  # metrics.json written before the schedule was recorded


def test_the_schedule_setting_names_the_class_and_its_knob():
    interval = OmegaConf.create({"_target_": "cachelab.core.schedules.Interval", "interval": "${n}", "first_enhance": 2})
    interval.n = 8  # an interpolation, as conf/schedule/interval.yaml has
    assert schedule_setting(interval) == "Interval interval=8"
    teacache = OmegaConf.create({"_target_": "cachelab.core.adaptive.TeaCache", "threshold": 0.2,
                                 "calibration": "tiny_flux_digits", "coefficients": [1.0, 0.0]})
    assert schedule_setting(teacache) == "TeaCache threshold=0.2 (calibrated)"


def test_several_sweep_folders_merge_into_one_table(tmp_path):
    a, b, out = tmp_path / "taylor", tmp_path / "reuse", tmp_path / "out"
    job(a, "0", metrics("taylor", 2, 5, 4.5, 30.0))
    job(b, "0", metrics("reuse", 0, 5, 4.5, 20.0))
    job(b, "1")
    out.mkdir()
    main([str(a), str(b), "--out", str(out)])
    table = (out / "sweep.md").read_text()
    assert table.index("| reuse |") < table.index("| taylor |")
    assert "- reuse/1: no metrics.json" in table


def test_a_flagged_null_reads_back_as_its_value():
    """metrics.json holds an infinite PSNR as null plus a non_finite flag; the table shows inf."""
    from cachelab.analysis.sweep import lookup

    metrics = {"quality": {"psnr_db": None, "ssim": None}, "non_finite": {"quality/psnr_db": "inf"}}
    assert lookup(metrics, ("quality", "psnr_db")) == float("inf")
    assert lookup(metrics, ("quality", "ssim")) is None


def test_a_job_that_never_started_is_listed_from_its_error_alone(tmp_path):
    """A job SLURM cancelled while it was queued has no Hydra files, only the launcher's error.txt."""
    job(tmp_path, "0", metrics("taylor", 2, 5, 4.5, 30.0))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "error.txt").write_text("cancelled by SLURM (job 12_1 CANCELLED)\n")
    (tmp_path / ".submitit").mkdir()  # submitit's logs: no job
    rows, failed = collect(tmp_path)
    assert [r["job"] for r in rows] == ["0"] and failed == ["1: cancelled by SLURM (job 12_1 CANCELLED)"]
