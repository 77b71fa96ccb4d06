#!/usr/bin/env bash
# The calibration-aware distillation leaderboard on Fashion-MNIST (experiments/leaderboard.py says what a row is):
#   bash experiments/leaderboard.sh    # runs what is missing (every run resumes), then writes the table and figure
# Sets: the committed DC / DSA / MTT sets (experiments/results/fmnist_dd, fmnist_mtt) with and without MDT, and DM
# with and without MDT (distilled here at configs/distill.py budget=cpu when not committed; copied to
# experiments/results/fmnist_dd/); controls: random real images and herding (embedding: runs/quickstart) at the
# same IPC. Each is evaluated with configs/evaluate.py budget=cpu (5 networks x 301 passes, DSA on), trained with
# CE and with label smoothing (the train-time baseline with the lowest mean ECE at IPC 1 in
# experiments/results/fmnist_table1.md), TS / MTS / conformal sets fitted on the distilled split and on 100 held-out
# real images per class. Variables: IPCS (default "1 10"), SETS (default "dc dsa dm mtt dc_mdt dsa_mdt dm_mdt
# mtt_mdt"), VARIANTS (default "loss=ce loss=label_smoothing").
# Runs go to runs/leaderboard/ and are kept in experiments/results/leaderboard_runs/ (experiments/lib.sh KEEP), from
# which the table and figure are written to experiments/results/leaderboard.{md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/lib.sh
RUNS=runs/leaderboard
TABLE=experiments/results/leaderboard
KEEP=experiments/results/leaderboard_runs
PROTOCOL=budget=cpu,fit_on=distilled_split,also_fit_on=held_out_real
mkdir -p "$RUNS"

table() {  # the table and the figure (experiments/lib.sh's table writes one file)
  "$PY" experiments/leaderboard.py "$KEEP" "$TABLE.$$.md" && mv "$TABLE.$$.md" "$TABLE.md" \
    && mv "$TABLE.$$.png" "$TABLE.png"
}

finished() {  # whether every variant of run name $1 is kept
  local variant
  for variant in ${VARIANTS:-loss=ce loss=label_smoothing}; do
    kept "${1}_${variant#*=}_eval" || return 1
  done
}

evaluate() {  # run name, then configs/evaluate.py presets (beyond the protocol, each followed by a comma) and flags
  local name=$1 presets=$2; shift 2
  for variant in ${VARIANTS:-loss=ce loss=label_smoothing}; do
    run_kept "${name}_${variant#*=}_eval" --config "configs/evaluate.py:$PROTOCOL,$presets$variant" "$@"
  done
}

for ipc in ${IPCS:-1 10}; do
  evaluate "random_ipc$ipc" "baseline=random,ipc=$ipc,"
  finished "herding_ipc$ipc" || main runs/quickstart --config configs/quickstart.py
  evaluate "herding_ipc$ipc" "baseline=herding,ipc=$ipc," --config.evaluate.herding_model=runs/quickstart
  for name in ${SETS:-dc dsa dm mtt dc_mdt dsa_mdt dm_mdt mtt_mdt}; do
    method=${name%%_*}
    dir=experiments/results/fmnist_dd
    [ $method = mtt ] && dir=experiments/results/fmnist_mtt
    file=$dir/${name}_ipc$ipc.npz
    if [ ! -f "$file" ] && [ $method = dm ]; then
      mdt=off
      [ "$name" != dm ] && mdt=fixed
      main "$RUNS/${name}_ipc$ipc" --config "configs/distill.py:method=dm,ipc=$ipc,mdt=$mdt,budget=cpu"
      cp "$RUNS/${name}_ipc$ipc/synthetic.npz" "$file"
    fi
    if [ -f "$file" ]; then
      evaluate "${name}_ipc$ipc" "" --config.evaluate.source="$file"
    else
      echo "leaderboard: no committed $file; skipped" >&2
    fi
  done
done
table
