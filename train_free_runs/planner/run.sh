#!/usr/bin/env bash
# The planned cache of the papers' settings on FLUX.1-dev, HunyuanVideo and Wan 2.2 A14B (docs/guides/memory.md,
# "Planning the cache"): python run.py job=plan on the shipped transformer configs, meta device.
# Run from the repository root: bash train_free_runs/planner/run.sh ; each run's plan.json lands in
# train_free_runs/planner/<name>/ and its wall time in <name>/wall_s.txt.
set -euo pipefail
out=train_free_runs/planner
plan() {  # name, then the overrides
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi  # ONLY="a b": just those
  local start=$(date +%s.%N)
  python run.py job=plan logger=none threads=1 plan.device_memory=80GiB "hydra.run.dir=$out/$name" "$@"
  python -c "print(round($(date +%s.%N) - $start, 1))" > "$out/$name/wall_s.txt"
}
# the paper's FLUX.1-dev setting: 1024^2, 50 steps, guidance 3.5 (embedded), order 2, N=5, first_enhance 3
plan flux_dev_o2 plan.target=flux.1-dev strategy=taylorseer order=2 interval=5 first_enhance=3 num_steps=50
plan flux_dev_o2_fp32 plan.target=flux.1-dev strategy=taylorseer order=2 interval=5 first_enhance=3 num_steps=50 \
  strategy.predictor.factor_dtype=fp32
# HunyuanVideo 720p x 129 frames, 50 steps, embedded guidance 6: the paper's order 1, N=5, first_enhance 1; and order 2
plan hunyuan_video_o1 plan.target=hunyuanvideo strategy=taylorseer order=1 interval=5 first_enhance=1 num_steps=50 \
  plan.height=720 plan.width=1280 plan.num_frames=129
plan hunyuan_video_o2 plan.target=hunyuanvideo strategy=taylorseer order=2 interval=5 first_enhance=1 num_steps=50 \
  plan.height=720 plan.width=1280 plan.num_frames=129
# Wan 2.2 A14B text-to-video 720p x 81 frames, 40 steps, CFG 4 (two calls per step), two experts; order 2, N=5
plan wan22_o2 plan.target=wan2.2-t2v-a14b strategy=taylorseer order=2 interval=5 first_enhance=1 num_steps=40 \
  plan.height=720 plan.width=1280 plan.num_frames=81 plan.guidance=4
