"""Matplotlib without a display, and figures as PNG bytes (written atomically by the caller)."""
from __future__ import annotations

import io

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """Render ``fig`` to PNG bytes at its own dpi and close it."""
    buffer = io.BytesIO()
    if fig.get_layout_engine() is None and fig.axes:  # a figure of placed pixels (figimage) keeps its layout
        fig.tight_layout()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()


MISSING_COLOR = "0.85"  # light grey: a heatmap cell with no value (NaN), said in each figure's caption


def heatmap_colormap(name: str):
    """``name`` with NaN cells drawn in :data:`MISSING_COLOR` (not white, not a value's colour)."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=MISSING_COLOR)


def log10_or_nan(values) -> np.ndarray:
    """log10 of positive values; NaN (drawn as missing) where a value is NaN, zero or negative."""
    values = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def label_sites(ax, sites: list[str], max_labels: int = 16, fontsize: float = 8) -> None:
    """Y tick labels for a site x step heatmap: every site when they fit, else every k-th
    (the axis label says so)."""
    step = max(1, -(-len(sites) // max_labels))
    ax.set_yticks(range(0, len(sites), step), [str(s) for s in sites[::step]], fontsize=fontsize)
    ax.set_ylabel("site" if step == 1 else f"site (every {step}th of {len(sites)})", fontsize=fontsize + 1)
