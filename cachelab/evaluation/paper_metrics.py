"""Metrics the papers report that need pretrained weights: Inception FID, LPIPS, CLIP score,
ImageReward. Real code paths for users who have the weights (or a network); without them a
metric is skipped with a message naming what is missing, and the run goes on.

Configured as ``paper_metrics: {name: {_target_: cachelab.evaluation.paper_metrics.LPIPS}, ...}``; each
result lands in ``metrics.json`` under ``paper_metrics/<name>``. Every metric is computed over
a stream of batches (:class:`PaperMetricStream`), so ``job=sample`` evaluates 50,000 images
chunk by chunk without holding them.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np
import torch

from cachelab.errors import WeightsUnavailable
from cachelab.evaluation.metrics import as_rgb

log = logging.getLogger(__name__)

SIDES = ("baseline", "cached")


class PaperMetric(ABC):
    """A metric of the cached (and baseline) images that needs pretrained weights, computed
    over batches: ``start()`` loads what it needs (raises WeightsUnavailable offline) and
    returns a running state, ``update`` adds one batch, ``result`` gives the values.
    Calling the metric does the three on one batch."""

    name: str
    title: str                    # how messages name the metric
    needs_baseline: bool = False  # compares each cached image with its baseline image

    def check(self, inputs) -> None:
        """Raise WeightsUnavailable, before anything is loaded, if the metric cannot apply to such inputs."""

    @abstractmethod
    def start(self):
        """Load the weights; the running state. Raises WeightsUnavailable offline."""

    @abstractmethod
    def update(self, state, baseline: torch.Tensor | None, cached: torch.Tensor, inputs) -> None:
        """Add one batch: images in [0, 1], (B, C, H, W); ``baseline`` None when not generated."""

    @abstractmethod
    def result(self, state) -> dict:
        """The values over every batch added."""

    def __call__(self, baseline, cached, inputs) -> dict:
        self.check(inputs)
        state = self.start()
        self.update(state, baseline, cached, inputs)
        return self.result(state)


def _unavailable(metric: str, err: Exception, fix: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"{metric} skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}; {fix}")


def _sides(baseline, cached):
    """(side, images) for the sides that were generated."""
    return [(side, images) for side, images in zip(SIDES, (baseline, cached)) if images is not None]


class Means:
    """Running means of per-image scores, one per key (e.g. per side)."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, key: str, batch_mean: float, count: int) -> None:
        total = self.totals.setdefault(key, [0.0, 0])
        total[0] += batch_mean * count
        total[1] += count

    def means(self, prefix: str) -> dict:
        return {f"{prefix}{key}": total / count for key, (total, count) in self.totals.items()}


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (as_rgb(images) * 255).round().to(torch.uint8)


class LPIPS(PaperMetric):
    """LPIPS of the cached images against the baseline (torchmetrics; AlexNet or VGG weights
    from torchvision's download cache)."""

    name, title, needs_baseline = "lpips", "LPIPS", True

    def __init__(self, net: str = "alex"):
        self.net = net

    def start(self):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type=self.net, normalize=True)
        except Exception as err:  # noqa: BLE001 -- any download failure means: weights unavailable
            raise _unavailable(self.title, err, f"put torchvision's {self.net} weights in the torch hub cache") from err
        return metric, Means()

    def update(self, state, baseline, cached, inputs) -> None:
        metric, means = state
        means.add("", float(metric(as_rgb(cached), as_rgb(baseline))), len(cached))  # the batch mean

    def result(self, state) -> dict:
        return state[1].means("lpips")


class InceptionFID(PaperMetric):
    """FID of the baseline and of the cached samples against reference statistics (an ``.npz``
    with ``mu`` and ``sigma``, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``), on the 2048-d
    pool features of torch-fidelity's Inception-v3 (as torchmetrics' FID). The features'
    mean and covariance are accumulated batch by batch."""

    name, title = "inception_fid", "Inception FID"

    def __init__(self, reference: str):
        self.reference = reference

    def start(self):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            inception = FrechetInceptionDistance(feature=2048).inception
            reference = np.load(self.reference)
        except Exception as err:  # noqa: BLE001
            raise _unavailable(self.title, err, "pip install 'cachelab[fid]' (torch-fidelity) with its Inception "
                                                "weights cached, and set the reference statistics file") from err
        ref = (torch.from_numpy(reference["mu"]).double(), torch.from_numpy(reference["sigma"]).double())
        return {"features": inception, "reference": ref, "stats": {}}

    def update(self, state, baseline, cached, inputs) -> None:
        from cachelab.evaluation.judge import RunningGaussian

        for side, images in _sides(baseline, cached):
            state["stats"].setdefault(side, RunningGaussian()).update(state["features"](_uint8(images)))

    def result(self, state) -> dict:
        from cachelab.evaluation.judge import frechet_distance

        values = {f"fid_{side}": frechet_distance(*stats.stats(), *state["reference"])
                  for side, stats in state["stats"].items()}
        return {**values, "num_samples": state["stats"]["cached"].count}


