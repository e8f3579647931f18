"""Feature trajectories: per site and step, how a full-compute run's features move.

``python run.py job=trajectory`` records, for every site (of the strategy's granularity)
and step: the norm, the relative change against the previous step, the cosine to the previous
step and the relative second difference ``||F_s - 2F_{s-1} + F_{s-2}|| / ||F_{s-1}||`` (what a
first-order forecast cannot follow). Memory stays bounded: two previous values per site.
With ``sketch_dim > 0`` each feature is also projected on a fixed Gaussian matrix to
``sketch_dim`` numbers (Johnson-Lindenstrauss), and a PCA over the steps of these sketches
gives each site's path in 2-D; its cost is ``T x sketch_dim`` floats per site plus one
``numel x sketch_dim`` projection matrix per feature size (stated in metrics.json).
"""
from __future__ import annotations

import numpy as np
import torch

from cachelab.analysis.figures import heatmap_colormap, label_sites, log10_or_nan, pyplot
from cachelab.core.outputs import Parts

STATISTICS = ("norm", "rel_change", "cosine", "rel_second_difference")


class TrajectoryRecorder:
    """A site observer (``handle.observe``) for a full-compute run; the site's outputs and
    CFG contexts are concatenated into one feature vector per step."""

    def __init__(self, T: int, sketch_dim: int = 0, seed: int = 0):
        self.T, self.sketch_dim, self.seed = T, sketch_dim, seed
        self.sites: list[str] = []
        self.stats: dict[str, dict[str, np.ndarray]] = {}
        self.sketches: dict[str, np.ndarray] = {}
        self._previous: dict[str, list[torch.Tensor]] = {}
        self._projections: dict[int, torch.Tensor] = {}
        self._pending: dict[tuple[str, int], list[torch.Tensor]] = {}

    def full(self, site: str, context: str, s: int, values: Parts) -> None:
        if site not in self.sites:
            self.sites.append(site)
            self.stats[site] = {name: np.full(self.T, np.nan) for name in STATISTICS}
        feature = torch.cat([v.detach().double().flatten() for v in values if v is not None])
        previous = self._previous.setdefault(site + "|" + context, [])
        self._record(site + "|" + context, site, s, feature, previous)

    def forecast(self, site: str, context: str, s: int, forecast: Parts, true: Parts | None) -> None:
        raise RuntimeError("trajectories are recorded from a full-compute run (schedule=always)")

    def _record(self, key: str, site: str, s: int, feature: torch.Tensor, previous: list) -> None:
        stats = self.stats[site]
        norm = float(feature.norm())
        stats["norm"][s] = _combine(stats["norm"][s], norm)
        if previous:
            last = previous[-1]
            stats["rel_change"][s] = float((feature - last).norm() / last.norm())
            stats["cosine"][s] = float(torch.dot(feature, last) / (feature.norm() * last.norm()))
            if len(previous) == 2:
                stats["rel_second_difference"][s] = float((feature - 2 * last + previous[0]).norm() / last.norm())
        previous.append(feature)
        del previous[:-2]
        if self.sketch_dim:
            sketch = self.sketches.setdefault(key, np.full((self.T, self.sketch_dim), np.nan))
            sketch[s] = (feature.float() @ self._projection(feature.numel())).numpy()

    def _projection(self, numel: int) -> torch.Tensor:
        if numel not in self._projections:
            generator = torch.Generator().manual_seed(self.seed + numel)
            self._projections[numel] = torch.randn(numel, self.sketch_dim, generator=generator) / self.sketch_dim**0.5
        return self._projections[numel]

    @property
    def sketch_bytes(self) -> int:
        """Memory held for the PCA sketches (projection matrices included)."""
        return sum(p.numel() * 4 for p in self._projections.values()) + sum(a.nbytes for a in self.sketches.values())

    def pca(self, components: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per site (and context): the sketches' top principal components over the steps,
        (T, components), and the fraction of the variance each explains."""
        out = {}
        for key, sketch in self.sketches.items():
            centered = sketch - np.nanmean(sketch, axis=0)
            u, singular, _ = np.linalg.svd(np.nan_to_num(centered), full_matrices=False)
            variance = singular**2
            out[key] = (u[:, :components] * singular[:components],
                        variance[:components] / variance.sum() if variance.sum() > 0 else np.zeros(components))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"sites": np.array(self.sites)}
        for name in STATISTICS:
            out[name] = np.stack([self.stats[site][name] for site in self.sites])
        for key, (path, explained) in self.pca().items():
            out[f"pca/{key}"] = path
            out[f"pca_explained/{key}"] = explained
        return out


def _combine(current: float, norm: float) -> float:
    """Norm of the concatenation over contexts: sqrt(a² + b²)."""
    return norm if np.isnan(current) else float(np.hypot(current, norm))


PANELS = {  # statistic -> (what the panel shows, the value drawn)
    "norm": ("||F_s||", lambda v: v),
    "rel_change": ("||F_s - F_{s-1}|| / ||F_{s-1}||", lambda v: v),
    "rel_second_difference": ("||F_s - 2F_{s-1} + F_{s-2}|| / ||F_{s-1}||", lambda v: v),
    "cosine": ("1 - cos(F_s, F_{s-1})", lambda v: 1 - v),
}


def statistics_figure(arrays: dict, title: str = ""):
    """Figure: one site x step heatmap (log10) per statistic, the norm first, sites labelled on each."""
    plt = pyplot()
    sites = list(arrays["sites"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 4.0 + 0.16 * min(len(sites), 40)), layout="constrained")
    for ax, (name, (formula, value)) in zip(axes.ravel(), PANELS.items()):
        image = ax.imshow(log10_or_nan(value(arrays[name])), aspect="auto", cmap=heatmap_colormap("viridis"),
                          interpolation="nearest")
        ax.set_title(f"log10 {formula}", fontsize=10)
        ax.set_xlabel("denoising step s", fontsize=9)
        label_sites(ax, sites)
        fig.colorbar(image, ax=ax, shrink=0.9, label="log10")
    fig.suptitle(f"Feature trajectories{': ' + title if title else ''}\n"
                 "grey: not defined (no previous step, or a change of exactly 0)", fontsize=10)
    return fig


def pca_figure(pca: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "", max_sites: int = 12):
    """Figure: each site's path over the steps in the plane of its two principal components
    (axes labelled with the variance each explains), coloured by step."""
    plt = pyplot()
    keys = list(pca)[:: max(1, -(-len(pca) // max_sites))][:max_sites]
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 3.1 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes.ravel(), keys):
        path, explained = pca[key]
        ax.plot(path[:, 0], path[:, 1], color="0.7", linewidth=0.8)
        points = ax.scatter(path[:, 0], path[:, 1], c=np.arange(len(path)), cmap="plasma", s=12)
        ax.annotate("s=0", path[0], fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_title(key.replace("|", ", context "), fontsize=9)
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f} % of variance)", fontsize=8)
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f} %)" if len(explained) > 1 else "PC2", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.colorbar(points, ax=axes.ravel().tolist(), shrink=0.6, label="denoising step s")
    shown = f"{len(keys)} of {len(pca)} sites" if len(keys) < len(pca) else f"{len(keys)} sites"
    fig.suptitle(f"PCA paths of the sketched features ({shown}){': ' + title if title else ''}", fontsize=10)
    return fig
