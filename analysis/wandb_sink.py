"""Weights & Biases sink: online with an API key, offline (no network) otherwise."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from analysis.sink import Sink


class WandbSink(Sink):
    """Logs a run to W&B; ``mode`` null picks online when an API key is set, else offline."""

    def __init__(self, project: str = "cachelab", mode: str | None = None, group: str | None = None,
                 tags: list[str] | None = None):
        self.project, self.mode, self.group, self.tags = project, mode, group, list(tags or [])
        self.run = None

    def start(self, name: str, config: dict, out_dir: Path) -> None:
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=self.project, name=name, group=self.group, tags=self.tags, config=config,
                              dir=str(out_dir), mode=mode, reinit="finish_previous")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path), caption=caption)})

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        finite = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row] for row in rows]
        self.run.log({key: wandb.Table(columns=columns, data=finite, allow_mixed_types=True)})

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self, failed: bool = False) -> None:
        """Mark the run finished (exit code 1 when the job failed or was interrupted). Called
        from ``finally`` blocks, also while an error or an interrupt is on its way out: a
        failure to finish is a warning, never a new error in its place."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # noqa: BLE001
            print(f"warning: the W&B run was not finished cleanly: {type(err).__name__}: {err}", file=sys.stderr)
