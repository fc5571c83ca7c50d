#!/usr/bin/env bash
# ACTION (You et al., IPMI 2023): runs the three stages in order, each one initialised from the
# previous run's checkpoint (model.init_args.init_weights_from).
#
# usage: experiments/acdc/run_action_chain.sh LABELED ROOT [extra `kdseg fit` arguments...]
#   LABELED  labeled patients: 3 or 7 (kdseg's ACDC settings, SSL4MIS's split sizes; any number with CONFIG_DIR
#            other than experiments/acdc)
#   ROOT     the ACDC data folder (data.init_args.root); "-" keeps the config's own (e.g. for the
#            phantom, which has no root)
#   extra    passed to every stage, e.g. --trainer.devices=1 --config experiments/loggers/wandb.yaml
# environment:
#   VARIANT     full (default): stage1 -> stage2 -> stage3
#               no_stage1:      action_no_stage1 (stage 2 from scratch) -> stage3
#               no_stage2:      stage1 -> action_no_stage2 (stage 3 from stage 1)
#               no_anco:        stage1 -> stage2 -> action_no_anco
#               no_unsup:       stage1 -> stage2 -> action_no_unsup
#   CONFIG_DIR  its last component names the dataset of the stacks (experiments/stacks.yaml) run:
#               experiments/acdc (default) or experiments/phantom for the
#               phantom versions: CONFIG_DIR=experiments/phantom run_action_chain.sh 2 -)
#   KDSEG       the kdseg command (default: `kdseg` on PATH, else .venv/bin/kdseg of this repo)
#
# Checkpoints handed on: stage 1 -> its last.ckpt (its validation Dice is that of an untrained
# decoder, so "best" means nothing; the end of pre-training is what the released code continues
# from, train_2D.sh --resume);
# stage 2 -> its best-*.ckpt (best validation Dice). Each run's folder is read from the line
# "kdseg: run folder ..." that `kdseg fit` prints, falling back to the newest
# runs/<name>/version_*. Runs are named <config dir>_action_<variant>_l<LABELED>_<stage>, e.g.
# runs/acdc_action_full_l7_stage3. Stops at the first failing stage.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
LABELED=$1
ROOT=$2
shift 2
EXTRA=("$@")

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONFIG_DIR=${CONFIG_DIR:-experiments/acdc}
[[ $CONFIG_DIR = /* ]] || CONFIG_DIR="$REPO/$CONFIG_DIR"
VARIANT=${VARIANT:-full}
if [[ -z ${KDSEG:-} ]]; then
  if command -v kdseg >/dev/null 2>&1; then KDSEG=kdseg; else KDSEG="$REPO/.venv/bin/kdseg"; fi
fi

[[ $LABELED =~ ^[1-9][0-9]*$ ]] || { echo "run_action_chain.sh: LABELED must be a positive integer, got '$LABELED'" >&2; exit 2; }
if [[ $(basename "$CONFIG_DIR") = acdc && $LABELED != 3 && $LABELED != 7 ]]; then
  echo "run_action_chain.sh: LABELED must be 3 or 7 (kdseg's ACDC settings), got $LABELED" >&2
  exit 2
fi
# CONFIG_DIR's last component names the dataset of the stacks in experiments/stacks.yaml.
DATASET=$(basename "$CONFIG_DIR")
grep -q "^$DATASET/action_stage1:" "$REPO/experiments/stacks.yaml" \
  || { echo "run_action_chain.sh: no ACTION stacks for $DATASET in experiments/stacks.yaml" >&2; exit 2; }
# The --config arguments of the stack <dataset>/<stage> of experiments/stacks.yaml.
stack_args() {
  awk -v run="$DATASET/$1:" -v repo="$REPO" '$0 == run {on = 1; next} on && /^  - / {print "--config=" repo "/" $2; next} {on = 0}' \
    "$REPO/experiments/stacks.yaml"
}

case $VARIANT in
  full)      STAGES=(action_stage1 action_stage2 action_stage3) ;;
  no_stage1) STAGES=(action_no_stage1 action_stage3) ;;
  no_stage2) STAGES=(action_stage1 action_no_stage2) ;;
  no_anco)   STAGES=(action_stage1 action_stage2 action_no_anco) ;;
  no_unsup)  STAGES=(action_stage1 action_stage2 action_no_unsup) ;;
  *) echo "run_action_chain.sh: unknown VARIANT '$VARIANT' (full|no_stage1|no_stage2|no_anco|no_unsup)" >&2; exit 2 ;;
esac

DATA_ARGS=("--data.init_args.labeled_patients=$LABELED")
[[ $ROOT = - ]] || DATA_ARGS+=("--data.init_args.root=$ROOT")

# The checkpoint a finished stage hands on: last.ckpt after stage 1 (action_stage1), else the
# newest best-*.ckpt of the run folder.
handed_on() {
  local stage=$1 folder=$2 ckpt
  if [[ $stage = action_stage1 ]]; then
    ckpt="$folder/checkpoints/last.ckpt"
    [[ -f $ckpt ]] || ckpt=""
  else
    ckpt=$(ls -t "$folder"/checkpoints/best-*.ckpt 2>/dev/null | head -n 1 || true)
  fi
  [[ -n $ckpt ]] || { echo "run_action_chain.sh: no checkpoint to hand on in $folder/checkpoints" >&2; return 1; }
  echo "$ckpt"
}

PREVIOUS=""
LOG_DIR=$(mktemp -d)
trap 'rm -rf "$LOG_DIR"' EXIT
PREFIX="$(basename "$CONFIG_DIR")_action_${VARIANT}_l${LABELED}"
for i in "${!STAGES[@]}"; do
  stage=${STAGES[$i]}
  name="${PREFIX}_stage$((i + 1))"
  mapfile -t layers < <(stack_args "$stage")
  args=(fit "${layers[@]}" "${DATA_ARGS[@]}" "--trainer.logger.init_args.name=$name")
  [[ -z $PREVIOUS ]] || args+=("--model.init_args.init_weights_from=$PREVIOUS")
  echo "run_action_chain.sh: stage $((i + 1))/${#STAGES[@]}: $KDSEG ${args[*]} ${EXTRA[*]:-}" >&2
  "$KDSEG" "${args[@]}" "${EXTRA[@]}" 2>&1 | tee "$LOG_DIR/$name.log"
  folder=$(sed -n 's/^kdseg: run folder //p' "$LOG_DIR/$name.log" | tail -n 1)
  if [[ -z $folder || ! -d $folder ]]; then
    folder=$(ls -td runs/"$name"/version_* 2>/dev/null | head -n 1 || true)
  fi
  [[ -n $folder && -d $folder ]] || { echo "run_action_chain.sh: cannot find the run folder of $name" >&2; exit 1; }
  PREVIOUS=$(handed_on "$stage" "$folder")
  echo "run_action_chain.sh: $name finished in $folder; hands on $PREVIOUS" >&2
done
echo "run_action_chain.sh: done; final model: $PREVIOUS" >&2
