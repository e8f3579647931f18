"""Figures carry what a reader needs: titles naming the run, labelled axes, readable site labels,
a scaled |diff| column with its scale printed, PC axes with their explained variance."""
from __future__ import annotations

import numpy as np
import torch

from cachelab.analysis.figures import label_sites, png_bytes, pyplot
from cachelab.analysis.sweep import pareto_plot
from cachelab.analysis.trajectory import STATISTICS, pca_figure, statistics_figure
from cachelab.jobs.report import comparison_grid, diff_scale, per_step_plot


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_the_grid_has_column_headers_and_a_printed_scale():
    baseline = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    cached = (baseline + 0.01).clamp(0, 1)
    k, typical = diff_scale((baseline - cached).abs())
    assert k == 64 and abs(typical - 0.01) < 1e-6  # 0.01 x 64 = 0.64: visible, not saturated
    fig = comparison_grid(baseline, cached, "tiny: taylor")
    shown = texts(fig)
    assert {"baseline (full)", "cached", "|diff| × 64"} <= set(shown)
    assert any("tiny: taylor" in t and "99th percentile" in t for t in shown)
    png = png_bytes(fig)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert height > 3 * 3 * 32 + 60 and width >= 3 * 96  # digits enlarged 3x, a header band above them


def test_identical_images_say_so():
    image = torch.rand(2, 3, 8, 8)
    assert diff_scale(torch.zeros_like(image)) == (1, 0.0)
    assert any("identical" in t for t in texts(comparison_grid(image, image)))


def test_per_step_plot_names_the_run():
    m = {"model": "tiny", "strategy": "taylor", "granularity": "module", "order": 2, "interval": 5, "num_steps": 3,
         "num_images": 8, "per_step_rel_l2": [0.0, 0.1, None], "full_steps": [0]}
    ax = per_step_plot(m).axes[0]
    assert "tiny: taylor (module, order 2, N=5), 3 steps, n=8" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()


def test_pareto_points_are_labelled_and_the_title_names_model_and_n():
    rows = [{"model": "tiny", "strategy": "taylor", "order": 2, "interval": n, "num_steps": 10, "num_images": 8,
             "flops": {"speedup": 1 + n / 2}, "quality": {"psnr_db": 40 - n}} for n in (2, 3, 5)]
    ax = pareto_plot(rows, ("quality", "psnr_db"), "PSNR (dB)").axes[0]
    assert {"N=2", "N=3", "N=5"} <= {t.get_text() for t in ax.texts}
    assert "model tiny" in ax.get_title() and "n=8" in ax.get_title() and "3 jobs" in ax.get_title()
    assert "FLOPs speedup" in ax.get_xlabel() and ax.get_legend() is not None


def test_trajectory_figures_have_a_norm_panel_site_labels_and_pc_variance():
    sites = [f"blocks.{i}.attn" for i in range(5)]
    arrays = {"sites": np.array(sites), **{name: np.random.default_rng(0).random((5, 6)) + 0.1 for name in STATISTICS}}
    arrays["rel_change"][:, 0] = np.nan
    fig = statistics_figure(arrays, "tiny")
    assert "||F_s||" in fig.axes[0].get_title()
    for ax in fig.axes[:4]:  # every panel labels its sites
        assert [t.get_text() for t in ax.get_yticklabels()] == sites
    path = np.random.default_rng(1).random((6, 2))
    fig = pca_figure({"blocks.0.attn|cond": (path, np.array([0.8, 0.15]))}, "tiny")
    assert fig.axes[0].get_xlabel() == "PC1 (80.0 % of variance)" and "15.0 %" in fig.axes[0].get_ylabel()


def test_many_sites_are_labelled_every_kth():
    fig, ax = pyplot().subplots()
    sites = [f"s{i}" for i in range(50)]
    label_sites(ax, sites, max_labels=16)
    assert len(ax.get_yticklabels()) <= 16 and "every 4th of 50" in ax.get_ylabel()
    pyplot().close(fig)
