"""cachelab entry point: ``python run.py strategy=taylor order=3`` (Hydra; ``-m`` sweeps)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from cachelab.errors import ConfigError, UserError
from cachelab.jobs.checks import check_group_choices
from cachelab.io import write_bytes_atomic, write_json_atomic

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
FINISHED = "finished.json"  # written after a job's metrics.json: its overrides, for resuming sweeps


def finished(out_dir: Path, overrides: list[str]) -> bool:
    """A job folder holds a valid ``metrics.json`` from a run with the same overrides."""
    try:
        done = json.loads((out_dir / FINISHED).read_text())
        json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return done.get("overrides") == overrides


def config_dirs(argv: list[str]) -> list[str]:
    """The folders given with ``--config-dir`` / ``-cd`` (Hydra searches them before conf/)."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            found.append(arg.split("=", 1)[1])
    return found


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cachelab.jobs.runner import run

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and finished(out_dir, overrides):  # a resumed sweep: this job is done
        print(f"skipping {out_dir}: finished with the same overrides", file=sys.stderr)
        return
    if multirun and cfg.logger and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # W&B runs grouped by sweep
    try:
        run(cfg, out_dir)
        write_json_atomic(out_dir / FINISHED, {"overrides": overrides})
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        if multirun:  # record it and let the other jobs run
            write_bytes_atomic(out_dir / "error.txt", f"{err}\n".encode())
            return
        sys.exit(2)


if __name__ == "__main__":
    try:
        # overrides only: not flags, nor flag values such as the `job` of `--cfg job`
        check_group_choices([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")], CONFIG_DIR,
                            config_dirs(sys.argv[1:]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OverrideParseException:
        pass  # a malformed override: Hydra parses them again below and reports it without a traceback
    main()
