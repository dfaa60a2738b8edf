"""``loopgrad-bench``: what each loop primitive costs, side by side with PyTorch.

Run ``loopgrad-bench --help`` for every option.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import loopgrad_jax as lg
from loopgrad_jax._progress import NoBar
from loopgrad_jax.bench import (
    as_written_grid,
    cases,
    peers,
    report,
    results_doc,
    run,
    timing,
    torch_peers,
)

#: The backends ``--backend`` accepts (JAX's platform names).
BACKENDS: tuple[str, ...] = ("cpu", "gpu", "tpu")

#: Settings when neither a flag nor ``--quick`` gives one.
DEFAULTS = {
    "loops": lg.LOOPS,
    "lengths": (10, 100, 1000),
    "input": 10,
    "hidden": 5,
    "batch": 1,
    "window": 10,
    "max_unroll": 100,
    "max_quadratic": 300,
    "repeats": 20,
    "warmup": 1,
    "compile_repeats": 1,
    "min_time": 0.5,
}

#: ``--quick``: the default sizes and lengths (the article's I=10, H=5, B=1 at T=10, 100
#: and 1000), where the recommendation means something, without what costs most (under
#: 90 s on a 2-core CPU): python loops only at T=10 (their compile time grows with T: the
#: RNN gradient's 5.7 s and truncated BPTT's 36 s at T=100), no O(T**2) as-written
#: algorithm past T=10, no train_as_written (:data:`QUICK_SCENARIOS`), and scan and
#: remat the only other loop kinds (fori costs what scan costs; while has no reverse
#: mode; parallel compiles for seconds and never won on a CPU). It also skips the
#: untimed first compile of each scenario and loop kind that keeps one-time costs out of
#: ``compile_s`` otherwise. Its timing window is the shortest that still reports
#: ``other_cores``.
QUICK = {
    **DEFAULTS,
    "loops": ("python", "scan", "remat"),
    "max_unroll": 10,
    "max_quadratic": 10,
    "min_time": timing.MIN_LOAD_WINDOW_S,
}

#: ``--quick``'s scenarios: train_as_written's PyTorch peers take seconds a call at T=1000
#: (real-time recurrent learning, 2.25 s at the article's size), so it is left out.
QUICK_SCENARIOS: tuple[str, ...] = tuple(
    s for s in cases.DEFAULT_SCENARIOS if s != "train_as_written"
)

#: ``--preset NAME``: the flags it stands for, placed before the command line's own (so
#: that a flag given there wins). Each is a comparison at T=1000 on the article's cell by
#: default (``--cell`` picks another where its peers run it):
#:
#: - ``checkpoints``: checkpointed reverse mode, memory against time: ``scan``, ``remat``,
#:   ``remat:chunk=32`` (32 ~ sqrt(T)) and ``remat:checkpoints=C`` beside equinox's
#:   checkpointed scan with the same ``C`` (8, 32 and 45 = ceil(sqrt(2T))), each row's
#:   body evaluations counted.
#: - ``flax``: this library's loops beside Flax NNX: ``nnx.RNN`` over Flax's built-in
#:   cell (and with ``unroll=8``), the library's loops stepping the Flax model's cells
#:   (``flax_loss:LOOP``), and ``nnx.RNN`` timed again as its own noise floor.
PRESETS: dict[str, tuple[str, ...]] = {
    "checkpoints": (
        "--scenarios", "rnn_loss", "--lengths", "1000", "--no-torch", "--evaluations",
        "--loops", "scan,remat,remat:chunk=32,remat:checkpoints=8,remat:checkpoints=32,"
        "remat:checkpoints=45",
        "--peers", "equinox:checkpoints=8,equinox:checkpoints=32,equinox:checkpoints=45",
    ),
    "flax": (
        "--scenarios", "rnn_loss", "--lengths", "1000", "--no-torch",
        "--loops", "scan,scan:unroll=8,remat,nnx_scan",
        "--peers", "nnx.RNN,nnx.RNN:unroll=8,flax_loss:scan,flax_loss:nnx_scan,nnx.RNN:again",
    ),
}  # fmt: skip

#: ``--sweep batch`` / ``--sweep hidden`` without ``=values``.
SWEEP_DEFAULTS = {"batch": (1, 4, 16, 64), "hidden": (8, 32, 128, 512)}

EPILOG = f"""\
scenarios (--scenarios):
{chr(10).join(f"  {name:17} {s.doc}" for name, s in cases.SCENARIOS.items())}

