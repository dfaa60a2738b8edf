"""``loopgrad-parity``: its arguments, :func:`main`, and running every chosen check with
a progress bar on stderr."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

import loopgrad_jax as lg
from loopgrad_jax import fixtures
from loopgrad_jax._progress import NoBar
from loopgrad_jax.parity.grid import GRIDS, SCENARIOS, Check, checks, select
from loopgrad_jax.parity.own_module import _check_module
from loopgrad_jax.parity.report import _meta, _write_json, format_table
from loopgrad_jax.parity.run import Record, run_check
from loopgrad_jax.parity.tolerance import DTYPES

_EPILOG = """\
what it checks:
  every scenario (accumulate, stack, rnn_loss, train_as_written, train_tbptt, and
  cell_loss, cell_as_written, cell_tbptt with torch.nn RNN, LSTM and GRU; module: those
  modules and cells of every option through lg.rnn) x its fixture cases x loop kinds x
  jit on/off x float32/float64: the value, every gradient, the final weights and the
  final state or outputs, each against PyTorch's, within
  |actual - expected| <= tol * (1 + |expected|), tol 1e-5 in float32, 1e-10 in float64.

examples:
  loopgrad-parity                          # against the fixtures this package ships
  loopgrad-parity --live                   # against fixtures the installed PyTorch writes
  loopgrad-parity --scenario cell_loss --cell lstm,gru --loop scan --json parity.json
  loopgrad-parity --module lstm.pt --steps 20 --batch 4 --lengths
                                           # your torch.save(module, 'lstm.pt') against lg.rnn

