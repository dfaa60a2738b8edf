#!/usr/bin/env bash
# Regenerates every file in bench/results/, each command in a fresh process.
#
#   bench/reproduce.sh                # the full runs, into bench/results/ (about 1.5 h on
#                                     # a 2-core CPU; cpu_as_written's PyTorch retained graph
#                                     # alone takes 82 s a call at T=1000)
#   bench/reproduce.sh --smoke DIR    # every command once at tiny sizes, into DIR: checks
#                                     # that each runs, measures nothing worth keeping
#
# The headline commands (cpu_article, cpu_large, cpu_as_written) run three times, their
# runs spread over the session: <name>.json and .png, then <name>_run2.json and
# <name>_run3.json. Quote a ratio from one run with its interval, and say how it moved
# between the three.
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

# --- the headline commands, first run -------------------------------------------------
article=(--lengths 10,100,1000,10000 --compile-repeats 3)
large=(--scenarios rnn_loss --lengths 10,100,1000 --input 64 --hidden 256 --batch 32)
# --repeats 5: PyTorch's retained graph takes 82 s a call at T=1000 (O(T^2)).
as_written=(--scenarios train_as_written --loops scan,fori --lengths 10,100,1000
            --max-quadratic 1000 --repeats 5)
bench cpu_article "${article[@]}"             # cpu_article.json cpu_article.png
bench cpu_large "${large[@]}"                 # cpu_large.json cpu_large.png
# The same, each implementation timed alone (not interleaved): what interleaving changes.
bench cpu_large_blocks "${large[@]}" --timing blocks  # cpu_large_blocks.json .png
bench cpu_as_written "${as_written[@]}"       # cpu_as_written.json cpu_as_written.png

# --- loop options, the hoisted body, a batch sweep -------------------------------------
bench cpu_remat --scenarios rnn_loss --loops scan,remat,remat:chunk=10,remat:chunk=32 \
  --lengths 10,100,1000 --input 64 --hidden 256 --batch 32 --no-torch --repeats 5
bench cpu_unroll --scenarios rnn_loss \
  --loops python,scan,scan:unroll=2,scan:unroll=4,scan:unroll=8,scan:unroll=16,fori:unroll=8 \
  --lengths 10,100 --no-torch --compile-repeats 3
hoisted=(--scenarios rnn_loss,rnn_loss_hoisted --loops scan,fori --lengths 1000 --input 256
         --hidden 256 --batch 32 --no-torch)
bench cpu_hoisted "${hoisted[@]}"                        # cpu_hoisted.json cpu_hoisted.png
bench cpu1_hoisted taskset -c 0 -- "${hoisted[@]}"       # cpu1_hoisted.json cpu1_hoisted.png
bench cpu_sweep_batch --scenarios rnn_loss --loops python,scan,remat:chunk=10 --lengths 100 \
  --input 64 --hidden 256 --sweep batch=1,4,16,64        # cpu_sweep_batch.json .png

# --- PyTorch's cells: the full-sequence LSTM and GRU gradient beside nn.LSTM, nn.GRU ----
cells=(--scenarios rnn_loss,rnn_loss_hoisted --loops scan,scan:unroll=8,remat,remat:policy=dots_saveable
       --lengths 1000)
