#!/usr/bin/env bash
# Knowledge distillation with calibration on Fashion-MNIST (papers 003 and 004), then the results table:
#   bash experiments/fmnist_kd.sh          # runs what is missing (every run resumes), then writes the table
# Budget (environment variables; the defaults are the CPU budget of the committed table):
#   TEACHER, STUDENT: the zoo pair; EPOCHS, PER_CLASS: epochs and training images per class of every run
#   (configs/train.py protocol=kd = configs/kd.py's protocol); VAL_PER_CLASS: the held-out validation images
#   per class (TS / MTS fits, best-epoch selection); CALIBRATORS: the teacher / direct-student calibration
#   losses (mixup and TS always run); SEEDS: the seeds each row is repeated over; BASELINES=0 runs only the
#   rows of CALIBRATORS (teacher, direct student, KD(C)), e.g. to add calibrators to a finished table;
#   ONLY="row ..." runs only those rows (a KD row needs its teacher's row); EXTRA: --config flags for every run;
#   MDCA_BETAS: teachers (teacher_mdca_b<beta>) and their KD(C) students at each MDCA beta, the sweep for a beta
#   that calibrates the teacher; DIRECT: losses trained only as direct students (student_<loss>: seed 003's
#   baselines mbls acls cpc crl pskd); AUG_LOSSES: paper 004's augmentation rows also with these KD losses
#   (aug_<loss>_<mixing>: rkd, crd); CORRUPTION_ROWS: rows whose networks get `analyze study=corruption`
#   (Fashion-MNIST-C generated here; corruption_<row>_s<seed>, table $TABLE with .md -> _corruption.md);
#   CORRUPTION_IMAGES: class-balanced test images scored per corruption and severity (default 0: all 10 000).
# Runs go to $RUNS (runs/fmnist_kd/<row>_s<seed>); the table to $TABLE (experiments/results/fmnist_kd.md). Each
#   finished run's results.json and config.json are copied to $KEEP (default: $TABLE without .md, then _runs/;
#   committed, as runs/ does not outlive a session); a kept run is not repeated unless a run still to come needs
#   its checkpoint; the tables are written from $KEEP.
#   The committed supplement: CALIBRATORS="mmce adafocal" BASELINES=0 RUNS=runs/fmnist_kd_more \
#     TABLE=experiments/results/fmnist_kd_mmce_adafocal.md bash experiments/fmnist_kd.sh
# Per seed: teachers and directly trained students with each calibration loss (the same protocol); KD(UC) from
# the NLL teacher; KD(C) from each calibrated teacher and from the NLL teacher with its TS temperature; paper
# 004's scaled KD alone and with cutout / mixup / CutMix; reverse KD; 3 generations of self-distillation.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
TEACHER=${TEACHER:-resnet20}
STUDENT=${STUDENT:-resnet8}
EPOCHS=${EPOCHS:-30}
PER_CLASS=${PER_CLASS:-50}
VAL_PER_CLASS=${VAL_PER_CLASS:-50}
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs/fmnist_kd}
TABLE=${TABLE:-experiments/results/fmnist_kd.md}
KEEP=${KEEP:-${TABLE%.md}_runs}
BASELINES=${BASELINES:-1}
ONLY=${ONLY:-}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a CALIBRATORS <<< "${CALIBRATORS:-mdca focal label_smoothing}"  # + mixup, a mixing, not a loss
read -r -a MDCA_BETAS <<< "${MDCA_BETAS:-}"
read -r -a DIRECT <<< "${DIRECT:-}"
read -r -a AUG_LOSSES <<< "${AUG_LOSSES:-}"
read -r -a CORRUPTION_ROWS <<< "${CORRUPTION_ROWS:-}"
mkdir -p "$RUNS" "$KEEP"

TABLE_MAKER=experiments/make_kd_table.py

