"""A model that fails on purpose, for the fault tests and ``train_free_runs/faults/run.py``: the
tiny DiT, armed per job seed by the environment variable ``CACHELAB_TEST_FAULTS``
("1=segv,2=hang": the job with seed 1 segfaults, the one with seed 2 hangs). Chosen on the
command line with ``model._target_=train_free_runs.faults.faulty.FaultyDiT +model.seed=${seed}``,
so the production code holds no test hook."""
from __future__ import annotations

import errno
import os
import signal
import sys
import time

from cachelab.models.dit_adapter import DiTAdapter

FAULTS = "CACHELAB_TEST_FAULTS"


class FaultyDiT(DiTAdapter):
    """The tiny DiT with the fault that ``$CACHELAB_TEST_FAULTS`` gives its seed: ``segv``
    (a segmentation fault in the first generation), ``raise`` (a RuntimeError there),
    ``hang`` (sleeps there), ``enospc`` (the disk is full: every fsync fails with ENOSPC),
    ``stall`` (the second generation, its first step done, prints :data:`STALLED` on stdout and
    waits for a line on stdin: a test signals the run in that known state, or lets it go on)."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        faults = dict(item.split("=") for item in os.environ.get(FAULTS, "").split(",") if item)
        self.fault = faults.get(str(seed))
        self.generations = 0
        if self.fault == "enospc":
            def full(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            os.fsync = full

    def generate(self, inputs, handle=None, callback=None, progress=None):
        if self.fault == "segv":
            print("FaultyDiT: crashing now", flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.fault == "raise":
            raise RuntimeError("the test's fault: raised while generating")
        if self.fault == "hang":
            time.sleep(600)
        self.generations += 1
        if self.fault == "stall" and self.generations == 2:
            callback = stalling(callback)
        return super().generate(inputs, handle, callback=callback, progress=progress)


STALLED = "FaultyDiT: stalled at step 1 of generation 2"


def stalling(callback):
    """``callback``, then, after the first step, :data:`STALLED` and a wait for a line on stdin."""
    def stalled(step: dict) -> None:
        if callback is not None:
            callback(step)
        if step["s"] == 0:
            print(STALLED, flush=True)
            sys.stdin.readline()

    return stalled
