"""Observers of runs: W&B logging (more analysis tools build on the sampler callback)."""
