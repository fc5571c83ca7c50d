#!/usr/bin/env bash
# The Mean Teacher ramp-up runs of mt_rampup_validation.md: the cpu table's semi-supervised budget
# (1000 steps, validation every 200, batch 4 labeled + 4 unlabeled, seed 0) with the consistency
# ramp-up over 400 steps (the cpu profile's mt_rampup) or over the whole run (1000 steps: SSL4MIS's
# ratio, consistency_rampup 200 x 150 of max_iterations 30000), at 3 and 7 labeled patients.
# Validation: the 5 held-out train patients; `kdseg fit` only, so splits/val.txt (the test set) is
# never read. Usage, from the repository root: bash experiments/results/notes/mt_rampup_check.sh OUT_DIR [SET]
# SET=rampup (default): the four runs above. SET=channels_last: the 3-labeled ramp-400 run (the table's
# own setting) with channels-last memory format, the 1,000-step check issue 16 asks for before channels-last
# could become a cpu-profile default (one run; compare with semi3_ramp400 and the table's seeds).
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [rampup|channels_last]}
set_name=${2:-rampup}
export OMP_NUM_THREADS=1
run() {  # name, labeled patients, ramp-up steps, extra flags
  .venv/bin/kdseg fit --config experiments/data/acdc_semi.yaml --config experiments/methods/mean_teacher.yaml \
    --config experiments/budgets/acdc_semi.yaml --config experiments/budgets/cpu_scribble.yaml \
    --data.init_args.labeled_patients="$2" --trainer.accelerator=cpu --trainer.devices=1 \
    --trainer.log_every_n_steps=25 --trainer.enable_model_summary=false --trainer.max_steps=1000 \
    --trainer.val_check_interval=200 --data.init_args.batch_size=4 --data.init_args.unlabeled_batch_size=4 \
    --model.init_args.consistency_rampup_steps="$3" --data.init_args.root=../shared/data/acdc \
    --data.init_args.fallback_val_patients=5 --seed_everything=0 \
    --trainer.default_root_dir="$out/$1" --trainer.logger.init_args.save_dir="$out/$1" "${@:4}" > "$out/$1.log" 2>&1
}
mkdir -p "$out"
if [[ $set_name == channels_last ]]; then
  run semi3_ramp400_channels_last 3 400 --model.init_args.channels_last=true
  exit 0
fi
run semi3_ramp400 3 400 &
run semi3_ramp1000 3 1000 &
wait
run semi7_ramp400 7 400 &
run semi7_ramp1000 7 1000 &
wait
# Validation Dice: the val/dice_mean column of $out/<run>/*/version_0/metrics.csv.
