#!/usr/bin/env bash
# MDT at the paper's iteration count (#21): IPC 1 DSA and DC sets distilled for 1000 iterations (the DC / DSA
# references' and the MTS paper's count; the committed sets have 60), with and without MDT, and the committed
# 60-iteration sets, all evaluated here with the MTS paper's protocol (experiments/lib.sh DD_CALIBRATION_PROTOCOL:
# configs/evaluate.py budget=cpu, 5 networks x 301 passes, CE; TS / MTS fitted on the distilled split and, on the
# same networks, on held-out real images), so that both iteration counts are compared on one machine:
#   bash experiments/fmnist_iterations.sh    # runs what is missing (every run resumes), then writes the tables
# Distillation: configs/distill.py budget=cpu with iterations=$ITERATIONS: 64 real images per class per matching
# step (the paper: 256), everything else at the paper's values; the sets are copied to
# experiments/results/fmnist_dd/<name>_it<ITERATIONS>_ipc1.npz. Variables: SETS (default "dsa dsa_mdt dc dc_mdt";
# two lanes may run disjoint SETS at once), ITERATIONS (default 1000), EVAL_EPOCHS (default 300, the networks train
# one pass more; 1000 is the MTS paper's evaluation, whose runs and tables get the suffix _e1000).
# Runs go to runs/fmnist_iterations/ and are kept in experiments/results/fmnist_iterations_runs/ (experiments/lib.sh
# KEEP), from which the tables are written to experiments/results/fmnist_iterations.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
ITERATIONS=${ITERATIONS:-1000}
EVAL_EPOCHS=${EVAL_EPOCHS:-300}
suffix=
[ "$EVAL_EPOCHS" = 300 ] || suffix=_e$EVAL_EPOCHS
RUNS=runs/fmnist_iterations$suffix
TABLE=experiments/results/fmnist_iterations$suffix.md
TABLE_MAKER=experiments/make_calibration_table.py
KEEP=experiments/results/fmnist_iterations${suffix}_runs
mkdir -p "$RUNS"

evaluate() {  # run name, set file
  run_kept "$1" --config "configs/evaluate.py:$DD_CALIBRATION_PROTOCOL,epochs=$EVAL_EPOCHS" \
      --config.evaluate.source="$2"
}

for name in ${SETS:-dsa dsa_mdt dc dc_mdt}; do
  method=${name%%_*}
  mdt=off
  [ "$name" != "$method" ] && mdt=fixed
  long=${name}_it${ITERATIONS}_ipc1
  file=experiments/results/fmnist_dd/$long.npz
  if [ ! -f "$file" ]; then
    main "runs/fmnist_iterations/$long" \
        --config "configs/distill.py:method=$method,ipc=1,mdt=$mdt,budget=cpu,iterations=$ITERATIONS"
    cp "runs/fmnist_iterations/$long/synthetic.npz" "$file"
  fi
  evaluate "${long}_eval" "$file"
  evaluate "${name}_ipc1_eval" "experiments/results/fmnist_dd/${name}_ipc1.npz"
done
