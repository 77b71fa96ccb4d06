#!/usr/bin/env bash
# The MTS paper's figure studies (configs/analyze.py) on Fashion-MNIST DDNNs, figures and their data copied to
# experiments/results/fmnist_figures/ (<set>_<figure>.png, <study>_<set>.json):
#   bash experiments/fmnist_figures.sh        # runs what is missing (every run resumes), then copies the figures
# DDNNs: network 0 of the CE evaluations of experiments/fmnist_table1.sh (runs/fmnist_table1/<set>_ce_eval, made
# here with the same command where missing; configs/evaluate.py budget=cpu: 5 networks x 301 passes). The
# network "trained on full data" is a ConvNet-3 trained on 1000 real images per class for 4 epochs (configs/train.py,
# the DD protocol) — a CPU-budget stand-in for the paper's full-data network.
#   Figs. 2a, 7, 2b (max_logit) and 4, 6 (tsne): DSA and MTT IPC 1; Fig. 8 (mts_ratio): DC, DSA, DM, MTT IPC 1 (T
#   fitted to convergence, and with the reference's LBFGS port: <set>_reference_fit) and DSA, MTT IPC 10; Fig. 9
#   (calibration_size): DSA and MTT IPC 10 (N = 10 ... 50 % of 10 images per class);
#   Fig. 3 (svd_spectrum): the DSA, DSA + MDT and MTT IPC 10 sets; Fig. 5 (svd_truncation): DSA, DSA + MDT and a
#   random real baseline at IPC 10, k = 0 ... 3 of 10 components per class removed.
# Variable PARTS (default "ipc1 ipc10"): the IPC 1 studies (max_logit, tsne, mts_ratio) and the IPC 10 ones.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
RUNS=runs/fmnist_figures
TABLES=runs/fmnist_table1
OUT=experiments/results/fmnist_figures
mkdir -p "$RUNS" "$OUT"

# The CE evaluation of a set, as experiments/fmnist_table1.sh runs it.
ce_evaluation() {  # set name (dsa_ipc10, ...)
  local dir=experiments/results/fmnist_dd
  [ "${1%%_*}" = mtt ] && dir=experiments/results/fmnist_mtt
  main "$TABLES/${1}_ce_eval" --config "configs/evaluate.py:$DD_CALIBRATION_PROTOCOL,loss=ce" \
      --config.evaluate.source="$dir/$1.npz"
}

# A study whose data is in $OUT is not repeated (runs/ does not outlive a session; $OUT is committed), nor the
# evaluations only it needs.
studied() {  # set name, then studies: whether every one of them is in $OUT
  local set=$1 study; shift
  for study in "$@"; do [ -f "$OUT/${study}_$set.json" ] || return 1; done
}

study() {  # study, set name, flags...
  local study=$1 set=$2; shift 2
  studied "$set" "$study" && return 0
  main "$RUNS/${study}_$set" --config "configs/analyze.py:study=$study" "$@"
  for png in "$RUNS/${study}_$set"/plots/*.png; do cp "$png" "$OUT/${set}_$(basename "$png")"; done
  cp "$RUNS/${study}_$set/results.json" "$OUT/${study}_$set.json"
}

ipc1() {
  for set in mtt_ipc1 dsa_ipc1; do
    studied $set max_logit tsne && continue
    main "$RUNS/full_data" --config configs/train.py:train_per_class=1000,epochs=4
    ce_evaluation $set
    study max_logit $set --config.analyze.source="$TABLES/${set}_ce_eval" --config.analyze.reference="$RUNS/full_data" \
        --config.analyze.ood_dataset=digits
    study tsne $set --config.analyze.source="$TABLES/${set}_ce_eval" --config.analyze.reference="$RUNS/full_data"
  done
  for set in dc_ipc1 dsa_ipc1 mtt_ipc1 dm_ipc1; do
    studied $set mts_ratio && studied ${set}_reference_fit mts_ratio && continue
    if [ -f "$TABLES/${set}_ce_eval/results.json" ] || [ $set != dm_ipc1 ]; then
      ce_evaluation $set
      study mts_ratio $set --config.analyze.source="$TABLES/${set}_ce_eval"
      study mts_ratio ${set}_reference_fit --config.analyze.source="$TABLES/${set}_ce_eval" \
          --config.calibration.ts_method=lbfgs_reference
    fi
  done
}

ipc10() {
  for set in dsa_ipc10 dsa_mdt_ipc10 mtt_ipc10; do
    dir=experiments/results/fmnist_dd; [ "${set%%_*}" = mtt ] && dir=experiments/results/fmnist_mtt
    study svd_spectrum $set --config.analyze.source="$dir/$set.npz"
  done
  for set in dsa_ipc10 mtt_ipc10; do
    studied $set mts_ratio calibration_size && continue
    ce_evaluation $set
    study mts_ratio $set --config.analyze.source="$TABLES/${set}_ce_eval"
    study calibration_size $set --config.analyze.source="$TABLES/${set}_ce_eval"
  done
  studied dsa_ipc10 svd_truncation && return 0
  ce_evaluation dsa_ipc10
  ce_evaluation dsa_mdt_ipc10
  main "$RUNS/random_ipc10_eval" --config "configs/evaluate.py:$DD_CALIBRATION_PROTOCOL,baseline=random,ipc=10"
  study svd_truncation dsa_ipc10 --config.analyze.truncation_ks="(0,1,2,3)" \
      --config.analyze.source="$TABLES/dsa_ipc10_ce_eval+$TABLES/dsa_mdt_ipc10_ce_eval+$RUNS/random_ipc10_eval"
}

for part in ${PARTS:-ipc1 ipc10}; do $part; done
