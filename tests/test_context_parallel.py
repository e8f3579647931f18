"""Caching under diffusers context parallelism (Ulysses, 2 ranks over gloo on this CPU): through
the same ``cachelab.apply``, the cached context-parallel output equals the single-process cached
output, every rank takes the single-process decisions (fixed and signal-driven schedules), the
cache changes the output, and removal restores it; ranks that disagree fail at once, naming
the step and each rank's decision; reduced means are right for unequal shards."""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

import cachelab
from cachelab.core.adaptive import relative_l1
from cachelab.core.distributed import DivergentDecisions
from cachelab.models.parallel import context_parallel_group, enable_context_parallel

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
STEPS, WORLD = 8, 2
TOLERANCE = 1e-5  # context parallel vs one process (measured: up to 1.4e-6); the cache changes outputs by more
RATIOS = [1.0, 0.9, 0.95, 1.05, 0.97, 1.02, 0.99, 1.0]  # a MagCache calibration (its mask is fixed by it)
# per model: (case name, preset, keys); thresholds chosen so that each schedule forecasts some steps
CASES = {
    "tiny_flux": [("taylor", "taylor", {"interval": 3}), ("fbcache", "fbcache", {"threshold": 0.3}),
                  ("magcache", "magcache", {"threshold": 0.1}), ("teacache", "teacache", {"threshold": 0.3}),
                  ("error_controlled", "taylor", {"schedule": "error_controlled", "tolerance": 0.3})],
    "tiny_wan": [("taylor", "taylor", {"interval": 3}), ("fbcache", "fbcache", {"threshold": 0.2}),
                 ("magcache", "magcache", {"threshold": 0.1}),
                 ("error_controlled", "taylor", {"schedule": "error_controlled", "tolerance": 0.3})],
}


def adapter(name: str, folder: Path):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.merge_with({"path": str(folder / name), "num_steps": STEPS, "device": "cpu"})
    return instantiate(cfg)


def generations(model, folder: Path) -> dict:
    """Uncached, each case cached through ``cachelab.apply`` (its output and full steps), and
    uncached again after every removal: the same calls in one process and on every rank."""
    pipe, arguments = model.pipe, model.call_arguments(model.make_inputs(1, seed=0))

    def generate():
        return pipe(**arguments, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                    output_type="pt", return_dict=False)[0].float()

    results = {"uncached": generate()}
    for case, preset, keys in CASES[model.name]:
        if preset == "magcache":
            keys = {**keys, "calibration": str(folder / "calibration.json")}
        handle = cachelab.apply(pipe, preset, **keys)
        results[case] = {"images": generate(), "full_steps": handle.stats().full_steps}
        handle.remove()
    results["restored"] = generate()
    return results


def rank_main(rank: int, name: str, folder: Path, port: int) -> None:
    """One rank: Ulysses context parallelism over gloo, the generations, a disagreement, unequal shards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20))
    try:
        model = adapter(name, folder)
        enable_context_parallel(model.pipe.transformer, ulysses=WORLD)
        results = generations(model, folder)
        group = context_parallel_group(model.pipe.transformer)
        group.agree(7, "step 3")  # the same code on every rank: passes
        try:
            group.agree(rank, "step 5")
        except DivergentDecisions as err:
            results["divergent"] = str(err)
        # unequal shards (3 and 5 elements) of the same tensors: the reduced ratio is the whole one
        whole, reference = torch.arange(8.0) - 2.5, torch.linspace(1, 3, 8)
        shard = slice(0, 3) if rank == 0 else slice(3, 8)
        results["unequal"] = (relative_l1(whole[shard], reference[shard], group), relative_l1(whole, reference))
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    """(single-process results, each rank's results) for one tiny pipeline."""
    name, folder = request.param, tmp_path_factory.mktemp(request.param)
    (folder / "calibration.json").write_text(json.dumps({"ratios": RATIOS}))
    torch.set_num_threads(1)
    single = generations(adapter(name, folder), folder)  # also builds the pipeline the ranks load
    mp.spawn(rank_main, args=(name, folder, free_port()), nprocs=WORLD)
    return name, single, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_cached_context_parallel_output_and_decisions_equal_single_process(runs):
    name, single, ranks = runs
    for rank in ranks:
        assert (rank["uncached"] - single["uncached"]).abs().max() < TOLERANCE
        for case, _, _ in CASES[name]:
            assert rank[case]["full_steps"] == single[case]["full_steps"], (name, case)
            assert (rank[case]["images"] - single[case]["images"]).abs().max() < TOLERANCE, (name, case)


def test_the_cache_did_something_and_removal_restores(runs):
    name, single, ranks = runs
    for case, _, _ in CASES[name]:
        assert len(single[case]["full_steps"]) < STEPS, (name, case)  # some steps forecast
        assert (single[case]["images"] - single["uncached"]).abs().max() > 5 * TOLERANCE, (name, case)
    for results in [single, *ranks]:
        assert torch.equal(results["restored"], results["uncached"])


def test_ranks_that_disagree_fail_at_once_naming_the_step_and_the_decisions(runs):
    _, _, ranks = runs
    for rank in ranks:
        assert "step 5 (rank 0: 0, rank 1: 1)" in rank["divergent"]


def test_reduced_means_are_right_for_unequal_shards(runs):
    _, _, ranks = runs
    for rank in ranks:
        sharded, whole = rank["unequal"]
        assert sharded == pytest.approx(whole, rel=1e-12)


# -- python run.py ... parallel.ulysses=2 ---------------------------------------------------------
def test_run_py_launches_the_ranks_and_rank_0_alone_writes(tmp_path):
    """The same run single-process and as 2 ranks under torchrun: the same decisions and quality,
    one W&B run, no trace of the other rank in the folder."""
    from tests.test_cli import app_env, check_ok, overrides, read_metrics, run_app

    env = {**app_env(tmp_path), "CACHELAB_CACHE": str(tmp_path / "cache")}
    common = ["model=tiny_flux", "num_steps=8", "num_images=2", "interval=3", "logger=wandb"]
    check_ok(run_app(overrides(*common, f"hydra.run.dir={tmp_path / 'single'}"), env=env))
    check_ok(run_app(overrides(*common, "parallel.ulysses=2", f"hydra.run.dir={tmp_path / 'cp'}"), env=env))
    single, cp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "cp")
    assert cp["parallel"] == {"ulysses": 2, "ring": 1} and cp["full_steps"] == single["full_steps"]
    assert cp["quality"]["rel_l2"] == pytest.approx(single["quality"]["rel_l2"], rel=1e-3)
    assert len(list((tmp_path / "cp" / "wandb").glob("offline-run-*"))) == 1
    assert (tmp_path / "cp" / "run.log").read_text().count("full steps") == 1


@pytest.mark.parametrize("args, message", [
    (["parallel.ring=2"], "parallel.ring=2: ring attention runs on GPUs only"),
    (["parallel.ulysses=2", "job=sample"], "parallel.ulysses=2 parallel.ring=1: context parallelism runs job=compare"),
    (["parallel.ulysses=0"], "parallel.ulysses=0 is out of range"),
])
def test_what_parallel_cannot_do_is_one_line_before_any_rank_starts(args, message, tmp_path):
    from tests.test_cli import overrides, run_app

    proc = run_app(overrides("model=tiny_flux", "logger=none", *args, f"hydra.run.dir={tmp_path}"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr
