"""``job=sample``: chunked, resumable generation for large evaluations, on the embedded
trained digits DiT (6 steps, chunks of 3 images, one thread). References are computed
independently: each chunk generated alone through the adapter with a fresh cache handle,
from the documented seed of chunk i (numpy SeedSequence([seed, i]))."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_config, check_group_choices
from cachelab.jobs.schema import compose_config
from cachelab.evaluation.judge import frechet_distance, gaussian_stats
from cachelab.models.dit_adapter import DiTAdapter
from cachelab.models.pipelines.dit import DiffusersDiTAdapter
from cachelab.evaluation.paper_metrics import InceptionFID
from cachelab.jobs.base import build, build_strategy
from cachelab.jobs.runner import run
from cachelab.jobs.sample import evaluate, plan

REPO = Path(__file__).resolve().parent.parent
# 6 steps with N=5: full steps 0 and 1, then 4 forecasts, so a leaked cache would show
FAST = ["job=sample", "num_steps=6", "num_images=7", "job.batch_size=3", "threads=1", "progress=false",
        "logger=none", "measure.flops=false"]
SIZES = [3, 3, 1]


def make_cfg(*overrides: str):
    return compose_config([*FAST, *overrides])  # a wrong type is a ConfigError here


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def chunk_file(run_dir: Path, side: str, index: int) -> Path:
    return run_dir / "samples" / side / f"{index:05d}.npz"


def read_chunk(run_dir: Path, side: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(chunk_file(run_dir, side, index)) as data:
        return data["images"], data["labels"]


def reference_chunk(cfg, index: int, size: int, cached: bool) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``index`` generated alone: its own adapter, a fresh handle, one generation."""
    torch.set_num_threads(1)
    adapter = build(cfg, "model")
    inputs = adapter.make_inputs(size, int(np.random.SeedSequence([cfg.seed, index]).generate_state(1)[0]))
    handle = build_strategy(cfg).attach(adapter) if cached else None
    images = adapter.decode(adapter.generate(inputs, handle))
    uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return uint8, inputs.labels.numpy()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, dict]:
    """7 images in 3 chunks, baseline too, in one uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    metrics = run(make_cfg("job.baseline_samples=true"), run_dir)
    torch.set_num_threads(threads)
    return run_dir, metrics


def test_every_chunk_equals_that_chunk_generated_alone(full_run):
    run_dir, metrics = full_run
    cfg = make_cfg()
    for index, size in enumerate(SIZES):
        for side in ("cached", "baseline"):
            images, labels = read_chunk(run_dir, side, index)
            ref_images, ref_labels = reference_chunk(cfg, index, size, cached=side == "cached")
            assert images.shape == (size, 32, 32, 1) and images.dtype == np.uint8
            np.testing.assert_array_equal(images, ref_images, err_msg=f"{side} chunk {index}")
            np.testing.assert_array_equal(labels, ref_labels)
        cached, _ = read_chunk(run_dir, "cached", index)
        assert not np.array_equal(cached, read_chunk(run_dir, "baseline", index)[0])  # forecasts really ran
    labels = [read_chunk(run_dir, "cached", i)[1] for i in range(2)]
    assert not np.array_equal(labels[0], labels[1])  # each chunk has its own classes
    assert [c["cached"]["full_steps"] for c in metrics["chunks"]] == [[0, 1]] * 3  # caches reset per chunk


def test_merged_samples_are_the_chunks_in_the_adm_format(full_run):
    run_dir, metrics = full_run
    for side, name in (("cached", "samples.npz"), ("baseline", "samples_baseline.npz")):
        chunks = [read_chunk(run_dir, side, i) for i in range(3)]
        with np.load(run_dir / name) as merged:
            assert set(merged.files) == {"arr_0", "arr_1"}
            np.testing.assert_array_equal(merged["arr_0"], np.concatenate([c[0] for c in chunks]))
            np.testing.assert_array_equal(merged["arr_1"], np.concatenate([c[1] for c in chunks]))
        # as ADM's evaluator reads it: the zip member arr_0.npy, header, then raw batches
        with zipfile.ZipFile(run_dir / name) as archive, archive.open("arr_0.npy") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            assert (shape, fortran, dtype) == ((7, 32, 32, 1), False, np.uint8)
            first = np.frombuffer(f.read(2 * 32 * 32), np.uint8).reshape(2, 32, 32, 1)
            np.testing.assert_array_equal(first, chunks[0][0][:2])
    assert metrics["samples"] == {"cached": {"file": "samples.npz", "images": 7},
                                  "baseline": {"file": "samples_baseline.npz", "images": 7}}


def test_metrics_json_counts_chunks_times_and_cache_stats(full_run):
    run_dir, metrics = full_run
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (metrics["job"], metrics["num_images"], metrics["batch_size"], metrics["num_chunks"]) == ("sample", 7, 3, 3)
    assert (metrics["chunks_generated"], metrics["chunks_resumed"]) == (3, 0)
    chunks = metrics["chunks"]
    assert [(c["index"], c["start"], c["size"]) for c in chunks] == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
    assert [c["seed"] for c in chunks] == [c.seed for c in plan(7, 3, 0)]
    for side in ("cached", "baseline"):
        walls = [c[side]["wall_s"] for c in chunks]
        assert all(w > 0 for w in walls) and metrics["wall_s"][side] == pytest.approx(sum(walls))
        assert metrics["flops"][side] is None  # measure.flops=false
    assert metrics["wall_s"]["speedup"] == pytest.approx(metrics["wall_s"]["baseline"] / metrics["wall_s"]["cached"])
    assert metrics["cache"]["num_full"] == 6 and metrics["cache"]["num_forecast"] == 12
    assert metrics["cache"]["cache_bytes"] == max(c["cached"]["cache_bytes"] for c in chunks) > 0


def test_one_chunk_run_gives_the_same_first_chunk(full_run, tmp_path):
    run(make_cfg("num_images=3"), tmp_path)
    np.testing.assert_array_equal(read_chunk(tmp_path, "cached", 0)[0], read_chunk(full_run[0], "cached", 0)[0])


def test_compiled_sampling_gives_the_eager_chunks(full_run, tmp_path):
    """compile=... applies in job=sample too (aot_eager: dynamo's graphs without a C++ toolchain)."""
    torch._dynamo.reset()
    run(make_cfg("compile=inductor", "compile.backend=aot_eager"), tmp_path)
    for index in range(len(SIZES)):
        compiled, _ = read_chunk(tmp_path, "cached", index)
        eager, _ = read_chunk(full_run[0], "cached", index)
        assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1  # uint8 rounding of ~1e-7 differences
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()


def test_flops_are_counted_per_chunk(tmp_path):
    metrics = run(make_cfg("measure.flops=true", "num_images=4"), tmp_path)
    flops = [c["cached"]["flops"] for c in metrics["chunks"]]
    assert flops[0] > 0 and flops[0] / flops[1] == pytest.approx(3)  # same steps, 3 images vs 1
    assert metrics["flops"]["cached"] == sum(flops)


def test_interrupted_run_resumes_to_the_same_images(full_run, tmp_path, monkeypatch):
    generate, calls = DiTAdapter.generate, []

    def failing_second_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(DiTAdapter, "generate", failing_second_call)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(make_cfg(), tmp_path)
    first = chunk_file(tmp_path, "cached", 0)
    assert sorted(p.name for p in first.parent.iterdir()) == ["00000.npz"]  # no partial file left
    assert not (tmp_path / "samples.npz").exists() and not (tmp_path / "metrics.json").exists()
    kept = first.read_bytes()

    monkeypatch.setattr(DiTAdapter, "generate", generate)
    metrics = run(make_cfg(), tmp_path)
    assert (metrics["chunks_generated"], metrics["chunks_resumed"]) == (2, 1)
    assert first.read_bytes() == kept  # finished chunk not regenerated
    with np.load(tmp_path / "samples.npz") as resumed, np.load(full_run[0] / "samples.npz") as uninterrupted:
        np.testing.assert_array_equal(resumed["arr_0"], uninterrupted["arr_0"])
        np.testing.assert_array_equal(resumed["arr_1"], uninterrupted["arr_1"])
    assert run(make_cfg(), tmp_path)["chunks_generated"] == 0  # a finished run: nothing to do

    with pytest.raises(ConfigError, match="other values of strategy"):  # another setting, same folder
        run(make_cfg("order=1"), tmp_path)


class ToyFID(InceptionFID):
    """InceptionFID with a toy feature extractor (mean intensity of 4 image quarters), to
    check the streaming accumulation offline; records the batch sizes it was given."""

    def __init__(self):
        super().__init__(reference="unused")
        self.batches = []

    def start(self):
        def features(uint8):
            self.batches.append(len(uint8))
            x = uint8.double()
            return torch.stack([q.mean((1, 2, 3)) for half in x.chunk(2, 2) for q in half.chunk(2, 3)], 1)

        return {"features": features, "reference": (torch.full((4,), 100.0).double(), torch.eye(4).double()),
                "stats": {}}


def test_paper_metrics_stream_chunk_by_chunk(full_run):
    run_dir, _ = full_run
    metric = ToyFID()
    results = evaluate(run_dir / "samples", plan(7, 3, 0), ("cached", "baseline"), {"fid": metric})["fid"]
    assert metric.batches == [3, 3, 3, 3, 1, 1]  # per chunk and side, never all 7 at once
    for side, name in (("cached", "samples.npz"), ("baseline", "samples_baseline.npz")):
        with np.load(run_dir / name) as merged:
            x = torch.from_numpy(merged["arr_0"]).double().repeat(1, 1, 1, 3)  # RGB, NHWC
        quarters = [q.mean((1, 2, 3)) for half in x.chunk(2, 1) for q in half.chunk(2, 2)]
        expected = frechet_distance(*gaussian_stats(torch.stack(quarters, 1)), torch.full((4,), 100.0), torch.eye(4))
        assert results[f"fid_{side}"] == pytest.approx(expected, rel=1e-9)
    assert results["num_samples"] == 7


def test_paper_metrics_offline_are_skipped_with_a_message(tmp_path, caplog):
    metrics = run(make_cfg("num_images=2", "+paper_metrics.fid._target_=cachelab.evaluation.paper_metrics.InceptionFID",
                           f"+paper_metrics.fid.reference={tmp_path / 'missing.npz'}",
                           "+paper_metrics.lpips._target_=cachelab.evaluation.paper_metrics.LPIPS"), tmp_path)
    skipped = metrics["paper_metrics"]
    assert skipped["fid"]["skipped"].startswith("Inception FID skipped:")
    assert skipped["lpips"]["skipped"].startswith("LPIPS skipped: it compares the cached images with the baseline's")
    assert "allowed: job.baseline_samples=true" in skipped["lpips"]["skipped"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("warning: Inception FID skipped") for w in warnings)
    assert any(w.startswith("warning: LPIPS skipped") for w in warnings)


def test_prompt_lists_continue_across_chunks():
    adapter = DiffusersDiTAdapter(name="x", path="/nonexistent", prompts=[1, 2, 3])  # make_inputs loads nothing
    assert adapter.make_inputs(4, seed=0, start=0).prompts == [1, 2, 3, 1]
    assert adapter.make_inputs(2, seed=0, start=4).prompts == [2, 3]


@pytest.mark.parametrize(("override", "message"), [
    ("job.batch_size=0", "job.batch_size=0 is out of range; allowed: integers >= 1"),
    ("job.batch_size=1.5", "job.batch_size=1.5 is not an integer; allowed: integers >= 1"),
    ("num_images=0", "num_images=0 is out of range; allowed: integers >= 1"),
    ("num_images=-5", "num_images=-5 is out of range; allowed: integers >= 1"),
    ("job.baseline_samples=maybe", "job.baseline_samples='maybe' is not allowed; allowed: true, false"),
])
def test_bad_input_is_a_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg(override))
    assert message in str(err.value)


def test_an_unknown_job_is_one_line_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match="job='fid' is unknown; allowed: atlas, benchmark, calibrate, compare, plan, sample, trajectory, tune"):
        check_group_choices(["job=fid"], REPO / "conf")


def test_bad_batch_size_on_the_command_line_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", *FAST, "job.batch_size=0", "model=tiny_dit", "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: job.batch_size=0 is out of range; allowed: integers >= 1\n"
    assert not (tmp_path / "samples").exists()
