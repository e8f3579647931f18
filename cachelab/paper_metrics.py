"""Metrics the papers report that need pretrained weights: Inception FID, LPIPS, CLIP score,
ImageReward. Real code paths for users who have the weights (or a network); without them a
metric is skipped with a message naming what is missing, and the run goes on.

Configured as ``paper_metrics: {name: {_target_: cachelab.paper_metrics.LPIPS}, ...}``; each
result lands in ``metrics.json`` under ``paper_metrics/<name>``.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod

import numpy as np
import torch

from cachelab.models.loading import WeightsUnavailable
from cachelab.report import as_rgb


class PaperMetric(ABC):
    """A metric of the baseline and cached images that needs pretrained weights."""

    name: str

    @abstractmethod
    def __call__(self, baseline: torch.Tensor, cached: torch.Tensor, inputs) -> dict:
        """Values for images in [0, 1], (B, C, H, W); raises WeightsUnavailable offline."""


def _unavailable(metric: str, err: Exception, fix: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"{metric} skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}; {fix}")


class LPIPS(PaperMetric):
    """LPIPS of the cached images against the baseline (torchmetrics; AlexNet or VGG weights
    from torchvision's download cache)."""

    name = "lpips"

    def __init__(self, net: str = "alex"):
        self.net = net

    def __call__(self, baseline, cached, inputs) -> dict:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type=self.net, normalize=True)
        except Exception as err:  # noqa: BLE001 -- any download failure means: weights unavailable
            raise _unavailable("LPIPS", err, f"put torchvision's {self.net} weights in the torch hub cache") from err
        return {"lpips": float(metric(as_rgb(cached), as_rgb(baseline)))}


class InceptionFID(PaperMetric):
    """FID of the baseline and of the cached samples against reference statistics (an ``.npz``
    with ``mu`` and ``sigma``, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``), on the 2048-d
    pool features of torch-fidelity's Inception-v3 (as torchmetrics' FID)."""

    name = "inception_fid"

    def __init__(self, reference: str):
        self.reference = reference

    def __call__(self, baseline, cached, inputs) -> dict:
        from cachelab.judge import frechet_distance, gaussian_stats

        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            inception = FrechetInceptionDistance(feature=2048).inception
            reference = np.load(self.reference)
        except Exception as err:  # noqa: BLE001
            raise _unavailable("Inception FID", err, "pip install torch-fidelity with its Inception weights cached, "
                                                     "and set the reference statistics file") from err
        ref = (torch.from_numpy(reference["mu"]).double(), torch.from_numpy(reference["sigma"]).double())

        def fid(images):
            features = inception((as_rgb(images) * 255).round().to(torch.uint8)).double()
            return frechet_distance(gaussian_stats(features), ref)

        return {"fid_baseline": fid(baseline), "fid_cached": fid(cached), "num_samples": len(cached)}


class CLIPScore(PaperMetric):
    """CLIP score of the images against their prompts (torchmetrics, a local or hub CLIP)."""

    name = "clip_score"

    def __init__(self, model: str = "openai/clip-vit-large-patch14"):
        self.model = model

    def __call__(self, baseline, cached, inputs) -> dict:
        from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore

        prompts = [str(p) for p in getattr(inputs, "prompts", [])]
        if not prompts or all(p.isdigit() for p in prompts):
            raise WeightsUnavailable("CLIP score skipped: the model has no text prompts")
        try:
            metric = TorchmetricsCLIPScore(model_name_or_path=self.model)
        except Exception as err:  # noqa: BLE001
            raise _unavailable("CLIP score", err, f"download {self.model} once and set its local folder") from err
        score = lambda images: float(metric((as_rgb(images) * 255).to(torch.uint8), prompts))  # noqa: E731
        return {"clip_baseline": score(baseline), "clip_cached": score(cached)}


class ImageReward(PaperMetric):
    """ImageReward (``pip install image-reward``) of the images against their prompts."""

    name = "image_reward"

    def __init__(self, model: str = "ImageReward-v1.0"):
        self.model = model

    def __call__(self, baseline, cached, inputs) -> dict:
        from torchvision.transforms.functional import to_pil_image

        try:
            import ImageReward as reward_models

            model = reward_models.load(self.model)
        except Exception as err:  # noqa: BLE001
            raise _unavailable("ImageReward", err, f"pip install image-reward and cache {self.model}") from err

        def score(images):
            return float(np.mean([model.score(prompt, to_pil_image(image.float().cpu()))
                                  for prompt, image in zip(inputs.prompts, as_rgb(images))]))

        return {"image_reward_baseline": score(baseline), "image_reward_cached": score(cached)}


def evaluate_all(metrics: dict[str, PaperMetric], baseline, cached, inputs) -> dict:
    """Every configured metric; one that cannot run records why (and says so on stderr)."""
    results = {}
    for name, metric in metrics.items():
        try:
            results[name] = metric(baseline, cached, inputs)
        except WeightsUnavailable as err:
            print(f"warning: {err}", file=sys.stderr)
            results[name] = {"skipped": str(err)}
    return results

