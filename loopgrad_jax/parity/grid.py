"""Which checks there are: the scenarios, loop kinds and grids, :class:`Check` (a fixture
case run one way), the fixtures the checks read, :func:`checks` (every check of the
chosen scenarios and dtypes, by grid) and :func:`select` (by cell kind and loop)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import loopgrad_jax as lg
from loopgrad_jax import fixtures
from loopgrad_jax.parity.tolerance import DTYPES

#: Every scenario with PyTorch results to check (``article_literal`` records an exception).
SCENARIOS: tuple[str, ...] = (
    "accumulate",
    "stack",
    "rnn_loss",
    "train_as_written",
    "train_tbptt",
    "cell_loss",
    "cell_as_written",
    "cell_tbptt",
    "module",
)

#: The kinds of the core grid, which runs every fixture case of the article's scenarios.
BASE_LOOPS: tuple[str, ...] = ("python", "scan", "fori")
#: Every loop kind, plus options: unrolled scan and fori, remat with another policy and
#: in chunks, a while loop bounded so that reverse mode runs through it, and quasi-DEER.
LOOP_VARIANTS: tuple[str, ...] = (
    *lg.LOOPS,
    "scan:unroll=3",
    "fori:unroll=2",
    "remat:policy=dots_saveable",
    "remat:chunk=4",
    "remat:checkpoints=3",
    "while:max_steps=128",
    "parallel:jacobian=diag",
)
#: What the loop kinds beyond the base ones add; they run on fewer cases.
NEW_LOOPS: tuple[str, ...] = tuple(v for v in LOOP_VARIANTS if v not in BASE_LOOPS)


class Check(NamedTuple):
    """One parity check: a fixture case run one way."""

    scenario: str  # one of SCENARIOS
    case: str  # the fixture case's name
    cell: str  # "article", one of lg.CELLS' torch kinds, or "" (scenarios 1 and 2)
    method: str  # "", "plain"/"hoisted" (loss, tbptt), "forward"/"reverse" (as written)
    loop: str  # a loop kind or its text form
    jit: bool  # under an outer jax.jit
    dtype: str  # "float32" or "float64"

    @property
    def name(self) -> str:
        """``scenario/case/method/loop/jit-or-eager/dtype`` (an empty method left out)."""
        parts = [self.scenario, self.case, self.method, self.loop]
        return "/".join([*filter(None, parts), "jit" if self.jit else "eager", self.dtype])


# ------------------------------------------------------------------- fixtures


def load(scenario: str, dtype: str, directory: str | os.PathLike | None = None):
    """The fixture of ``scenario`` in ``dtype``, from ``directory`` (the shipped ones)."""
    path = fixtures.fixture_path(directory or fixtures.SHIPPED, scenario, dtype)
    stat = path.stat() if path.exists() else None
    key = (str(path.resolve()), stat and (stat.st_mtime_ns, stat.st_size))
    return _load(key)


@functools.lru_cache(maxsize=64)
def _load(key: tuple[str, Any]) -> fixtures.Fixture:
    # Keyed by path, time and size: a rewritten file is read again.
    return fixtures.load_fixture(key[0])


def case_names(scenario: str, directory: str | os.PathLike | None = None) -> list[str]:
    return [c["name"] for c in load(scenario, "float64", directory).cases]


# ------------------------------------------------------------------- which checks


def _grid(
    cases: Iterable[str],
    methods: Sequence[str],
    loops: Sequence[str],
    first: str,
) -> list[tuple[str, str, str, bool]]:
    """``(case, method, loop, jit)`` for the chosen cases, methods, loop kinds, jit on/off.

    Every case runs eagerly. Under an outer ``jax.jit`` only the cases where that traces
    a different program run again: the Python loop kind (eager, it runs op by op; under
    jit it is unrolled into one program) and ``first``, the scenario's first case. For
    the other kinds an eager call already runs the entry point compiled with ``jax.jit``
    (``_loops.compiled``), so an outer jit would trace the same program again.

    One exclusion keeps the suite fast: a Python loop under ``jax.jit`` is unrolled, and
    for the 200-step ``long*`` cases compiling it takes 15-120 s per check (the growth
    loopgrad-bench measures), so there the python kind runs eagerly only.
    """
    grid = []
    for case in cases:
        for method in methods:
            for loop in loops:
                for jit in (False, True):
                    if jit and loop == "python" and case.startswith("long"):
                        continue
                    if jit and loop != "python" and case != first:
                        continue
                    grid.append((case, method, loop, jit))
    return grid


def _full_grid(
    names: list[str],
    methods: Sequence[str],
    loops: Sequence[str] = LOOP_VARIANTS,
    new_cases: Sequence[str] | None = None,
) -> list[tuple[str, str, str, bool]]:
    """The base kinds on every case, the other kinds and options on ``new_cases``
    (the article's cases by default)."""
    if new_cases is None:
        new_cases = [n for n in names if n.startswith("article")]
    base = tuple(v for v in loops if v in BASE_LOOPS)
    new = tuple(v for v in loops if v in NEW_LOOPS)
    return _grid(names, methods, base, names[0]) + _grid(new_cases, methods, new, names[0])


def has_reverse_mode(loop: str) -> bool:
    """Whether reverse-mode differentiation runs through ``loop`` (a kind or its text form)."""
    return lg.Loop.parse(loop).reverse_mode


def has_forward_mode(loop: str) -> bool:
    """Whether forward-mode differentiation runs through ``loop`` (a kind or its text form)."""
    return lg.Loop.parse(loop).forward_mode


REVERSE_VARIANTS: tuple[str, ...] = tuple(filter(has_reverse_mode, LOOP_VARIANTS))


def _is_sgd(spec: Mapping[str, Any]) -> bool:
    return spec["name"] == "sgd" and set(spec) == {"name", "lr"}


def _plan(scenario: str, directory, grid: str) -> list[tuple[str, str, str, bool]]:
    """Every ``(case, method, loop, jit)`` of ``scenario``, before dtypes.

    Scenarios 1, 2 and ``rnn_loss``: the base kinds on every case, the other kinds and
    options on the article's cases. The hoisted input projection runs with the compiled
    loops reverse mode goes through (scan, remat).

    ``train_as_written``: plain SGD on every loop kind and option. The reverse method
    replays all T stored steps at every step: a Python loop unrolls T*T cell VJPs (40,000
    for the long case) under jit, and runs the 200-step case op by op; both take tens of
    seconds, so the python kind runs the reverse method eagerly only, and neither method
    on the long case. The reverse method's inner loop runs with the base kinds, remat
    and while. The optimizers
    (momentum, Nesterov, Adam, AdamW) are independent of the loop and of the method: they
    run with scan and the forward method. The resumed case (two calls, the second
    continuing the first) runs both methods with scan.

    ``train_tbptt``: differentiates through its window loop, so every kind but the
    unbounded ``while`` (``while:max_steps=N`` runs).
    The window sizes (1, 3, T) run on the base kinds; the other kinds and options on
    windows of 3; the optimizers with scan.

    ``cell_*``: PyTorch's modules, every kind (rnn_tanh, rnn_relu, lstm, gru) on every
    loop kind, see :func:`_cell_plan`.
    """
    if scenario not in SCENARIOS:
        raise ValueError(
            f"scenario must be one of {', '.join(map(repr, SCENARIOS))}, got {scenario!r}."
        )
    names = case_names(scenario, directory)
    first = names[0]
    if scenario in ("accumulate", "stack"):
        return _full_grid(names, ("",))
    if scenario == "rnn_loss":
        hoisted = _full_grid(names, ("hoisted",), ("scan", "remat"))
        return _full_grid(names, ("plain",)) + hoisted
    if scenario in ("train_as_written", "train_tbptt"):
        cases = load(scenario, "float64", directory).cases
        sgd = [c["name"] for c in cases if _is_sgd(c["optimizer"])]
        others = [c["name"] for c in cases if c["name"] not in sgd and "resume_at" not in c]
        resumed = [c["name"] for c in cases if "resume_at" in c]
    if scenario == "train_as_written":
        plain = [
            p
            for p in _full_grid(names, ("forward",))
            + _full_grid(names, ("reverse",), (*BASE_LOOPS, "remat", "while"))
            if p[0] in sgd
            and not (p[2] == "python" and (p[0] == "long" or (p[1], p[3]) == ("reverse", True)))
        ]
        return (
            plain
            + _grid(others, ("forward",), ("scan",), first)
            + _grid(resumed, ("forward", "reverse"), ("scan",), first)
        )
    if scenario == "train_tbptt":
        windows_of_3 = ["article_w3"]
        plain = [
            p
            for p in _full_grid(names, ("plain",), REVERSE_VARIANTS, windows_of_3)
            + _full_grid(names, ("hoisted",), ("scan", "remat"), windows_of_3)
            if p[0] in sgd
        ]
        return plain + _grid(others, ("plain",), ("scan",), first)
    if scenario == "module":
        return _module_plan(names, grid)
    return _cell_plan(scenario, names, grid)


#: The grids :func:`checks` knows: ``"full"`` (what ``loopgrad-parity`` runs) and
#: ``"suite"`` (what the test suite runs: fewer cell combinations, the article's scenarios
#: under an outer jit with the python kind only and the python kind op by op on their
#: first case, and float32 with scan only; see :func:`checks`).
GRIDS: tuple[str, ...] = ("full", "suite")
#: The loop options beyond the kinds themselves.
OPTIONS: tuple[str, ...] = tuple(v for v in LOOP_VARIANTS if v not in lg.LOOPS)

_CELL_METHODS = {
    "cell_loss": ("plain", "hoisted"),
    "cell_as_written": ("forward", "reverse"),
    "cell_tbptt": ("plain", "hoisted"),
}


def _cell_plan(scenario: str, names: list[str], grid: str) -> list[tuple[str, str, str, bool]]:
    """The grid of a ``cell_*`` scenario.

    Each kind (rnn_tanh, rnn_relu, lstm, gru) has two cases: one layer from a zero state
    with plain SGD (``{kind}_l1*``), and two layers from a random state with momentum or
    Adam (``{kind}_l2h*``); ``cell_loss`` has both again for modules built with
    ``bias=False`` (``*_nobias``). ``while`` has no reverse mode: ``cell_loss`` takes its
    gradient in forward mode and ``cell_as_written`` runs it (the as-written mode
    differentiates single cells), ``cell_tbptt`` cannot. The jit rule is
    :func:`_grid`'s: python under jit, and every loop under jit on the first case.

    ``"full"``: on the one-layer cases every loop kind and option, on the two-layer cases
    every loop kind, with the first method (the loss, the forward as-written method,
    tbptt without hoisting); then the reverse as-written method with every loop kind,
    and the hoisted loss and tbptt with scan and remat, on every case.

    ``"suite"``: fewer combinations, so that compiling them (1-2 s of CPU each) stays a
    small part of the test suite. ``cell_loss`` runs every kind with every loop kind on
    the one-layer case, and each option on one kind (in turn: the first kind takes the
    fifth option too); without biases, every reverse-capable loop kind on the one-layer
    case, and the two-layer case plain and hoisted with scan, hoisted with remat too.
    ``cell_as_written`` runs each kind's one-layer case with the forward method and its
    two-layer case with the reverse method, and ``while`` on the first case;
    ``cell_tbptt`` the one-layer case plain and the two-layer case hoisted; with scan.
    """
    first = names[0]
    methods = _CELL_METHODS[scenario]
    every = REVERSE_VARIANTS if scenario == "cell_tbptt" else LOOP_VARIANTS
    kinds = tuple(k for k in lg.CELLS if k != "article")
    plan = []
    for index, kind in enumerate(kinds):
        mine = [n for n in names if n.startswith(kind + "_")]
        one = [n for n in mine if n.startswith(kind + "_l1")]
        two = [n for n in mine if n not in one]
        if grid == "full":
            loops = tuple(v for v in every if v in lg.LOOPS)
            plan += _grid(one, methods[:1], every, first)
            plan += _grid(two, methods[:1], loops, first)
            later = loops if methods[1:] == ("reverse",) else ("scan", "remat")
            plan += [
                p
                for p in _grid(mine, methods[1:], later, first)
                if not (p[2] == "python" and p[3])  # reverse x python under jit: T*T VJPs
            ]
        elif scenario == "cell_loss":
            options = OPTIONS[index :: len(kinds)]
            bare = [n for n in mine if n.endswith("_nobias")]
            two_bare = [n for n in two if n in bare]
            plan += _grid(
                [n for n in one if n not in bare], methods[:1], (*lg.LOOPS, *options), first
            )
            plan += _grid([n for n in one if n in bare], methods[:1], lg.REVERSE_LOOPS, first)
            plan += _grid(two_bare, methods, ("scan",), first)
            plan += _grid(two_bare, methods[1:], ("remat",), first)
        else:
            plan += _grid(one, methods[:1], ("scan",), first)
            plan += _grid(two, methods[1:], ("scan",), first)
            if scenario == "cell_as_written" and first in one:
                plan += _grid([first], methods[:1], ("while",), first)
    return plan


def _module_plan(names: list[str], grid: str) -> list[tuple[str, str, str, bool]]:
    """The grid of ``module``: PyTorch's modules of every option (``{kind}_{option}``),
    called through ``lg.rnn``; the gradient of the fixture's probe runs in reverse mode.

    ``"full"``: every case with every reverse-capable loop kind and option, under an
    outer ``jax.jit`` by :func:`_grid`'s rule (``lg.rnn`` runs compiled already).
    ``"suite"``: every case with scan eagerly, scan under jit on the first case, and each
    other kind or option once eagerly, on cases taken in turn across the options (the
    kind rotating within each), and the python kind under jit on the next case.
    """
    if grid == "full":
        return _grid(names, ("",), REVERSE_VARIANTS, names[0])
    kinds = sorted(lg.CELLS[1:], key=len, reverse=True)  # "rnn_tanh" before "rnn"...
    option = {n: n.removeprefix(next(k for k in kinds if n.startswith(f"{k}_")) + "_")
              for n in names}  # fmt: skip
    groups = [[n for n in names if option[n] == o] for o in dict.fromkeys(option.values())]
    rounds = range(max(map(len, groups)))
    turns = [g[(i + j) % len(g)] for i in rounds for j, g in enumerate(groups)]
    others = [v for v in REVERSE_VARIANTS if v != "scan"]
    picks = [(turns[i % len(turns)], "", v, False) for i, v in enumerate(others)]
    picks.append((turns[len(others) % len(turns)], "", "python", True))  # unrolled
    return [(n, "", "scan", False) for n in names] + [(names[0], "", "scan", True)] + picks


def checks(
    scenarios: Iterable[str] = SCENARIOS,
    dtypes: Iterable[str] = DTYPES,
    directory: str | os.PathLike | None = None,
    *,
    grid: str = "full",
) -> list[Check]:
    """Every check of ``scenarios`` in ``dtypes``, against the fixtures in ``directory``.

    ``grid`` is one of :data:`GRIDS`: ``"suite"`` checks the ``cell_*`` scenarios on fewer
    combinations (:func:`_cell_plan`); the article's scenarios under an outer ``jax.jit``
    only with the python kind (every other kind's entry point runs compiled with
    ``jax.jit`` already, so the outer jit traces the same program), and the python kind
    op by op on the first case only (it runs the program it runs under jit), and never
    for the as-written reverse method (quadratic in T op by op); every scenario in
    float32 only with scan, eagerly: the other kinds, the options and the python kind
    trace the same programs in both dtypes, so float64 covers them, while float32
    rounding, which grows with the length, is checked on every case.

    The ``parallel`` kinds leave out the as-written cases whose optimizer state holds an
    integer (Adam's and AdamW's step count): that loop carries it from step to step, and
    DEER refuses a carry that is not all floating-point (a ``TypeError`` that names it).
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(map(repr, GRIDS))}, got {grid!r}.")
    out = []
    for scenario in scenarios:
        plan = _plan(scenario, directory, grid)
        for dtype in dtypes:
            cases = {c["name"]: c for c in load(scenario, dtype, directory).cases}
            for case, method, loop, jit in plan:
                if grid == "suite" and _left_out_of_suite(
                    scenario, dtype, case, plan[0][0], loop, jit, method
                ):
                    continue
                if _integer_carry(scenario, cases[case], loop):
                    continue
                cell = _cell_of(scenario, cases[case])
                out.append(Check(scenario, case, cell, method, loop, jit, dtype))
    return out


def _integer_carry(scenario: str, case: Mapping[str, Any], loop: str) -> bool:
    """Whether ``loop`` is a ``parallel`` kind and ``case`` trains as written (the time
    loop carries the optimizer's state) with an integer step count."""
    optimizer = case.get("optimizer", {}).get("name")
    parallel = lg.Loop.parse(loop).kind == "parallel"
    return parallel and scenario.endswith("as_written") and optimizer in ("adam", "adamw")


def _left_out_of_suite(
    scenario: str, dtype: str, case: str, first: str, loop: str, jit: bool, method: str | None
) -> bool:
    """What the ``"suite"`` grid leaves to ``loopgrad-parity`` (see :func:`checks`)."""
    if dtype == "float32" and (jit or loop != "scan"):
        return True  # float64 runs the same programs
    if loop == "python" and not jit and method == "reverse":
        return True  # T*(T+1)/2 cell VJPs op by op (9 s); under jit it runs the same ops
    if scenario.startswith("cell_") or scenario == "module":
        return False  # otherwise trimmed by _cell_plan, _module_plan
    if jit and loop != "python":
        return True  # the entry point is jitted inside already: the same program
    # The python kind op by op runs what it runs under jit (every case but the long
    # ones, which would unroll for tens of seconds): eagerly on the first case only.
    return loop == "python" and not jit and case != first


def _cell_of(scenario: str, case: Mapping[str, Any]) -> str:
    if scenario in ("accumulate", "stack"):
        return ""
    return case.get("kind", "article")


def select(
    all_checks: Iterable[Check],
    cells: Sequence[str] | None = None,
    loops: Sequence[str] | None = None,
) -> list[Check]:
    """The checks of ``cells`` (cell kinds) and ``loops`` (a kind: all its options)."""
    out = []
    for check in all_checks:
        if cells is not None and check.cell not in cells:
            continue
        if loops is not None and not any(
            check.loop == loop or (":" not in loop and lg.Loop.parse(check.loop).kind == loop)
            for loop in loops
        ):
            continue
        out.append(check)
    return out
