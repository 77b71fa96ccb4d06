#!/usr/bin/env bash
# Fashion-MNIST trajectory matching at the CPU budget: an expert buffer (configs/buffer.py, EXPERTS experts x 30
# epochs), MTT with and without MDT (fixed r = 0.1, dynamic r ~ U[0, 0.1]) at IPC 1 and 10 (configs/distill.py
# budget=cpu: 150 iterations, IPC 10 with 10 synthetic images per student step), each set evaluated with its
# learned lr (configs/evaluate.py budget=cpu: 5 networks x 301 epochs), then the results table:
#   bash experiments/fmnist_mtt.sh                # runs what is missing (every run resumes), writes the table
#   IPCS=1 bash experiments/fmnist_mtt.sh &  IPCS=10 bash experiments/fmnist_mtt.sh   # two lanes, once the
#                                                 # buffer exists (the buffer itself is not safe to run twice)
# Variables: EXPERTS (default 1), IPCS (default "1 10"), MDTS (default "off fixed dynamic").
# Runs go to runs/fmnist_mtt/; the table to experiments/results/fmnist_mtt.md; the distilled sets (with their
# learned lr) are copied to experiments/results/fmnist_mtt/<name>.npz.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
RUNS=runs/fmnist_mtt
TABLE=experiments/results/fmnist_mtt.md
OUT=experiments/results/fmnist_mtt
EXPERTS=${EXPERTS:-1}
mkdir -p "$RUNS" "$OUT"
EVALUATE_PRESETS=budget=cpu,$TABLE_PROTOCOL,learned_lr=True
DISTILL_FLAGS=(--config.distill.mtt.buffer_dir="$RUNS/buffer")

main "$RUNS/buffer" --config "configs/buffer.py:experts=$EXPERTS"
for ipc in ${IPCS:-1 10}; do
  for mdt in ${MDTS:-off fixed dynamic}; do
    name=$(case $mdt in off) echo mtt;; fixed) echo mtt_mdt;; dynamic) echo mtt_mdtdyn;; esac)_ipc$ipc
    distill_and_evaluate "$name" "method=mtt,ipc=$ipc,mdt=$mdt"
  done
done
