"""``python run.py job=calibrate model=<model> num_steps=<T>``: a model's calibration for the
adaptive schedules, from one full-compute run, into ``calibration.json`` in the run folder.

- MagCache: the magnitude ratio of the stack residual ``R_s`` (last block's output minus
  first block's input: the ``stack`` site) at every step,
  ``r_s = mean over tokens of ||R_s|| / ||R_{s-1}||`` (``r_0 = 1``; mean over CFG contexts and
  output streams too): ``ratios``.
- TeaCache: the polynomial (degree 4, highest first) fitted by least squares from the relative
  L1 change of the first block's modulated input to that of the model output between
  consecutive steps, as TeaCache fits its per-model coefficients: ``teacache_coefficients``
  (and the pairs it was fitted on, ``teacache_fit``).

``schedule=magcache schedule.calibration=<path to calibration.json>`` (and ``schedule=teacache``)
read it; the calibrations the project ships (``cachelab/assets/calibration_<model>.json``) are
found by the model's name and are never rewritten by this job.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cachelab.analysis.sink import Sink
from cachelab.core.adaptive import relative_l1
from cachelab.core.controller import attach
from cachelab.core.outputs import Parts
from cachelab.core.schedules import Decision, Schedule, StepContext
from cachelab.core.sites import select_sites
from cachelab.core.strategy import Strategy
from cachelab.io import write_json_atomic
from cachelab.jobs.base import observed_full_run
from cachelab.models.adapter import Inputs, ModelAdapter
from cachelab.strategies.reuse import Reuse

log = logging.getLogger(__name__)

CALIBRATION = "calibration.json"  # in the run folder


class CalibrateJob:
    """One full generation of ``num_images`` -> ``calibration.json`` (MagCache ratios, TeaCache fit)."""

    def __init__(self, num_images: int = 1):
        self.num_images = num_images

    def run(self, cfg: DictConfig, adapter: ModelAdapter, strategy: Strategy, sink: Sink, out_dir: Path) -> dict:
        torch.manual_seed(cfg.seed)
        inputs = adapter.make_inputs(self.num_images, cfg.seed)
        ratios = magnitude_ratios(adapter, inputs)
        fit = teacache_fit(adapter, inputs)
        record = {"model": cfg.model.name, "num_steps": adapter.num_steps, "num_images": self.num_images,
                  "seed": cfg.seed, "ratios": ratios,
                  "teacache_coefficients": fit["coefficients"],
                  "teacache_fit": {"input_change, output_change": fit["pairs"]}}
        path = Path(out_dir) / CALIBRATION
        write_json_atomic(path, record)
        sink.summary({"calibration/path": str(path)})
        log.info(f"{path}\nuse it with: schedule.calibration={path}")
        return record


class StackResidualNorms:
    """A site observer on the ``stack`` site: the per-token norms of each step's stack
    residual, per context and output stream."""

    def __init__(self):
        self.norms: dict[tuple[str, int], dict[int, torch.Tensor]] = {}

    def full(self, site: str, context: str, s: int, values: Parts) -> None:
        for i, value in enumerate(values):
            if value is not None:
                self.norms.setdefault((context, i), {})[s] = torch.linalg.vector_norm(value.float(), dim=-1)

    def forecast(self, site: str, context: str, s: int, forecast: Parts, true: Parts | None) -> None:
        raise RuntimeError("calibration runs every step in full")

    def ratios(self, T: int) -> list[float]:
        """``r_s`` for ``s = 0..T-1``."""
        ratios = [1.0]
        for s in range(1, T):
            per_key = [(norms[s] / norms[s - 1]).mean() for norms in self.norms.values()]
            ratios.append(float(torch.stack(per_key).mean()))
        return ratios


def magnitude_ratios(adapter: ModelAdapter, inputs: Inputs) -> list[float]:
    """MagCache's ratio curve of ``adapter``'s model, from one full generation of ``inputs``."""
    recorder = StackResidualNorms()
    observed_full_run(adapter, "stack", recorder, inputs)
    return recorder.ratios(adapter.num_steps)


class ModulatedInputs(Schedule):
    """Computes every step and keeps each step's first-block modulated input (TeaCache's signal)."""

    signals = ("modulated_input",)

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []

    def decide(self, ctx: StepContext) -> Decision:
        self.values.append(ctx.signals["modulated_input"].float().clone())
        return Decision.FULL


def teacache_fit(adapter: ModelAdapter, inputs: Inputs, degree: int = 4) -> dict:
    """TeaCache's rescaling polynomial for ``adapter``'s model from one full generation:
    ``coefficients`` (highest degree first) of the least-squares fit of the model output's
    relative L1 change on the modulated input's, and the ``pairs`` it was fitted on."""
    recorder, outputs = ModulatedInputs(), []
    handle = attach(select_sites(adapter.model, adapter.site_patterns("block")), Reuse(), recorder)
    try:
        adapter.generate(inputs, handle, callback=lambda step: outputs.append(step["model_output"].float().clone()))
        signals = recorder.values  # before remove(), which resets the schedule
    finally:
        handle.remove()
    pairs = [(relative_l1(m, m_prev), relative_l1(o, o_prev))
             for m_prev, m, o_prev, o in zip(signals, signals[1:], outputs, outputs[1:])]
    x, y = np.array(pairs).T
    return {"coefficients": np.polyfit(x, y, degree).tolist(), "pairs": pairs}
