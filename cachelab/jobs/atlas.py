"""``python run.py job=atlas``: one full-compute run shadowed by every candidate
(predictor family x order x interval N), the configured strategy audited in a real cached
run, and the atlas written into the run folder: arrays, heatmaps, error-vs-k and
derivative-error curves, a ranking per layer depth, ``report.md`` and ``metrics.json``."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from cachelab.analysis.atlas import Atlas, Candidate, ForecastAudit, nanmean
from cachelab.analysis.figures import heatmap_colormap, label_sites, log10_or_nan, png_bytes, pyplot
from cachelab.io import npz_bytes, write_bytes_atomic, write_json_atomic
from cachelab.core.schedules import Interval, StaticSchedule
from cachelab.jobs.base import observed_full_run

log = logging.getLogger(__name__)


class AtlasJob:
    """``predictors``: family name -> factory taking ``order`` (Hydra ``_partial_``);
    candidates are every family x ``orders`` x ``intervals`` (warm-up ``first_enhance``)."""

    def __init__(self, predictors: dict, orders: list[int], intervals: list[int], first_enhance: int,
                 derivative_orders: int = 3, num_images: int = 16, audit: bool = True):
        self.predictors, self.orders, self.intervals = dict(predictors), list(orders), list(intervals)
        self.first_enhance, self.derivative_orders, self.audit = first_enhance, derivative_orders, audit
        self.num_images = num_images

    def candidates(self) -> list[Candidate]:
        return [Candidate(f"{family}_o{order}_N{n}", factory(order=order), Interval(n, self.first_enhance))
                for family, factory in self.predictors.items() for order in self.orders for n in self.intervals]

    def run(self, cfg, adapter, strategy, sink, out_dir: Path) -> dict:
        T = adapter.num_steps
        inputs = adapter.make_inputs(self.num_images, cfg.seed)
        candidates = self.candidates()
        checked = strategy.predictor is not None and isinstance(strategy.schedule, StaticSchedule)
        if checked:
            candidates.append(Candidate("configured", strategy.predictor, strategy.schedule))
        atlas = Atlas(candidates, T, self.derivative_orders)
        observed_full_run(adapter, strategy.granularity, atlas, inputs, "atlas: full run" if cfg.progress else None)
        metrics = {"model": cfg.model.name, "granularity": strategy.granularity, "num_steps": T,
                   "num_images": self.num_images, "sites": atlas.sites,
                   "mean_forecast_error": {c.name: nanmean(atlas.error_map(c.name)) for c in candidates}}
        write_bytes_atomic(out_dir / "atlas.npz", npz_bytes(atlas.arrays()))
        title = f"{cfg.model.name}, {strategy.granularity} sites, {T} steps, n={self.num_images}"
        figures = {"atlas_heatmaps.png": self.heatmaps(atlas, title), "atlas_error_vs_k.png": self.error_vs_k(atlas, title),
                   "atlas_derivatives.png": self.derivative_curves(atlas, title)}
        if checked and self.audit:
            metrics["check"] = self.check(cfg, adapter, strategy, atlas, inputs, out_dir)
            figures["atlas_check.png"] = check_plot(metrics["check"], f"{strategy.name} (order {cfg.order}, "
                                                                      f"N={cfg.interval}) on {title}")
        for name, data in figures.items():
            write_bytes_atomic(out_dir / name, data)
            sink.log_image(f"atlas/{name[:-4]}", out_dir / name)
        ranking = self.ranking(atlas)
        metrics["ranking"] = ranking
        write_json_atomic(out_dir / "metrics.json", metrics)
        write_bytes_atomic(out_dir / "report.md", self.report(cfg, metrics, figures).encode())
        sink.summary({f"atlas/{k}": v for k, v in metrics["mean_forecast_error"].items()})
        log.info(ranking_markdown(ranking))
        return metrics

    def check(self, cfg, adapter, strategy, atlas: Atlas, inputs, out_dir: Path) -> dict:
        """The configured strategy in a real cached run, each forecast audited against the
        site's true output from the cached run's own inputs; the gap to the atlas per step."""
        audit = ForecastAudit(adapter.num_steps)
        handle = strategy.attach(adapter)
        handle.observe(audit, audit=True)
        try:
            adapter.generate(inputs, handle, progress="atlas: audited cached run" if cfg.progress else None)
        finally:
            handle.remove()
        predicted, measured = atlas.error_map("configured"), audit.error_map(atlas.sites)
        mask = strategy.schedule.mask(adapter.num_steps)
        steps = [s for s, full in enumerate(mask) if not full and s > mask.index(True)]
        write_bytes_atomic(out_dir / "atlas_check.npz", npz_bytes({"predicted": predicted, "measured": measured}))
        return {"steps": steps,
                "predicted": [nanmean(predicted[:, s]) for s in steps],
                "measured": [nanmean(measured[:, s]) for s in steps],
                "max_abs_gap": [float(np.nanmax(np.abs(predicted[:, s] - measured[:, s]))) for s in steps],
                "first_site_first_step": [float(predicted[0, steps[0]]), float(measured[0, steps[0]])]}

    # -- figures and tables --------------------------------------------------------------
    def _grid(self):
        rows = [(family, order) for family in self.predictors for order in self.orders]
        return rows, self.intervals

    def heatmap_intervals(self) -> list[int]:
        """The intervals the heatmaps show: the smallest, a middle one and the largest (all
        intervals are in ``atlas_error_vs_k.png`` and ``atlas.npz``)."""
        n = sorted(self.intervals)
        return sorted({n[0], n[len(n) // 2], n[-1]})

    def heatmaps(self, atlas: Atlas, title: str = "") -> bytes:
        """log10 relative forecast error, site x step: one row per family and order, a column
        per shown interval; grey where the candidate made no forecast (its full steps)."""
        plt = pyplot()
        rows, cols = self._grid()[0], self.heatmap_intervals()
        height = 1.2 + 0.12 * min(len(atlas.sites), 24)
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.4 * len(cols) + 2.2, height * len(rows) + 1.2),
                                 squeeze=False, sharex=True, sharey=True, layout="constrained")
        image = None
        for i, (family, order) in enumerate(rows):
            for j, n in enumerate(cols):
                errors = atlas.error_map(f"{family}_o{order}_N{n}")
                image = axes[i][j].imshow(log10_or_nan(errors), aspect="auto", cmap=heatmap_colormap("magma"),
                                          vmin=-3, vmax=0.5, interpolation="nearest")
                axes[i][j].set_title(f"{family} order {order}, N={n}", fontsize=9)
        for ax in axes[-1]:
            ax.set_xlabel("denoising step s", fontsize=9)
        for ax in axes[:, 0]:
            label_sites(ax, atlas.sites, max_labels=12)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="log10 relative forecast error")
        fig.suptitle(f"Atlas: forecast error per site and step{': ' + title if title else ''}\n"
                     f"grey columns: the candidate's full steps (computed, nothing forecast); "
                     f"N in {cols} of {sorted(self.intervals)} shown", fontsize=10)
        return png_bytes(fig)

    def error_vs_k(self, atlas: Atlas, title: str = "") -> bytes:
        """Mean relative error against k = steps since the last full step, per N and order."""
        plt = pyplot()
        fig, axes = plt.subplots(1, len(self.intervals), figsize=(3 * len(self.intervals), 3.4), squeeze=False,
                                 sharey=True, layout="constrained")
        for ax, n in zip(axes[0], self.intervals):
            for family, order in self._grid()[0]:
                name = f"{family}_o{order}_N{n}"
                by_k = errors_by_offset(atlas.error_map(name), atlas.masks[name])
                ax.plot(list(by_k), list(by_k.values()), marker="o", label=f"{family} order {order}")
            ax.set_yscale("log")
            ax.set_title(f"N = {n}", fontsize=9)
            ax.set_xlabel("k (steps since the last full step)", fontsize=8)
            ax.set_xticks(list(by_k))  # k is a whole number of steps
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("mean relative forecast error")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"Forecast error against distance from the last full step{': ' + title if title else ''}",
                     fontsize=10)
        return png_bytes(fig)

    def derivative_curves(self, atlas: Atlas, title: str = "") -> bytes:
        """Mean relative error of D_i against the dense derivative, per order i, against N."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
        family = next(iter(self.predictors))
        top = max(self.orders)
        for i in range(1, min(self.derivative_orders, top) + 1):
            values = [nanmean(atlas.derivative_map(f"{family}_o{top}_N{n}", i)) for n in self.intervals]
            ax.plot(self.intervals, values, marker="o", label=f"D{i}")
        ax.set_yscale("log")
        ax.set_xlabel("interval N (steps between full steps)")
        ax.set_ylabel("mean rel. error of D_i vs Δ^i F")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="factor")
        ax.set_title(f"Finite-difference factors of {family} order {top}\n{title}", fontsize=9)
        return png_bytes(fig)

    def ranking(self, atlas: Atlas) -> list[dict]:
        """Per layer depth and N: candidates sorted by mean forecast error."""
        depths = [site_depth(site) for site in atlas.sites]
        rows = []
        for depth in sorted(set(depths), key=lambda d: (d is None, d)):
            index = [i for i, d in enumerate(depths) if d == depth]
            for n in self.intervals:
                scores = {f"{family} o{order}": nanmean(atlas.error_map(f"{family}_o{order}_N{n}")[index])
                          for family, order in self._grid()[0]}
                ranked = sorted(scores.items(), key=lambda item: item[1])
                rows.append({"depth": depth, "N": n, "ranked": ranked})
        return rows

    def report(self, cfg, metrics: dict, figures: dict) -> str:
        lines = [f"# Atlas: {cfg.model.name}, {metrics['granularity']} sites, {metrics['num_steps']} steps, "
                 f"{metrics['num_images']} images", "",
                 "Relative L2 error of each candidate's forecast against the full run's feature, from the history "
                 "it would have had under its schedule (one full-compute run). `atlas.npz` holds the arrays.", "",
                 ranking_markdown(metrics["ranking"]), ""]
        if "check" in metrics:
            check = metrics["check"]
            lines += ["## Check against a real cached run (the configured strategy)", "",
                      "| step | atlas | measured | max site gap |", "| --- | --- | --- | --- |"]
            lines += [f"| {s} | {p:.4g} | {m:.4g} | {g:.3g} |"
                      for s, p, m, g in zip(check["steps"], check["predicted"], check["measured"], check["max_abs_gap"])]
            lines.append("")
        lines += [f"![{name}]({name})" for name in figures]
        return "\n".join(lines) + "\n"


