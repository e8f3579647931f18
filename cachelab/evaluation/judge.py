"""The digit judge: a small CNN classifier, its feature space, and the Fréchet distance there."""
from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import nn

from cachelab.assets import load_asset


class DigitClassifier(nn.Module):
    """LeNet-style CNN on 32x32 digits in [-1, 1]; ``features`` is its 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def stage(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.trunk = nn.Sequential(stage(1, width), stage(width, 2 * width), stage(2 * width, 4 * width),
                                   nn.Flatten(), nn.Linear(4 * width * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


class RunningGaussian:
    """:func:`gaussian_stats` of features given batch by batch: float64 sums of the features
    and of their outer products (memory D^2, whatever the number of samples)."""

    def __init__(self):
        self.count, self.sum, self.outer = 0, None, None

    def update(self, features: torch.Tensor) -> None:
        features = features.double()
        if self.sum is None:
            dim = features.shape[1]
            self.sum, self.outer = features.new_zeros(dim), features.new_zeros(dim, dim)
        self.count += len(features)
        self.sum += features.sum(0)
        self.outer += features.T @ features

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance of everything seen."""
        mu = self.sum / self.count
        return mu, (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), the FID formula.

    tr((cov1 cov2)^(1/2)) is the sum of the square roots of the eigenvalues of cov1 cov2,
    which are real and non-negative for covariance matrices (tiny negative/imaginary
    round-off is clipped). NaN if any statistic holds NaN or Inf (features of non-finite
    images): LAPACK's eigenvalue routine must never see those (it crashes the process).
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    product = cov1 @ cov2
    if not all(bool(torch.isfinite(t).all()) for t in (mu1, mu2, cov1, cov2, product)):
        return math.nan
    eigenvalues = torch.linalg.eigvals(product).real.clamp(min=0)
    trace_sqrt = eigenvalues.sqrt().sum()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt).item()


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500):
    """Predicted labels and features of images in [-1, 1]."""
    classifier.eval()
    labels, features = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.float())
        features.append(f)
        labels.append(classifier.head(f).argmax(1))
    return torch.cat(labels), torch.cat(features)


class DigitJudge:
    """Scores generated digits with the shipped classifier: the fraction recognised as the
    requested class, and the Fréchet distance of their features to the real digits'."""

    def __init__(self, classifier: str = "digit_classifier", reference: str = "digit_reference_stats"):
        self.classifier_name, self.reference_name = classifier, reference

    @cached_property
    def classifier(self) -> DigitClassifier:
        state_dict, _ = load_asset(self.classifier_name)
        model = DigitClassifier()
        model.load_state_dict(state_dict)
        return model.eval()

    @cached_property
    def reference(self) -> dict:
        return load_asset(self.reference_name)[0]

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """``images`` in [0, 1], (N, 1, 32, 32); ``labels`` the requested classes. An image
        holding NaN or Inf is recognised as no class; any makes ``feature_fd`` NaN."""
        predicted, features = classify(self.classifier, images * 2 - 1)
        broken = ~torch.isfinite(images.flatten(1)).all(1).to(predicted.device)
        predicted = predicted.masked_fill(broken, -1)
        scores = {"class_accuracy": (predicted == labels.to(predicted.device)).float().mean().item(),
                  "num_samples": len(labels)}
        if len(labels) > 1:
            mu, cov = gaussian_stats(features)
            scores["feature_fd"] = frechet_distance(mu, cov, self.reference["mu"], self.reference["cov"])
        return scores
