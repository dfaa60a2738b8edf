#!/usr/bin/env bash
# The checks to run on a GPU host, with the JAX that host ships, in one go:
# versions, the test suite (PyTorch-version tests deselected: fixtures record torch 2.13)
# and a short benchmark. Results land in $OUT (default bench/results).
#
#   OUT=/some/folder bash bench/gpu_check.sh
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Several test workers share one GPU: allocate on demand, not 75% of it each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python3 - <<'PY' | tee "$out/gpu_versions.txt"
import platform

import jax
import jaxlib
import optax

print("python", platform.python_version(), "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "optax", optax.__version__)
print("devices", jax.devices())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee -a "$out/gpu_versions.txt"

timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark -m "not torch" \
  > "$out/gpu_tests.log" 2>&1
echo "tests exit status $?" | tee -a "$out/gpu_tests.log"
tail -n 25 "$out/gpu_tests.log"

# PyTorch peers are left out: they would run on the host's CPU, not like for like.
timeout "${BENCH_TIMEOUT:-90}" python3 -m loopgrad_jax.bench --quick --backend gpu --no-torch \
  --no-progress --json "$out/gpu_quick.json" > "$out/gpu_quick.txt" 2>&1
echo "quick bench exit status $?"
timeout "${BENCH_TIMEOUT:-90}" python3 -m loopgrad_jax.bench --backend gpu --no-torch \
  --scenarios rnn_loss --loops scan,scan:unroll=8,fori,remat,remat:chunk=10 \
  --lengths 100,1000 --input 64 --hidden 256 --batch 32 --repeats 20 \
  --no-progress --json "$out/gpu_large.json" > "$out/gpu_large.txt" 2>&1
echo "large bench exit status $?"
tail -n 30 "$out/gpu_large.txt"

# Per-step outputs: fori's linear reverse mode (custom JVP, write-once outputs)
# beside scan, where XLA on a GPU launches each loop step's kernels.
timeout "${BENCH_TIMEOUT:-90}" python3 -m loopgrad_jax.bench --backend gpu --no-torch \
  --scenarios stack,rnn_loss --loops scan,fori --lengths 1000,10000 \
  --repeats 20 --no-progress --json "$out/gpu_loops.json" > "$out/gpu_loops.txt" 2>&1
echo "loops bench exit status $?"
tail -n 20 "$out/gpu_loops.txt"

# PyTorch's cells: the LSTM and GRU gradient, stepped and hoisted (layer by layer).
# CELLS=0 skips them (their files are committed from an earlier run).
[[ "${CELLS:-1}" == 0 ]] && exit 0
cells=(--backend gpu --no-torch --scenarios rnn_loss,rnn_loss_hoisted --loops scan,scan:unroll=8
       --lengths 1000 --input 64 --hidden 256 --batch 32 --repeats 20 --no-progress)
timeout "${BENCH_TIMEOUT:-90}" python3 -m loopgrad_jax.bench --cell lstm "${cells[@]}" \
  --json "$out/gpu_lstm.json" > "$out/gpu_lstm.txt" 2>&1
echo "lstm bench exit status $?"
head -n 8 "$out/gpu_lstm.txt"
timeout "${BENCH_TIMEOUT:-90}" python3 -m loopgrad_jax.bench --cell gru "${cells[@]}" \
  --json "$out/gpu_gru.json" > "$out/gpu_gru.txt" 2>&1
echo "gru bench exit status $?"
head -n 8 "$out/gpu_gru.txt"
