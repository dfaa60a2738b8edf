"""The as-written methods side by side over a grid of sizes, and what ``"auto"`` picks.

``train_rnn(mode="as_written")`` computes its gradient two exact ways (``forward``,
``reverse``); ``as_written_method="auto"`` picks one from a cost model
(:func:`loopgrad_jax._as_written.choose_method`). This measures both at every
point ``(I, H, B, T)`` of a grid and says how far auto's pick is from the faster.
At each point, as plain Python::

  for method in ("forward", "reverse"):                 # compile: not timed
    compiled[method] = jax.jit(train_rnn(..., as_written_method=method)).lower(*args).compile()
  for method in ("forward", "reverse"):                 # warm-up: timed only to size
    jax.block_until_ready(compiled[method](*args))       # the repeats below
  for r in range(repeats):                              # interleaved, order alternating
    for method in (("forward", "reverse") if r % 2 == 0 else ("reverse", "forward")):
      start = perf_counter()
      jax.block_until_ready(compiled[method](*args))
      times[method].append(perf_counter() - start)
  faster = the method with the smaller median
  auto_over_faster = median(times[choose_method(sizes)]) / median(times[faster])

A point is skipped (and recorded so) when the model's estimate of either
method's call exceeds ``--max-call-s``. ``repeats`` is as many rounds as fit in
``--point-budget-s`` by the warm-up calls' times, at least 3 and at most
``--repeats``: sub-millisecond points, the noisiest, get the most.

``--fit PATH`` fits the time model's prices (:data:`~loopgrad_jax._as_written.TIME_MODEL`)
to the timings of a grid's JSON and prints them, with each point's pick under the fit.
The committed prices come from one run and are checked on another::

  python -m loopgrad_jax.bench.as_written_grid \\
      --json bench/results/cpu_as_written_grid_calibration.json
  python -m loopgrad_jax.bench.as_written_grid \\
      --fit bench/results/cpu_as_written_grid_calibration.json   # -> TIME_MODEL
  python -m loopgrad_jax.bench.as_written_grid --json bench/results/cpu_as_written_grid.json

``--recheck PATH`` re-times, with the same settings, the points of an earlier run whose
window saw more than ``--busy-above`` other cores busy (another process competing for
the CPU, which slows the multi-threaded ``forward`` products more than ``reverse``'s),
and writes the whole grid with those points replaced; each replaced record keeps the
first run's figures under ``first_run``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax import _as_written
from loopgrad_jax.bench import cases, report, timing

METHODS = ("forward", "reverse")

#: The grid: points on both sides of the crossover (small T or large H*P: reverse;
#: long T at small sizes: forward).
GRID = {
    "input": (10, 64),
    "hidden": (5, 16, 64, 128),
    "batch": (1, 8, 32),
    "length": (10, 100, 1000, 2000),
}

#: Format of the JSON file; bumped when a key changes meaning.
FORMAT_VERSION = 1


def points(grid: Mapping[str, Sequence[int]]) -> list[lg.RNNSizes]:
    """Every ``(I, H, B, T)`` of ``grid``, ``T`` varying fastest."""
    combos = itertools.product(grid["input"], grid["hidden"], grid["batch"], grid["length"])
    return [lg.RNNSizes(length=t, batch=b, input=i, hidden=h, output=1) for i, h, b, t in combos]


def measure(
    sizes: lg.RNNSizes,
    dtype: str,
    *,
    repeats: int,
    max_call_s: float,
    point_budget_s: float,
    seed: int = 0,
) -> dict[str, Any]:
    """One grid point: both methods timed side by side (see the module docstring)."""
    itemsize = jnp.dtype(dtype).itemsize
    record: dict[str, Any] = {
        "input": sizes.input,
        "hidden": sizes.hidden,
        "batch": sizes.batch,
        "length": sizes.length,
        "params": _as_written.num_params(sizes),
        "skipped": None,
    }
    for method in METHODS:
        cost = _as_written.as_written_cost(sizes, method, itemsize)
        record[method] = {
            "flops": cost.flops,
            "estimated_temp_bytes": cost.memory_bytes,
            "estimated_s": _as_written.estimated_seconds(sizes, method, itemsize),
        }
    record["auto"] = _as_written.choose_method(sizes, dtype)
    slowest = max(record[m]["estimated_s"] for m in METHODS)
    if slowest > max_call_s:
        record["skipped"] = f"a call is estimated at {slowest:.0f} s > --max-call-s {max_call_s}"
        return record

    data = cases.make_data(cases.Sizes(*sizes[:4], window=1, output=sizes.output), seed)
    args = jax.tree.map(lambda a: jnp.asarray(a, dtype), (data.params, data.inputs, data.targets))
    compiled = {}
    for method in METHODS:
        compiled[method] = jax.jit(_train(method)).lower(*args).compile()
        record[method]["temp_bytes"] = timing.memory_bytes(compiled[method], parts=("temp",))
    first = {}
    for method in METHODS:
        start = time.perf_counter()
        jax.block_until_ready(compiled[method](*args))
        first[method] = time.perf_counter() - start
    runs = max(3, min(repeats, int(point_budget_s / max(sum(first.values()), 1e-9))))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    busy, own, wall = timing.machine_busy_s(), timing.own_cpu_s(), time.perf_counter()
    for r in range(runs):
        for method in METHODS if r % 2 == 0 else METHODS[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[method](*args))
            times[method].append(time.perf_counter() - start)
    wall = time.perf_counter() - wall
    busy_after, own_after = timing.machine_busy_s(), timing.own_cpu_s()
    record["other_cores"] = None
    if busy is not None and busy_after is not None and wall >= timing.MIN_LOAD_WINDOW_S:
        record["other_cores"] = round(max((busy_after - busy) - (own_after - own), 0.0) / wall, 2)
    record["repeats"] = runs
    for method in METHODS:
        record[method]["times_s"] = times[method]
        record[method]["median_s"] = statistics.median(times[method])
        record[method]["min_s"] = min(times[method])
    _add_verdict(record)
    return record


def _train(method: str):
    def train(params, inputs, targets):
        result = lg.train_rnn(
            params, inputs, targets, lr=cases.LR, mode="as_written", as_written_method=method
        )
        return result.losses, result.params

    return train


def _add_verdict(record: dict[str, Any]) -> None:
    median = {m: record[m]["median_s"] for m in METHODS}
    faster = min(METHODS, key=median.__getitem__)
    record["faster"] = faster
    record["slower_over_faster"] = max(median.values()) / median[faster]
    record["auto_over_faster"] = median[record["auto"]] / median[faster]


def collect_meta(argv: Sequence[str], dtype: str, repeats: int) -> dict[str, Any]:
    """The machine, versions and settings of a run."""
    return {
        "format_version": FORMAT_VERSION,
        **report.machine_meta(jax.devices()[0]),
        "command": f"python -m loopgrad_jax.bench.as_written_grid {shlex.join(argv)}".strip(),
        "dtype": dtype,
        "repeats": repeats,
        "time_model": _as_written.TIME_MODEL,
        "forward_memory_limit": _as_written.FORWARD_MEMORY_LIMIT,
        "status": "running",
    }


def fit(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The time model (:data:`~loopgrad_jax._as_written.TIME_MODEL`'s form) best fitting
    the measured medians of float32 ``records``.

    For each method, non-negative least squares of ``median_s = sum(price[k] *
    work_counts[k])`` over the timed records, each row divided by its measured
    time so that every point weighs by its relative error; prices rounded to 2 digits.
    """
    timed = [r for r in records if not r.get("skipped")]
    model = {}
    for method in METHODS:
        counts = [_as_written.work_counts(_sizes_of(r), method) for r in timed]
        keys = list(counts[0])
        a = np.asarray([[c[k] for k in keys] for c in counts], float)
        y = np.asarray([r[method]["median_s"] for r in timed], float)
        prices = _nonnegative_lstsq(a / y[:, None], np.ones_like(y))
        model[method] = {k: float(f"{v:.2g}") for k, v in zip(keys, prices, strict=True)}
    return model


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> list[float]:
    """``argmin |a x - y|`` over ``x >= 0``, by trying every subset of free columns."""
    best, best_x = np.inf, [0.0] * a.shape[1]
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            x, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (x < 0).any():
                continue
            residual = float(np.sum((a[:, cols] @ x - y) ** 2))
            if residual < best:
                best, best_x = residual, [0.0] * a.shape[1]
                for c, v in zip(cols, x, strict=True):
                    best_x[c] = float(v)
    return best_x


