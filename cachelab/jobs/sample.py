"""``job=sample``: the images of a large evaluation (FID-50k), generated in resumable chunks.

Chunk ``i`` holds images ``i * batch_size`` onwards (``batch_size`` of them, fewer in the
last one) and is generated afresh from its own seed, a function of ``(seed, i)`` alone, with
the noise and conditioning that the adapter's ``make_inputs`` gives for that seed and start
index: no chunk depends on another, on the order of the chunks or on how often the run was
resumed. Every chunk is written atomically as soon as it is done (``samples/cached/00000.npz``
and, with ``job.baseline_samples=true``, ``samples/baseline/00000.npz``): uint8 NHWC ``images``,
the ``labels`` or ``prompts``, and its measurements (``meta``, JSON). A rerun into the same
folder skips the finished chunks; a folder whose chunks came from other settings is refused.

At the end the chunks are streamed into ``samples.npz`` (and ``samples_baseline.npz``):
``arr_0`` uint8 NHWC and, for a class-conditional model, ``arr_1`` the labels -- the format
of ADM's evaluator (guided-diffusion), which the DiT and TaylorSeer papers use for FID-50k.
The paper metrics are updated chunk by chunk, and ``metrics.json`` gets the counts, the
wall-clock, FLOPs and cache statistics per chunk and in total.
"""
from __future__ import annotations

import logging
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cachelab.errors import ConfigError
from cachelab.analysis.sink import Sink
from cachelab.core.controller import CacheHandle, CacheStats
from cachelab.core.strategy import Strategy
from cachelab.evaluation.flops import count_flops
from cachelab.evaluation.paper_metrics import PaperMetricStream
from cachelab.io import ArrayParts, finite_json, from_uint8_hwc, to_uint8_hwc, write_json_atomic, write_npz_atomic
from cachelab.jobs.base import build, compiled_regions, describe, flatten, timed_generation
from cachelab.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

SAMPLES = "samples"         # the chunk folder inside the run folder
SETTINGS = "settings.json"  # in it: the settings its chunks were generated with
MERGED = {"cached": "samples.npz", "baseline": "samples_baseline.npz"}
# the settings that decide a chunk's images; finished chunks are reused only if these are unchanged
IMAGE_KEYS = ("model", "strategy", "schedule", "num_steps", "seed", "device")  # and the batch size
CHUNK_KEYS = ("index", "start", "size", "seed")


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index``: a function of ``(seed, index)`` alone, from numpy's
    SeedSequence (distinct pairs give unrelated seeds, which ``seed + index`` would not)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass(frozen=True)
class Chunk:
    """Images ``start`` .. ``start + size - 1`` of a sampling run, generated from ``seed``."""

    index: int
    start: int
    size: int
    seed: int

    def path(self, folder: Path, side: str) -> Path:
        return folder / side / f"{self.index:05d}.npz"


def plan(num_images: int, batch_size: int, seed: int) -> list[Chunk]:
    """``num_images`` in chunks of ``batch_size`` (the last one may be smaller)."""
    return [Chunk(i, start, min(batch_size, num_images - start), chunk_seed(seed, i))
            for i, start in enumerate(range(0, num_images, batch_size))]


class SampleJob:
    """The cached images (and with ``baseline_samples`` the full-compute ones) in resumable
    chunks of ``batch_size``, merged into ``samples.npz``."""

    def __init__(self, batch_size: int = 250, baseline_samples: bool = False):
        self.batch_size, self.baseline_samples = batch_size, baseline_samples

    def run(self, cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path) -> dict:
        return sample(cfg, adapter, strategy, sink, out_dir, self.batch_size, self.baseline_samples)