cells_large=(--input 64 --hidden 256 --batch 32)
cells_small=(--input 10 --hidden 5 --batch 1)
bench cpu_lstm --cell lstm "${cells[@]}" "${cells_large[@]}"        # cpu_lstm.json .png
bench cpu_lstm_small --cell lstm "${cells[@]}" "${cells_small[@]}"  # cpu_lstm_small.json .png
bench cpu_gru --cell gru "${cells[@]}" "${cells_large[@]}"          # cpu_gru.json .png
bench cpu_gru_small --cell gru "${cells[@]}" "${cells_small[@]}"    # cpu_gru_small.json .png
# Where the LSTM gradient's time goes (forward, whole, each product alone), beside nn.LSTM.
profile=()
if wanted cpu_lstm_profile; then
if ((${#SMOKE[@]})); then profile=(--length 3 --input 3 --hidden 4 --batch 2 --repeats 5 --min-time 0); fi
wait_idle
"${NICE_CMD[@]}" python -m loopgrad_jax.bench.cell_profile --cell lstm --loop scan:unroll=8 "${profile[@]}" \
  --json "$OUT/cpu_lstm_profile.json" > "$OUT/cpu_lstm_profile.txt"
fi

# --- checkpointed reverse mode: remat:checkpoints=C beside equinox, memory against time --
if wanted cpu_checkpoints; then
checkpointing=()
if ((${#SMOKE[@]})); then
  checkpointing=(--length 6 --sizes article --checkpoints 2,sqrt --repeats 3 --min-time 0)
fi
wait_idle
"${NICE_CMD[@]}" python -m loopgrad_jax.bench.checkpoints "${checkpointing[@]}" \
  --json "$OUT/cpu_checkpoints.json" --plot "$OUT/cpu_checkpoints.png" > "$OUT/cpu_checkpoints.txt"
fi

# --- Flax NNX: this library's loops beside nnx.RNN, nnx.scan and loops over a module ------
if wanted cpu_flax; then
flaxing=()
if ((${#SMOKE[@]})); then
  flaxing=(--length 6 --sizes article --cells article,lstm --repeats 3 --min-time 0)
fi
wait_idle
"${NICE_CMD[@]}" python -m loopgrad_jax.bench.flax_peers --min-time 5 "${flaxing[@]}" \
  --json "$OUT/cpu_flax.json" > "$OUT/cpu_flax.txt"
fi

# --- PyTorch's own loops: eager, torch.compile, the functional scan, beside lax.scan -----
if wanted cpu_torch_loops; then
torching=(--lengths 10,100,1000)
if ((${#SMOKE[@]})); then torching=(--lengths 3 --max-unroll 1 --repeats 3 --min-time 0); fi
wait_idle
"${NICE_CMD[@]}" python -m loopgrad_jax.bench.torch_loops "${torching[@]}" \
  --json "$OUT/cpu_torch_loops.json" > "$OUT/cpu_torch_loops.txt"
fi

# The same loop kinds through loopgrad-bench: compile and run time from T=10 to 10000.
bench cpu_checkpoints_lengths --scenarios stack,rnn_loss \
  --loops scan,remat,remat:checkpoints=8,remat:checkpoints=32 --lengths 10,1000,10000 \
  --no-torch --compile-repeats 3                # cpu_checkpoints_lengths.json .png

# --- data-parallel: the batch split over 2 (and 4) virtual CPU devices ------------------
parallel=(--scenarios rnn_loss --loops scan --lengths 1000 --input 64 --hidden 256 --batch 32
          --devices 2)
bench cpu_parallel "${parallel[@]}"           # cpu_parallel.json cpu_parallel.png
bench cpu_parallel_run2 "${parallel[@]}"      # cpu_parallel_run2.json
bench cpu_parallel_run3 "${parallel[@]}"      # cpu_parallel_run3.json
# Weak scaling: B/n = 32 examples per device on the diagonal (B=32 n=1, 64 n=2, 128 n=4).
bench cpu_parallel_weak --scenarios rnn_loss --loops scan --lengths 1000 --input 64 \
  --hidden 256 --sweep batch=32,64,128 --devices 2,4 --no-torch  # cpu_parallel_weak.json .png

# --- DEER (loop="parallel") beside scan: the full-sequence gradient -------------------------
deer=(--scenarios rnn_loss --loops parallel,parallel:jacobian=diag,scan,scan:unroll=8 --input 10
      --batch 1 --repeats 5 --min-time 0.2 --no-torch)
bench cpu_deer "${deer[@]}" --hidden 5 --lengths 100,1000,10000   # cpu_deer.json .png
bench cpu_deer_h64 "${deer[@]}" --hidden 64 --lengths 100,1000    # cpu_deer_h64.json .png

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
if ((${#SMOKE[@]} == 0)) && wanted cpu_as_written_grid; then  # each takes tens of minutes: no smoke version
  wait_idle
  "${NICE_CMD[@]}" python -m loopgrad_jax.bench.as_written_grid \
    --json "$OUT/cpu_as_written_grid_calibration.json"
  wait_idle
  "${NICE_CMD[@]}" python -m loopgrad_jax.bench.as_written_grid --max-call-s 20 \
    --json "$OUT/cpu_as_written_grid.json"
  # Points whose timing window saw other processes on the CPU are timed again.
  wait_idle
  "${NICE_CMD[@]}" python -m loopgrad_jax.bench.as_written_grid --max-call-s 20 \
    --recheck "$OUT/cpu_as_written_grid.json" --json "$OUT/cpu_as_written_grid.json"
fi

# --- the headline commands, runs 2 and 3 -----------------------------------------------
bench cpu_article_run2 "${article[@]}"        # cpu_article_run2.json
bench cpu_large_run2 "${large[@]}"            # cpu_large_run2.json
bench cpu_as_written_run2 "${as_written[@]}"  # cpu_as_written_run2.json
bench cpu_article_run3 "${article[@]}"        # cpu_article_run3.json
bench cpu_large_run3 "${large[@]}"            # cpu_large_run3.json
bench cpu_as_written_run3 "${as_written[@]}"  # cpu_as_written_run3.json

echo "reproduce.sh: done; tables in $OUT/*.txt" >&2
