"""cachelab from a checkout: ``python run.py strategy=taylor order=3`` (Hydra; ``-m`` sweeps), the
same as the ``cachelab`` console script that ``pip install`` provides (:mod:`cachelab.jobs.cli`
says what it does and its exit statuses)."""
from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # until cachelab.jobs.cli.console installs its own handlers
    def _stop_early(signum, frame):
        print("interrupted; nothing of this run was kept beyond the files already complete", file=sys.stderr)
        sys.exit(128 + signum)

    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stop_early)

    from cachelab.jobs.cli import console

    console()