# The script body runs twice: PASS=plan records which run needs which (a KD student its teacher, a corruption run its
# source); PASS=run then runs every row that is neither kept nor excluded by ONLY, and every kept row whose
# checkpoint a row still to run needs (runs/ does not outlive a session; the runs are deterministic, so a rerun
# teacher is the one its kept results describe, on the same machine).
declare -A DEPENDENTS
PASS=plan
selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" ${1%_s*} "* ]]; }
needed() {  # whether a run still to come needs run $1's checkpoint
  local dependent
  for dependent in ${DEPENDENTS[$1]:-}; do
    if ! kept "$dependent" || needed "$dependent"; then return 0; fi
  done
  return 1
}
depends() {  # run $1 needs the checkpoint of run $2
  [ $PASS = plan ] && selected "$1" && DEPENDENTS[$2]+=" $1"
  return 0
}
# lib.sh's main for run $RUNS/$1 unless it is not selected, or kept and not needed; its results are then kept.
run() {
  local name=$1; shift
  [ $PASS = run ] && selected "$name" || return 0
  if kept "$name" && ! needed "$name"; then return 0; fi
  main "$RUNS/$name" "$@"
  keep "$RUNS/$name"
}
budget="dataset=fashion_mnist,epochs=$EPOCHS,train_per_class=$PER_CLASS"
train() {  # row, seed, model, extra presets, then extra flags
  run "${1}_s$2" --config "configs/train.py:protocol=kd,$budget,seed=$2,model=$3$4" "${@:5}" \
      --config.data.val_per_class="$VAL_PER_CLASS" "${EXTRA[@]}"
}
kd() {  # row, seed, teacher row, presets
  depends "${1}_s$2" "${3}_s$2"
  run "${1}_s$2" --config "configs/kd.py:$budget,seed=$2,teacher=$RUNS/${3}_s$2,$4" \
      --config.data.val_per_class="$VAL_PER_CLASS" "${EXTRA[@]}"
}
corruption() {  # source row, seed
  depends "corruption_${1}_s$2" "${1}_s$2"
  run "corruption_${1}_s$2" --config configs/analyze.py:study=corruption \
      --config.analyze.source="$RUNS/${1}_s$2" --config.analyze.corruption_test_images="${CORRUPTION_IMAGES:-0}"
}

# The kept runs (and those of $RUNS not kept, from before this script kept runs), side by side in one directory
# for the table makers.
tables() {
  local both; both=$(mktemp -d)
  ln -s "$(realpath "$KEEP")"/*_s[0-9]* "$both"/ 2>/dev/null || true
  ln -s "$(realpath "$RUNS")"/*_s[0-9]* "$both"/ 2>/dev/null || true
  "$PY" "$TABLE_MAKER" "$both" > "$TABLE.$$" && mv "$TABLE.$$" "$TABLE"
  if [ ${#CORRUPTION_ROWS[@]} -gt 0 ]; then
    "$PY" experiments/make_corruption_table.py "$both" > "${TABLE%.md}_corruption.md"
  fi
  rm -r "$both"
}

body() {
for seed in $SEEDS; do
  for role in teacher student; do
    model=$TEACHER; [ $role = student ] && model=$STUDENT
    for loss in "${CALIBRATORS[@]}"; do train "${role}_$loss" "$seed" "$model" ",loss=$loss"; done
    if [ $role = teacher ]; then
      for beta in "${MDCA_BETAS[@]}"; do
        train "teacher_mdca_b$beta" "$seed" "$model" ",loss=mdca" --config.loss.hparams.beta="$beta"
      done
    else
      for loss in "${DIRECT[@]}"; do train "student_$loss" "$seed" "$model" ",loss=$loss"; done
    fi
    [ "$BASELINES" = 1 ] || continue
    train "${role}_ce" "$seed" "$model" ""
    train "${role}_mixup" "$seed" "$model" ",mixing=mixup"
  done
  for calibrator in "${CALIBRATORS[@]}"; do
    kd "kd_c_$calibrator" "$seed" "teacher_$calibrator" "recipe=kd_c,student=$STUDENT"
  done
  for beta in "${MDCA_BETAS[@]}"; do
    kd "kd_c_mdca_b$beta" "$seed" "teacher_mdca_b$beta" "recipe=kd_c,student=$STUDENT"
  done
  for loss in "${AUG_LOSSES[@]}"; do
    for mixing in none cutout mixup cutmix; do
      kd "aug_${loss}_$mixing" "$seed" teacher_ce "recipe=aug,student=$STUDENT,mixing=$mixing,loss=$loss"
    done
  done
  if [ "$BASELINES" = 1 ]; then
    kd kd_uc "$seed" teacher_ce "recipe=kd_uc,student=$STUDENT"
    kd kd_c_ts "$seed" teacher_ce "recipe=kd_c,student=$STUDENT,teacher_cal=ts"
    kd kd_c_mixup "$seed" teacher_mixup "recipe=kd_c,student=$STUDENT"
    for mixing in none cutout mixup cutmix; do
      kd "aug_$mixing" "$seed" teacher_ce "recipe=aug,student=$STUDENT,mixing=$mixing"
    done
    kd reverse "$seed" student_ce "recipe=reverse,student=$TEACHER"
    previous=student_ce  # generation 0: the directly trained student
    for generation in 1 2 3; do
      kd "self_gen$generation" "$seed" "$previous" "recipe=self,student=$STUDENT"
      previous=self_gen$generation
    done
  fi
  for row in "${CORRUPTION_ROWS[@]}"; do corruption "$row" "$seed"; done
  [ $PASS = plan ] || tables
done
}
body
PASS=run
body
