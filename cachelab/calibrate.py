"""A model's calibration for the adaptive schedules, from one full-compute run, into a JSON file::

    python -m cachelab.calibrate model=tiny_dit num_steps=50 [num_images=1] [seed=0] [out=file.json]

- MagCache: the magnitude ratio of the stack residual ``R_s`` (last block's output minus
  first block's input: the ``stack`` site) at every step,
  ``r_s = mean over tokens of ||R_s|| / ||R_{s-1}||`` (``r_0 = 1``; mean over CFG contexts and
  output streams too): ``ratios``.
- TeaCache: the polynomial (degree 4, highest first) fitted by least squares from the relative
  L1 change of the first block's modulated input to that of the model output between
  consecutive steps, as TeaCache fits its per-model coefficients: ``teacache_coefficients``
  (and the pairs it was fitted on, ``teacache_fit``).

``out`` defaults to ``cachelab/assets/magcache_<model.name>.json``, where ``schedule=magcache``
and ``schedule=teacache schedule.calibration=<name>`` find it by the model's name (or a path
to a .json file).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cachelab.adaptive import relative_l1
from cachelab.assets import ASSETS_DIR
from cachelab.checks import ConfigError
from cachelab.controller import attach
from cachelab.io import write_json_atomic
from cachelab.models.adapter import Inputs, ModelAdapter
from cachelab.outputs import Parts
from cachelab.schedules import Always, Decision, Schedule, StepContext
from cachelab.sites import select_sites

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def calibration_path(calibration: str) -> Path:
    """A ``.json`` path as given, else the shipped calibration of that name."""
    return Path(calibration) if calibration.endswith(".json") else ASSETS_DIR / f"magcache_{calibration}.json"


def load_calibration(calibration: str) -> dict:
    """The calibration record (``model``, ``num_steps``, ``ratios``, ...) of ``calibration``."""
    path = calibration_path(calibration)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem[len("magcache_"):] for p in ASSETS_DIR.glob("magcache_*.json"))) or "none"
        raise ConfigError(f"schedule.calibration={calibration!r}: no file {path}; allowed: a path to a .json "
                          f"file or a shipped name ({shipped}); record one with "
                          f"`python -m cachelab.calibrate model=<model> num_steps=<T>`")
    return json.loads(path.read_text())


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
    from strategies.reuse import Reuse

    recorder = StackResidualNorms()
    handle = attach(select_sites(adapter.model, adapter.site_patterns("stack")), Reuse(), Always())
    handle.observe(recorder)
    try:
        adapter.generate(inputs, handle)
    finally:
        handle.remove()
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
    from strategies.reuse import Reuse

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


def main(argv: list[str]) -> Path:
    """Compose the config from ``argv`` (Hydra overrides, plus ``out=``), calibrate, write."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    overrides = [a for a in argv if not a.startswith("out=")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["num_images=1", *overrides])
    adapter: ModelAdapter = instantiate(cfg.model)
    torch.manual_seed(cfg.seed)
    inputs = adapter.make_inputs(cfg.num_images, cfg.seed)
    ratios = magnitude_ratios(adapter, inputs)
    fit = teacache_fit(adapter, inputs)
    out = Path(outs[-1]) if outs else calibration_path(cfg.model.name)
    write_json_atomic(out, {"model": cfg.model.name, "num_steps": cfg.num_steps, "num_images": cfg.num_images,
                            "seed": cfg.seed, "ratios": ratios, "teacache_coefficients": fit["coefficients"],
                            "teacache_fit": {"input_change, output_change": fit["pairs"]},
                            "command": " ".join(["python -m cachelab.calibrate", *argv])})
    return out


if __name__ == "__main__":
    print(main(sys.argv[1:]))
