"""PyTorch's own loop primitives beside ``lax.scan``: eager, ``torch.compile``, functional scan.

For the article's full-sequence gradient (the ``rnn_loss`` scenario), every setting on
the same weights and inputs, timed interleaved
(:func:`loopgrad_jax.bench.timing.time_interleaved`)::

  lg:scan          jax.value_and_grad(lg.rnn_loss)(params, inputs, targets, loop="scan")
  torch:eager      for t: h = cell(x[t], h); loss += step_loss(h, y[t]);  loss.backward()
  torch:compile    torch.compile of that loop, then loss.backward(): dynamo unrolls the
                   Python loop, so it compiles only up to --max-unroll steps
  torch:scan       torch._higher_order_ops.scan(step, h0, (inputs, targets)) (PyTorch's
                   prototype functional scan, run eagerly), loss.sum().backward()
  torch:scan+compile   torch.compile of torch:scan

``cell`` and ``step_loss`` are :mod:`loopgrad_jax.bench.torch_peers`' (``tanh(F.linear(
cat([x, h], 1), W, b))`` and ``mean((F.linear(h, V, c) - y) ** 2)``). The first call of
each PyTorch setting is timed alone as ``first_call_s`` (for the compiled ones, the
compile), and ``lg:scan``'s trace and compile as ``compile_s``. Each row's loss and
gradient are checked against ``lg:scan``'s (``max_rel_diff``) and its run time compared
with it (``vs_lg_scan``: the setting's median over ``lg:scan``'s, with a 95% bootstrap
interval; above 1 is slower than ``lax.scan``). A setting PyTorch refuses is recorded
as skipped with the first line of its error.

PyTorch is a benchmark extra (``pip install 'loopgrad_jax[torch]'``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, report, timing, torch_peers
from loopgrad_jax.bench.run import max_rel_diff

#: Format of the JSON file.
FORMAT_VERSION = 1
#: The settings, in table order.
SETTINGS = ("lg:scan", "torch:eager", "torch:compile", "torch:scan", "torch:scan+compile")


def _jax_gradient(params, inputs, targets):
    loss, grads = jax.value_and_grad(lg.rnn_loss)(params, inputs, targets, loop="scan")
    return (loss, *grads)


def _torch_call(setting: str, d: cases.Data, sizes: cases.Sizes) -> Callable[[], tuple]:
    """A zero-argument callable running ``setting``'s forward and backward once."""
    import torch
    from torch._higher_order_ops import scan

    cell, step_loss = torch_peers._rnn_ops()

    def loop_loss(w, inputs, targets):
        hidden, total = torch.zeros(sizes.batch, sizes.hidden), 0.0
        for t in range(sizes.length):
            hidden = cell(w, inputs[t], hidden)
            total = total + step_loss(w, hidden, targets[t])
        return total

    def scan_loss(w, inputs, targets):
        def step(hidden, xy):
            hidden = cell(w, xy[0], hidden)
            # A fresh carry: scan refuses a carry that aliases another output.
            return hidden.clone(), step_loss(w, hidden, xy[1])

        _, losses = scan(step, torch.zeros(sizes.batch, sizes.hidden), (inputs, targets))
        return losses.sum()

    loss_fn = scan_loss if setting.startswith("torch:scan") else loop_loss
    if setting.endswith("compile"):
        loss_fn = torch.compile(loss_fn)

    def call():
        w = torch_peers._leaves(d.params)
        loss = loss_fn(w, d.inputs, d.targets)
        loss.backward()
        return (loss.detach(), *(p.grad for p in w))

    return call


def _skip_reason(setting: str, sizes: cases.Sizes, max_unroll: int) -> str | None:
    if setting == "torch:compile" and sizes.length > max_unroll:
        return (
            "torch.compile unrolls the Python loop into its graph, so its compile time grows "
            f"with T; T={sizes.length} > --max-unroll={max_unroll}"
        )
    return None


