#!/bin/bash
# DiT supplement: ToCa and TaylorSeer x ToCa scored by norm (the converted DiT's modules give no
# attention map), PAB on its attn1 site kind, DuCa with its intervals on the plain interval schedule
# (in the main DiT library run the first three crashed and DuCa's interval knob did not reach ToCa's
# schedule); the same splits, seeds and image counts. One timing round
# (job.rounds=1, against 2 in the main runs), to finish before the deadline.
set -u
cd "$(dirname "$0")/../.."
. /work/main/.venv/bin/activate
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
echo "tiny_dit_supplement start $(date -u +%H:%M:%S) $(uptime)"
python run.py job=benchmark model=tiny_dit job.grid=../../train_free_runs/library/dit_supplement logger=none job.rounds=1 \
    threads=1 hydra.run.dir=train_free_runs/library/tiny_dit_supplement
echo "tiny_dit_supplement end rc=$? $(date -u +%H:%M:%S) $(uptime)"
