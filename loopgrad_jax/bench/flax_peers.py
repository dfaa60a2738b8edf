"""This library's loops beside Flax NNX's: ``nnx.RNN``, ``nnx.scan`` and loops over a module.

For each cell kind Flax has a cell for (the article's ``SimpleRNN`` and ``rnn_tanh``:
``nnx.SimpleCell``; ``lstm``: ``nnx.OptimizedLSTMCell``; ``gru``: ``nnx.GRUCell``), the
full-sequence gradient of the summed per-step loss, every setting on the same weights
and inputs, timed interleaved (:func:`loopgrad_jax.bench.timing.time_interleaved`)::

  lg:<loop>           jax.value_and_grad(lg.rnn_loss)(params, ..., loop=<loop>)
  nnx.RNN             jax.value_and_grad(loss)(state), the model rebuilt from ``state``
                      by nnx.merge: one nnx.RNN per layer over Flax's built-in cell, an
                      nnx.Linear head on every step's output (lg.flax_loss(model))
  nnx.RNN:unroll=k    the same with nnx.RNN(unroll=k)
  module:<loop>       lg.flax_loss(model, loop=<loop>): <loop> (lax.scan, nnx.scan, a
                      Python loop, ...) over the module's cell, called on every step
  nnx.RNN (again)     nnx.RNN compiled a second time: the same program, timed as a row
                      of its own, so each group shows how far two identical programs'
                      times land apart (the noise floor its ratios stand on)

The built-in cells keep one bias per layer (``b_ih + b_hh``) and ``nnx.GRUCell`` has no
``b_hn``: the GRU's ``b_hn`` is zeroed for every setting, so that all compute the same
numbers. Each row's loss and gradient are checked against ``lg:scan``'s
(``max_rel_diff``; the built-in cells' one bias against PyTorch's ``b_ih``), and its run
time is compared with ``nnx.RNN``'s (``vs_nnx_rnn``: the ratio of medians with its 95%
bootstrap interval; below 1 is faster than Flax).

Flax is a benchmark extra (``pip install 'loopgrad_jax[bench]'``), never a dependency
of the library's core.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, report, timing
from loopgrad_jax.bench.run import max_rel_diff

#: Format of the JSON file.
FORMAT_VERSION = 1
#: The kinds Flax has a built-in cell for.
KINDS = ("article", "rnn_tanh", "lstm", "gru")
#: The setting every ratio is taken against.
REFERENCE = "nnx.RNN"
#: :data:`REFERENCE` compiled and timed a second time.
AGAIN = f"{REFERENCE} (again)"


def settings(unroll: int, length: int, max_unroll: int) -> list[str]:
    """The settings timed, in table order (a Python loop only up to ``max_unroll`` steps)."""
    rows = ["lg:scan", f"lg:scan:unroll={unroll}", "lg:remat", "lg:nnx_scan"]
    rows += [REFERENCE, f"{REFERENCE}:unroll={unroll}", "module:scan", "module:nnx_scan"]
    if length <= max_unroll:
        rows.append("module:python")
    return rows + [AGAIN]


def _params(kind: str, sizes: cases.Sizes, seed: int):
    key = jax.random.key(seed)
    params = lg.init_cell(key, kind, input_size=sizes.input, hidden_size=sizes.hidden)
    if kind == "gru":  # nnx.GRUCell has no b_hn
        h = sizes.hidden
        layer = params.layers[0]
        layer = lg.LayerParams(
            layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh.at[2 * h :].set(0)
        )
        params = lg.CellParams((layer,), params.head_weight, params.head_bias, kind)
    return params


def _gradient(setting: str, params) -> tuple[Callable, Any]:
    """``(f, weights)``: ``f(weights, inputs, targets)`` returns the loss and gradient leaves."""
    from flax import nnx

    family, _, rest = (REFERENCE if setting == AGAIN else setting).partition(":")
    if family == "lg":

        def ours(p, inputs, targets):
            return jax.value_and_grad(lg.rnn_loss)(p, inputs, targets, loop=rest)

        return ours, params
    unroll = int(rest.partition("=")[2] or 1) if family == REFERENCE else 1
    model = lg.to_flax(params, cells="flax", unroll=unroll)
    graphdef, state = nnx.split(model)
    loop = None if family == REFERENCE else rest

    def theirs(state, inputs, targets):
        def loss(state):
            return lg.flax_loss(nnx.merge(graphdef, state), inputs, targets, loop=loop)

        value, grads = jax.value_and_grad(loss)(state)
        return value, lg.from_flax(nnx.merge(graphdef, grads))

    return theirs, state


def _comparable(setting: str, output: tuple) -> list[np.ndarray]:
    """A setting's loss and gradient as arrays that mean the same for every setting.

    A built-in cell keeps one bias, which :func:`loopgrad_jax.from_flax` returns as one
    of PyTorch's two (the other zeros); its gradient is the gradient of either of
    PyTorch's. So the sum of the two is compared for Flax's cells, ``bias_ih`` for ours.
    """
    loss, grads = output
    arrays = [np.asarray(loss)]
    if isinstance(grads, lg.RNNParams):
        return arrays + [np.asarray(g) for g in grads]
    arrays += [np.asarray(grads.head_weight), np.asarray(grads.head_bias)]
    builtin = not setting.startswith("lg:")
    for layer in grads.layers:
        bias = layer.bias_ih + layer.bias_hh if builtin else layer.bias_ih
        arrays += [np.asarray(layer.weight_ih), np.asarray(layer.weight_hh), np.asarray(bias)]
    return arrays


def measure(
    kind: str,
    sizes: cases.Sizes,
    *,
    unroll: int,
    max_unroll: int,
    repeats: int,
    min_time: float,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per setting for one kind and size, all timed interleaved."""
    data = cases.make_data(sizes, seed)
    params = _params(kind, sizes, seed) if kind != "article" else data.params
    names = settings(unroll, sizes.length, max_unroll)
    compiled = {}
    for name in names:
        f, weights = _gradient(name, params)
        args = jax.device_put((weights, data.inputs, data.targets))
        compiled[name] = (timing.compile_jax(lambda f=f: f, args), args)
    measured = timing.time_interleaved(
        {name: (lambda c=c, a=a: c.compiled(*a)) for name, (c, a) in compiled.items()},
        warmup=1,
        min_samples=repeats,
        min_time=min_time,
    )
    want = _comparable("lg:scan", measured.outputs["lg:scan"])
    reference = measured.samples[REFERENCE]
    rows = []
    for name in names:
        stats = timing.spread(measured.samples[name], measured.number[name])
        c = compiled[name][0]
        rows.append(
            {
                "cell": kind,
                "setting": name,
                "framework": "jax" if name.startswith("lg:") else "flax",
                **report.sweep_row(sizes, stats, c),
                "vs_nnx_rnn": list(timing.ratio(measured.samples[name], reference)),
                "max_rel_diff": max_rel_diff(_comparable(name, measured.outputs[name]), want),
                "other_cores": measured.other_cores,
            }
        )
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table."""
    head = (
        f"{'cell':8} {'setting':20} {'median':>10} {'95% CI':>21} {'temp':>10} "
        f"{'compile':>8} {'rel diff':>8}  vs nnx.RNN [95% CI]"
    )
    lines = [head]
    for r in rows:
        low, high = r["run_s_ci"]
        value, lo, hi = r["vs_nnx_rnn"]
        lines.append(
            f"{r['cell']:8} {r['setting']:20} {r['run_s_median'] * 1e3:8.3f}ms "
            f"{low * 1e3:9.3f}-{high * 1e3:9.3f}ms {report._bytes(r['temp_bytes']):>10} "
            f"{r['compile_s']:7.2f}s {r['max_rel_diff']:8.1e}  {value:.2f}x [{lo:.2f}-{hi:.2f}]"
        )
    return "\n".join(lines)


# ------------------------------------------------- loopgrad-bench's rnn_module peer

#: ``loopgrad-bench``'s Flax row of ``rnn_module --bidirectional``.
BIDIRECTIONAL = "nnx.Bidirectional"
#: The kinds it runs: Flax's built-in cells that compute PyTorch's (a GRU's b_hn is not).
BIDIRECTIONAL_KINDS = ("rnn_tanh", "rnn_relu", "lstm")


def available() -> bool:
    """Whether Flax is installed (without importing it)."""
    from loopgrad_jax.bench import peers

    return peers.installed("flax")


def module_peers(scenario: str, sizes: cases.Sizes) -> tuple[str, ...]:
    """The Flax rows of a ``loopgrad-bench`` case: :data:`BIDIRECTIONAL` for a
    bidirectional ``rnn_module`` of :data:`BIDIRECTIONAL_KINDS`, else none."""
    if scenario != "rnn_module" or not sizes.bidirectional:
        return ()
    return (BIDIRECTIONAL,) if sizes.cell in BIDIRECTIONAL_KINDS else ()


def bidirectional_case(data: cases.Data) -> tuple[Callable[[], Callable], tuple]:
    """``(build, args)``: ``build()`` is a new ``f(weights, rngs, inputs, lengths)`` returning the
    loss and gradients ``rnn_module`` returns, run as a Flax user would write it::

      layer k = nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell'), time_major=True)
      outputs = layer_L(...layer_1(x, seq_lengths=lengths)..., seq_lengths=lengths)
      loss = sum((outputs * (t < lengths)) ** 2)

    ``cell`` is Flax's built-in one (``nnx.OptimizedLSTMCell`` for an LSTM) holding the
    layer's weights. ``seq_lengths`` gives PyTorch's packed states (the reverse direction
    starts at each example's last real step), but not its outputs: Flax's go on past
    ``lengths`` (PyTorch's are zero there), hence the mask. Each cell keeps one bias
    (``b_ih + b_hh``), whose gradient is returned for both of PyTorch's.
    """
    from flax import nnx

    from loopgrad_jax._flax import _builtin_cell, _layer_of

    params = data.params
    kind = params.kind

    def rnn(j: int) -> nnx.RNN:
        return nnx.RNN(_builtin_cell(kind, j, params.layers[j]), time_major=True)

    stack = nnx.List(
        nnx.Bidirectional(rnn(j), rnn(j + 1), time_major=True)
        for j in range(0, len(params.layers), 2)
    )
    graphdef, weights, rest = nnx.split(stack, nnx.Param, ...)  # rest: RNG state

    def build() -> Callable:
        def loss(weights, rest, inputs, lengths):
            x = inputs
            zeros = jax.numpy.zeros((inputs.shape[1], params.layers[0].weight_hh.shape[1]), x.dtype)
            carry = (zeros, zeros) if kind == "lstm" else zeros  # no RNG draws its zeros
            for layer in nnx.merge(graphdef, weights, rest):
                x = layer(x, initial_carry=(carry, carry), seq_lengths=lengths)
            if lengths is not None:
                live = jax.numpy.arange(x.shape[0])[:, None] < lengths[None, :]
                x = jax.numpy.where(live[..., None], x, 0)
            return jax.numpy.sum(x**2)

        def f(weights, rest, inputs, lengths):
            value, grads = jax.value_and_grad(loss)(weights, rest, inputs, lengths)
            leaves = [value]
            for layer in nnx.merge(graphdef, grads, rest):
                for j, direction in enumerate((layer.forward_rnn, layer.backward_rnn)):
                    g = _layer_of(kind, j, direction.cell)
                    bias = g.bias_ih + g.bias_hh  # one of them is zeros
                    leaves += [g.weight_ih, g.weight_hh, bias, bias]
            return tuple(leaves)

        return f

    return build, (weights, rest, data.inputs, data.lengths)


def collect_meta(argv: Sequence[str]) -> dict[str, Any]:
    """The machine, versions and settings of a run."""
    import flax

    return report.tool_meta("flax_peers", argv, FORMAT_VERSION, flax=flax.__version__)


def build_parser() -> argparse.ArgumentParser:
    parser = report.tool_parser("flax_peers", __doc__)
    report.add_sweep_arguments(parser)
    parser.add_argument(
        "--cells", default=",".join(KINDS), help=f"comma-separated (default: {','.join(KINDS)})"
    )
    parser.add_argument("--unroll", type=int, default=8, help="k of the unrolled rows")
    parser.add_argument(
        "--max-unroll",
        type=int,
        default=100,
        help="run the Python loop over the module only up to this T (default: 100)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    every_size = report.sweep_sizes(parser, args)
    if args.unroll < 1:
        parser.error(f"--unroll must be >= 1, got {args.unroll}")
    kinds = [s.strip() for s in args.cells.split(",")]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"--cells takes {', '.join(KINDS)} (Flax's cells); got {kind!r}")
    try:
        import flax  # noqa: F401
    except ImportError:
        parser.error("Flax is not installed: pip install 'loopgrad_jax[bench]'")
    rows = []
    for sizes in every_size:
        for kind in kinds:
            new = measure(
                kind,
                sizes,
                unroll=args.unroll,
                max_unroll=args.max_unroll,
                repeats=args.repeats,
                min_time=args.min_time,
                seed=args.seed,
            )
            rows += new
            report.emit(rows, format_rows(new), args.json, lambda: collect_meta(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
