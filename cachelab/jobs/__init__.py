"""Jobs: compare, sample, trajectory, atlas, calibrate, training; the only layer that knows Hydra/OmegaConf.

Importing it registers the config schemas (:mod:`cachelab.jobs.schema`) that conf/ names."""
from pathlib import Path

# the configs: conf/ of the checkout, which cachelab/conf links to and a wheel carries as package data
CONFIG_DIR = (Path(__file__).resolve().parents[1] / "conf").resolve()

from cachelab.jobs import schema  # noqa: E402,F401 -- registers the schemas in Hydra's ConfigStore
