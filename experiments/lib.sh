# Shared by the experiments/*.sh scripts. A script sources it from the repository root, then sets RUNS (its runs
# directory) and TABLE (its table); one that distils also sets OUT (where the distilled sets are copied) and may
# change the defaults below.
PY=${PYTHON:-.venv/bin/python}
TABLE_MAKER=experiments/make_table.py
# The evaluation protocol of the committed tables: TS / MTS fitted on held-out real images, the lr decayed after
# pass epochs // 2 + 1 without a momentum restart (configs/evaluate.py presets fit_on and schedule).
TABLE_PROTOCOL=fit_on=held_out_real,schedule=decay_at_half
# The MTS paper's protocol for networks trained on distilled data (experiments/fmnist_table1.sh, fmnist_figures.sh):
# TS / MTS fitted on 10 % per class of the distilled set (T fitted to convergence, the MTS ratio chosen on the same
# images); there with the MTS ratio chosen on the test split; there with the MTS reference code's whole protocol (its
# LBFGS port of T, which stops near T = 1.5, and the ratio chosen on test); and on held-out real images.
DD_CALIBRATION_PROTOCOL=budget=cpu,fit_on=distilled_split,\
also_fit_on=distilled_split@test_reference+distilled_split@test_reference@lbfgs_reference+held_out_real
EVALUATE_PRESETS=budget=cpu,$TABLE_PROTOCOL  # the configs/evaluate.py presets of distill_and_evaluate
DISTILL_FLAGS=()  # extra --config flags of every distillation of distill_and_evaluate

# Runs `python -m calibjax.main ... --workdir $1` unless that workdir already has its results.json (a finished
# run would otherwise repeat its final calibration stage); an unfinished one resumes from its checkpoint.
main() {
  local workdir=$1; shift
  [ -f "$workdir/results.json" ] || "$PY" -m calibjax.main "$@" --workdir "$workdir"
}

# Written aside and moved, so that two lanes of one script never leave a half-written table; from the kept runs
# where the script keeps them (below).
table() { "$PY" "$TABLE_MAKER" "${KEEP:-$RUNS}" > "$TABLE.$$" && mv "$TABLE.$$" "$TABLE"; }

# Distils $RUNS/$1 with configs/distill.py:$2,budget=cpu, copies its set to $OUT, evaluates it and rewrites the
# table.
distill_and_evaluate() {
  local name=$1 presets=$2
  main "$RUNS/$name" --config "configs/distill.py:$presets,budget=cpu" "${DISTILL_FLAGS[@]}"
  cp "$RUNS/$name/synthetic.npz" "$OUT/$name.npz"
  main "$RUNS/${name}_eval" --config "configs/evaluate.py:$EVALUATE_PRESETS" --config.evaluate.source="$RUNS/$name"
  table
}

# Kept runs: runs/ does not outlive a session, so a script that sets KEEP copies each finished run's results.json
# and config.json to $KEEP/<run>/ (committed with its tables, which are made from there) and does not repeat a
# kept run.
kept() { [ -f "$KEEP/$1/results.json" ]; }
keep() { mkdir -p "$KEEP/$(basename "$1")" && cp "$1/results.json" "$1/config.json" "$KEEP/$(basename "$1")/"; }
# Runs $RUNS/$1 (`main` with the remaining arguments) unless it is kept, keeps it and rewrites the table.
run_kept() { kept "$1" && return; main "$RUNS/$1" "${@:2}"; keep "$RUNS/$1"; table; }
