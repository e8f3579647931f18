"""What a run shows on the console: messages through :mod:`logging`, configured by Hydra from
conf/hydra/job_logging/cachelab.yaml (information on stdout, warnings and errors on stderr,
everything with time and origin in the run folder's ``run.log``), and one progress bar per
generation (the samplers) or per sweep (:class:`cachelab.jobs.sweep.SweepReport`), closed
before the last line a run prints (:func:`close_progress_bars`)."""
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


def close_progress_bars() -> None:
    """Close every progress bar this process still shows (tqdm's: a generation's is cleared, a
    sweep's ends its line), so that the next line printed starts a line of its own. Called while
    the exception that stopped a run is being handled: a signal that arrives inside a bar's first
    render leaves a bar drawn that tqdm's own ``close`` would not clear (it never finished its
    ``__init__``); the exception's traceback keeps that bar here until then."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of open bars (every tqdm class shares it)
        if hasattr(bar, "sp") and not hasattr(bar, "start_t"):  # drawn, its __init__ cut short
            bar.clear()
        bar.close()
