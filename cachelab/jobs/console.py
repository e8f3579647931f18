"""What a run shows on the console: messages through :mod:`logging`, configured by Hydra from
conf/hydra/job_logging/cachelab.yaml (information on stdout, warnings and errors on stderr,
everything with time and origin in the run folder's ``run.log``), and one progress bar per
generation (the samplers) or per sweep (:class:`cachelab.jobs.sweep.SweepReport`)."""
from __future__ import annotations

import logging

STDOUT_HANDLER = "stdout"  # the handler's name in conf/hydra/job_logging/cachelab.yaml


class BelowWarning(logging.Filter):
    """Lets through only records below WARNING (the stdout handler: stderr has the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def quiet_console() -> None:
    """Information no longer reaches stdout (a sweep's job: it stays in the job's ``run.log``);
    warnings and errors still reach stderr."""
    for handler in logging.getLogger().handlers:
        if handler.name == STDOUT_HANDLER:
            handler.setLevel(logging.WARNING)
