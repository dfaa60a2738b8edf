"""Checkpointed reverse mode: memory against time, beside equinox's checkpointed scan.

For the article's model's full-sequence gradient, ``jax.value_and_grad(lg.rnn_loss)``,
every setting below runs on the same weights and inputs and is timed interleaved with
the others (:func:`loopgrad_jax.bench.timing.time_interleaved`)::

  scan                    lg.rnn_loss(..., loop="scan")            stores every step
  remat                   lg.rnn_loss(..., loop="remat")           every carry
  remat:chunk=k           lg.rnn_loss(..., loop="remat:chunk=k")   k = round(sqrt(T))
  remat:checkpoints=C     lg.rnn_loss(..., loop="remat:checkpoints=C")
  equinox:checkpoints=C   equinox.internal.scan(body, h0, (inputs, targets),
                                                kind="checkpointed", checkpoints=C)

for each ``C`` of ``--checkpoints`` (``sqrt`` stands for ``ceil(sqrt(2T))``). Equinox's
body is the library's step: ``h = lg.rnn_cell(params, h, x)``, then
``lg.step_loss(params, h, y)``; its loss and gradient are checked against ``scan``'s
(``max_rel_diff``). Each row records the compiled gradient's temp bytes and compile
time, and the body evaluations of one gradient (``evaluations``; ``recompute`` = that
over T), counted in a separately compiled copy whose body calls ``jax.debug.callback``.

Equinox is a benchmark extra (``pip install 'loopgrad_jax[bench]'``), never a
dependency of the library.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, report, timing
from loopgrad_jax.bench.run import max_rel_diff

#: Format of the JSON file.
FORMAT_VERSION = 1


def checkpoint_counts(text: str, length: int) -> tuple[int, ...]:
    """``"8,32,sqrt"`` -> ``(8, 32, ceil(sqrt(2 * length)))``; raises naming bad entries."""
    counts = []
    for item in text.split(","):
        item = item.strip()
        if item == "sqrt":
            counts.append(math.ceil(math.sqrt(2 * length)))
        elif item.isdigit() and int(item) >= 1:
            counts.append(int(item))
        else:
            raise ValueError(
                f"--checkpoints takes integers >= 1 or 'sqrt', comma-separated; got {item!r}."
            )
    return tuple(dict.fromkeys(counts))


def _equinox_scan() -> Callable | None:
    try:
        import equinox.internal as eqxi
    except ImportError:
        return None
    return eqxi.scan


def _article_body(params, count: bool = False) -> Callable:
    def body(h, xy):
        if count:  # on the carry, so that no transformation moves it out of the loop
            jax.debug.callback(_tick, h)
        x, y = xy
        h = lg.rnn_cell(params, h, x)
        return h, lg.step_loss(params, h, y)

    return body


_TICKS = [0]


def _tick(_) -> None:
    _TICKS[0] += 1


def _zero_hidden(params, inputs) -> jax.Array:
    """The article's initial hidden state, zeros of shape (B, H): what rnn_loss starts from."""
    return jnp.zeros((inputs.shape[1], params.i2h_weight.shape[0]), inputs.dtype)


def _loss(setting: str, count: bool = False) -> Callable:
    """``(params, inputs, targets) -> loss`` for a setting (a loop kind, or equinox's)."""
    if setting.startswith("equinox:checkpoints="):
        scan, c = _equinox_scan(), int(setting.partition("=")[2])

        def equinox_loss(params, inputs, targets):
            body, h0 = _article_body(params, count), _zero_hidden(params, inputs)
            _, losses = scan(body, h0, (inputs, targets), kind="checkpointed", checkpoints=c)
            return losses.sum()

        return equinox_loss
    if not count:
        return lambda params, inputs, targets: lg.rnn_loss(params, inputs, targets, loop=setting)

    def counted_loss(params, inputs, targets):  # the loop rnn_loss runs, on a counting body
        body, h0 = _article_body(params, count), _zero_hidden(params, inputs)
        _, losses = lg.run_loop(body, h0, (inputs, targets), length=inputs.shape[0], loop=setting)
        return losses.sum()

    return counted_loss


def _gradient(setting: str, count: bool = False) -> Callable:
    def f(params, inputs, targets):
        loss, grads = jax.value_and_grad(_loss(setting, count))(params, inputs, targets)
        return (loss, *jax.tree.leaves(grads))

    return f


def evaluations(setting: str, args: Sequence[Any]) -> int:
    """Body evaluations of one gradient, counted by a callback in the body."""
    gradient = jax.jit(_gradient(setting, count=True))
    jax.block_until_ready(gradient(*args))  # compile and run once
    jax.effects_barrier()
    _TICKS[0] = 0
    jax.block_until_ready(gradient(*args))
    jax.effects_barrier()
    return _TICKS[0]


def settings(length: int, counts: Sequence[int], equinox: bool) -> list[str]:
    """The settings timed, in table order."""
    chunk = max(1, round(math.sqrt(length)))
    rows = ["scan", "remat", f"remat:chunk={chunk}"]
    for c in counts:
        rows.append(f"remat:checkpoints={c}")
        if equinox:
            rows.append(f"equinox:checkpoints={c}")
    return rows


