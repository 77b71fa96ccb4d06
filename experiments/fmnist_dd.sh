#!/usr/bin/env bash
# Fashion-MNIST dataset distillation at the CPU budget (configs/distill.py budget=cpu, configs/evaluate.py
# budget=cpu: 5 evaluation networks x 301 epochs), then the results table:
#   bash experiments/fmnist_dd.sh            # runs what is missing (every run resumes), then writes the table
# Runs go to runs/fmnist_dd/; the table to experiments/results/fmnist_dd.md; the distilled sets are copied to
# experiments/results/fmnist_dd/<name>.npz. Herding embeds with runs/quickstart (`make quickstart`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=runs/fmnist_dd
OUT=experiments/results/fmnist_dd
mkdir -p "$RUNS" "$OUT"
main() { "$PY" -m calibjax.main "$@"; }

distill_and_evaluate() {  # name, distill presets
  local name=$1 presets=$2
  main --config "configs/distill.py:$presets,budget=cpu" --workdir "$RUNS/$name"
  cp "$RUNS/$name/synthetic.npz" "$OUT/$name.npz"
  main --config configs/evaluate.py:budget=cpu --config.evaluate.source="$RUNS/$name" --workdir "$RUNS/${name}_eval"
}

for ipc in ${IPCS:-1 10}; do
  main --config "configs/evaluate.py:budget=cpu,baseline=random,ipc=$ipc" --workdir "$RUNS/random_ipc${ipc}_eval"
  [ -d runs/quickstart ] && main --config "configs/evaluate.py:budget=cpu,baseline=herding,ipc=$ipc" \
      --config.evaluate.herding_model=runs/quickstart --workdir "$RUNS/herding_ipc${ipc}_eval"
  distill_and_evaluate "dsa_ipc${ipc}" "method=dsa,ipc=$ipc"
  distill_and_evaluate "dsa_mdt_ipc${ipc}" "method=dsa,ipc=$ipc,mdt=fixed"
  if [ "$ipc" = 1 ]; then
    distill_and_evaluate "dsa_mdtdyn_ipc${ipc}" "method=dsa,ipc=$ipc,mdt=dynamic"
    distill_and_evaluate "dc_ipc${ipc}" "method=dc,ipc=$ipc"
    distill_and_evaluate "dc_mdt_ipc${ipc}" "method=dc,ipc=$ipc,mdt=fixed"
    for baseline in loss=label_smoothing loss=focal mixing=mixup; do  # the paper's train-time calibration
      main --config "configs/evaluate.py:budget=cpu,$baseline" --config.evaluate.source="$RUNS/dsa_ipc${ipc}" \
          --workdir "$RUNS/dsa_ipc${ipc}_${baseline#*=}_eval"
    done
  fi
done
"$PY" experiments/make_table.py "$RUNS" > experiments/results/fmnist_dd.md