what is measured, for each case (one scenario, length and sizes), every JAX loop kind
and every PyTorch peer:
  lower_s       JAX: trace + lower, jax.jit(f).lower(*args)
  compile_s     JAX: XLA compile, lowered.compile()
  run_s_median  steady state, seconds per call: every implementation of the case is
  run_s_min     called in turn, round after round (interleaved), until --repeats rounds
  run_s_q1/q3   and --min-time seconds have passed; a fast one is called several times
  run_s_ci      per round (each sample >= 2 ms, as timeit's autorange), each call ending
                in jax.block_until_ready; run_s_ci is a 95% bootstrap interval of the
                median, and every ratio to PyTorch has its interval too
  saved_bytes   what is kept for the backward pass: JAX, the residuals of jax.vjp of the
                differentiated function; PyTorch, the tensors autograd saves (peak)
  temp_bytes    JAX: the executable's temp bytes
  memory_bytes  JAX: compiled.memory_analysis(): temp + argument + output bytes (null if
                the backend does not report them)
  gflops        RNN scenarios: FLOPs / run_s_median / 1e9
  seqs_per_s    RNN scenarios: sequences per second, B / run_s_median
  other_cores   cores other processes kept busy while the case was timed (Linux)
PyTorch peers (when torch is installed) run the same computation on the same inputs and
weights; their outputs are checked against JAX's (max_rel_diff). With --cell the RNN
scenarios run that cell (loopgrad_jax.init_cell's weights, --layers deep); its peers get
the weights through loopgrad_jax.to_torch: "eager", a per-step loop over nn.RNNCell /
nn.LSTMCell / nn.GRUCell stacks, and the fused module over the whole sequence ("nn.RNN",
"nn.LSTM", "nn.GRU"; rnn_loss and rnn_loss_hoisted). train_as_written runs
each exact method: JAX "forward" beside the PyTorch "rtrl" peer (the same real-time
recurrent learning), JAX "reverse" beside the "eager" peer (the retained graph).

FLOP count (matrix products only, a multiply-add = 2 FLOPs; tanh, biases, loss and SGD
are not counted):
  cell = 2*B*H*(I+H)  (i2h),  head = 2*B*H*O  (h2o, O = 1),  per time step
  with --cell and --layers L: cell = 2*B*sum over layers k of G*H*(I_k+H), G gates
  (rnn_tanh, rnn_relu 1, lstm 4, gru 3), I_0 = I and I_k = H after
  rnn_loss, train_tbptt:  3 * T * (cell + head)   (a gradient costs 3x the forward)
  train_as_written:       torch eager: T*(cell + 3*head) + T*(T+1)*cell (step t runs
                          back through its head and all t cells so far); JAX forward,
                          reverse and torch rtrl: loopgrad_jax.as_written_cost(...).flops

skipped cases (recorded with "skipped": "<reason>"):
  python loops longer than --max-unroll (their compile time grows with T; the reverse
  method's when T*(T+1)/2 exceeds it), the O(T**2) as-written algorithms (JAX reverse,
  torch eager) longer than --max-quadratic, train_tbptt when --window > T.

output:
  a table on stdout, 120 columns wide (scenario, T, impl, run time's median and 95%
  interval, saved bytes, speedup vs peers, note; --wide: all the figures above, one line
  a record), a recommendation per scenario after it (and sequences per second across
  sizes with --sweep), a progress bar on stderr; --json PATH is rewritten after every
  case, so Ctrl-C (exit status 130) or a crash keeps every finished record. A
  recommendation quotes a row timed on a busy machine with its BUSY flag; one whose
  longest loop is under {report.SMOKE_LENGTH} steps starts with "smoke-size run": its figures
  are mostly a call's fixed costs and say nothing about longer loops.

subcommands (each with its own --help):
  loopgrad-bench report DIR [--out FILE] [--readme FILE] [--check]
                markdown from the JSON results in DIR: bench/RESULTS.md and the README's
                decision table
  loopgrad-bench as-written-grid [--json PATH] [--fit PATH] [--recheck PATH]
                train_as_written's two exact methods (forward, reverse) timed over a grid
                of sizes (I, H, B, T), and how far as_written_method="auto"'s pick is from
                the faster: the data auto's time model is fit to; --show prints its file

examples:
  loopgrad-bench
  loopgrad-bench --quick --json quick.json
  loopgrad-bench --quick --lengths 3 --input 3 --hidden 4 --batch 2   # a smoke test
  loopgrad-bench --scenarios rnn_loss --loops scan,fori --lengths 1000 \\
      --input 64 --hidden 256 --batch 32 --json large.json --plot large.png
  loopgrad-bench --scenarios rnn_loss --loops scan --lengths 100 --sweep batch=1,8,32
  loopgrad-bench --cell lstm --layers 2 --scenarios rnn_loss,rnn_loss_hoisted --loops scan
  loopgrad-bench --cell lstm --layers 2 --bidirectional --lengths-spread 0.5 \\
      --loops scan,scan:unroll=8 --lengths 200 --input 64 --hidden 256 --batch 32
  loopgrad-bench --preset checkpoints --plot checkpoints.png
  loopgrad-bench --preset flax --cell lstm --input 64 --hidden 256 --batch 32
  loopgrad-bench --show bench/results/cpu_large.json
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line parser; options default to ``None`` so ``--quick`` can fill them."""
    parser = argparse.ArgumentParser(
        prog="loopgrad-bench",
        description=(
            f"Compile time, run time and memory of every loop kind ({', '.join(lg.LOOPS)}) "
            "for each of the article's scenarios, side by side with PyTorch on the same inputs."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenarios",
        type=_names("scenario", tuple(cases.SCENARIOS)),
        help=f"comma-separated scenarios (default: {','.join(cases.DEFAULT_SCENARIOS)}; "
        "under --quick all but train_as_written; with --bidirectional or --lengths-spread: "
        "rnn_module)",
    )
    parser.add_argument(
        "--loops",
        type=_loops,
        help=(
            f"comma-separated loop kinds from {','.join(lg.LOOPS)} (and "
            f"{','.join(lg.FUSED_LOOPS)}: an LSTM through cuDNN, on a CUDA GPU), each "
            "optionally with "
            "options as in loopgrad_jax.Loop's text form, e.g. scan:unroll=8, "
            f"remat:chunk=32, remat:policy=dots_saveable (default: all: {','.join(lg.LOOPS)}; "
            f"under --quick {','.join(QUICK['loops'])})"
        ),
    )
    parser.add_argument(
        "--cell",
        choices=lg.CELLS,
        default=lg.CELLS[0],
        help=f"the RNN scenarios' cell: the article's SimpleRNN or PyTorch's nn.RNN (tanh, "
        f"relu), nn.LSTM, nn.GRU (default: {lg.CELLS[0]}); the scalar scenarios have none",
    )
    parser.add_argument(
        "--layers",
        type=_at_least(1),
        default=1,
        help="the cell's layers, stacked as nn.RNN/LSTM/GRU(num_layers=...) stacks them "
        "(default: 1; the article's cell has one)",
    )
    parser.add_argument(
        "--bidirectional",
        action="store_true",
        help="rnn_module: a bidirectional module (nn.LSTM(bidirectional=True) ...); beside "
        "PyTorch's module, Flax's nnx.Bidirectional when Flax is installed (rnn_tanh, "
        "rnn_relu, lstm)",
    )
    parser.add_argument(
        "--lengths-spread",
        type=_fraction,
        metavar="S",
        help="rnn_module: lengths drawn uniformly in ceil((1-S)*T)..T (at least 1; from "
        "--seed, in no order), lg.rnn(..., lengths=) beside PyTorch's pack_padded_sequence("
        "..., enforce_sorted=False); S in [0, 1] (default: no lengths, nothing packed)",
    )
    parser.add_argument(
        "--precision",
        type=_names("precision", ("float32", *lg.PRECISIONS)),
        default=("float32",),
        help="the RNN scenarios' precision= for lg.rnn_loss / lg.train_rnn, comma-separated "
        "for one row each: float32 (precision=None) or bf16 (bfloat16 products, float32 "
        "accumulation and state); needs a --cell of PyTorch's (default: float32)",
    )
    parser.add_argument(
        "--devices",
        type=_lengths,
        default=(1,),
        help="comma-separated device counts: the RNN scenarios also run data-parallel, the "
        "batch split over a mesh of that many devices (lg.rnn_loss(..., mesh=...)), beside "
        "the one-device rows; on a CPU, that many virtual devices are made (default: 1)",
    )
    parser.add_argument(
        "--lengths",
        type=_lengths,
        help=f"comma-separated loop lengths T (default: {_join(DEFAULTS['lengths'])})",
    )
    for flag, minimum, meaning in (
        ("input", 1, "RNN input size I"),
        ("hidden", 1, "RNN hidden size H"),
        ("batch", 1, "batch size B (the scalar scenarios' x is (B, I))"),
        ("window", 1, "train_tbptt: steps per update"),
        ("max-unroll", 0, "skip python-loop cases longer than this"),
        ("max-quadratic", 0, "skip the O(T**2) as-written algorithms longer than this"),
        ("repeats", 5, "at least this many timed samples per implementation (>= 5)"),
        ("warmup", 1, "untimed calls before the timed ones"),
        ("compile-repeats", 1, "lowerings+compilations per JAX case; the median is kept"),
    ):
        default = DEFAULTS[flag.replace("-", "_")]
        parser.add_argument(
            f"--{flag}", type=_at_least(minimum), help=f"{meaning} (default: {default})"
        )
    parser.add_argument(
        "--min-time",
        type=_seconds_at_least(0.0),
        help="keep timing each case until this many seconds have passed "
        f"(default: {DEFAULTS['min_time']}; under --quick {QUICK['min_time']})",
    )
    parser.add_argument(
        "--timing",
        choices=("interleaved", "blocks"),
        default="interleaved",
        help="interleaved (default): every implementation of a case called in turn, round "
        "after round, so all share the same moments of the machine; blocks: each timed "
        "alone, one after the other (to see what interleaving changes)",
    )
    parser.add_argument(
        "--sweep",
        type=_sweep,
        help="vary one size and report sequences per second across it: batch or hidden, "
        "optionally with the sizes, e.g. batch=1,8,32 (defaults: "
        + "; ".join(f"{k} {_join(v)}" for k, v in SWEEP_DEFAULTS.items())
        + "); it replaces --batch or --hidden",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="JAX backend to run on (default: JAX's default backend)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the table, where the gradient's time goes at the longest --lengths: "
        "forward, backward and gradient of rnn_loss per step and layer by layer (the layer "
        "rule), PyTorch's fused module beside them, and the per-step products; into the "
        "JSON as 'profile' (needs a PyTorch --cell and torch)",
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="skip the PyTorch peers even if torch is installed"
    )
    parser.add_argument(
        "--peers",
        type=_peers,
        help="the peers beside JAX's loop kinds, comma-separated: "
        + ", ".join(peers.names())
        + " (default: PyTorch's eager loop and fused module; 'fused' is the cell's nn.RNN, "
        "nn.LSTM or nn.GRU; torch.compile, torch.scan, nnx.RNN and equinox run rnn_loss; "
        "a peer that cannot run a case is a row saying why)",
    )
    parser.add_argument(
        "--evaluations",
        action="store_true",
        help="count each row's body evaluations of one gradient (the article's rnn_loss: "
        "JAX's loop kinds and equinox's scan; a run of its own, untimed), in the note beside "
        "the fewest possible for remat:checkpoints=C (lg.checkpointed_evaluations)",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="a named comparison, as the flags it stands for (flags given too win): "
        + "; ".join(f"{name}: {' '.join(flags)}" for name, flags in PRESETS.items()),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the default sizes in under 90 s on a 2-core CPU: lengths "
        f"{_join(QUICK['lengths'])}, I={QUICK['input']}, H={QUICK['hidden']}, "
        f"B={QUICK['batch']}, window={QUICK['window']}; scenarios "
        f"{','.join(QUICK_SCENARIOS)} (train_as_written's PyTorch peers take seconds a "
        f"call at T=1000); loops {','.join(QUICK['loops'])}, python only at "
        f"T<={QUICK['max_unroll']} (--max-unroll {QUICK['max_unroll']}: its compile time "
        f"grows with T), the O(T**2) as-written algorithms only at "
        f"T<={QUICK['max_quadratic']}; {QUICK['min_time']} s timing windows, no untimed "
        "warm-up compile; flags still win",
    )
    parser.add_argument("--seed", type=_at_least(0), default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--json", metavar="PATH", help="write the results as JSON, updated after every record"
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG: per scenario, time per call beside the memory kept for backward "
        "(bars at one length, lines over several lengths or a --sweep)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--show",
        metavar="PATH",
        help="measure nothing: print the table and recommendation of a JSON file written "
        "by --json (a committed result, read with this version's report; --wide applies); "
        "a file of as-written-grid's: its table, a line a point (--wide: a line a record)",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help=f"print the table with every column, one line a record (wider than "
        f"{report.TABLE_WIDTH} columns): trace+lower and compile time, the fastest sample, "
        "temp bytes and GFLOP/s beside the default table's",
    )
    return parser


def plot_title(meta: Mapping[str, Any], plan: run.Plan) -> str:
    """The figure's title: the machine, JAX's version, the cell and the sizes of ``plan``
    (``window``, which sizes train_tbptt's updates only, where that scenario ran)."""
    swept = {"input": plan.input, "hidden": plan.hidden, "batch": plan.batch}
    if plan.sweep:
        swept[plan.sweep[0]] = _join(plan.sweep[1])
    sizes = ", ".join(f"{k[0].upper()}={v}" for k, v in swept.items())
    cell = "" if plan.cell == "article" else f"{plan.cell} x{plan.layers} layers, "
    window = f", window={plan.window}" if "train_tbptt" in plan.scenarios else ""
    return f"{meta['device']}, jax {meta['jax']}, {cell}{sizes}{window}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (0, 2 for bad arguments, 130 if interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # loopgrad-bench report DIR: markdown from the JSON results
        return results_doc.main(argv[1:])
    if argv[:1] == ["as-written-grid"]:  # both as-written methods over a grid of sizes
        return as_written_grid.main(argv[1:])
    parser = build_parser()
    argv = _expand_preset(parser, argv)
    args = parser.parse_args(argv)
    if args.show:
        records = _read_records(parser, args.show)
        if not as_written_grid.is_grid(records):
            _print_report(records, wide=args.wide)
        elif args.wide:  # every column, a line a record; a recommendation has no case here
            print(report.format_table(records, wide=True))
        else:
            try:  # a line a point: both methods, the faster, auto's pick
                print(as_written_grid.format_table(records))
            except ValueError as error:
                parser.error(f"argument --show: {args.show!r}: {error}")
        return 0
    preset = QUICK if args.quick else DEFAULTS
    settings = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in preset}
    devices = tuple(sorted({1, *args.devices}))
    _make_cpu_devices(max(devices))  # before JAX starts its backends
    backend = args.backend or jax.default_backend()
    _check_backend(parser, backend)
    available = len(jax.devices(backend))
    if max(devices) > available:
        parser.error(
            f"argument --devices: expected at most {available} (the {backend} devices here), "
            f"got {max(devices)}; on a CPU, JAX had started before the virtual devices could "
            "be made: run loopgrad-bench in a new process"
        )
    for flag in ("json", "plot"):
        _check_output_path(parser, flag, getattr(args, flag))
    if args.layers > 1 and args.cell == "article":
        parser.error(
            f"argument --layers: expected 1 with --cell article (the article's SimpleRNN has "
            f"one layer), got {args.layers}; pick a cell with layers, e.g. --cell rnn_tanh"
        )
    module_options = [
        flag
        for flag, given in (
            ("--bidirectional", args.bidirectional),
            ("--lengths-spread", args.lengths_spread is not None),
        )
        if given
    ]
    if args.scenarios is None:
        default = QUICK_SCENARIOS if args.quick else cases.DEFAULT_SCENARIOS
        args.scenarios = ("rnn_module",) if module_options else default
    others = [s for s in args.scenarios if s != "rnn_module"]
    if module_options and others:
        parser.error(
            f"argument {module_options[0]}: applies to rnn_module (lg.rnn, PyTorch's module "
            f"forward) only, got --scenarios {','.join(args.scenarios)}; drop --scenarios "
            "or name rnn_module alone"
        )
    if "rnn_module" in args.scenarios and args.cell == "article":
        what = f"argument {module_options[0]}" if module_options else "argument --scenarios"
        parser.error(
            f"{what}: rnn_module runs PyTorch's modules (nn.RNN, nn.LSTM, nn.GRU), which "
            "--cell article (the article's SimpleRNN, one direction) is not; pick e.g. "
            "--cell lstm"
        )
    if args.precision != ("float32",) and args.cell == "article":
        parser.error(
            f"argument --precision: expected float32 with --cell article (precision= applies "
            f"to PyTorch's cells), got {','.join(args.precision)}; pick e.g. --cell lstm"
        )
    if args.profile and (args.cell == "article" or args.no_torch or not torch_peers.available()):
        why = (
            "a PyTorch --cell (rnn_tanh, rnn_relu, lstm, gru), got --cell article"
            if args.cell == "article"
            else "PyTorch's fused module beside JAX: install torch and drop --no-torch"
        )
        parser.error(f"argument --profile: needs {why}")
    if args.profile and (args.layers > 1 or args.precision != ("float32",)):
        parser.error(
            "argument --profile: profiles one layer in float32 (its per-step products are "
            f"one layer's), got --layers {args.layers} --precision {','.join(args.precision)}; "
            "drop --profile or run it with --layers 1 --precision float32"
        )
    if args.profile and (args.backend or jax.default_backend()) != "cpu":
        parser.error(
            "argument --profile: times PyTorch's CPU module beside JAX, so it runs on the CPU "
            f"only, got backend {args.backend or jax.default_backend()}; add --backend cpu"
        )
    if settings["window"] > max(settings["lengths"]) and "train_tbptt" in args.scenarios:
        parser.error(
            f"argument --window: expected at most the longest of --lengths "
            f"({max(settings['lengths'])}), got {settings['window']}"
        )

    if args.evaluations and (args.cell != "article" or "rnn_loss" not in args.scenarios):
        parser.error(
            "argument --evaluations: counts the body evaluations of the article's rnn_loss, "
            f"got --cell {args.cell} --scenarios {','.join(args.scenarios)}; add --cell "
            "article --scenarios rnn_loss"
        )
    torch_named = [p for p in args.peers or () if peers.framework(p) == "torch"]
    if args.no_torch and torch_named:
        parser.error(
            "argument --no-torch: not allowed with --peers naming PyTorch's peers "
            f"({', '.join(torch_named)}); list only the peers you want"
        )
    torch_setup = None
    if not args.no_torch:
        if torch_peers.available():
            torch_setup = torch_peers.setup(backend, report.usable_cores())
        else:
            print(
                "note: torch is not installed, so there are no PyTorch peers; "
                "pip install 'loopgrad_jax[torch]' to add them.",
                file=sys.stderr,
            )
    plan = run.Plan(
        scenarios=args.scenarios,
        loops=settings["loops"],
        lengths=settings["lengths"],
        batch=settings["batch"],
        input=settings["input"],
        hidden=settings["hidden"],
        window=settings["window"],
        limits=cases.Limits(settings["max_unroll"], settings["max_quadratic"]),
        warmup=settings["warmup"],
        repeats=settings["repeats"],
        compile_repeats=settings["compile_repeats"],
        compile_warmup=not args.quick,
        seed=args.seed,
        torch=torch_setup,
        min_time=settings["min_time"],
        sweep=args.sweep,
        interleave=args.timing == "interleaved",
        cell=args.cell,
        layers=args.layers,
        devices=devices,
        precisions=tuple(None if p == "float32" else p for p in args.precision),
        bidirectional=args.bidirectional,
        spread=args.lengths_spread,
        flax=args.bidirectional and peers.installed("flax"),
        peers=args.peers,
        evaluations=args.evaluations,
    )
    device = jax.devices(backend)[0]
    meta = report.collect_meta(plan, backend, device, argv)
    records = _run(plan, device, meta, args.json, progress=not args.no_progress)
    _print_report(records, wide=args.wide)
    if args.profile and meta["status"] != "interrupted":
        _profile(args, settings, meta, records)
    if args.plot and records:
        from loopgrad_jax.bench.plot import plot_records

        plot_records(
            records, args.plot, plot_title(meta, plan), x=plan.sweep[0] if plan.sweep else "length"
        )
    if meta["status"] == "interrupted":
        kept = f"; kept in {args.json}" if args.json else ""
        print(f"interrupted after {len(records)} records{kept}.", file=sys.stderr)
        return 130
    return 0


def _expand_preset(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--preset NAME`` replaced by :data:`PRESETS` ``[NAME]``'s flags, put
    first so that the command line's own flags win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    known, rest = pre.parse_known_args(argv)
    if known.preset is None:
        return argv
    if known.preset not in PRESETS:
        parser.error(
            f"argument --preset: expected one of {', '.join(PRESETS)}, got {known.preset!r}"
        )
    return [*PRESETS[known.preset], *rest]


def _profile(args: argparse.Namespace, settings: dict, meta: dict, records: list) -> None:
    """``--profile``: :mod:`loopgrad_jax.bench.cell_profile` at the run's cell and sizes."""
    from loopgrad_jax.bench import cell_profile

    loop = next((loop for loop in settings["loops"] if loop.split(":")[0] == "scan"), "scan")
    sizes = cases.Sizes(
        max(settings["lengths"]),
        settings["batch"],
        settings["input"],
        settings["hidden"],
        settings["window"],
        cell=args.cell,
    )
    rows = cell_profile.profile(
        sizes, loop=loop, repeats=settings["repeats"], min_time=settings["min_time"], seed=args.seed
    )
    print(
        f"\nprofile ({args.cell}, T={sizes.length}, B={sizes.batch}, I={sizes.input}, "
        f"H={sizes.hidden}, loop={loop}):"
    )
    print(cell_profile.format_rows(rows))
    meta["profile"] = {"sizes": sizes._asdict(), "loop": loop, "rows": rows}
    if args.json:
        report.write_json(args.json, meta, records)


def _print_report(records: Sequence[dict], *, wide: bool = False) -> None:
    """The table (every column if ``wide``), the recommendation and the throughput across
    sizes, on stdout."""
    print(report.format_table(records, wide=wide))
    advice = report.recommend(records)
    if advice:
        print("\nrecommendation, from the rows above:")
        print("\n".join(report.wrap_advice(advice)))
    throughput = report.throughput_table(records)
    if throughput:
        print("\n" + throughput)


def _read_records(parser: argparse.ArgumentParser, path: str) -> list[dict]:
    """The records of a file written by ``--json``, or a parser error saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        parser.error(f"argument --show: expected a JSON file written by --json, got {path!r}: {e}")
    if not (isinstance(data, dict) and isinstance(data.get("records"), list)):
        parser.error(
            f"argument --show: expected a JSON file written by --json (an object with "
            f"'meta' and 'records'), got {path!r} without a list of records"
        )
    missing = [k for k in results_doc.BENCH_KEYS if any(k not in r for r in data["records"])]
    if missing or not all(isinstance(r, dict) for r in data["records"]):
        tool = str((data.get("meta") or {}).get("command") or "another tool")
        parser.error(
            f"argument --show: expected records of loopgrad-bench --json, got {path!r}, "
            f"written by {tool!r}, whose records lack {', '.join(missing) or 'fields'}; "
            "its own command prints its table"
        )
    return data["records"]


def _run(plan: run.Plan, device: jax.Device, meta: dict, json_path: str | None, *, progress):
    """Runs the plan, updating the JSON file and the progress bar after every record."""
    todo = run.tasks(plan)
    records: list[dict] = []
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), file=sys.stderr, unit="case")
    else:
        bar = NoBar()

    def save(status: str) -> None:
        meta["status"] = status
        if json_path:
            report.write_json(json_path, meta, records)

    save("running")
    try:
        with jax.default_device(device):
            for record in _described(run.run(plan, device), todo, bar):
                records.append(record)
                save("running")
                bar.update(1)
    except KeyboardInterrupt:
        save("interrupted")
    except Exception as error:
        save(f"failed: {type(error).__name__}: {error}")
        raise
    else:
        save("complete")
    finally:
        bar.close()
    return records


def _described(records, todo: list[run.Task], bar):
    """Passes ``records`` through, naming the next case on the progress bar."""
    for task in todo:
        method = f" {task.method}" if task.method else ""
        bar.set_description(f"{task.scenario}{method} T={task.length}")
        yield next(records)


def _check_backend(parser: argparse.ArgumentParser, backend: str) -> None:
    available = available_backends()
    if backend not in available:
        parser.error(
            f"argument --backend: backend {backend!r} is not available; "
            f"available backends: {', '.join(available) or 'none'}"
        )


def _make_cpu_devices(count: int) -> None:
    """Asks JAX's CPU backend for ``count`` virtual devices, if it has not started yet."""
    if count > 1:
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:  # started already (called in-process): --devices checks
            pass


def available_backends() -> list[str]:
    """The backends of :data:`BACKENDS` that JAX can run on here."""
    found = []
    for name in BACKENDS:
        try:
            jax.devices(name)
        except RuntimeError:
            continue
        found.append(name)
    return found


def _check_output_path(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    if path is None:
        return
    folder = Path(path).resolve().parent
    if Path(path).is_dir() or not folder.is_dir():
        parser.error(f"argument --{flag}: expected a file path in an existing folder, got {path!r}")


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an int >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


def _seconds_at_least(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value >= minimum or math.isinf(value):
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds >= {minimum:g}, got {text!r}"
            )
        return value

    return parse


def _fraction(text: str) -> float:
    """``--lengths-spread``: a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1] (the share of T the lengths may fall short by), "
            f"got {text!r}"
        )
    return value


def _sweep(text: str) -> tuple[str, tuple[int, ...]]:
    """``"batch"`` -> ``("batch", SWEEP_DEFAULTS["batch"])``; ``"hidden=8,64"`` -> its sizes."""
    name, _, values = text.partition("=")
    try:
        sizes = _lengths(values) if values else SWEEP_DEFAULTS.get(name, ())
    except argparse.ArgumentTypeError:
        sizes = ()
    if name not in SWEEP_DEFAULTS or not sizes:
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(SWEEP_DEFAULTS)}, optionally with comma-separated sizes "
            f">= 1 (e.g. batch=1,8,32), got {text!r}"
        )
    return name, sizes


def _lengths(text: str) -> tuple[int, ...]:
    """``"10,100"`` -> ``(10, 100)``: sorted, without repeats."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints >= 1, e.g. 10,100,1000, got {text!r}"
        )
    return tuple(sorted(set(values)))


def _names(what: str, choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = [part.strip() for part in text.split(",")]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}s from {','.join(choices)}, "
                f"got {text!r} (unknown: {','.join(map(repr, unknown))})"
            )
        return tuple(dict.fromkeys(names))

    return parse


def _loops(text: str) -> tuple[str, ...]:
    """``"scan,scan:unroll=8"`` -> the loops in their canonical text form."""
    loops = []
    for part in text.split(","):
        try:
            loops.append(str(lg.Loop.parse(part.strip())))
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated loop kinds from {','.join(lg.LOOPS)} with optional "
                f"options (e.g. scan:unroll=8), got {text!r}: {error}"
            ) from None
    return tuple(dict.fromkeys(loops))


def _peers(text: str) -> tuple[str, ...]:
    try:
        return peers.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _join(values: Sequence[int]) -> str:
    return ",".join(map(str, values))
