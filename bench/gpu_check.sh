#!/usr/bin/env bash
# The checks to run on a GPU host, with the JAX (and CUDA PyTorch) that host ships, in one
# go of under 8 minutes: versions, the test suite (PyTorch-version tests deselected: the
# fixtures record torch 2.13) and short benchmarks with PyTorch's CUDA peers beside JAX on
# the same GPU. Results land in $OUT (default bench/results) as gpu_*.json / .txt; each
# JSON's meta records the GPU's model, driver and memory and the library versions.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#   BACKEND=cpu SMOKE=1 OUT=/tmp/smoke bash bench/gpu_check.sh   # every command at tiny
#                                     # sizes on the CPU: checks that each one runs
#
# TEST_TIMEOUT (180 s) bounds the tests, BENCH_TIMEOUT (40 s) each of the 7 benchmarks;
# TESTS=0 skips the tests.
set -uo pipefail
out=${OUT:-bench/results}
backend=${BACKEND:-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Several test workers share one GPU: allocate on demand, not 75% of it each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
small=()
if [[ "${SMOKE:-0}" == 1 ]]; then  # later flags win: tiny sizes, few samples
  small=(--lengths 3 --input 3 --hidden 4 --batch 2 --repeats 5 --min-time 0)
fi

python3 - <<'PY' | tee "$out/gpu_versions.txt"
import platform

import jax
import jaxlib
import optax

print("python", platform.python_version(), "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "optax", optax.__version__)
print("devices", jax.devices())
try:
    import torch
except ImportError:
    print("torch not installed: no PyTorch peers")
else:
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
          torch.cuda.is_available(),
          "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader | tee -a "$out/gpu_versions.txt"

if [[ "${TESTS:-1}" == 1 ]]; then
  timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -n 8 -p no:cacheprovider -m "not torch" \
    > "$out/gpu_tests.log" 2>&1
  echo "tests exit status $?" | tee -a "$out/gpu_tests.log"
  tail -n 25 "$out/gpu_tests.log"
fi

bench() {  # bench NAME FLAGS...: loopgrad-bench into $out/NAME.json and .txt
  local name=$1
  shift
  timeout "${BENCH_TIMEOUT:-40}" python3 -m loopgrad_jax.bench --backend "$backend" "$@" \
    --no-progress "${small[@]}" --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name exit status $?"
  head -n 14 "$out/$name.txt"
}

# The article's scenarios at its size (I=10, H=5, B=1; T = 10, 100, 1000), beside PyTorch's
# eager loop and nn.RNN on the same GPU.
bench gpu_quick --quick
large=(--scenarios rnn_loss --lengths 1000 --input 64 --hidden 256 --batch 32 --repeats 20)
# The article's model at a realistic size: JAX's loops beside PyTorch's eager loop and
# nn.RNN.
bench gpu_large "${large[@]}" --loops scan,scan:unroll=8,fori,remat --peers eager,fused
# PyTorch's cells beside cuDNN's nn.LSTM / nn.GRU / nn.RNN; the LSTM also through cuDNN from
# JAX (loop="cudnn") and with precision="bf16" (bf16 products, float32 state).
bench gpu_lstm --cell lstm "${large[@]}" --loops scan,scan:unroll=8,cudnn \
  --precision float32,bf16 --peers fused
bench gpu_gru --cell gru "${large[@]}" --loops scan,scan:unroll=8 --peers fused
bench gpu_rnn_tanh --cell rnn_tanh "${large[@]}" --loops scan,scan:unroll=8 --peers fused
# Per-step outputs: fori's linear reverse mode (custom JVP, write-once outputs) beside
# scan, where XLA on a GPU launches each loop step's kernels.
bench gpu_loops --scenarios stack,rnn_loss --loops scan,fori --lengths 1000,10000 \
  --repeats 20 --no-torch
# DEER (loop="parallel") at the article's size, T=10000: parallel in time beside scan.
bench gpu_deer --scenarios rnn_loss --lengths 10000 --input 10 --hidden 5 --batch 1 \
  --loops parallel,parallel:jacobian=diag,scan,scan:unroll=8 --repeats 10 --no-torch
