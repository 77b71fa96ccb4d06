#!/usr/bin/env bash
# Fashion-MNIST dataset distillation at the CPU budget (configs/distill.py budget=cpu, configs/evaluate.py
# budget=cpu: 5 evaluation networks x 301 epochs), then the results table:
#   bash experiments/fmnist_dd.sh            # runs what is missing (every run resumes), then writes the table
# Runs go to runs/fmnist_dd/; the table to experiments/results/fmnist_dd.md; the distilled sets are copied to
# experiments/results/fmnist_dd/<name>.npz. Herding embeds with runs/quickstart (`make quickstart`).
# Order: IPC 1 (baselines, DSA and DC with and without MDT, dynamic MDT, train-time calibration), then IPC 10.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
RUNS=runs/fmnist_dd
TABLE=experiments/results/fmnist_dd.md
OUT=experiments/results/fmnist_dd
mkdir -p "$RUNS" "$OUT"

baseline() {  # kind (random | herding), ipc
  local extra=()
  [ "$1" = herding ] && extra=(--config.evaluate.herding_model=runs/quickstart)
  main "$RUNS/${1}_ipc${2}_eval" --config "configs/evaluate.py:budget=cpu,$TABLE_PROTOCOL,baseline=$1,ipc=$2" \
      "${extra[@]}"
}

baseline random 1
baseline herding 1
for method in dsa dc; do
  distill_and_evaluate "${method}_ipc1" "method=$method,ipc=1"
  distill_and_evaluate "${method}_mdt_ipc1" "method=$method,ipc=1,mdt=fixed"
done
distill_and_evaluate dsa_mdtdyn_ipc1 "method=dsa,ipc=1,mdt=dynamic"
for variant in loss=label_smoothing loss=focal mixing=mixup; do  # the paper's train-time calibration baselines
  main "$RUNS/dsa_ipc1_${variant#*=}_eval" --config "configs/evaluate.py:budget=cpu,$TABLE_PROTOCOL,$variant" \
      --config.evaluate.source="$RUNS/dsa_ipc1"
  table
done
baseline random 10
distill_and_evaluate dsa_ipc10 "method=dsa,ipc=10"
distill_and_evaluate dsa_mdt_ipc10 "method=dsa,ipc=10,mdt=fixed"
baseline herding 10
distill_and_evaluate dc_ipc10 "method=dc,ipc=10"
distill_and_evaluate dc_mdt_ipc10 "method=dc,ipc=10,mdt=fixed"
table
