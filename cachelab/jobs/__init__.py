"""Jobs: compare, sample, trajectory, atlas, calibrate, training; the only layer that knows Hydra/OmegaConf."""
