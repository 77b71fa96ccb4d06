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
PY=${PYTHON:-.venv/bin/python}
RUNS=runs/fmnist_mtt
OUT=experiments/results/fmnist_mtt
EXPERTS=${EXPERTS:-1}
mkdir -p "$RUNS" "$OUT"
# Runs `python -m calibjax.main ... --workdir $1` unless that workdir already has its results.json; an
# unfinished run resumes from its checkpoint.
main() {
  local workdir=$1; shift
  [ -f "$workdir/results.json" ] || "$PY" -m calibjax.main "$@" --workdir "$workdir"
}
table() {  # written aside and moved, so two lanes never leave a half-written table
  "$PY" experiments/make_table.py "$RUNS" > "$RUNS/table.md.$$"
  mv "$RUNS/table.md.$$" experiments/results/fmnist_mtt.md
}

main "$RUNS/buffer" --config "configs/buffer.py:experts=$EXPERTS"
for ipc in ${IPCS:-1 10}; do
  for mdt in ${MDTS:-off fixed dynamic}; do
    name=$(case $mdt in off) echo mtt;; fixed) echo mtt_mdt;; dynamic) echo mtt_mdtdyn;; esac)_ipc$ipc
    main "$RUNS/$name" --config "configs/distill.py:method=mtt,ipc=$ipc,mdt=$mdt,budget=cpu" \
        --config.distill.mtt.buffer_dir="$RUNS/buffer"
    cp "$RUNS/$name/synthetic.npz" "$OUT/$name.npz"
    main "$RUNS/${name}_eval" --config configs/evaluate.py:budget=cpu,learned_lr=True \
        --config.evaluate.source="$RUNS/$name"
    table
  done
done
