#!/usr/bin/env bash
# The side-by-side benchmark (benchmarks/speed.py) on a CUDA GPU, larger batches included, and a fast subset of
# the tests on that GPU, in under 8 minutes; the tables go to OUT (default gpu_speed.md) with the GPU's name:
#   bash benchmarks/gpu.sh [OUT]
# Needs jax with CUDA and torch with CUDA on the machine. Pure-Python dependencies missing there (ml-collections,
# ...) are installed from ./wheels if that folder exists (`pip download -d wheels ml-collections absl-py` here).
# Fashion-MNIST for the distillation rows: CALIBJAX_FASHION_MNIST_DIR, else the Debian package's folder.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_speed.md}
PY=${PYTHON:-python3}
if [ -d wheels ]; then "$PY" -m pip install -q --no-index --find-links wheels wheels/*.whl; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYCHECK'
import sys
import jax, torch
if jax.default_backend() != "gpu" or not torch.cuda.is_available():
  sys.exit(f"benchmarks/gpu.sh needs a CUDA GPU visible to jax and torch; jax sees {jax.default_backend()}, "
           f"torch.cuda.is_available() = {torch.cuda.is_available()}")
PYCHECK
{ echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"; echo; } > "$OUT.head"
# IPC 50 in a second call, so that a slow IPC 50 row cannot crowd out the MTT rows; each call writes row by row.
timeout 270 "$PY" benchmarks/speed.py --large --gm-ipcs 1 10 --gm-repeats 2 --mtt-ipcs 10 --mtt-memory none remat \
    --out "$OUT.body1" || echo "(speed.py stopped early: exit $?)" >> "$OUT.body1"
timeout 110 "$PY" benchmarks/speed.py --sections gm mtt --gm-ipcs 50 --gm-repeats 1 --mtt-ipcs 50 --mtt-repeats 1 \
    --out "$OUT.body2" || echo "(speed.py stopped early: exit $?)" >> "$OUT.body2"
cat "$OUT.head" "$OUT.body1" "$OUT.body2" > "$OUT" && rm -f "$OUT.head" "$OUT.body1" "$OUT.body2"
timeout 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_fast_paths.py tests/test_models.py tests/test_metrics.py \
    | tail -3 | tee -a "$OUT"
echo "tables: $OUT"
