"""The as-written methods side by side over a grid of sizes, and what ``"auto"`` picks.

``loopgrad-bench as-written-grid``: ``train_rnn(mode="as_written")`` computes its gradient
two exact ways (``forward``, ``reverse``); ``as_written_method="auto"`` picks one from a
cost model (:func:`loopgrad_jax._as_written.choose_method`). This measures both at every
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

The JSON file is loopgrad-bench's (:mod:`loopgrad_jax.bench.report`): one record per
method per point, ``scenario="train_as_written"``, every key of
:data:`~loopgrad_jax.bench.run.RECORD_KEYS`, and the grid's own (:data:`GRID_KEYS`):
``estimated_s`` and ``estimated_temp_bytes`` (the cost model's), ``auto`` (whether auto
picks this method here), ``faster`` and ``auto_over_faster`` (the same on both records
of a point). ``meta`` adds the grid, ``dtype``, ``time_model``, ``forward_memory_limit``
and ``worst_auto_over_faster``.

``--fit PATH`` fits the time model's prices (:data:`~loopgrad_jax._as_written.TIME_MODEL`)
to the timings of a grid's JSON and prints them, with each point's pick under the fit.
The committed prices come from one run and are checked on another::

  loopgrad-bench as-written-grid --json bench/results/cpu_as_written_grid_calibration.json
  loopgrad-bench as-written-grid \\
      --fit bench/results/cpu_as_written_grid_calibration.json   # -> TIME_MODEL
  loopgrad-bench as-written-grid --json bench/results/cpu_as_written_grid.json

``--recheck PATH`` re-times, with the same settings, the points of an earlier run whose
window saw more than ``--busy-above`` other cores busy (another process competing for
the CPU, which slows the multi-threaded ``forward`` products more than ``reverse``'s),
and writes the whole grid with those points replaced; each replaced record keeps the
first run's figures under ``first_run`` (:data:`FIRST_RUN_KEYS`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax import _as_written
from loopgrad_jax.bench import cases, report, run, timing

METHODS = ("forward", "reverse")

#: How the grid is run, as ``meta.command`` records it.
COMMAND = ("loopgrad-bench", "as-written-grid")

#: The scenario of every record: loopgrad-bench's as-written loop, one method a record.
SCENARIO = "train_as_written"

#: The grid: points on both sides of the crossover (small T or large H*P: reverse;
#: long T at small sizes: forward).
GRID = {
    "input": (10, 64),
    "hidden": (5, 16, 64, 128),
    "batch": (1, 8, 32),
    "length": (10, 100, 1000, 2000),
}

#: The keys a grid's records have beside :data:`~loopgrad_jax.bench.run.RECORD_KEYS`.
GRID_KEYS: tuple[str, ...] = (
    "estimated_s",  # the time model's seconds per call (_as_written.estimated_seconds)
    "estimated_temp_bytes",  # the cost model's temp bytes (as_written_cost(...).memory_bytes)
    "auto",  # whether as_written_method="auto" picks this method at this point
    "faster",  # whether this method's median is the point's smaller
    "auto_over_faster",  # auto's pick's median over the faster's: the same on both records
)

#: What a re-timed record (``--recheck``) keeps of the first run, under ``first_run``.
FIRST_RUN_KEYS: tuple[str, ...] = ("run_s_median", "other_cores", "faster", "auto_over_faster")


def points(grid: Mapping[str, Sequence[int]]) -> list[lg.RNNSizes]:
    """Every ``(I, H, B, T)`` of ``grid``, ``T`` varying fastest."""
    combos = itertools.product(grid["input"], grid["hidden"], grid["batch"], grid["length"])
    return [lg.RNNSizes(length=t, batch=b, input=i, hidden=h, output=1) for i, h, b, t in combos]


def new_record(sizes: lg.RNNSizes, method: str, dtype: str = "float32") -> dict[str, Any]:
    """``method``'s record at ``sizes``, every figure ``None``: loopgrad-bench's keys
    (:func:`loopgrad_jax.bench.run.new_record`'s, for the as-written loop's ``scan``) and
    the cost model's estimates."""
    itemsize = jnp.dtype(dtype).itemsize
    bench_sizes = cases.Sizes(*sizes[:4], window=1, output=sizes.output)
    # train_rnn's default loop, scan
    record = run.new_record(run.Task(SCENARIO, bench_sizes, "jax", "scan", method))
    record.update(
        estimated_s=_as_written.estimated_seconds(sizes, method, itemsize),
        estimated_temp_bytes=_as_written.as_written_cost(sizes, method, itemsize).memory_bytes,
        auto=_as_written.choose_method(sizes, dtype) == method,
        faster=None,
        auto_over_faster=None,
    )
    return record


