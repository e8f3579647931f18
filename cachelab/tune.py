"""``python -m cachelab.tune model=<m> target.psnr=35``: ``python run.py job=tune
job.target.psnr=35`` (:mod:`cachelab.jobs.tune`); ``target.<key>=`` stands for
``job.target.<key>=``, every other argument is the command line's own."""
from __future__ import annotations

import sys


def main() -> None:
    """Run the tune job with this command line."""
    from cachelab.jobs.cli import console

    sys.argv = [sys.argv[0], "job=tune", *(f"job.{a}" if a.startswith("target.") else a for a in sys.argv[1:])]
    console()


if __name__ == "__main__":
    main()