def sample(cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path,
           batch_size: int, baseline_samples: bool) -> dict:
    """Generate (or resume) every chunk, merge them, evaluate them; returns what metrics.json holds."""
    folder = Path(out_dir) / SAMPLES
    claim(folder, cfg, batch_size)
    paper = {name: build(cfg.paper_metrics, name) for name in cfg.paper_metrics}  # before hours of sampling
    chunks = plan(cfg.num_images, batch_size, cfg.seed)
    sides = ("cached", "baseline") if baseline_samples else ("cached",)
    records = {side: [] for side in sides}  # per chunk, its file's measurements
    generated = 0
    handle = strategy.attach(adapter)
    try:
        # the first chunk of each side includes the compilation
        with compiled_regions(cfg.get("compile"), adapter, handle):
            for chunk in chunks:
                metas = {side: finished(chunk.path(folder, side), chunk) for side in sides}
                missing = [side for side in sides if metas[side] is None]
                if missing:
                    inputs = adapter.make_inputs(chunk.size, chunk.seed, start=chunk.start)
                    for side in missing:
                        label = f"chunk {chunk.index + 1}/{len(chunks)} {side}" if cfg.progress else None
                        side_handle = handle if side == "cached" else None  # the baseline: full compute
                        metas[side] = write_chunk(folder, chunk, side, adapter, inputs, side_handle,
                                                  cfg.measure.flops, label)
                    generated += 1
                    sink.log({f"sample/{side}_wall_s": metas[side]["wall_s"] for side in missing}, step=chunk.index)
                    log.info(f"chunk {chunk.index + 1}/{len(chunks)} ({chunk.size} images): "
                             + ", ".join(f"{side} {metas[side]['wall_s']:.2f} s" for side in missing))
                for side in sides:
                    records[side].append(metas[side])
    finally:
        if handle is not None:
            handle.remove()

    counts = {side: merge(folder, chunks, side, records[side], Path(out_dir) / MERGED[side]) for side in sides}
    metrics = {
        "job": "sample",
        **describe(cfg, adapter, strategy),
        "batch_size": batch_size,
        "num_chunks": len(chunks),
        "chunks_generated": generated,  # in this invocation; the others were finished before
        "chunks_resumed": len(chunks) - generated,
        "samples": {side: {"file": MERGED[side], "images": counts[side]} for side in sides},
        **totals(records),
        "paper_metrics": evaluate(folder, chunks, sides, paper) if paper else {},
        "chunks": [{**{key: getattr(chunk, key) for key in CHUNK_KEYS},
                    **{side: {k: v for k, v in records[side][i].items() if k not in CHUNK_KEYS} for side in sides}}
                   for i, chunk in enumerate(chunks)],
        "torch_threads": torch.get_num_threads(),
        "guard": strategy.guard,
    }
    metrics, flags = finite_json(metrics)  # NaN and Inf as null (strict JSON), named here
    metrics["non_finite"] = flags
    write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    sink.summary(flatten(metrics))
    sink.artifact("samples", [Path(out_dir) / MERGED[side] for side in sides],  # what the paper metrics were taken on
                  {"images": counts, "paper_metrics": metrics["paper_metrics"]})
    log.info(summary(metrics))
    return metrics


def claim(folder: Path, cfg: DictConfig, batch_size: int) -> None:
    """Record in ``folder`` the settings that decide the images, or, if it has them (a
    resumed run), check that they are the same; raises ConfigError naming the keys that differ."""
    settings = json.loads(json.dumps({**{key: OmegaConf.to_container(cfg[key], resolve=True)
                                         if OmegaConf.is_config(cfg[key]) else cfg[key] for key in IMAGE_KEYS},
                                      "batch_size": batch_size}))
    path = folder / SETTINGS
    if not path.is_file():
        write_json_atomic(path, settings)
        return
    recorded = json.loads(path.read_text())
    differ = [key for key in settings if recorded.get(key) != settings[key]]
    if differ:
        raise ConfigError(f"{folder} holds chunks generated with other values of {', '.join(differ)} "
                          f"(recorded in {path.name}); allowed: the same values, or another hydra.run.dir")


