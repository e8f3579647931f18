#!/bin/bash
# FLUX supplement: ToCa, DuCa and TaylorSeer x ToCa on tiny_flux_digits with the spatial bonus off and
# their intervals on the plain interval schedule (they crashed in the main FLUX library run, whose grid
# lacked bonus_ratio=0 for FLUX's non-square text tokens); the same splits, seeds and image counts. One timing round
# (job.rounds=1, against 2 in the main runs), to finish before the deadline.
set -u
cd "$(dirname "$0")/../.."
. /work/main/.venv/bin/activate
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
echo "tiny_flux_digits_tokens start $(date -u +%H:%M:%S) $(uptime)"
python run.py job=benchmark model=tiny_flux_digits job.grid=../../train_free_runs/library/flux_tokens logger=none job.rounds=1 \
    threads=1 hydra.run.dir=train_free_runs/library/tiny_flux_digits_tokens
echo "tiny_flux_digits_tokens end rc=$? $(date -u +%H:%M:%S) $(uptime)"