def _sizes_of(record: Mapping[str, Any]) -> lg.RNNSizes:
    return lg.RNNSizes(
        length=record["length"],
        batch=record["batch"],
        input=record["input"],
        hidden=record["hidden"],
        output=1,
    )


def format_record(r: Mapping[str, Any]) -> str:
    """One line of the terminal table."""
    head = f"I={r['input']:<3} H={r['hidden']:<4} B={r['batch']:<3} T={r['length']:<5}"
    if r["skipped"]:
        return f"{head} skipped: {r['skipped']}"
    fwd, rev = r["forward"]["median_s"], r["reverse"]["median_s"]
    return (
        f"{head} forward {fwd * 1e3:10.2f} ms  reverse {rev * 1e3:10.2f} ms"
        f"  faster {r['faster']:7s}  auto {r['auto']:7s} {r['auto_over_faster']:5.2f}x"
        f"  busy {r['other_cores']}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = report.tool_parser("as_written_grid", __doc__, epilog=False)
    for key, default in GRID.items():
        parser.add_argument(
            f"--{key}", type=_ints, default=default, help=f"comma-separated ({_join(default)})"
        )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--repeats", type=_positive, default=50, help="at most this many timed calls of each (50)"
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=10.0,
        help="skip a point where the time model puts either method's call above this (10)",
    )
    parser.add_argument(
        "--point-budget-s",
        type=float,
        default=10.0,
        help="as many repeats as fit in this many seconds, at least 3 (10)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the records here, rewritten after each point")
    parser.add_argument("--fit", metavar="PATH", help="fit the time model to PATH's timings")
    parser.add_argument(
        "--recheck",
        metavar="PATH",
        help="re-time PATH's points whose window saw other cores busy (see --busy-above)",
    )
    parser.add_argument(
        "--busy-above",
        type=float,
        default=0.3,
        help="with --recheck: re-time points whose other_cores exceeded this (0.3)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the grid (or ``--fit``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.fit:
        records = json.loads(Path(args.fit).read_text())["records"]
        model = fit(records)
        print(json.dumps(model))
        for r in records:
            if not r["skipped"]:
                sizes = _sizes_of(r)
                est = {m: _as_written.estimated_seconds(sizes, m, 4, model) for m in METHODS}
                pick = _as_written.pick_method(est["forward"], est["reverse"])
                ratio = r[pick]["median_s"] / r[r["faster"]]["median_s"]
                fitted = "  ".join(f"{m} {est[m] * 1e3:.2f} ms" for m in METHODS)
                print(f"{format_record(r)}  | fit: {fitted}, pick {pick} {ratio:.2f}x")
        return 0
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    meta = collect_meta(argv, args.dtype, args.repeats)
    records: list[dict[str, Any]] = []
    grid = {k: getattr(args, k) for k in GRID}
    earlier: list[dict[str, Any]] = []
    if args.recheck:
        earlier = json.loads(Path(args.recheck).read_text())["records"]
        meta["recheck"] = {"of": args.recheck, "busy_above": args.busy_above}
    todo = [_sizes_of(r) for r in earlier] if earlier else points(grid)
    try:
        for k, sizes in enumerate(todo):
            first = earlier[k] if earlier else None
            busy = first is not None and (first.get("other_cores") or 0.0) > args.busy_above
            if first is not None and (first["skipped"] or not busy):
                record = first  # kept as measured
            else:
                record = measure(
                    sizes,
                    args.dtype,
                    repeats=args.repeats,
                    max_call_s=args.max_call_s,
                    point_budget_s=args.point_budget_s,
                    seed=args.seed,
                )
                if first is not None:
                    record["first_run"] = {
                        key: first[key] for key in ("other_cores", "auto_over_faster", "faster")
                    } | {m: first[m]["median_s"] for m in METHODS}
            records.append(record)
            print(format_record(record), flush=True)
            if args.json:
                report.write_json(args.json, meta, records)
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
    else:
        meta["status"] = "complete"
    timed = [r for r in records if not r["skipped"]]
    if timed:
        meta["worst_auto_over_faster"] = max(r["auto_over_faster"] for r in timed)
    if args.json:
        report.write_json(args.json, meta, records)
    return 130 if meta["status"] == "interrupted" else 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _join(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


if __name__ == "__main__":
    raise SystemExit(main())