exit status: 0 when every check passes, 1 when one fails, 2 for bad arguments."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopgrad-parity",
        description=(
            "Check that loopgrad_jax computes what PyTorch computes, with the installed JAX "
            "(and, with --live, the installed PyTorch)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="regenerate the fixtures with the installed PyTorch in a temporary folder and "
        "check against those (needs pip install 'loopgrad_jax[torch]')",
    )
    parser.add_argument(
        "--fixtures",
        metavar="DIR",
        help="check against the fixtures in DIR instead of the shipped ones",
    )
    parser.add_argument(
        "--scenario",
        type=_choices("scenario", SCENARIOS),
        default=SCENARIOS,
        help=f"comma-separated scenarios (default: all: {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--cell",
        type=_choices("cell", lg.CELLS),
        default=None,
        help=f"comma-separated cell kinds ({','.join(lg.CELLS)}; 'article' is the article's "
        "SimpleRNN); leaves out accumulate and stack, which have no cell (default: all)",
    )
    parser.add_argument(
        "--loop",
        type=_loops,
        default=None,
        help="comma-separated loop kinds or text forms: a kind ('scan') selects it with "
        "every option, a text form ('scan:unroll=3') only itself (default: all)",
    )
    parser.add_argument(
        "--dtype", type=_choices("dtype", DTYPES), default=DTYPES, help="float32, float64 or both"
    )
    parser.add_argument(
        "--grid",
        choices=GRIDS,
        default="full",
        help="full: every loop kind with every cell scenario (default); suite: the test "
        "suite's grid, fewer cell combinations and the article's float32 cases on the base "
        "loop kinds only",
    )
    parser.add_argument("--json", metavar="PATH", help="write every record as JSON to PATH")
    own = parser.add_argument_group(
        "your own module (lg.check_against_torch; needs pip install 'loopgrad_jax[torch]')"
    )
    own.add_argument(
        "--module",
        metavar="FILE",
        help="check the nn.RNN/LSTM/GRU or cell module saved with torch.save(module, FILE) "
        "on random inputs, with every reverse-capable loop kind (or --loop) and --dtype, "
        "instead of the fixtures",
    )
    own.add_argument("--steps", type=_positive, default=5, metavar="T", help="default 5")
    own.add_argument("--batch", type=_positive, default=3, metavar="B", help="default 3")
    own.add_argument("--lengths", action="store_true", help="random lengths in 1..T, packed")
    own.add_argument("--unbatched", action="store_true", help="inputs (T, I), no batch axis")
    own.add_argument("--seed", type=int, default=0, help="of the inputs and the probe")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _split(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return items


def _choices(what: str, allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = _split(text)
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}"
            )
        return tuple(items)

    return parse


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _loops(text: str) -> tuple[str, ...]:
    items = _split(text)
    for item in items:
        try:
            lg.Loop.parse(item)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return tuple(items)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``loopgrad-parity``; returns the exit status (0 all pass, 1 a failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.live and args.fixtures:
        parser.error("argument --live: not allowed with --fixtures")
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir():
            parser.error(f"argument --json: folder {folder} does not exist")
    # float64 checks need 64-bit arrays; full float32 matrix products, as PyTorch computes
    # them on the CPU (JAX's default on NVIDIA GPUs rounds float32 operands to TF32).
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    if args.module:
        return _check_module(args, parser)
    with contextlib.ExitStack() as stack:
        directory: Path = Path(args.fixtures) if args.fixtures else fixtures.SHIPPED
        source = str(directory) if args.fixtures else "shipped"
        if args.live:
            try:
                import torch  # noqa: F401 - only to say clearly that it is missing
            except ImportError:
                parser.error(
                    "argument --live: needs PyTorch, which is not installed; "
                    "pip install 'loopgrad_jax[torch]' (or check the shipped fixtures "
                    "without --live)"
                )
            from loopgrad_jax import torch_reference

            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            print("regenerating the fixtures with the installed PyTorch...", file=sys.stderr)
            torch_reference.generate(
                directory, scenarios=args.scenario, command="loopgrad-parity --live"
            )
            source = "live"
        try:
            every = checks(args.scenario, args.dtype, directory, grid=args.grid)
            todo = select(every, args.cell, args.loop)
        except fixtures.FixtureError as err:
            print(f"loopgrad-parity: {err}", file=sys.stderr)
            return 1
        if not todo:
            parser.error("no check matches --scenario, --cell, --loop and --dtype together")
        meta = {"grid": args.grid, **_meta(directory, source, args.scenario, args.dtype[0])}
        records = _run_all(todo, directory, progress=not args.no_progress)
    print(format_table(records))
    failed = [r for r in records if not r.passed]
    print(f"\n{len(records) - len(failed)} of {len(records)} checks passed ({source} fixtures).")
    for r in failed:
        print(f"FAILED {_check_of(r).name}: {r.message}")
    if args.json:
        _write_json(args.json, meta, records)
    return 1 if failed else 0


def _check_of(record: Record) -> Check:
    return Check(*(getattr(record, f) for f in Check._fields))


def _run_all(todo: list[Check], directory: Path, *, progress: bool) -> list[Record]:
    bar = _progress_bar(len(todo), progress)
    records = []
    try:
        for check in todo:
            bar.set_description(f"{check.scenario} {check.case}")
            records.append(run_check(check, directory))
            # Every check compiles new programs, and each compiled program keeps its
            # code mapped: after a few hundred checks the process ran out of memory
            # mappings (LLVM: "Cannot allocate memory") and died. Dropping them costs
            # about 5% more CPU, in small programs compiled again.
            jax.clear_caches()
            bar.update(1)
    finally:
        bar.close()
    return records


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: count on stderr instead
        return _CountBar(total)
    return tqdm(total=total, file=sys.stderr, unit="check")


class _CountBar(NoBar):
    """``done/total`` on one stderr line, for when tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.done, self.text = total, 0, ""

    def set_description(self, text: str) -> None:
        self.text = text
        print(f"\r{self.done}/{self.total} {self.text:<60}", end="", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        print(f"\r{self.done}/{self.total} checks{' ' * 60}", file=sys.stderr, flush=True)