def measure(
    sizes: lg.RNNSizes,
    dtype: str,
    *,
    repeats: int,
    max_call_s: float,
    point_budget_s: float,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """One grid point: both methods timed side by side (see the module docstring); its
    records, ``{method: record}``."""
    point = {method: new_record(sizes, method, dtype) for method in METHODS}
    slowest = max(r["estimated_s"] for r in point.values())
    if slowest > max_call_s:
        reason = f"a call is estimated at {slowest:.0f} s > --max-call-s {max_call_s}"
        for record in point.values():
            record["skipped"] = reason
        return point

    data = cases.make_data(cases.Sizes(*sizes[:4], window=1, output=sizes.output), seed)
    args = jax.tree.map(lambda a: jnp.asarray(a, dtype), (data.params, data.inputs, data.targets))
    compiled = {}
    for method in METHODS:
        compiled[method] = jax.jit(_train(method)).lower(*args).compile()
        point[method]["temp_bytes"] = timing.memory_bytes(compiled[method], parts=("temp",))
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
    other_cores = None
    if busy is not None and busy_after is not None and wall >= timing.MIN_LOAD_WINDOW_S:
        other_cores = round(max((busy_after - busy) - (own_after - own), 0.0) / wall, 2)
    for method in METHODS:
        _fill(point[method], times[method], other_cores)
    _add_verdict(point)
    return point


def _train(method: str):
    def train(params, inputs, targets):
        result = lg.train_rnn(
            params, inputs, targets, lr=cases.LR, mode="as_written", as_written_method=method
        )
        return result.losses, result.params

    return train


def _fill(record: dict[str, Any], samples: Sequence[float], other_cores: float | None) -> None:
    """Writes the timings of one method's ``samples`` (a call each) into its record."""
    record.update(**run.timing_fields(samples, 1), other_cores=other_cores)
    record["gflops"] = record["flops"] / record["run_s_median"] / 1e9
    record["seqs_per_s"] = record["batch"] / record["run_s_median"]


def _add_verdict(point: Mapping[str, dict[str, Any]]) -> None:
    faster = faster_method(point)
    ratio = point[auto_method(point)]["run_s_median"] / point[faster]["run_s_median"]
    for method in METHODS:
        point[method]["faster"] = method == faster
        point[method]["auto_over_faster"] = ratio


def auto_method(point: Mapping[str, Mapping[str, Any]]) -> str:
    """The method auto picks at ``point``."""
    return next(m for m in METHODS if point[m]["auto"])


def faster_method(point: Mapping[str, Mapping[str, Any]]) -> str:
    """The method with the smaller median at a timed ``point``."""
    return min(METHODS, key=lambda m: point[m]["run_s_median"])


def skip_reason(point: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why ``point`` was not timed, or ``None``."""
    return point["forward"]["skipped"] or point["reverse"]["skipped"]


def is_grid(records: Sequence[Any]) -> bool:
    """Whether ``records`` are a grid's: ``train_as_written`` records with :data:`GRID_KEYS`."""
    return bool(records) and all(
        isinstance(r, dict) and r.get("scenario") == SCENARIO and all(k in r for k in GRID_KEYS)
        for r in records
    )


def pairs(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Mapping[str, Any]]]:
    """The records of each point, ``{method: record}``, in the order the points come.

    Raises:
      ValueError: a point without one record of each of :data:`METHODS`, or where
        ``auto`` is true on other than one of them.
    """
    found: dict[tuple[int, ...], dict[str, Mapping[str, Any]]] = {}
    for r in records:
        point = found.setdefault(sizes_key(r), {})
        method = r.get("method")
        if method not in METHODS or method in point:
            raise ValueError(
                f"expected one record of each of {', '.join(METHODS)} at {_where(sizes_key(r))}, "
                f"got {'a second' if method in point else 'a record of'} {method!r}"
            )
        point[method] = r
    for key, point in found.items():
        where = _where(key)
        if len(point) < len(METHODS):
            raise ValueError(
                f"expected one record of each of {', '.join(METHODS)} at {where}, "
                f"got {', '.join(point)} alone"
            )
        if sum(bool(r["auto"]) for r in point.values()) != 1:
            raise ValueError(f"expected auto true on one record at {where}, got it on none or both")
    return list(found.values())


def sizes_key(record: Mapping[str, Any]) -> tuple[int, ...]:
    """``(I, H, B, T)`` of ``record``: what its point is known by."""
    return tuple(record[k] for k in ("input", "hidden", "batch", "length"))


def _where(key: Sequence[int]) -> str:
    """``I=10 H=5 B=1 T=100``."""
    return " ".join(f"{k}={v}" for k, v in zip("IHBT", key, strict=True))


def collect_meta(
    argv: Sequence[str], dtype: str, repeats: int, todo: Sequence[lg.RNNSizes]
) -> dict[str, Any]:
    """loopgrad-bench's ``meta`` (the format, the machine and versions, the command) with
    the grid's settings: its sizes (those of ``todo``), dtype, the cost model's."""
    return {
        "format_version": report.FORMAT_VERSION,
        **report.machine_meta(jax.devices()[0]),
        "command": shlex.join([*COMMAND, *argv]),
        "dtype": dtype,
        "repeats": repeats,
        "grid": {k: sorted({getattr(s, k) for s in todo}) for k in GRID},
        "time_model": _as_written.TIME_MODEL,
        "forward_memory_limit": _as_written.FORWARD_MEMORY_LIMIT,
        "status": "running",
    }


def fit(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The time model (:data:`~loopgrad_jax._as_written.TIME_MODEL`'s form) best fitting
    the measured medians of float32 ``records``.

    For each method, non-negative least squares of ``run_s_median = sum(price[k] *
    work_counts[k])`` over the timed points, each row divided by its measured
    time so that every point weighs by its relative error; prices rounded to 2 digits.
    """
    timed = [p for p in pairs(records) if not skip_reason(p)]
    model = {}
    for method in METHODS:
        counts = [_as_written.work_counts(_sizes_of(p[method]), method) for p in timed]
        keys = list(counts[0])
        a = np.asarray([[c[k] for k in keys] for c in counts], float)
        y = np.asarray([p[method]["run_s_median"] for p in timed], float)
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


# --- The terminal table: one line a point, within report.TABLE_WIDTH columns ------------

_POINT_COLUMNS = (("forward", 11), ("reverse", 11), ("faster", 7), ("auto", 7))
_RUN_COLUMNS = (*_POINT_COLUMNS, ("auto/faster", 11), ("busy", 5))
_FIT_COLUMNS = (
    *_POINT_COLUMNS[:3],
    ("fit forward", 11),
    ("fit reverse", 11),
    ("fit pick", 8),
    ("pick/faster", 11),
)


def _line(sizes: Sequence[Any], cells: Sequence[Any], columns) -> str:
    """One line of a table: the four sizes, then ``cells`` right-aligned to ``columns``."""
    head = " ".join(f"{v!s:>{w}}" for v, w in zip(sizes, (4, 5, 4, 6), strict=True))
    widths = [w for _, w in columns]
    body = "".join(f"  {c!s:>{w}}" for c, w in zip(cells, widths, strict=True))
    return (head + body).rstrip()


def _header(columns) -> list[str]:
    names = [name for name, _ in columns]
    rule = ["-" * w for _, w in columns]
    return [_line("IHBT", names, columns), _line(["-" * w for w in (4, 5, 4, 6)], rule, columns)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def format_point(point: Mapping[str, Mapping[str, Any]]) -> str:
    """A point's line of the table :func:`format_table` heads: each method's median, the
    faster, auto's pick, its median over the faster's, the other cores busy meanwhile."""
    forward = point["forward"]
    if skip_reason(point):
        return f"{_line(sizes_key(forward), [], ())}  skipped: {skip_reason(point)}"
    cells = [
        *(_ms(point[m]["run_s_median"]) for m in METHODS),
        faster_method(point),
        auto_method(point),
        f"{forward['auto_over_faster']:.2f}x",
        "" if forward["other_cores"] is None else f"{forward['other_cores']:.2f}",
    ]
    return _line(sizes_key(forward), cells, _RUN_COLUMNS)


def header() -> str:
    """The head of :func:`format_point`'s lines."""
    return "\n".join(_header(_RUN_COLUMNS))


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A grid's records as the table the run printed, a line a point, and the worst pick."""
    points = pairs(records)
    lines = [header(), *map(format_point, points)]
    timed = [p for p in points if not skip_reason(p)]
    if timed:
        worst = max(p["forward"]["auto_over_faster"] for p in timed)
        lines += textwrap.wrap(
            f"auto's pick at most {worst:.2f}x the faster method's median over "
            f"{len(timed)} timed points ({len(points) - len(timed)} skipped); busy: the cores "
            "other processes kept busy while a point was timed",
            report.TABLE_WIDTH,
        )
    return "\n".join(lines)


def _print_fit(records: Sequence[Mapping[str, Any]]) -> None:
    """``--fit``: the fitted prices, then each timed point's pick under them."""
    model = fit(records)
    print(json.dumps(model))
    print("\n".join(_header(_FIT_COLUMNS)))
    for point in pairs(records):
        if skip_reason(point):
            continue
        sizes = _sizes_of(point["forward"])
        est = {m: _as_written.estimated_seconds(sizes, m, 4, model) for m in METHODS}
        pick = _as_written.pick_method(est["forward"], est["reverse"])
        faster = faster_method(point)
        ratio = point[pick]["run_s_median"] / point[faster]["run_s_median"]
        cells = [
            *(_ms(point[m]["run_s_median"]) for m in METHODS),
            faster,
            *(_ms(est[m]) for m in METHODS),
            pick,
            f"{ratio:.2f}x",
        ]
        print(_line(sizes_key(point["forward"]), cells, _FIT_COLUMNS))


def build_parser() -> argparse.ArgumentParser:
    parser = report.tool_parser("as_written_grid", __doc__, epilog=False, prog=" ".join(COMMAND))
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


def _read(parser: argparse.ArgumentParser, flag: str, path: str) -> list[dict[str, Any]]:
    """The records of a grid's JSON file, or a parser error saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
        records = data["records"]
        if not is_grid(records):
            raise ValueError(f"its records lack {', '.join(GRID_KEYS)} or are not {SCENARIO}'s")
        pairs(records)
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(
            f"argument {flag}: expected a JSON file written by {' '.join(COMMAND)} --json, "
            f"got {path!r}: {error}"
        )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the grid (or ``--fit``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fit:
        _print_fit(_read(parser, "--fit", args.fit))
        return 0
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    earlier = pairs(_read(parser, "--recheck", args.recheck)) if args.recheck else []
    todo = [_sizes_of(p["forward"]) for p in earlier] or points({k: getattr(args, k) for k in GRID})
    meta = collect_meta(argv, args.dtype, args.repeats, todo)
    if args.recheck:
        meta["recheck"] = {"of": args.recheck, "busy_above": args.busy_above}
    records: list[Mapping[str, Any]] = []
    print(header(), flush=True)
    try:
        for k, sizes in enumerate(todo):
            first = earlier[k] if earlier else None
            busy = first is not None and (first["forward"]["other_cores"] or 0.0) > args.busy_above
            if first is not None and (skip_reason(first) or not busy):
                point = first  # kept as measured
            else:
                point = measure(
                    sizes,
                    args.dtype,
                    repeats=args.repeats,
                    max_call_s=args.max_call_s,
                    point_budget_s=args.point_budget_s,
                    seed=args.seed,
                )
                if first is not None:
                    for method in METHODS:
                        point[method]["first_run"] = {
                            key: first[method][key] for key in FIRST_RUN_KEYS
                        }
            records += [point[m] for m in METHODS]
            print(format_point(point), flush=True)
            if args.json:
                report.write_json(args.json, meta, records)
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
    else:
        meta["status"] = "complete"
    timed = [p for p in pairs(records) if not skip_reason(p)]
    if timed:
        meta["worst_auto_over_faster"] = max(p["forward"]["auto_over_faster"] for p in timed)
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
