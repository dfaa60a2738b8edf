"""Parity with PyTorch: the library's results against PyTorch's, recorded as fixtures.

One code path serves the test suite and the ``loopgrad-parity`` command: :func:`checks`
lists what to check (scenario, case, method, loop kind, jit on or off, dtype), and
:func:`run_check` runs one check and compares every result field its fixture case
records, returning a :class:`Record`. In plain Python, one check is::

  case = load(scenario, dtype).case(name)
  actual = scenario's entry point on the case's inputs, with `loop` (and `method`),
                 under an outer jax.jit when `jit`
  error = max over every recorded field f and every element of
          |actual[f] - case[f]| / (1 + |case[f]|)
  passed = error <= TOL[dtype]            # shapes and dtypes equal too

The fixtures ship with the package (:data:`loopgrad_jax.fixtures.SHIPPED`), so an
installed copy can re-check parity after an upgrade of JAX or PyTorch:
``loopgrad-parity`` against them, ``loopgrad-parity --live`` against fixtures the
installed PyTorch writes into a temporary folder first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax import _sequence, fixtures
from loopgrad_jax._progress import NoBar

#: Relative and absolute tolerance against PyTorch, by dtype: an element passes when
#: ``|actual - expected| <= TOL * (1 + |expected|)``. float64: both libraries are exact up
#: to a few roundings; float32: at the fixtures' sizes the two differ by a few ulps (~1e-7).
TOL: dict[str, float] = {"float32": 1e-5, "float64": 1e-10}
DTYPES: tuple[str, ...] = ("float32", "float64")
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

# Case fields that are the problem, not a result: everything else in a case is compared.
_INPUT_FIELDS = frozenset(
    {
        "name",
        "seed",
        "code",
        "n",
        "x",
        "params",
        "inputs",
        "targets",
        "hidden0",
        "optimizer",
        "window",
        "resume_at",
        "kind",
        "num_layers",
        "input_size",
        "hidden_size",
        "output_size",
        "rnn_state",
        "head_state",
        # module: the call's options and the probe's weights
        "lengths",
        "batch_first",
        "bias",
        "bidirectional",
        "proj_size",
        "unbatched",
        "cell_module",
        "r_out",
        "r_h",
        "r_c",
    }
)


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


@dataclasses.dataclass(frozen=True)
class Record:
    """The outcome of one :class:`Check`.

    ``error`` is the largest ``|actual - expected| / (1 + |expected|)`` over every
    compared element (relative for large values, absolute near zero; ``inf`` when a
    shape, dtype or structure differs or the run raised), found in ``field``.
    """

    scenario: str
    case: str
    cell: str
    method: str
    loop: str
    jit: bool
    dtype: str
    error: float
    tolerance: float
    passed: bool
    field: str = ""  # where the largest error is
    message: str = ""  # why it failed
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["error"] = self.error if math.isfinite(self.error) else None
        return out


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


# ------------------------------------------------------------------- running one


def value_and_grad(fn: Callable, loop: str) -> Callable:
    """``jax.value_and_grad(fn)``; forward mode (``jax.jacfwd``) for loops without reverse mode.

    A ``while`` loop cannot be reverse-differentiated; forward mode gives the same gradient.
    """
    if has_reverse_mode(loop):
        return jax.value_and_grad(fn)

    def forward(*args):
        return fn(*args), jax.jacfwd(fn)(*args)

    return forward


def _maybe_jit(fn: Callable, jit: bool) -> Callable:
    return jax.jit(fn) if jit else fn


def _optimizer(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Plain SGD through ``lr=`` (the default path); the rest through ``torch_optimizer``."""
    if _is_sgd(spec):
        return {"lr": spec["lr"]}
    return {"optimizer": lg.torch_optimizer(**spec)}


def _promotion(spec: Mapping[str, Any]):
    # optax's Adam bias correction raises a Python float to an int32 step count, which a
    # strict promotion mode (the test suite's) refuses; our own code passes strict mode.
    if spec["name"] == "sgd":
        return contextlib.nullcontext()
    return jax.numpy_dtype_promotion("standard")


