"""cachelab entry point: ``python run.py strategy=taylor order=3`` (Hydra; ``-m`` sweeps)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from cachelab.checks import ConfigError, UserError, check_group_choices
from cachelab.io import write_bytes_atomic

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cachelab.runner import run

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run(cfg, out_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # record it and let the other jobs run
            write_bytes_atomic(out_dir / "error.txt", f"{err}\n".encode())
            return
        sys.exit(2)


if __name__ == "__main__":
    try:
        # overrides only: not flags, nor flag values such as the `job` of `--cfg job`
        check_group_choices([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")], CONFIG_DIR)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OverrideParseException:
        pass  # a malformed override: Hydra parses them again below and reports it without a traceback
    main()
