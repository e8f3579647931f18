#!/bin/bash
# The two library runs, one after the other (started 2026-12-07 on the shared 2-core machine); run in
# the project's environment (README "Install").
set -u
cd "$(dirname "$0")/../.."
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
for model in tiny_flux_digits tiny_dit; do
  echo "$model start $(date -u +%H:%M:%S) $(uptime)"
  python run.py job=benchmark model=$model job.grid=full logger=none threads=1 \
      hydra.run.dir=train_free_runs/library/$model "$@"
  echo "$model end rc=$? $(date -u +%H:%M:%S) $(uptime)"
done
