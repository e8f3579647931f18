"""What a run shows a person: the comparison grid and the console table."""
from __future__ import annotations

import math

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

    def fmt(value, spec):  # None (null in metrics.json), NaN and Inf: n/a
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "n/a"
        return format(value, spec)

    order = f"order={m['order']}"
    if m.get("order_reached") and m["order_reached"]["max"] != m["order"]:
        reached = m["order_reached"]
        order += f" (reached {reached['min']}" + (f"..{reached['max']})" if reached["min"] != reached["max"] else ")")
    rows = [
        ("model", f"{m['model']} ({m['model_weights']})"),
        ("strategy", f"{m['strategy']} / {m['granularity']}  {order} N={m['interval']} "
                     f"first_enhance={m['first_enhance']}"),
        ("full steps", f"{m['num_full']}/{m['num_steps']}  {m['full_steps']}"),
        ("FLOPs", f"{fmt(m['flops']['baseline'], '.3e')} -> {fmt(m['flops']['cached'], '.3e')}  "
                  f"speedup {fmt(m['flops']['speedup'], '.2f')}x"),
        ("wall", f"{fmt(m['wall_s']['baseline'], '.2f')}s -> {fmt(m['wall_s']['cached'], '.2f')}s  "
                 f"speedup {fmt(m['wall_s']['speedup'], '.2f')}x"),
        ("efficiency", fmt(m["efficiency"], ".2f") + "  (wall speedup / FLOPs speedup)"),
        ("cache", f"{m['cache_bytes'] / 2**20:.2f} MiB"),
        ("rel-L2", f"{fmt(m['quality']['rel_l2'], '.4g')}  (model output vs full compute)"),
        ("PSNR / SSIM", f"{fmt(m['quality']['psnr_db'], '.2f')} dB / {fmt(m['quality']['ssim'], '.4f')}  "
                        f"(images vs full compute)"),
    ]
    if m.get("guard_fallbacks"):
        rows.append(("guard", f"{m['guard_fallbacks']} site forecasts held NaN/Inf and were computed instead"))
    baseline, cached = m["model_quality"]["baseline"], m["model_quality"]["cached"]
    for key in [*baseline, *(k for k in cached if k not in baseline)]:
        if key != "num_samples":
            rows.append((key, f"{fmt(baseline.get(key), '.4g')} -> {fmt(cached.get(key), '.4g')}  "
                              f"(baseline -> cached, n={cached.get('num_samples')})"))
    if m.get("non_finite"):
        flags = [f"{key}={value}" for key, value in m["non_finite"].items()]
        more = f", ... ({len(flags)} in all)" if len(flags) > 6 else ""
        rows.append(("non-finite", ", ".join(flags[:6]) + more + "  (null in metrics.json)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def per_step_plot(m: dict) -> bytes:
    """PNG: rel-L2 of the cached trajectory against the baseline after every step, full steps marked."""
    from analysis.figures import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    errors = [math.nan if e is None else e for e in m["per_step_rel_l2"]]  # null: not finite
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
