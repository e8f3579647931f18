#!/usr/bin/env bash
# job=tune job.search=space on a trained model, one run per target, all sharing one probe file
# ($OUT/<model>_probes.json: a later target reuses every measurement an earlier one made).
# Each run's report.md, tune.json and benchmark_tool.yaml are copied next to this script.
#   bash train_free_runs/search/run.sh                                  (tiny_dit, from the repository root)
#   MODEL=tiny_flux_digits bash train_free_runs/search/run.sh
set -euo pipefail
OUT=${OUT:-/tmp/cachelab_search}
HERE=$(dirname "$0")
MODEL=${MODEL:-tiny_dit}
TARGETS=${TARGETS:-"psnr=35 psnr=30 psnr=40 psnr=37 psnr=32 psnr=42"}
mkdir -p "$OUT"
for target in $TARGETS; do
  name="${MODEL}_${target/=/_}"
  rm -rf "${OUT:?}/$name"
  /usr/bin/time -f "%e s wall" python -m cachelab.tune model="$MODEL" num_steps=50 threads=1 logger=none progress=false \
    target."$target" job.search=space job.space.probe_file="$OUT/${MODEL}_probes.json" hydra.run.dir="$OUT/$name" \
    > "$OUT/$name.log" 2>&1
  mkdir -p "$HERE/$name"
  cp "$OUT/$name/report.md" "$OUT/$name/tune.json" "$HERE/$name/"
  if [ -f "$OUT/$name/benchmark_tool.yaml" ]; then cp "$OUT/$name/benchmark_tool.yaml" "$HERE/$name/"; fi
done