def finished(path: Path, chunk: Chunk) -> dict | None:
    """The measurements in ``path`` if it is a finished file of ``chunk``, else None."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # absent, or not a chunk file
        return None
    return meta if all(meta.get(key) == getattr(chunk, key) for key in CHUNK_KEYS) else None


def write_chunk(folder: Path, chunk: Chunk, side: str, adapter: ModelAdapter, inputs, handle: CacheHandle | None,
                flops: bool, progress: str | None) -> dict:
    """Generate one side of ``chunk`` (``handle`` None: full compute) and write its file
    atomically; returns its measurements: generation wall-clock, decoding time (to uint8 on
    the CPU), FLOPs (counted during the timed generation, so its wall-clock includes the
    counter's overhead; None unless ``flops``), the images that held NaN or Inf (stored with
    NaN as 0), and for the cached side the cache statistics."""
    torch.manual_seed(chunk.seed)  # whatever draws from the global generator is per chunk too
    generation = lambda: timed_generation(adapter, inputs, handle, 1, progress)  # noqa: E731
    (latents, wall), counted = count_flops(generation) if flops else (generation(), None)
    start = time.perf_counter()
    decoded = adapter.decode(latents)
    images = to_uint8_hwc(decoded)
    meta = {**{key: getattr(chunk, key) for key in CHUNK_KEYS}, "images": len(images), "wall_s": wall,
            "decode_s": time.perf_counter() - start, "flops": counted,
            "non_finite_images": int((~torch.isfinite(decoded.flatten(1)).all(1)).sum())}
    if side == "cached":
        meta.update((handle.stats() if handle else CacheStats(full_steps=list(range(adapter.num_steps)))).as_dict())
    write_npz_atomic(chunk.path(folder, side), {"images": images, **conditioning(inputs),
                                                "meta": np.array(json.dumps(meta))})
    return meta


def conditioning(inputs) -> dict[str, np.ndarray]:
    """What a chunk file keeps of the conditioning: class ``labels`` and/or text ``prompts``."""
    arrays = {}
    if getattr(inputs, "labels", None) is not None:
        arrays["labels"] = inputs.labels.cpu().numpy()
    if getattr(inputs, "prompts", None) is not None:
        arrays["prompts"] = np.array([str(prompt) for prompt in inputs.prompts])
    return arrays


def load_chunk(path: Path) -> tuple[torch.Tensor, SimpleNamespace]:
    """A chunk file's images in [0, 1], (B, C, H, W), and its conditioning as inputs."""
    with np.load(path) as data:
        found, images = conditioning_arrays(data), from_uint8_hwc(data["images"])
    inputs = SimpleNamespace()
    if "labels" in found:
        inputs.labels = torch.from_numpy(found["labels"])
    if "prompts" in found:
        inputs.prompts = [str(prompt) for prompt in found["prompts"]]
    return images, inputs


def conditioning_arrays(data) -> dict[str, np.ndarray]:
    return {key: data[key] for key in ("labels", "prompts") if key in data}


def merge(folder: Path, chunks: list[Chunk], side: str, metas: list[dict], path: Path) -> int:
    """Stream the chunk files of ``side`` into one ``.npz`` in the ADM evaluator's format:
    ``arr_0`` uint8 NHWC, ``arr_1`` the class labels (if any), ``prompts`` (if any).
    Only one chunk's images are in memory at a time. Returns the number of images."""
    found: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:  # the small arrays first
        with np.load(chunk.path(folder, side)) as data:
            for key, value in conditioning_arrays(data).items():
                found.setdefault(key, []).append(value)
    with np.load(chunks[0].path(folder, side)) as data:
        image_shape = data["images"].shape[1:]
    total = sum(meta["images"] for meta in metas)

    def parts():
        for chunk in chunks:
            with np.load(chunk.path(folder, side)) as data:
                yield data["images"]

    arrays = {"arr_0": ArrayParts((total, *image_shape), np.uint8, parts())}
    labels = np.concatenate(found["labels"]) if "labels" in found else None
    if labels is not None and len(labels) == total:  # one label per image (not per video)
        arrays["arr_1"] = labels
    if "prompts" in found:
        arrays["prompts"] = np.concatenate(found["prompts"])
    write_npz_atomic(path, arrays)
    return total