def site_depth(site: str) -> int | None:
    """The block index in a site name (``blocks.3.attn`` -> 3); None for the model output."""
    match = re.search(r"\.(\d+)(\.|$)", site)
    return int(match.group(1)) if match else None


def errors_by_offset(errors: np.ndarray, mask: list[bool]) -> dict[int, float]:
    """Mean over sites and steps of the errors ``k`` steps after the last full step."""
    offsets, last = {}, None
    for s, full in enumerate(mask):
        if full:
            last = s
        elif last is not None:
            offsets.setdefault(s - last, []).append(s)
    return {k: nanmean(errors[:, steps]) for k, steps in sorted(offsets.items())}


def ranking_markdown(ranking: list[dict]) -> str:
    lines = ["| depth | N | best | 2nd | worst |", "| --- | --- | --- | --- | --- |"]
    for row in ranking:
        ranked = row["ranked"]
        cell = lambda item: f"{item[0]} ({item[1]:.3g})"  # noqa: E731
        depth = "output" if row["depth"] is None else row["depth"]
        lines.append(f"| {depth} | {row['N']} | {cell(ranked[0])} | "
                     f"{cell(ranked[1]) if len(ranked) > 1 else ''} | {cell(ranked[-1])} |")
    return "\n".join(lines)


def check_plot(check: dict, title: str = "") -> bytes:
    """The configured strategy's forecast error per step: the atlas's against a real cached run's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    ax.plot(check["steps"], check["predicted"], marker="o", label="atlas (full-run inputs)")
    ax.plot(check["steps"], check["measured"], marker="x", label="measured (cached run)")
    ax.set_yscale("log")
    ax.set_xlabel("forecast step s")
    ax.set_ylabel("mean rel. forecast error over sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Atlas check: {title}", fontsize=9, wrap=True)
    return png_bytes(fig)
