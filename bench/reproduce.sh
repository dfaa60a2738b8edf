#!/usr/bin/env bash
# Regenerates every file in bench/results/, each command in a fresh process.
#
#   bench/reproduce.sh                # the full runs, into bench/results/ (36-55 min on a
#                                     # 2-core CPU, the as-written grid left out)
#   bench/reproduce.sh --smoke DIR    # every command once at tiny sizes, into DIR: checks
#                                     # that each runs, measures nothing worth keeping
#
# One run of each command, at one commit, in one sitting: every figure the documents quote
# comes from these files (bench/RESULTS.md is generated from them: loopgrad-bench report).
#
# Run it from a clean checkout with the package installed (pip install -e '.[bench,torch]').
# Before each command it waits until other processes leave the CPU idle (under 0.25 busy
# cores for 10 s, on Linux; at most 30 min, then it says so and goes on: every record's
# other_cores shows what was left). WAIT_IDLE=0 skips the wait. NICE="nice -n -20" (as
# root) raises the benchmark's priority. ONLY="cpu_large cpu_large_run2" regenerates only
# the files named (names as below, without .json).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=bench/results
SMOKE=()
if [[ "${1:-}" == "--smoke" ]]; then
  OUT=${2:?usage: bench/reproduce.sh --smoke DIR}
  mkdir -p "$OUT"
  # Later flags win: tiny sizes, few samples, short windows, every O(T^2) case kept.
  SMOKE=(--lengths 3 --input 3 --hidden 4 --batch 2 --window 2 --repeats 5 --min-time 0
         --compile-repeats 1 --max-quadratic 3)
  WAIT_IDLE=${WAIT_IDLE:-0}
fi
read -r -a NICE_CMD <<< "${NICE:-}"

wanted() {  # wanted NAME: true unless ONLY is set and does not name NAME
  [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]
}

wait_idle() {
  [[ "${WAIT_IDLE:-1}" == 0 || ! -r /proc/stat ]] && return 0
  local deadline=$((SECONDS + 1800)) before after
  while ((SECONDS < deadline)); do
    before=$(awk '/^cpu /{print $2 + $3 + $4}' /proc/stat)
    sleep 10
    after=$(awk '/^cpu /{print $2 + $3 + $4}' /proc/stat)
    # clock ticks (100 per second) over 10 s: under 25 ticks/s is under 0.25 busy cores
    if (((after - before) < 250)); then return 0; fi
  done
  echo "reproduce.sh: the CPU did not go idle in 30 min; running anyway" >&2
}

bench() {  # bench NAME [taskset -c 0 --] FLAGS...: writes $OUT/NAME.json and .png
  local name=$1 plot=1
  shift
  wanted "$name" || return 0
  local prefix=()
  if [[ "${1:-}" == taskset ]]; then prefix=("$1" "$2" "$3"); shift 4; fi
  if [[ "$name" == *_run[23] ]]; then plot=0; fi
  wait_idle
  echo "reproduce.sh: $name" >&2
  local outputs=(--json "$OUT/$name.json")
  if ((plot)); then outputs+=(--plot "$OUT/$name.png"); fi
  "${NICE_CMD[@]}" "${prefix[@]}" python -m loopgrad_jax.bench "$@" "${outputs[@]}" \
    --no-progress "${SMOKE[@]}" > "$OUT/$name.txt"
}

# --- the article's scenarios at its size, and its model at a realistic size -------------
# Every loop kind but parallel (DEER: cpu_deer below); while:max_steps=1000 runs
# lax.while_loop's semantics as a bounded scan.
# Every peer (--peers all) beside them in rnn_loss: PyTorch's eager loop, nn.RNN,
# torch.compile (up to T=100), its functional scan, flax's nnx.RNN, equinox's
# checkpointed scan.
bench cpu_article --lengths 10,100,1000 --compile-repeats 3 --peers all \
  --loops python,scan,fori,remat,while,while:max_steps=1000   # cpu_article.json .png
# DEER (parallel) is left out here too: its full Jacobians at H=256 take gigabytes.
bench cpu_large --scenarios rnn_loss --lengths 10,100,1000 --input 64 --hidden 256 --batch 32 \
  --loops python,scan,fori,remat,while:max_steps=1000 --peers eager,fused,nnx.RNN,equinox
# The article's model layer by layer (the layer rule), the batch also split over 2 devices,
# beside nn.RNN: the same runs as cpu_rnn_tanh's rnn_loss_hoisted, on the article's cell.
# 40 samples (not 20) here and in cpu_rnn_tanh: the headline ratios to nn.RNN, whose
# intervals 20 samples left about 0.2x wide.
bench cpu_large_hoisted --scenarios rnn_loss_hoisted --lengths 1000 --input 64 --hidden 256 \
  --batch 32 --loops scan,fori --devices 2 --peers fused --repeats 40 # cpu_large_hoisted.json .png
# The article's per-step training loop: both exact methods beside PyTorch running each; the
# O(T^2) retained-graph algorithms up to T=300 (PyTorch's takes 82 s a call at T=1000).
bench cpu_as_written --scenarios train_as_written --loops scan,fori --lengths 10,100,1000 \
  --max-quadratic 300 --repeats 5                                    # cpu_as_written.json .png

# --- memory: remat and its chunks beside scan --------------------------------------------
bench cpu_remat --scenarios rnn_loss --loops scan,remat,remat:chunk=10,remat:chunk=32 \
  --lengths 10,100,1000 --input 64 --hidden 256 --batch 32 --no-torch --repeats 5