class CLIPScore(PaperMetric):
    """CLIP score of the images against their prompts (torchmetrics, a local or hub CLIP)."""

    name, title = "clip_score", "CLIP score"

    def __init__(self, model: str = "openai/clip-vit-large-patch14"):
        self.model = model

    def check(self, inputs) -> None:
        prompts = [str(p) for p in getattr(inputs, "prompts", [])]
        if not prompts or all(p.isdigit() for p in prompts):
            raise WeightsUnavailable(f"{self.title} skipped: the model has no text prompts")

    def start(self):
        from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore

        try:
            metric = TorchmetricsCLIPScore(model_name_or_path=self.model)
        except Exception as err:  # noqa: BLE001
            raise _unavailable(self.title, err, f"download {self.model} once and set its local folder") from err
        return metric, Means()

    def update(self, state, baseline, cached, inputs) -> None:
        metric, means = state
        prompts = [str(p) for p in inputs.prompts]
        for side, images in _sides(baseline, cached):
            means.add(side, float(metric(_uint8(images), prompts)), len(images))  # the batch mean

    def result(self, state) -> dict:
        return state[1].means("clip_")


class ImageReward(PaperMetric):
    """ImageReward (``pip install image-reward``) of the images against their prompts."""

    name, title = "image_reward", "ImageReward"

    def __init__(self, model: str = "ImageReward-v1.0"):
        self.model = model

    def start(self):
        try:
            import ImageReward as reward_models

            model = reward_models.load(self.model)
        except Exception as err:  # noqa: BLE001
            raise _unavailable(self.title, err, f"pip install image-reward and cache {self.model}") from err
        return model, Means()

    def update(self, state, baseline, cached, inputs) -> None:
        from torchvision.transforms.functional import to_pil_image

        model, means = state
        for side, images in _sides(baseline, cached):
            scores = [model.score(prompt, to_pil_image(image.float().cpu()))
                      for prompt, image in zip(inputs.prompts, as_rgb(images))]
            means.add(side, float(np.mean(scores)), len(scores))

    def result(self, state) -> dict:
        return state[1].means("image_reward_")


class PaperMetricStream:
    """Every configured metric over a stream of batches (``update`` per batch, ``results``
    at the end); a metric that cannot run is skipped with a logged warning, once, and
    records why. Without baseline images, a metric that needs them is skipped."""

    def __init__(self, metrics: dict[str, PaperMetric], with_baseline: bool = True):
        self.metrics = metrics
        self.states: dict[str, object] = {}
        self.skipped: dict[str, dict] = {}
        for name, metric in metrics.items():
            if metric.needs_baseline and not with_baseline:
                self._skip(name, WeightsUnavailable(f"{metric.title} skipped: it compares the cached images with "
                                                    f"the baseline's; allowed: job.baseline_samples=true"))

    def update(self, baseline: torch.Tensor | None, cached: torch.Tensor, inputs) -> None:
        for name, metric in self.metrics.items():
            if name in self.skipped:
                continue
            try:
                if name not in self.states:
                    metric.check(inputs)
                    self.states[name] = metric.start()
                metric.update(self.states[name], baseline, cached, inputs)
            except WeightsUnavailable as err:
                self._skip(name, err)

    def results(self) -> dict:
        return {name: self.skipped.get(name) or self.metrics[name].result(self.states[name]) for name in self.metrics}

    def _skip(self, name: str, err: WeightsUnavailable) -> None:
        log.warning(f"warning: {err}")
        self.skipped[name] = {"skipped": str(err)}


def evaluate_all(metrics: dict[str, PaperMetric], baseline, cached, inputs) -> dict:
    """Every configured metric on one batch; one that cannot run records why (and logs a warning)."""
    stream = PaperMetricStream(metrics)
    stream.update(baseline, cached, inputs)
    return stream.results()
