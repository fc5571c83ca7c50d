#!/usr/bin/env bash
# kdseg's side of the peer-parity runs (issue 16 §2): one fit of the acdc/pce stack (or the dense
# supervised one with SUP=1) at the cpu profile's budget, validated every 200 steps on the last 5
# patients of splits/train.txt (data.init_args.fallback_val_patients=5; splits/val.txt unused).
# Usage: run_kdseg.sh NAME [extra kdseg overrides...]   output: ${PARITY_RUNS:-/work/parity_runs}/NAME
set -euo pipefail
name=$1; shift
out=${PARITY_RUNS:-/work/parity_runs}/$name
mkdir -p "$out"
if [[ "${SUP:-0}" == 1 ]]; then
  stack=(--config experiments/data/acdc_semi.yaml --config experiments/methods/supervised.yaml
         --config experiments/budgets/acdc_semi.yaml)
else
  stack=(--config experiments/data/acdc_scribble.yaml --config experiments/methods/pce.yaml
         --config experiments/budgets/acdc_scribble.yaml)
fi
export OMP_NUM_THREADS=1
start=$(date +%s)
python -m kdseg.cli fit "${stack[@]}" --config experiments/budgets/cpu_scribble.yaml \
  --trainer.max_steps=1000 --trainer.val_check_interval=200 \
  --data.init_args.fallback_val_patients=5 --seed_everything=0 \
  --trainer.accelerator=cpu --trainer.devices=1 --trainer.log_every_n_steps=25 --trainer.enable_model_summary=false \
  --trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger \
  --trainer.logger.init_args.save_dir="$out" --trainer.logger.init_args.name=fit \
  --trainer.enable_progress_bar=false "$@" > "$out/stdout.log" 2>&1
echo "wall_s $(( $(date +%s) - start ))" >> "$out/stdout.log"
