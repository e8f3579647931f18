"""``python run.py job=trajectory``: one full-compute run whose sites are recorded by
:class:`cachelab.analysis.trajectory.TrajectoryRecorder`; arrays, figures, report and metrics.json."""
from __future__ import annotations

from pathlib import Path

from cachelab.analysis.atlas import nanmean
from cachelab.analysis.figures import png_bytes
from cachelab.analysis.trajectory import STATISTICS, TrajectoryRecorder, pca_figure, statistics_figure
from cachelab.io import npz_bytes, write_bytes_atomic, write_json_atomic
from cachelab.jobs.base import observed_full_run


class TrajectoryJob:
    """``python run.py job=trajectory``: one full run, recorded; arrays, figures, report."""

    def __init__(self, num_images: int = 16, sketch_dim: int = 32):
        self.num_images, self.sketch_dim = num_images, sketch_dim

    def run(self, cfg, adapter, strategy, sink, out_dir: Path) -> dict:
        recorder = TrajectoryRecorder(adapter.num_steps, self.sketch_dim, seed=cfg.seed)
        observed_full_run(adapter, strategy.granularity, recorder, adapter.make_inputs(self.num_images, cfg.seed),
                          "trajectory: full run" if cfg.progress else None)
        arrays = recorder.arrays()
        write_bytes_atomic(out_dir / "trajectory.npz", npz_bytes(arrays))
        title = (f"{cfg.model.name}, {strategy.granularity} sites, full compute, {adapter.num_steps} steps, "
                 f"n={self.num_images}")
        figures = {"trajectory_statistics.png": png_bytes(statistics_figure(arrays, title))}
        if self.sketch_dim:
            figures["trajectory_pca.png"] = png_bytes(pca_figure(recorder.pca(), title))
        for name, data in figures.items():
            write_bytes_atomic(out_dir / name, data)
            sink.log_image(f"trajectory/{name[:-4]}", out_dir / name)
        per_step = {name: [nanmean(column) for column in arrays[name].T] for name in STATISTICS}
        metrics = {"model": cfg.model.name, "granularity": strategy.granularity, "num_images": self.num_images,
                   "sites": recorder.sites, "mean_over_sites": per_step, "sketch_bytes": recorder.sketch_bytes}
        for s in range(adapter.num_steps):
            sink.log({f"trajectory/{name}": per_step[name][s] for name in STATISTICS}, step=s)
        write_json_atomic(out_dir / "metrics.json", metrics)
        report = [f"# Feature trajectories: {cfg.model.name}, {strategy.granularity} sites", "",
                  "Per site and step (full-compute run): norm, relative change and cosine to the previous step, "
                  "relative second difference. `trajectory.npz` holds the (site, step) arrays.", ""]
        report += [f"![{name}]({name})" for name in figures]
        write_bytes_atomic(out_dir / "report.md", ("\n".join(report) + "\n").encode())
        return metrics
