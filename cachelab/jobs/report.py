"""What a run shows a person: the comparison grid and the console table."""
from __future__ import annotations

import math

import torch
from torchvision.utils import make_grid

from cachelab.evaluation.metrics import as_rgb


def diff_scale(difference: torch.Tensor) -> tuple[int, float]:
    """The power of two ``k`` (>= 1) that brings the 99th percentile of |difference| (returned
    too) to at most 1: the typical difference is visible, the largest ones saturate."""
    typical = float(torch.quantile(difference.flatten().float()[:2**24], 0.99)) if difference.numel() else 0.0
    return (2 ** max(0, math.floor(math.log2(1 / typical))) if typical > 0 else 1), typical


def comparison_grid(baseline: torch.Tensor, cached: torch.Tensor, title: str = ""):
    """Figure (pixels 1:1, small images enlarged by an integer factor): one row per sample,
    columns baseline | cached | |baseline - cached| × k, with k and the difference's 99th
    percentile and maximum printed above them."""
    from cachelab.analysis.figures import pyplot

    baseline, cached = as_rgb(baseline), as_rgb(cached)
    difference = (baseline - cached).abs()
    k, typical = diff_scale(difference)
    zoom = max(1, 96 // baseline.shape[-2])  # 32-pixel digits are shown 3x
    columns = [make_grid(x.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1), nrow=1, padding=2, pad_value=1.0)
               for x in (baseline, cached, (difference * k).clamp(0, 1))]
    width = max(columns[0].shape[-1], 130)  # room for each column's header
    header, dpi = 80, 100
    total = (3 * width + 20, columns[0].shape[-2] + header + 6)
    fig = pyplot().figure(figsize=(max(total[0], 480) / dpi, total[1] / dpi), dpi=dpi, layout="none",
                          facecolor="white")
    left = (fig.bbox.width - 3 * width) / 2
    largest = float(difference.max()) if difference.numel() else 0.0
    headers = ["baseline (full)", "cached", f"|diff| × {k}" if k > 1 else "|diff|"]
    for i, (column, name) in enumerate(zip(columns, headers)):
        x = left + i * width + (width - column.shape[-1]) / 2
        fig.figimage((column.permute(1, 2, 0).numpy() * 255).round().astype("uint8"), xo=round(x), yo=6,
                     origin="upper")
        fig.text((left + (i + 0.5) * width) / fig.bbox.width, (columns[0].shape[-2] + 12) / fig.bbox.height, name,
                 ha="center", va="bottom", fontsize=10, weight="bold")
    note = (f"|diff| × {k}, clipped at 1 (pixel range 0..1): 99th percentile {typical:.3g}, max {largest:.3g}"
            if largest > 0 else "identical images: |diff| is 0 everywhere")
    fig.text(0.5, 1 - 4 / fig.bbox.height, f"{title}\n{note}" if title else note, ha="center", va="top", fontsize=8.5,
             wrap=True)
    return fig


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
                     f"first_enhance={m['first_enhance']}" + (f"  tokens={m['tokens']}" if m.get("tokens") else "")),
        ("full steps", f"{m['num_full']}/{m['num_steps']}  {m['full_steps']}"),
        *((f"  {name}", f"{e['num_full']}/{e['num_full'] + e['num_forecast']} of its steps full  {e['full_steps']}  "
                        f"cache {e['cache_bytes'] / 2**20:.2f} MiB") for name, e in m.get("experts", {}).items()),
        ("FLOPs", f"{fmt(m['flops']['baseline'], '.3e')} -> {fmt(m['flops']['cached'], '.3e')}  "
                  f"speedup {fmt(m['flops']['speedup'], '.2f')}x"),
        ("wall", f"{fmt(m['wall_s']['baseline'], '.2f')}s -> {fmt(m['wall_s']['cached'], '.2f')}s  "
                 f"speedup {fmt(m['wall_s']['speedup'], '.2f')}x"),
        ("efficiency", fmt(m["efficiency"], ".2f") + "  (wall speedup / FLOPs speedup)"),
        ("cache", f"{m['cache_bytes'] / 2**20:.2f} MiB" + ("  (the most held at once)" if m.get("experts") else "")
                  + site_range(m.get("site_bytes"))),
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


def site_range(site_bytes: dict[str, int] | None) -> str:
    """``  (12 sites, 0.25..1.50 MiB each)`` from a run's per-site peaks ('' without any)."""
    if not site_bytes:
        return ""
    low, high = min(site_bytes.values()) / 2**20, max(site_bytes.values()) / 2**20
    return f"  ({len(site_bytes)} sites, {low:.2f}..{high:.2f} MiB each)"


def run_title(m: dict) -> str:
    """``model: strategy (granularity, order, N), T steps, n images`` from a run's metrics."""
    return (f"{m['model']}: {m['strategy']} ({m['granularity']}, order {m['order']}, N={m['interval']}), "
            f"{m['num_steps']} steps, n={m['num_images']}")


def per_step_plot(m: dict):
    """Figure: rel-L2 of the cached trajectory against the baseline after every step, full steps marked."""
    from cachelab.analysis.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    ax.set_title(f"Cached vs full-compute trajectory\n{run_title(m)}", fontsize=9)
    errors = [math.nan if e is None else e for e in m["per_step_rel_l2"]]  # null: not finite
    ax.plot(range(len(errors)), errors, color="C0", label="cached vs baseline x_s")
    full = [s for s in m["full_steps"] if s < len(errors)]
    ax.scatter(full, [errors[s] for s in full], color="C3", s=12, zorder=3, label="full step")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("denoising step s")
    ax.set_ylabel("rel. L2 of x_s (cached vs baseline)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run_report(config_yaml: str, m: dict, images: list[str]) -> str:
    """Markdown for the run folder: the table, the images, the composed config."""
    lines = [f"# {m['model']} / {m['strategy']} (order {m['order']}, N = {m['interval']})", "",
             "```", summary_table(m), "```", ""]
    lines += [f"![{name}]({name})" for name in images]
    lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
