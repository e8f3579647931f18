#!/bin/bash
cd "$(dirname "$0")/../.."
# (the project venv active)
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
mkdir -p ${OUT:-/tmp/methods}
for model in tiny_dit tiny_flux_digits; do
  for strat in taylorseer foca dmd freqca seacache speca; do
    out=${OUT:-/tmp/methods}/q_${model}_${strat}
    [ -f $out/metrics.json ] && continue
    python run.py model=$model strategy=$strat num_images=8 logger=none threads=1 progress=false hydra.run.dir=$out > ${OUT:-/tmp/methods}/q_${model}_${strat}.log 2>&1
  done
done
echo done > ${OUT:-/tmp/methods}/quick.done
