#!/usr/bin/env bash
# The tuner on the trained tiny_dit / tiny_flux_digits (50 steps): one tune per target, each into
# its own folder under $OUT (default /tmp/cachelab_tuner); the targets of a model share its
# sensitivity runs ($OUT/<model>_sensitivity.json: measured by the first target, read by the
# others). The recorded report.md, tune.json and conf/strategy/tuned.yaml of each are copied
# next to this script.
#   bash train_free_runs/tuner/run.sh                                   (from the repository root)
#   MODEL=tiny_flux_digits TARGETS="psnr=30 psnr=35 psnr=40 speedup=4" bash train_free_runs/tuner/run.sh
set -euo pipefail
OUT=${OUT:-/tmp/cachelab_tuner}
HERE=$(dirname "$0")
MODEL=${MODEL:-tiny_dit}
TARGETS=${TARGETS:-"psnr=30 psnr=35 psnr=40 speedup=3"}
mkdir -p "$OUT"
for target in $TARGETS; do
  name="${MODEL}_${target/=/_}"
  rm -rf "${OUT:?}/$name"
  /usr/bin/time -f "%e s wall" python -m cachelab.tune model="$MODEL" num_steps=50 num_images=32 threads=1 \
    measure.flops_images=2 target."$target" job.sensitivity_file="$OUT/${MODEL}_sensitivity.json" \
    logger=none progress=false hydra.run.dir="$OUT/$name"
  mkdir -p "$HERE/$name"
  rm -f "$HERE/$name/tuned.yaml"
  cp "$OUT/$name/report.md" "$OUT/$name/tune.json" "$HERE/$name/"
  if [ -f "$OUT/$name/conf/strategy/tuned.yaml" ]; then cp "$OUT/$name/conf/strategy/tuned.yaml" "$HERE/$name/"; fi
done