# --- PyTorch's cells beside their fused modules (nn.RNN, nn.LSTM, nn.GRU) -----------------
# Per step (rnn_loss, JAX's rule for the loop) and layer by layer (rnn_loss_hoisted, the
# layer rule), with where the time goes (--profile: forward, backward, per-step products),
# and each JAX row again with the batch split over 2 virtual devices (one per core).
cells=(--scenarios rnn_loss,rnn_loss_hoisted --loops scan,scan:unroll=4,fori --lengths 1000
       --input 64 --hidden 256 --batch 32 --profile --devices 2)
bench cpu_rnn_tanh --cell rnn_tanh "${cells[@]}" --repeats 40   # cpu_rnn_tanh.json .png
bench cpu_lstm --cell lstm "${cells[@]}"           # cpu_lstm.json .png
bench cpu_gru --cell gru "${cells[@]}"             # cpu_gru.json .png
# The LSTM wide and short, and its batch from 8 to 128.
bench cpu_lstm_h1024 --cell lstm --scenarios rnn_loss,rnn_loss_hoisted --loops scan,scan:unroll=4 \
  --lengths 100 --input 64 --hidden 1024 --batch 64                 # cpu_lstm_h1024.json .png
bench cpu_lstm_batch --cell lstm --scenarios rnn_loss,rnn_loss_hoisted --loops scan \
  --lengths 1000 --input 64 --hidden 256 --sweep batch=8,32,128     # cpu_lstm_batch.json .png

# --- checkpointed reverse mode: remat:checkpoints=C beside equinox, memory against time --
# (--preset checkpoints: rnn_loss at T=1000, each row's body evaluations counted)
bench cpu_checkpoints --preset checkpoints --repeats 5              # cpu_checkpoints.json .png
bench cpu_checkpoints_large --preset checkpoints --repeats 5 --input 64 --hidden 256 --batch 32

# --- Flax NNX: this library's loops beside nnx.RNN and the library's loops over Flax's cells
# (--preset flax: rnn_loss at T=1000); every cell Flax has, at I=64, H=256, B=32.
flaxing=(--preset flax --input 64 --hidden 256 --batch 32 --min-time 5 --repeats 5)
bench cpu_flax_article --cell article "${flaxing[@]}"       # cpu_flax_article.json .png
bench cpu_flax_rnn_tanh --cell rnn_tanh "${flaxing[@]}"     # cpu_flax_rnn_tanh.json .png
bench cpu_flax_lstm --cell lstm "${flaxing[@]}"             # cpu_flax_lstm.json .png
bench cpu_flax_gru --cell gru "${flaxing[@]}"               # cpu_flax_gru.json .png

# --- data-parallel: the batch split over 2 (and 4) virtual CPU devices ------------------
parallel=(--scenarios rnn_loss --loops scan --lengths 1000 --input 64 --hidden 256 --batch 32
          --devices 2)
bench cpu_parallel "${parallel[@]}"           # cpu_parallel.json cpu_parallel.png

# --- DEER (loop="parallel") beside scan: the full-sequence gradient -------------------------
deer=(--scenarios rnn_loss --loops parallel,parallel:jacobian=diag,scan,scan:unroll=8 --input 10
      --batch 1 --repeats 5 --min-time 0.2 --no-torch)
bench cpu_deer "${deer[@]}" --hidden 5 --lengths 100,1000,10000,100000   # cpu_deer.json .png
# At H=64 (full DEER keeps T*64*64 Jacobian numbers an iteration: 1.6 GB at T=100000).
bench cpu_deer_h64 "${deer[@]}" --hidden 64 --lengths 100,1000,10000   # cpu_deer_h64.json .png

# --- mixed precision: precision="bf16" against float32, the LSTM's gradient, interleaved ---
bench cpu_bf16 --cell lstm --scenarios rnn_loss --loops scan --lengths 100 --input 64 \
  --hidden 256 --batch 32 --precision float32,bf16 --no-torch    # cpu_bf16.json

# --- a bidirectional 2-layer LSTM, packed: lg.rnn beside packed nn.LSTM, nnx.Bidirectional ---
bidirectional=(--cell lstm --layers 2 --bidirectional --loops scan,scan:unroll=8,fori --min-time 5)
bench cpu_bidirectional "${bidirectional[@]}" --lengths-spread 0.5 --lengths 200 --input 64 \
  --hidden 256 --batch 32 --repeats 5                            # cpu_bidirectional.json
bench cpu_bidirectional_article "${bidirectional[@]}" --lengths-spread 0 --lengths 1000 \
  --input 10 --hidden 5 --batch 1 --repeats 20                   # cpu_bidirectional_article.json

# --- the as-written methods: auto's calibration grid, then the grid that checks it -----
# Not part of a default run (each takes tens of minutes): the data as_written_method="auto"
# is fit to. AS_WRITTEN_GRID=1 re-makes it.
if ((${#SMOKE[@]} == 0)) && [[ "${AS_WRITTEN_GRID:-0}" == 1 ]] && wanted cpu_as_written_grid; then
  wait_idle
  "${NICE_CMD[@]}" python -m loopgrad_jax.bench as-written-grid \
    --json "$OUT/cpu_as_written_grid_calibration.json"
  wait_idle
  "${NICE_CMD[@]}" python -m loopgrad_jax.bench as-written-grid --max-call-s 20 \
    --json "$OUT/cpu_as_written_grid.json"
  # Points whose timing window saw other processes on the CPU are timed again.
  wait_idle
  "${NICE_CMD[@]}" python -m loopgrad_jax.bench as-written-grid --max-call-s 20 \
    --recheck "$OUT/cpu_as_written_grid.json" --json "$OUT/cpu_as_written_grid.json"
fi

echo "reproduce.sh: done; tables in $OUT/*.txt" >&2
