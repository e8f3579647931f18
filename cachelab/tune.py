"""``python -m cachelab.tune model=<m> target.psnr=35``: ``python run.py job=tune
job.target.psnr=35`` (:mod:`cachelab.jobs.tune`); ``target.<key>=`` stands for
``job.target.<key>=`` and ``budget.cache=<size>`` for ``cache.budget=<size>`` (the fastest
configuration whose planned cache fits too), every other argument is the command line's own."""
from __future__ import annotations

import sys


def main() -> None:
    """Run the tune job with this command line."""
    from cachelab.jobs.cli import console

    sys.argv = [sys.argv[0], "job=tune", *map(argument, sys.argv[1:])]


def argument(arg: str) -> str:
    """``target.<key>=`` as ``job.target.<key>=``, ``budget.cache=`` as ``cache.budget=``; others as given."""
    if arg.startswith("target."):
        return f"job.{arg}"
    if arg.startswith("budget.cache="):
        return f"cache.budget={arg.partition('=')[2]}"
    return arg
    console()


if __name__ == "__main__":
    main()
