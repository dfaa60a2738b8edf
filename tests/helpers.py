"""Shared test helpers: fixtures as JAX values, tolerances keyed by dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loopgrad_jax as lg
from loopgrad_jax.fixtures import SHIPPED, Fixture, fixture_path, load_fixture

#: The fixtures the package ships, which the suite checks.
FIXTURES = SHIPPED
DTYPES = ("float32", "float64")

# Relative and absolute tolerance against PyTorch. float64: both libraries are exact up to
# a few roundings; float32: at the article's sizes the two differ by a few ulps (~1e-7).
TOL = {"float32": 1e-5, "float64": 1e-10}


def case_names(scenario: str) -> list[str]:
    return [c["name"] for c in fixture(scenario, "float64").cases]


#: The kinds of the core parity grid, which runs every fixture case.
BASE_LOOPS = ("python", "scan", "fori")
#: Every loop kind, plus options: unrolled scan and fori, and remat with another policy.
LOOP_VARIANTS = (
    *lg.LOOPS,
    "scan:unroll=3",
    "fori:unroll=2",
    "remat:policy=dots_saveable",
    "remat:chunk=4",
)
#: What issue-level features add beyond the base kinds; they run on the article's cases.
NEW_LOOPS = tuple(v for v in LOOP_VARIANTS if v not in BASE_LOOPS)


def article_cases(scenario: str) -> list[str]:
    return [name for name in case_names(scenario) if name.startswith("article")]


def parity_grid(
    scenario: str,
    methods: tuple[str, ...] = ("",),
    loops: tuple[str, ...] = BASE_LOOPS,
    cases=case_names,
) -> list[Any]:
    """``(case, method, loop, jit)`` for the chosen cases, loop kinds and jit on/off.

    Every case runs eagerly. Under an outer ``jax.jit`` only the cases where that traces
    a different program run again: the Python loop kind (eager, it runs op by op; under
    jit it is unrolled into one program) and the first case of each scenario. For the
    other kinds an eager call already runs the entry point compiled with ``jax.jit``
    (``_loops.compiled``), so an outer jit would trace the same program again.

    One exclusion keeps the suite fast: a Python loop under ``jax.jit`` is unrolled, and
    for the 200-step ``long*`` cases compiling it takes 15-120 s per test (the growth
    loopgrad-bench measures), so there the python kind runs eagerly only.
    """
    grid = []
    first = case_names(scenario)[0]
    for case in cases(scenario):
        for method in methods:
            for loop in loops:
                for jit in (False, True):
                    if jit and loop == "python" and case.startswith("long"):
                        continue
                    if jit and loop != "python" and case != first:
                        continue
                    ids = "-".join(filter(None, [case, method, loop, "jit" if jit else "eager"]))
                    grid.append(pytest.param(case, method, loop, jit, id=ids))
    return grid


def full_grid(
    scenario: str, methods: tuple[str, ...] = ("",), loops=LOOP_VARIANTS, new_cases=article_cases
) -> list[Any]:
    """The base kinds on every case, the other kinds and options on ``new_cases``."""
    return parity_grid(scenario, methods, tuple(v for v in loops if v in BASE_LOOPS)) + (
        parity_grid(scenario, methods, tuple(v for v in loops if v in NEW_LOOPS), new_cases)
    )


def has_reverse_mode(loop: str) -> bool:
    """Whether reverse-mode differentiation runs through ``loop`` (a kind or its text form)."""
    return lg.Loop.parse(loop).kind in lg.REVERSE_LOOPS


def grad_modes(loop: str) -> list[str]:
    """The ``check_grads`` modes ``loop`` supports."""
    return ["fwd", "rev"] if has_reverse_mode(loop) else ["fwd"]


def value_and_grad(fn, loop: str):
    """``jax.value_and_grad(fn)``; forward mode (``jax.jacfwd``) for loops without reverse mode.

    A ``while`` loop cannot be reverse-differentiated; forward mode gives the same gradient.
    """
    if has_reverse_mode(loop):
        return jax.value_and_grad(fn)

    def forward(*args):
        return fn(*args), jax.jacfwd(fn)(*args)

    return forward


def fixture(scenario: str, dtype: str) -> Fixture:
    return load_fixture(fixture_path(FIXTURES, scenario, dtype))


def random_rnn_problem(key, t, b, i, h, o, dtype=jnp.float64):
    """``(params, inputs, targets, hidden0)`` of the given sizes, all random."""
    kp, kx, ky, kh = jax.random.split(key, 4)
    params = lg.init_rnn(kp, i, h, o, dtype=dtype)
    inputs = jax.random.normal(kx, (t, b, i), dtype)
    targets = jax.random.normal(ky, (t, b, o), dtype)
    hidden0 = jax.random.normal(kh, (b, h), dtype)
    return params, inputs, targets, hidden0


def params_of(tree: dict[str, Any]) -> lg.RNNParams:
    return lg.RNNParams(**{k: jnp.asarray(v) for k, v in tree.items()})


def maybe_jit(fn, jit: bool, **static):
    """``fn`` with ``static`` keyword arguments bound, jitted when ``jit``."""

    def bound(*args):
        return fn(*args, **static)

    return jax.jit(bound) if jit else bound


def assert_close(actual: Any, expected: Any, tol: float, what: str = "") -> None:
    """Elementwise ``|a - e| <= tol * (1 + |e|)``, leaf by leaf, with dtype kept."""
    if isinstance(expected, dict):
        expected = type(actual)(**expected) if hasattr(actual, "_fields") else expected
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e, f"{what}: structure {tree_a} != {tree_e}"
    for a, e in zip(leaves_a, leaves_e, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
        if e.dtype.kind == "f":
            assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol, err_msg=what)


_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
    """Counts, inside the block, the jaxprs lowered for XLA: every compilation starts
    with one, whether or not a persistent cache then supplies the executable."""
    lowered: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == _LOWERING_EVENT:
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield lowered
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
