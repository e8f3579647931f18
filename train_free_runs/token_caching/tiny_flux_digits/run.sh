#!/usr/bin/env bash
# Token-wise caching against FORA and TaylorSeer on the shipped tiny_flux_digits (FluxPipeline,
# 50 steps): every method at intervals (and, where its defaults cannot get there, fresh ratios or
# cluster counts) chosen from FLOPs-only probes (8 images) to land near 2x, 3x and 4.5x FLOPs
# speedup. Run from the repository root; OUT is where the sweep folders go.
set -euo pipefail
OUT=${OUT:-train_free_runs/token_caching/tiny_flux_digits}
PY=${PY:-python}
COMMON="model=tiny_flux_digits hydra/launcher=local hydra.launcher.n_jobs=1 threads=1 num_images=64 measure.flops_images=8 logger=none progress=false"
NOBONUS="strategy.tokens.bonus_ratio=0"   # text tokens are no square map: no spatial bonus on FLUX
$PY run.py -m $COMMON strategy=reuse,taylor interval=2,4,6 hydra.sweep.dir=$OUT/sweep_fixed
$PY run.py -m $COMMON strategy=toca $NOBONUS schedule.interval=4,8 hydra.sweep.dir=$OUT/sweep_toca
$PY run.py -m $COMMON strategy=duca $NOBONUS schedule.interval=3,6,8 hydra.sweep.dir=$OUT/sweep_duca
$PY run.py -m $COMMON strategy=taylor_toca $NOBONUS interval=4,10 hydra.sweep.dir=$OUT/sweep_taylor_toca
$PY run.py -m $COMMON strategy=clusca interval=4 hydra.sweep.dir=$OUT/sweep_clusca
# where the defaults cannot reach the higher targets: fewer fresh tokens, fewer clusters
$PY run.py -m $COMMON strategy=toca $NOBONUS strategy.tokens.fresh_ratio=0.01 strategy.name=toca_fr0.01 schedule.interval=8 hydra.sweep.dir=$OUT/sweep_toca_fr0.01
$PY run.py -m $COMMON strategy=clusca strategy.tokens.clusters=4 strategy.name=clusca_k4 interval=6 hydra.sweep.dir=$OUT/sweep_clusca_k4
$PY run.py -m $COMMON strategy=taylor_toca $NOBONUS strategy.tokens.fresh_ratio=0.01 strategy.name=taylor_toca_fr0.01 interval=12 hydra.sweep.dir=$OUT/sweep_taylor_toca_fr0.01
$PY run.py -m $COMMON strategy=clusca strategy.tokens.clusters=2 strategy.name=clusca_k2 interval=12 hydra.sweep.dir=$OUT/sweep_clusca_k2
# control: FORA on ToCa's schedule (its full steps, no token recomputation)
$PY run.py -m $COMMON strategy=reuse schedule=toca strategy.name=reuse_toca_schedule schedule.interval=4,8 hydra.sweep.dir=$OUT/sweep_reuse_toca_schedule
$PY -m cachelab.analysis.sweep $OUT/sweep_* --out $OUT
