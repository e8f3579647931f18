set -e
out=train_free_runs/memory/storage
for spec in "int8_token:strategy.predictor.factor_dtype=int8_token" "bf16_fp8:strategy.predictor.factor_dtype=[bf16,fp8_e4m3]" "fp32_int8:strategy.predictor.factor_dtype=[fp32,int8_token]"; do
  name=${spec%%:*}; override=${spec#*:}
  start=$(date +%s.%N)
  python run.py job=plan logger=none threads=1 plan.device_memory=80GiB "hydra.run.dir=$out/plan_flux_dev_o2_$name" plan.target=flux.1-dev strategy=taylorseer order=2 interval=5 first_enhance=3 num_steps=50 "$override"
  python -c "print(round($(date +%s.%N) - $start, 1))" > "$out/plan_flux_dev_o2_$name/wall_s.txt"
done
