#!/usr/bin/env bash
# The uniform TaylorSeer frontier on the tuner's images (32 images, seed 0, 50 steps): orders 1-3 x
# N = 2..10, one job=compare run each, into $OUT/frontier_<model>/ (default /tmp/cachelab_tuner);
# then compare.py puts the tuner's choices against it:
#   bash train_free_runs/tuner/frontier.sh            (MODEL=tiny_flux_digits for the other model)
#   python train_free_runs/tuner/compare.py $OUT/frontier_tiny_dit $OUT/tiny_dit_sensitivity.json $OUT/tiny_dit_*/
set -euo pipefail
OUT=${OUT:-/tmp/cachelab_tuner}
MODEL=${MODEL:-tiny_dit}
python run.py -m model="$MODEL" job=compare strategy=taylor order=1,2,3 interval=2,3,4,5,6,7,8,9,10 \
  num_steps=50 num_images=32 threads=1 logger=none progress=false hydra.sweep.dir="$OUT/frontier_$MODEL"
