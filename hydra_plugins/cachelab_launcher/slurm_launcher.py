"""``hydra/launcher=slurm``'s class, where Hydra looks for launchers; what it does is
:mod:`cachelab.jobs.slurm`. Hydra imports this module at every start: it imports nothing
heavy, and defines nothing without the ``launchers`` extra (``cachelab.jobs.cli.check_launcher``
names the extra then)."""
from __future__ import annotations

import sys

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:
    SubmititSlurmLauncher = None

if SubmititSlurmLauncher is not None:
    class SlurmLauncher(SubmititSlurmLauncher):
        """Hydra's submitit SLURM launcher that checks the request before submitting and records
        every job's end in the job's folder (:func:`cachelab.jobs.slurm.launch`)."""

        def launch(self, job_overrides, initial_job_idx: int):
            from cachelab.jobs.slurm import launch

            return launch(self, job_overrides, initial_job_idx)

        def __call__(self, *args, **kwargs):
            """One job, in its SLURM job: an interrupt (scancel, a requeue) ends it with its one
            line in the job's log, not a traceback."""
            from cachelab.jobs.lifecycle import Interrupted

            try:
                return super().__call__(*args, **kwargs)
            except Interrupted as stop:
                print(stop.line, file=sys.stderr)
                sys.exit(stop.exit_code)
