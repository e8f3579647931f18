#!/bin/bash
# The supplement: ToCa, DuCa and TaylorSeer x ToCa on tiny_flux_digits with the spatial bonus off
# (they crashed in the first FLUX library run, whose grid lacked bonus_ratio=0 for FLUX's
# non-square text tokens); same splits, seeds and image counts as the library runs.
set -u
cd "$(dirname "$0")/../.."
. /work/main/.venv/bin/activate
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
echo "tiny_flux_digits_tokens start $(date -u +%H:%M:%S) $(uptime)"
python run.py job=benchmark model=tiny_flux_digits job.grid=../../train_free_runs/library/flux_tokens logger=none \
    threads=1 hydra.run.dir=train_free_runs/library/tiny_flux_digits_tokens
echo "tiny_flux_digits_tokens end rc=$? $(date -u +%H:%M:%S) $(uptime)"