def evaluate(folder: Path, chunks: list[Chunk], sides: tuple[str, ...], metrics: dict) -> dict:
    """The paper metrics, updated chunk by chunk from the chunk files."""
    stream = PaperMetricStream(metrics, with_baseline="baseline" in sides)
    for chunk in chunks:
        cached, inputs = load_chunk(chunk.path(folder, "cached"))
        baseline = load_chunk(chunk.path(folder, "baseline"))[0] if "baseline" in sides else None
        stream.update(baseline, cached, inputs)
    return stream.results()


def totals(records: dict[str, list[dict]]) -> dict:
    """Wall-clock, decoding time and FLOPs per side over all chunks (FLOPs None unless every
    chunk was counted), with the baseline/cached ratios; the cache statistics summed over
    the chunks' generations (``cache_bytes``, ``host_bytes``: the largest)."""
    def total(side: str, key: str):  # None if a chunk lacks it (or was written before it was measured)
        values = [meta.get(key) for meta in records.get(side, [])]
        return sum(values) if values and all(v is not None for v in values) else None

    def ratio(key: str):
        baseline, cached = total("baseline", key), total("cached", key)
        return baseline / cached if baseline and cached else None

    cached = records["cached"]
    orders = [m.get("order_reached") for m in cached]
    return {
        "wall_s": {**{side: total(side, "wall_s") for side in records}, "speedup": ratio("wall_s")},
        "decode_s": {side: total(side, "decode_s") for side in records},
        "flops": {**{side: total(side, "flops") for side in records}, "speedup": ratio("flops")},
        "non_finite_images": {side: total(side, "non_finite_images") for side in records},
        "cache": {"num_full": total("cached", "num_full"), "num_forecast": total("cached", "num_forecast"),
                  "fallbacks": total("cached", "fallbacks"), "guard_fallbacks": total("cached", "guard_fallbacks"),
                  "cache_bytes": max(m["cache_bytes"] for m in cached),
                  "host_bytes": max(m.get("host_bytes", 0) for m in cached),  # cache.offload's; 0 in older chunks
                  # over the chunks' generations; None if a chunk's predictor has no orders
                  "order_reached": {"min": min(o["min"] for o in orders), "max": max(o["max"] for o in orders)}
                  if orders and all(orders) else None},
    }


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{metrics['samples']['cached']['file']}: {metrics['num_images']} images in {metrics['num_chunks']} "
             f"chunks ({metrics['chunks_generated']} generated now, {metrics['chunks_resumed']} finished before)"]
    for side in metrics["samples"]:
        flops, broken = metrics["flops"][side], metrics["non_finite_images"][side]
        lines.append(f"  {side}: {metrics['wall_s'][side]:.2f} s generating"
                     + (f", {flops:.4g} FLOPs" if flops is not None else "")
                     + (f", {broken} images with NaN/Inf" if broken else ""))
    if metrics["cache"]["guard_fallbacks"]:
        lines.append(f"  guard: {metrics['cache']['guard_fallbacks']} site forecasts held NaN/Inf and were computed")
    if metrics["non_finite"]:
        lines.append(f"  non-finite (null in metrics.json): {', '.join(metrics['non_finite'])}")
    if metrics["wall_s"]["speedup"]:
        lines.append(f"  speedup: wall {metrics['wall_s']['speedup']:.2f}x"
                     + (f", FLOPs {metrics['flops']['speedup']:.2f}x" if metrics["flops"]["speedup"] else ""))
    return "\n".join(lines)
