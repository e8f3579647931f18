#!/usr/bin/env bash
# The lead measurement: conf/benchmark/lead/ (lead_grid.py: the tuner's choices recorded next to
# this script, and per model and level the held-out best peer and preset points of the recorded
# job.grid=full runs), benchmarked on held-out inputs per model, then holds.py's table.
#   bash train_free_runs/search/lead.sh                       (from the repository root)
#   MODELS=tiny_dit bash train_free_runs/search/lead.sh
set -euo pipefail
HERE=$(dirname "$0")
MODELS=${MODELS:-"tiny_flux_digits tiny_dit"}
python "$HERE/lead_grid.py"
for model in $MODELS; do
  rm -rf "${HERE:?}/benchmark_$model"
  /usr/bin/time -f "%e s wall" python run.py job=benchmark model="$model" job.grid=lead logger=none threads=1 \
    progress=false hydra.run.dir="$HERE/benchmark_$model"
done
python "$HERE/holds.py" > "$HERE/holds.md"
