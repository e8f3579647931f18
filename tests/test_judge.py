"""The shipped digit judge: hash-checked loading, accuracy, and the Fréchet distance."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from cachelab import assets
from cachelab.assets import load_asset, read_manifest
from cachelab.errors import AssetCorrupt
from cachelab.evaluation.digits import load_digits32
from cachelab.evaluation.judge import DigitJudge, frechet_distance, gaussian_stats


def test_frechet_distance_against_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(300, 6, generator=g,
                                                                              dtype=torch.float64)
    mu1, c1 = gaussian_stats(a @ torch.randn(6, 6, generator=g, dtype=torch.float64))
    mu2, c2 = gaussian_stats(b + 0.5)
    m1, s1, m2, s2 = (t.numpy() for t in (mu1, c1, mu2, c2))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-8)


def test_shipped_classifier_is_accurate_on_held_out_digits():
    images, labels = load_digits32("heldout")
    judge = DigitJudge()
    scores = judge.evaluate((images + 1) / 2, labels)
    assert scores["class_accuracy"] >= 0.97
    assert scores["class_accuracy"] == pytest.approx(read_manifest("digit_classifier")["heldout_accuracy"])


def test_feature_fd_real_vs_real_is_small_and_noise_is_far():
    images, labels = load_digits32("all")
    judge = DigitJudge()
    real = judge.evaluate((images + 1) / 2, labels)["feature_fd"]
    noise = judge.evaluate(torch.rand(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
                           labels[:1000])["feature_fd"]
    assert real == pytest.approx(0, abs=1e-3)
    assert noise > 1000 * max(real, 1e-3)


def test_corrupt_or_missing_asset_is_named(tmp_path, monkeypatch):
    for name in ("digit_classifier.pt", "digit_classifier.json"):
        shutil.copy(assets.ASSETS_DIR / name, tmp_path / name)
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    load_asset("digit_classifier")
    data = bytearray((tmp_path / "digit_classifier.pt").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "digit_classifier.pt").write_bytes(bytes(data))
    with pytest.raises(AssetCorrupt, match="digit_classifier.pt has sha256"):
        load_asset("digit_classifier")
    (tmp_path / "digit_classifier.pt").unlink()
    with pytest.raises(AssetCorrupt, match="missing"):
        load_asset("digit_classifier")
    with pytest.raises(AssetCorrupt, match="available: digit_classifier"):
        load_asset("nope")
