#!/bin/bash
# The supplements, for the tools whose grid was fixed after the main library runs (run_both.sh);
# the same splits, seeds and image counts, one timing round (job.rounds=1, against 2 in the main
# runs). Run in the project's environment (README "Install"), from anywhere:
#   bash train_free_runs/library/run_supplement.sh tiny_flux_digits  # ToCa, DuCa, TaylorSeer x ToCa with
#       the spatial bonus off (FLUX's text tokens are no square map: they crashed in the main run) and
#       their intervals on the plain interval schedule
#   bash train_free_runs/library/run_supplement.sh tiny_dit          # ToCa and TaylorSeer x ToCa scored by
#       norm (the converted DiT gives no attention map), PAB on its attn1 site kind, DuCa's intervals on
#       the plain interval schedule (in the main run its interval knob did not reach ToCa's schedule)
set -u
cd "$(dirname "$0")/../.."
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
model=$1
case $model in
  tiny_flux_digits) grid=flux_tokens; out=tiny_flux_digits_tokens ;;
  tiny_dit) grid=dit_supplement; out=tiny_dit_supplement ;;
  *) echo "error: model=$model; allowed: tiny_flux_digits, tiny_dit" >&2; exit 2 ;;
esac
echo "$out start $(date -u +%H:%M:%S) $(uptime)"
python run.py job=benchmark model="$model" job.grid="../../train_free_runs/library/$grid" logger=none job.rounds=1 \
    threads=1 hydra.run.dir="train_free_runs/library/$out"
echo "$out end rc=$? $(date -u +%H:%M:%S) $(uptime)"
