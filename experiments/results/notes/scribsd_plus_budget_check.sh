#!/usr/bin/env bash
# The ScribSD+ runs of scribsd_plus_validation_choices.md, last section (2026-12-06): the cpu table's
# scribble budget (1000 steps, validation every 250, ramp-up 200, seed 0) on the 5 held-out train
# patients; `kdseg fit` only, so splits/val.txt (the test set) is never read.
# Usage, from the repository root: bash experiments/results/notes/scribsd_plus_budget_check.sh OUT_DIR [SET]
# SET=choices (default): the four runs of 2026-12-06 (two at a time, one torch thread each; about an
# hour on 2 cores beside nothing else). SET=ds_pce: the class defaults with pCE on every decoder
# scale (ds_pce_weight 1.0), the one test-era choice left to check (one run, one thread).
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [choices|ds_pce]}
set_name=${2:-choices}
export OMP_NUM_THREADS=1
run() {  # name, flags over the stack acdc/scribsd_plus
  local name=$1; shift
  .venv/bin/kdseg fit --config experiments/data/acdc_scribble.yaml --config experiments/methods/scribsd_plus.yaml \
    --config experiments/budgets/acdc_scribble.yaml --config experiments/budgets/cpu_scribble.yaml \
    --trainer.accelerator=cpu --trainer.devices=1 --trainer.log_every_n_steps=25 \
    --trainer.enable_model_summary=false --trainer.max_steps=1000 --trainer.val_check_interval=250 \
    --seed_everything=0 --data.init_args.root=../shared/data/acdc --data.init_args.fallback_val_patients=5 \
    --model.init_args.consistency_rampup_steps=200 \
    --trainer.default_root_dir="$out/$name" --trainer.logger.init_args.save_dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1
}
mkdir -p "$out"
if [[ $set_name == ds_pce ]]; then
  run class_defaults_ds_pce --model.init_args.noise_on=teacher --model.init_args.kd_target=full_resolution \
    --model.init_args.ds_pce_weight=1.0
  exit 0
fi
# The config of 2026-12-04 to 12-06 (noise on the student, same-scale target), given explicitly.
run student_same_scale --model.init_args.noise_on=student --model.init_args.kd_target=same_scale &
run student_same_scale_ds_pce --model.init_args.noise_on=student --model.init_args.kd_target=same_scale \
  --model.init_args.ds_pce_weight=1.0 &
wait
run student_no_kd_no_contrast --model.init_args.noise_on=student --model.init_args.kd_target=same_scale \
  --model.init_args.kd_weight=0 --model.init_args.contrast_weight=0 &
run class_defaults --model.init_args.noise_on=teacher --model.init_args.kd_target=full_resolution &
wait
# Validation Dice: the val/dice_mean column of $out/<run>/acdc_scribble/version_0/metrics.csv.
