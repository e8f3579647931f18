"""Weights & Biases sink: online with an API key, offline (no network) otherwise."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from cachelab.analysis.sink import Sink

log = logging.getLogger(__name__)

REFERENCE_BYTES = 16 * 2**20  # larger artifact files are logged by reference, not copied


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
                              dir=str(out_dir), mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(silent=True))  # W&B's own ~25 lines: the one below instead
        log.info(f"W&B {mode} run: {self.run.url if mode == 'online' else Path(self.run.dir).parent}")

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

    def artifact(self, kind: str, paths: list[Path], metadata: dict | None = None) -> None:
        """One artifact ``<kind>-<run id>`` of type ``kind`` logged by the run (its lineage ties it to
        the run's metrics); files above ``REFERENCE_BYTES`` by reference (``file://``, not copied)."""
        import wandb

        artifact = wandb.Artifact(f"{kind}-{self.run.id}", type=kind, metadata=metadata)
        for path in map(Path, paths):
            if path.stat().st_size > REFERENCE_BYTES:
                artifact.add_reference(path.resolve().as_uri(), name=path.name)
            else:
                artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)

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
            log.warning(f"warning: the W&B run was not finished cleanly: {type(err).__name__}: {err}")
