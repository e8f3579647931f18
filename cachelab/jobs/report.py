"""What a run shows a person: the comparison grid and the console table."""
from __future__ import annotations

import torch
from torchvision.utils import make_grid

from cachelab.evaluation.metrics import as_rgb


def comparison_grid(baseline: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """(3, H', W'): one row per sample, columns baseline | cached | |baseline - cached|."""
    baseline, cached = as_rgb(baseline), as_rgb(cached)
    rows = torch.stack([baseline, cached, (baseline - cached).abs()], dim=1).flatten(0, 1)
    return make_grid(rows, nrow=3, padding=2, pad_value=1.0)


def summary_table(m: dict) -> str:
    """A short fixed-width table of one run's metrics."""

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("model", f"{m['model']} ({m['model_weights']})"),
        ("strategy", f"{m['strategy']} / {m['granularity']}  order={m['order']} N={m['interval']} "
                     f"first_enhance={m['first_enhance']}"),
        ("full steps", f"{m['num_full']}/{m['num_steps']}  {m['full_steps']}"),
        ("FLOPs", f"{fmt(m['flops']['baseline'], '.3e')} -> {fmt(m['flops']['cached'], '.3e')}  "
                  f"speedup {fmt(m['flops']['speedup'], '.2f')}x"),
        ("wall", f"{m['wall_s']['baseline']:.2f}s -> {m['wall_s']['cached']:.2f}s  "
                 f"speedup {m['wall_s']['speedup']:.2f}x"),
        ("efficiency", fmt(m["efficiency"], ".2f") + "  (wall speedup / FLOPs speedup)"),
        ("cache", f"{m['cache_bytes'] / 2**20:.2f} MiB"),
        ("rel-L2", f"{m['quality']['rel_l2']:.4g}  (model output vs full compute)"),
        ("PSNR / SSIM", f"{m['quality']['psnr_db']:.2f} dB / {m['quality']['ssim']:.4f}  (images vs full compute)"),
    ]
    for key in m["model_quality"]["baseline"]:
        if key != "num_samples":
            base, cached = m["model_quality"]["baseline"][key], m["model_quality"]["cached"][key]
            rows.append((key, f"{base:.4g} -> {cached:.4g}  (baseline -> cached, "
                              f"n={m['model_quality']['cached']['num_samples']})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def per_step_plot(m: dict) -> bytes:
    """PNG: rel-L2 of the cached trajectory against the baseline after every step, full steps marked."""
    from analysis.figures import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    errors = m["per_step_rel_l2"]
    ax.plot(range(len(errors)), errors, color="C0", label="cached vs baseline x_s")
    full = [s for s in m["full_steps"] if s < len(errors)]
    ax.scatter(full, [errors[s] for s in full], color="C3", s=12, zorder=3, label="full step")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def run_report(config_yaml: str, m: dict, images: list[str]) -> str:
    """Markdown for the run folder: the table, the images, the composed config."""
    lines = [f"# {m['model']} / {m['strategy']} (order {m['order']}, N = {m['interval']})", "",
             "```", summary_table(m), "```", ""]
    lines += [f"![{name}]({name})" for name in images]
    lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