def measure(
    sizes: cases.Sizes,
    *,
    settings: Sequence[str] = SETTINGS[1:],
    max_unroll: int,
    repeats: int,
    min_time: float,
    seed: int,
) -> list[dict[str, Any]]:
    """One row for ``lg:scan`` and each of ``settings``, those that run timed interleaved."""
    data = cases.make_data(sizes, seed)
    torch_data = torch_peers._tensors(data, sizes, "cpu")
    args = jax.device_put((data.params, data.inputs, data.targets))
    compiled = timing.compile_jax(lambda: _jax_gradient, args)
    calls: dict[str, Callable[[], Any]] = {"lg:scan": lambda: compiled.compiled(*args)}
    first_call_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for setting in settings:
        reason = _skip_reason(setting, sizes, max_unroll)
        if reason is None:
            call = _torch_call(setting, torch_data, sizes)
            start = time.perf_counter()
            try:
                call()
            except Exception as error:  # noqa: BLE001 - PyTorch's refusal is the result
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
            else:
                first_call_s[setting] = time.perf_counter() - start
                calls[setting] = call
        if reason is not None:
            skipped[setting] = reason
    measured = timing.time_interleaved(calls, warmup=1, min_samples=repeats, min_time=min_time)
    outputs = {name: _arrays(out) for name, out in measured.outputs.items()}
    rows = []
    for setting in ("lg:scan", *settings):
        row: dict[str, Any] = {
            "setting": setting,
            "framework": setting.partition(":")[0],
            "length": sizes.length,
            "batch": sizes.batch,
            "input": sizes.input,
            "hidden": sizes.hidden,
            "skipped": skipped.get(setting),
        }
        if setting in calls:
            stats = timing.spread(measured.samples[setting], measured.number[setting])
            row.update(
                run_s_median=stats.median_s,
                run_s_q1=stats.q1_s,
                run_s_q3=stats.q3_s,
                run_s_ci=list(stats.ci_s),
                run_samples=stats.samples,
                first_call_s=first_call_s.get(setting),
                compile_s=compiled.compile_s + compiled.lower_s if setting == "lg:scan" else None,
                vs_lg_scan=list(
                    timing.ratio(measured.samples[setting], measured.samples["lg:scan"])
                ),
                max_rel_diff=max_rel_diff(outputs[setting], outputs["lg:scan"]),
                other_cores=measured.other_cores,
            )
        rows.append(row)
    return rows


def _arrays(output: Any) -> list[np.ndarray]:
    if hasattr(output[0], "detach"):  # PyTorch's tensors
        return list(torch_peers.to_numpy(output))
    return [np.asarray(a) for a in output]


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table."""
    lines = [
        f"{'setting':20} {'T':>6} {'median':>11} {'95% CI':>23} {'first call':>10} "
        f"{'rel diff':>8}  vs lax.scan [95% CI]"
    ]
    for r in rows:
        if r["skipped"]:
            lines.append(f"{r['setting']:20} {r['length']:>6} skipped: {r['skipped']}")
            continue
        low, high = r["run_s_ci"]
        value, lo, hi = r["vs_lg_scan"]
        first = r["first_call_s"] if r["first_call_s"] is not None else r["compile_s"]
        lines.append(
            f"{r['setting']:20} {r['length']:>6} {r['run_s_median'] * 1e3:9.3f}ms "
            f"{low * 1e3:10.3f}-{high * 1e3:10.3f}ms {first:9.2f}s "
            f"{r['max_rel_diff']:8.1e}  {value:.2f}x [{lo:.2f}-{hi:.2f}]"
        )
    return "\n".join(lines)


def collect_meta(argv: Sequence[str], threads: int) -> dict[str, Any]:
    """The machine, versions and settings of a run."""
    import torch

    return report.tool_meta(
        "torch_loops", argv, FORMAT_VERSION, torch=torch.__version__, torch_threads=threads
    )


def build_parser() -> argparse.ArgumentParser:
    parser = report.tool_parser("torch_loops", __doc__)
    parser.add_argument(
        "--lengths", default="100,1000", help="comma-separated T values (default: 100,1000)"
    )
    parser.add_argument(
        "--max-unroll",
        type=int,
        default=100,
        help="compile the Python loop with torch.compile only up to this T (default: 100)",
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS[1:]),
        help=f"comma-separated PyTorch settings beside lg:scan (default: all: "
        f"{','.join(SETTINGS[1:])})",
    )
    report.add_sampling_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lengths = [int(v) for v in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths takes comma-separated integers, got {args.lengths!r}")
    if not lengths or min(lengths) < 1:
        parser.error(f"--lengths must all be >= 1, got {args.lengths!r}")
    settings = tuple(v.strip() for v in args.settings.split(","))
    for setting in settings:
        if setting not in SETTINGS[1:]:
            parser.error(f"--settings takes {', '.join(SETTINGS[1:])}; got {setting!r}")
    if not torch_peers.available():
        parser.error("PyTorch is not installed: pip install 'loopgrad_jax[torch]'")
    threads = torch_peers.setup("cpu", report.usable_cores()).threads
    rows = []
    for length in lengths:
        i, h, b = report.SIZE_PRESETS["article"]
        sizes = cases.Sizes(length, b, i, h, 1)
        new = measure(
            sizes,
            settings=settings,
            max_unroll=args.max_unroll,
            repeats=args.repeats,
            min_time=args.min_time,
            seed=args.seed,
        )
        rows += new
        report.emit(rows, format_rows(new), args.json, lambda: collect_meta(argv, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
