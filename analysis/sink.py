"""Where a run's measurements go besides metrics.json (W&B lives in analysis/)."""
from __future__ import annotations

from pathlib import Path


class Sink:
    """A logger that drops everything (``logger=none``); subclasses send it somewhere."""

    def start(self, name: str, config: dict, out_dir: Path) -> None:
        """Open the run."""

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Per-step values, ``/``-namespaced keys."""

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        """An image file written by the run."""

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. a sweep's results)."""

    def summary(self, metrics: dict) -> None:
        """Final values of the run."""

    def artifact(self, kind: str, paths: list[Path], metadata: dict | None = None) -> None:
        """Files the run's numbers come from (samples, grids), kept with the run."""

    def finish(self, failed: bool = False) -> None:
        """Close the run; always called."""