def _hidden0(case: Mapping[str, Any]) -> Any:
    h0 = case["hidden0"]
    return tuple(h0) if isinstance(h0, list) else h0


def _stored(hidden: Any) -> Any:
    """A result's state as a fixture holds it: an LSTM's ``(h, c)`` as a list."""
    return list(hidden) if isinstance(hidden, tuple) else hidden


def _scalar(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    fn = {"accumulate": lg.accumulate_loss, "stack": lg.stack_loss}[check.scenario]

    def loss_of(x):
        return fn(x, c["n"], loop=check.loop)

    loss, grad = _maybe_jit(value_and_grad(loss_of, check.loop), check.jit)(jnp.asarray(c["x"]))
    return {"loss": loss, "grad": grad}


def _final_hidden(params, c: Mapping[str, Any], loop: str, hoist_input: bool) -> Any:
    """The state after the whole sequence: the forward pass ``rnn_loss`` sums the losses of.

    ``rnn_loss`` returns only the summed loss; this runs the same checks and the same
    forward pass (:func:`loopgrad_jax._sequence.rnn_forward`, with the same cell, loop
    kind and hoisting) and keeps its final carry, in the API's layout. A forward pass
    costs a fraction of ``train_rnn(mode="tbptt", window=T, lr=0)``, which would
    differentiate it too (12 s of CPU for the 200-step case with a Python loop).
    """
    bound = _sequence.bind(params, c["inputs"], c["targets"], _hidden0(c), None)
    carry, _ = _sequence.rnn_forward(
        bound.cell,
        bound.params,
        bound.inputs,
        bound.targets,
        _sequence.to_carry(bound.kind, bound.hidden0),
        loop=lg.Loop.parse(loop),
        hoist_input=hoist_input,
    )
    return _sequence.to_public(bound.kind, carry)


def _loss(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    """``rnn_loss`` and its gradient (full BPTT), and the final state."""
    cell = check.scenario == "cell_loss"
    params = _cell_params(c) if cell else lg.RNNParams(**c["params"])

    def loss_of(params):
        return lg.rnn_loss(
            params,
            c["inputs"],
            c["targets"],
            hidden0=_hidden0(c),
            loop=check.loop,
            hoist_input=check.method == "hoisted",
        )

    def run(params):
        loss, grads = value_and_grad(loss_of, check.loop)(params)
        return loss, grads, _final_hidden(params, c, check.loop, check.method == "hoisted")

    loss, grads, hidden = _maybe_jit(run, check.jit)(params)
    if not cell:
        return {"loss": loss, "grads": grads._asdict(), "hidden": hidden}
    grads_rnn, grads_head = lg.to_torch(grads)
    return {
        "loss": loss,
        "grads_rnn": grads_rnn,
        "grads_head": grads_head,
        "hidden": _stored(hidden),
    }


def _cell_params(c: Mapping[str, Any]) -> lg.CellParams:
    params = lg.from_torch(c["rnn_state"], c["head_state"], kind=c["kind"])
    if params.num_layers != c["num_layers"]:
        raise ValueError(f"the case has {c['num_layers']} layers, its state {params.num_layers}.")
    return params


def _train(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    """``train_rnn`` on the case with its optimizer; a resumed case in two calls."""
    cell = check.scenario.startswith("cell_")
    params = _cell_params(c) if cell else lg.RNNParams(**c["params"])
    kwargs: dict[str, Any] = {"loop": check.loop, **_optimizer(c["optimizer"])}
    if check.scenario.endswith("tbptt"):
        kwargs.update(mode="tbptt", window=c["window"], hoist_input=check.method == "hoisted")
    else:
        kwargs.update(mode="as_written", as_written_method=check.method)

    def train(params, inputs, targets, hidden0):
        return lg.train_rnn(params, inputs, targets, hidden0=hidden0, **kwargs)

    def resumed(params, inputs, targets, hidden0):
        # PyTorch ran the loop for `resume_at` steps, then went on from hidden.detach()
        # with the same model and optimizer: a new graph, which is what a second call is.
        cut = c["resume_at"]
        first = train(params, inputs[:cut], targets[:cut], hidden0)
        second = lg.train_rnn(
            first.params,
            inputs[cut:],
            targets[cut:],
            hidden0=first.hidden,
            opt_state=first.opt_state,
            **kwargs,
        )
        return second._replace(
            losses=jnp.concatenate([first.losses, second.losses]),
            grads=jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first.grads, second.grads),
        )

    fn = _maybe_jit(resumed if "resume_at" in c else train, check.jit)
    with _promotion(c["optimizer"]):
        result = fn(params, c["inputs"], c["targets"], _hidden0(c))
    if not cell:
        return {
            "losses": result.losses,
            "grads": result.grads._asdict(),
            "final_params": result.params._asdict(),
            "hidden": result.hidden,
        }
    grads_rnn, grads_head = lg.to_torch(result.grads)
    final_rnn, final_head = lg.to_torch(result.params)
    return {
        "losses": result.losses,
        "grads_rnn": grads_rnn,
        "grads_head": grads_head,
        "final_rnn_state": final_rnn,
        "final_head_state": final_head,
        "hidden": _stored(result.hidden),
    }


def _module_params(c: Mapping[str, Any]) -> lg.CellParams:
    """The case's module from its state dict: the structure from the keys, batch_first
    (which a state dict does not hold) from the case; checked against the case's options."""
    params = lg.from_torch(c["rnn_state"], kind=c["kind"], batch_first=c.get("batch_first", False))
    if params.cell_module != bool(c.get("cell_module")):
        raise ValueError(f"the case's cell_module is {c.get('cell_module')}, not its state's.")
    if not params.cell_module:
        first = params.layers[0]
        found = (params.num_layers, params.bidirectional, first.weight_hr is not None)
        found += (first.bias_ih is not None,)
        told = (c["num_layers"], c["bidirectional"], c["proj_size"] > 0, c["bias"])
        if found != told:
            raise ValueError(
                f"the case's (num_layers, bidirectional, projection, bias) are {told}, "
                f"its state dict's {found}."
            )
    return params


def _module(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    """``lg.rnn`` on PyTorch's module call, and the gradients of the fixture's probe
    ``sum(outputs * r_out) + sum(h_n * r_h)`` (``+ sum(c_n * r_c)``) w.r.t. the weights,
    the inputs and ``hidden0``; a cell module's state gains (and loses) the layer axis."""
    params, cell = _module_params(c), c.get("cell_module", False)
    lengths = None if c.get("lengths") is None else jnp.asarray(c["lengths"])
    r_final = [c[r] for r in ("r_h", "r_c") if r in c]
    hidden0 = None if c["hidden0"] is None else jax.tree.map(jnp.asarray, _hidden0(c))
    if cell and hidden0 is not None:
        hidden0 = jax.tree.map(lambda a: a[None], hidden0)

    def probe(params, inputs, hidden0):
        outputs, final = lg.rnn(params, inputs, hidden0, lengths=lengths, loop=check.loop)
        finals = final if isinstance(final, tuple) else (final,)
        finals = tuple(f[0] for f in finals) if cell else finals  # a cell's (B, H)
        total = jnp.sum(outputs * c["r_out"])
        for f, r in zip(finals, r_final, strict=True):
            total = total + jnp.sum(f * r)
        return total, (outputs, _stored(finals) if len(finals) == 2 else finals[0])

    argnums = (0, 1) if hidden0 is None else (0, 1, 2)
    run = _maybe_jit(jax.value_and_grad(probe, argnums=argnums, has_aux=True), check.jit)
    (value, (outputs, hidden)), grads = run(params, jnp.asarray(c["inputs"]), hidden0)
    grads_rnn, grads_head = lg.to_torch(grads[0])
    if grads_head is not None:
        raise ValueError("a module without a head has a head's gradient.")
    out = {"value": value, "outputs": outputs, "hidden": hidden, "grads_rnn": grads_rnn}
    out |= {"grad_inputs": grads[1], "grad_hidden0": None}
    if hidden0 is not None:
        g = jax.tree.map(lambda a: a[0], grads[2]) if cell else grads[2]
        out["grad_hidden0"] = _stored(g)
    return out


_RUNNERS: dict[str, Callable[[Check, Mapping[str, Any]], dict[str, Any]]] = {
    "accumulate": _scalar,
    "stack": _scalar,
    "rnn_loss": _loss,
    "cell_loss": _loss,
    "train_as_written": _train,
    "train_tbptt": _train,
    "cell_as_written": _train,
    "cell_tbptt": _train,
    "module": _module,
}


def run_check(
    check: Check, directory: str | os.PathLike | None = None, *, catch: bool = True
) -> Record:
    """Runs ``check`` and compares every result field its fixture case records.

    Args:
      check: what to run, one entry of :func:`checks`.
      directory: the fixtures' folder; the shipped fixtures when ``None``.
      catch: record an exception raised by the run as a failure (the command goes on
        to the next check); ``False`` lets it propagate (the test suite shows its
        traceback).

    Returns:
      A :class:`Record`: the largest error, the tolerance and whether it passed.

    Examples:
      >>> from loopgrad_jax import parity
      >>> check = parity.checks(["accumulate"], ["float32"])[0]
      >>> check.name
      'accumulate/article/python/eager/float32'
      >>> record = parity.run_check(check)
      >>> record.passed, record.error <= record.tolerance == 1e-5
      (True, True)
    """
    if check.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64 checks need jax.config.update('jax_enable_x64', True) before they run."
        )
    start = time.perf_counter()
    tol = TOL[check.dtype]
    fields = dict(check._asdict())
    try:
        c = load(check.scenario, check.dtype, directory).case(check.case)
        actual = jax.device_get(_RUNNERS[check.scenario](check, c))
        error, field, message = compare(actual, c, check.dtype)
    except Exception as err:  # noqa: BLE001 - a failed run is a failed check
        if not catch:
            raise
        error, field, message = math.inf, "", f"{type(err).__name__}: {err}"
    passed = not message and error <= tol
    if not message and not passed:
        message = f"{field}: max |actual - expected| / (1 + |expected|) = {error:.3g} > {tol:g}"
    seconds = time.perf_counter() - start
    return Record(
        **fields,
        error=error,
        tolerance=tol,
        passed=passed,
        field=field,
        message=message,
        seconds=seconds,
    )


def compare(
    actual: Mapping[str, Any], case: Mapping[str, Any], dtype: str
) -> tuple[float, str, str]:
    """``(error, field, message)``: the largest error over every result field of ``case``.

    Every field of the case that is not part of the problem must be in ``actual``;
    ``message`` is empty unless a field is missing or a structure, shape or dtype differs.
    """
    recorded = sorted(k for k in case if k not in _INPUT_FIELDS)
    missing = [k for k in recorded if k not in actual]
    if missing:
        return math.inf, missing[0], f"recorded fields not compared: {missing}"
    worst, where = 0.0, recorded[0] if recorded else ""
    for key in recorded:
        expected = case[key]
        if isinstance(expected, float):
            expected = np.asarray(expected, dtype)
        for path, a, e in _pairs(actual[key], expected, key):
            if isinstance(a, str):  # a structure mismatch, described
                return math.inf, path, a
            a, e = np.asarray(a), np.asarray(e)
            if a.shape != e.shape:
                return math.inf, path, f"{path}: shape {a.shape} != {e.shape}"
            if e.dtype.kind == "f" and a.dtype != e.dtype:
                return math.inf, path, f"{path}: dtype {a.dtype} != {e.dtype}"
            error = _max_error(a, e)
            if error > worst:
                worst, where = error, path
    return worst, where, ""


def _pairs(actual: Any, expected: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """``(path, actual leaf, expected leaf)``, or ``(path, description, None)`` on a mismatch."""
    if expected is None:  # recorded as absent (a module's d hidden0 without hidden0)
        if actual is not None:
            yield path, f"{path}: {type(actual).__name__} != None", None
        return
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping) or set(actual) != set(expected):
            keys = sorted(actual) if isinstance(actual, Mapping) else type(actual).__name__
            yield path, f"{path}: keys {keys} != {sorted(expected)}", None
            return
        for k in expected:
            yield from _pairs(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        if not isinstance(actual, list | tuple) or len(actual) != len(expected):
            yield path, f"{path}: {type(actual).__name__} != a list of {len(expected)}", None
            return
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            yield from _pairs(a, e, f"{path}[{i}]")
    else:
        yield path, actual, expected


def _max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.size == 0:
        return 0.0
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    with np.errstate(invalid="ignore"):
        error = np.abs(a - e) / (1 + np.abs(e))
    return float(np.max(np.where(np.isnan(error), np.inf, error)))


# ------------------------------------------------------------------- the command

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


def _check_module(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--module FILE``: :func:`loopgrad_jax.check_against_torch` on random inputs."""
    from loopgrad_jax import check_torch

    given = [
        name
        for name, value in (("--live", args.live), ("--fixtures", args.fixtures))
        + (("--scenario", args.scenario is not SCENARIOS), ("--cell", args.cell))
        if value
    ]
    if given:
        parser.error(f"argument --module: not allowed with {', '.join(given)}")
    if args.lengths and args.unbatched:
        parser.error("argument --lengths: not allowed with --unbatched (one example)")
    try:
        module = check_torch.load_module(args.module)
        x, h0, lengths = check_torch.random_call(
            module, args.steps, args.batch, lengths=args.lengths,
            unbatched=args.unbatched, seed=args.seed,
        )  # fmt: skip
        results = [
            check_torch.check_against_torch(
                module,
                x,
                lengths=lengths,
                hidden0=h0,
                dtype=dtype,
                seed=args.seed,
                loops=args.loop or check_torch.DEFAULT_LOOPS,
            )  # fmt: skip
            for dtype in args.dtype
        ]
    except (ImportError, TypeError, ValueError) as err:
        parser.error(f"argument --module: {err}")
    shape = "x".join(map(str, x.shape))
    print(f"{args.module}: random inputs {shape}, lengths {lengths}, seed {args.seed}\n")
    print("\n\n".join(map(str, results)))
    if args.json:
        doc = {"module": args.module, "passed": all(r.passed for r in results)}
        doc["results"] = [r.as_json() for r in results]
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return 0 if all(r.passed for r in results) else 1


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


_COLUMNS = ("case", "scenario", "method", "loop", "jit", "dtype", "max rel error", "pass")


def format_table(records: Sequence[Record]) -> str:
    """One row per record: case, scenario, method, loop, jit, dtype, max relative error, pass."""
    rows = [
        (
            r.case,
            r.scenario,
            r.method or "-",
            r.loop,
            "jit" if r.jit else "eager",
            r.dtype,
            f"{r.error:.2e}" if math.isfinite(r.error) else "error",
            "pass" if r.passed else "FAIL",
        )
        for r in records
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(_COLUMNS, *rows, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in (_COLUMNS, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _meta(directory: Path, source: str, scenarios: Sequence[str], dtype: str) -> dict[str, Any]:
    versions = {"loopgrad_jax": lg.__version__, "jax": jax.__version__, "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import jaxlib

        versions["jaxlib"] = jaxlib.__version__
    with contextlib.suppress(ImportError):
        import optax

        versions["optax"] = optax.__version__
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    header = load(scenarios[0], dtype, directory).header
    return {
        "fixtures": source,
        "fixtures_torch_version": header["torch_version"],
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "tolerance": TOL,
        "error": "max over elements of |actual - expected| / (1 + |expected|)",
    }


def _write_json(path: str, meta: dict[str, Any], records: Sequence[Record]) -> None:
    failed = sum(not r.passed for r in records)
    doc = {
        **meta,
        "passed": failed == 0,
        "checks": len(records),
        "failed": failed,
        "records": [r.as_json() for r in records],
    }
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
