#!/usr/bin/env bash
# Where TS / MTS are fitted, on the committed Fashion-MNIST IPC 1 sets (#21, the MTS paper's Table 1 question):
# each set evaluated with calibration.fit_on=distilled_split (the paper's: 10 % per class of the distilled set,
# here its single image per class, also a training image) and fit_on=held_out_real (100 held-out real images per
# class), with the reference's evaluation schedule (configs/evaluate.py budget=cpu: 5 networks x 301 passes, DSA
# on; MTT with its learned lr), then the table:
#   bash experiments/fmnist_calibration_data.sh   # runs what is missing (every run resumes), then the table
# Runs go to runs/fmnist_calibration_data/; the table to experiments/results/fmnist_calibration_data.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
RUNS=runs/fmnist_calibration_data
TABLE=experiments/results/fmnist_calibration_data.md
mkdir -p "$RUNS"

for set in dsa_ipc1 dc_ipc1 mtt_ipc1; do
  dir=experiments/results/fmnist_dd
  extra=""
  if [ "$set" = mtt_ipc1 ]; then dir=experiments/results/fmnist_mtt; extra=",learned_lr=True"; fi
  for fit_on in distilled_split held_out_real; do
    main "$RUNS/${set}_${fit_on}_eval" --config "configs/evaluate.py:budget=cpu,fit_on=$fit_on$extra" \
        --config.evaluate.source="$dir/$set.npz"
    table
  done
done
