#!/usr/bin/env bash
# One-shot GPU check for the Mosaic GPU flash attention (run from anywhere on an NVIDIA H100/H200):
#   (a) tests/test_attention_mgpu.py compiled (MIMO_PALLAS_INTERPRET=0, the front door's override):
#       the Mosaic GPU forward, backward (dq, dk/dv) and decode kernels vs the fp32 reference;
#   (b) bench/attention_gpu.py: Mosaic GPU ("mgpu") SWA fwd+bwd vs XLA dense-masked and banded at
#       T = 4K, 16K, 64K (goal: >= 10x dense at 16K), then the decode / verify table.
# Every step has its own timeout so the whole script stays under 8 minutes; a failing step is
# reported and the next one still runs. Results (log, JSON) go to $OUT if set, else bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MIMO_PALLAS_INTERPRET=0
# Keep XLA from grabbing 75% of HBM up front: the dense baseline and the tests share the device.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
SECONDS=0

echo "== environment"
if ! python -c "import jax, numpy, pytest" 2>/dev/null; then
  echo "missing packages; trying pip install -r requirements.txt pytest"
  timeout 120 pip install -q -r requirements.txt pytest || echo "pip install failed (offline?)"
fi
timeout 60 python - <<'PY' || echo "!! jax does not see a GPU"
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

echo "== (a) Mosaic GPU kernel tests, compiled (forward, backward, decode)"
timeout 120 python -m pytest tests/test_attention_mgpu.py -q -rs --durations=5 \
  -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests_mgpu.log" | tail -40
echo "mgpu tests exit status: ${PIPESTATUS[0]} (124 = timed out)  [${SECONDS}s elapsed]"

echo "== (b) benchmark"
timeout $((450 - SECONDS > 30 ? 450 - SECONDS : 30)) python bench/attention_gpu.py \
  --seq 4096,16384,65536 --iters 5 --json "$RESULTS/attention_gpu.json" \
  2>"$RESULTS/attention_gpu.err" | tee "$RESULTS/attention_gpu.log"
echo "benchmark exit status: ${PIPESTATUS[0]} (124 = timed out)  [${SECONDS}s elapsed]"
echo "(tracebacks of failed rows: $RESULTS/attention_gpu.err; last lines below)"
grep -E "Error|error:" "$RESULTS/attention_gpu.err" 2>/dev/null | tail -15