def measure(
    sizes: cases.Sizes, counts: Sequence[int], *, repeats: int, min_time: float, seed: int
) -> list[dict[str, Any]]:
    """One row per setting, all timed interleaved."""
    data = cases.make_data(sizes, seed)
    args = jax.device_put((data.params, data.inputs, data.targets))
    names = settings(sizes.length, counts, _equinox_scan() is not None)
    compiled = {name: timing.compile_jax(lambda name=name: _gradient(name), args) for name in names}
    measured = timing.time_interleaved(
        {name: (lambda c=c: c.compiled(*args)) for name, c in compiled.items()},
        warmup=1,
        min_samples=repeats,
        min_time=min_time,
    )
    want = [np.asarray(a) for a in measured.outputs["scan"]]
    rows = []
    for name in names:
        stats = timing.spread(measured.samples[name], measured.number[name])
        count = evaluations(name, args)
        framework = "equinox" if name.startswith("equinox") else "jax"
        checkpoints = int(name.partition("checkpoints=")[2] or 0) or None
        rows.append(
            {
                "setting": name,
                "framework": framework,
                "checkpoints": checkpoints,
                **report.sweep_row(sizes, stats, compiled[name]),
                "evaluations": count,
                "recompute": count / sizes.length,
                "optimal_evaluations": (
                    lg.checkpointed_evaluations(sizes.length, checkpoints) if checkpoints else None
                ),
                "max_rel_diff": max_rel_diff([np.asarray(a) for a in measured.outputs[name]], want),
                "other_cores": measured.other_cores,
            }
        )
    ours = {r["checkpoints"]: r for r in rows if r["framework"] == "jax" and r["checkpoints"]}
    for r in rows:
        mine = ours.get(r["checkpoints"])
        if r["framework"] == "equinox" and mine is not None:
            ratio = timing.ratio(measured.samples[r["setting"]], measured.samples[mine["setting"]])
            mine["vs_equinox"] = list(ratio)
            mine["temp_vs_equinox"] = (mine["temp_bytes"] or 0) / max(r["temp_bytes"] or 1, 1)
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table."""
    head = (
        f"{'setting':24} {'median':>10} {'95% CI':>21} {'temp':>10} {'compile':>8} "
        f"{'evals/T':>7} {'optimum/T':>9}  {'rel diff':>8}  vs equinox [95% CI]"
    )
    lines = [head]
    for r in rows:
        low, high = r["run_s_ci"]
        optimum = r["optimal_evaluations"]
        versus = ""
        if "vs_equinox" in r:
            value, lo, hi = r["vs_equinox"]
            versus = f"{value:.2f}x [{lo:.2f}-{hi:.2f}], temp {r['temp_vs_equinox']:.2f}x"
        lines.append(
            f"{r['setting']:24} {r['run_s_median'] * 1e3:8.2f}ms "
            f"{low * 1e3:9.2f}-{high * 1e3:9.2f}ms {report._bytes(r['temp_bytes']):>10} "
            f"{r['compile_s']:7.2f}s {r['recompute']:7.2f} "
            f"{(optimum / r['length']) if optimum else float('nan'):9.2f}  "
            f"{r['max_rel_diff']:8.1e}  {versus}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Temp bytes against run time, one point per setting, per size (``--plot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["input"], r["hidden"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for r in (r for r in rows if (r["input"], r["hidden"], r["batch"]) == group):
            ours = r["framework"] == "jax"
            low, high = r["run_s_ci"]
            ax.errorbar(
                r["run_s_median"] * 1e3,
                r["temp_bytes"] / 2**20,
                xerr=[[(r["run_s_median"] - low) * 1e3], [(high - r["run_s_median"]) * 1e3]],
                fmt="o" if ours else "s",
                color="tab:blue" if ours else "tab:red",
                capsize=3,
            )
            ax.annotate(
                r["setting"],
                (r["run_s_median"] * 1e3, r["temp_bytes"] / 2**20),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        i, h, b = group
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="gradient run time (ms, median, 95% CI)",
            ylabel="temp bytes of the compiled gradient (MiB)",
            title=f"T={rows[0]['length']}, I={i}, H={h}, B={b}",
        )
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        "Memory against time: blue, this library's loops; red, equinox's checkpointed scan"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect_meta(argv: Sequence[str]) -> dict[str, Any]:
    """The machine, versions and settings of a run."""
    try:
        import equinox

        equinox_version = equinox.__version__
    except ImportError:
        equinox_version = None
    return report.tool_meta("checkpoints", argv, FORMAT_VERSION, equinox=equinox_version)


def build_parser() -> argparse.ArgumentParser:
    parser = report.tool_parser("checkpoints", __doc__)
    report.add_sweep_arguments(parser)
    parser.add_argument(
        "--checkpoints",
        default="8,32,sqrt",
        help="C values, 'sqrt' for ceil(sqrt(2T)) (default: 8,32,sqrt)",
    )
    parser.add_argument("--plot", metavar="PATH", help="draw temp bytes against run time")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    every_size = report.sweep_sizes(parser, args)
    try:
        counts = checkpoint_counts(args.checkpoints, args.length)
    except ValueError as error:
        parser.error(str(error))
    if _equinox_scan() is None:
        print("equinox is not installed: its rows are left out", file=sys.stderr)
    rows = []
    for sizes in every_size:
        rows += measure(sizes, counts, repeats=args.repeats, min_time=args.min_time, seed=args.seed)
        print(
            format_rows(
                [r for r in rows if (r["input"], r["hidden"]) == (sizes.input, sizes.hidden)]
            )
        )
        print()
        if args.json:
            report.write_json(args.json, collect_meta(argv), rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
