"""Shared test helpers: the parity checks as pytest parameters, random problems, assertions.

The tolerances, loop kinds and the parity grid live in :mod:`loopgrad_jax.parity`, which
``loopgrad-parity`` runs too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loopgrad_jax as lg
from loopgrad_jax import parity
from loopgrad_jax.fixtures import SHIPPED, Fixture
from loopgrad_jax.parity import (  # noqa: F401 - re-exported: the suite's loop kinds and rules
    BASE_LOOPS,
    DTYPES,
    LOOP_VARIANTS,
    TOL,
    has_forward_mode,
    has_reverse_mode,
    value_and_grad,
)

#: The fixtures the package ships, which the suite checks.
FIXTURES = SHIPPED


def parity_params(
    checks: list[parity.Check], scenario_in_id: bool = False, quick_every: int = 1
) -> list[Any]:
    """``pytest.param(check)`` for each check, with ids ``dtype-case[-method]-loop-jit``.

    ``scenario_in_id`` appends the scenario (where one test covers several).
    The ``parallel`` kinds (DEER) compile slowly: the quick tier runs the first such
    check of each scenario, the slow tier the rest. With ``quick_every=k`` the quick
    tier runs every k-th check of the list (its order mixes dtypes, cases and loop
    kinds), the slow tier the others.
    """
    params, seen = [], set()
    for index, check in enumerate(checks):
        parts = [check.dtype, check.case, check.method, check.loop]
        parts += ["jit" if check.jit else "eager"]
        parts += [check.scenario] if scenario_in_id else []
        parallel = lg.Loop.parse(check.loop).kind == "parallel"
        slow = (parallel and check.scenario in seen) or index % quick_every != 0
        seen |= {check.scenario} if parallel else set()
        marks = [pytest.mark.slow] if slow else []
        params.append(pytest.param(check, id="-".join(filter(None, parts)), marks=marks))
    return params


def assert_passes(check: parity.Check) -> parity.Record:
    """Runs ``check`` (exceptions propagate, with their traceback) and asserts it passed."""
    record = parity.run_check(check, catch=False)
    assert record.passed, f"{check.name}: {record.message}"
    return record


def grad_modes(loop: str) -> list[str]:
    """The ``check_grads`` modes ``loop`` supports."""
    return [m for m, ok in (("fwd", has_forward_mode(loop)), ("rev", has_reverse_mode(loop))) if ok]


def fixture(scenario: str, dtype: str) -> Fixture:
    """The shipped fixture, loaded once per process."""
    return parity.load(scenario, dtype)


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


LOOPS = ("scan", "while")  # the primitives whose bodies run once per step


def equations(jaxpr, names: tuple[str, ...], inside: bool = False) -> list[tuple[Any, bool]]:
    """``(equation, whether inside a loop)`` for every equation of a (closed) jaxpr whose
    primitive is named in ``names``, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.append((eqn, inside))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if sub is not None and hasattr(sub, "eqns"):
                    found += equations(sub, names, inside or eqn.primitive.name in LOOPS)
    return found


def products(jaxpr) -> list[tuple[Any, bool]]:
    """``(dot_general equation, whether inside a loop)`` for every product of a (closed)
    jaxpr, nested jaxprs included."""
    return equations(jaxpr, ("dot_general",))


def loop_outputs(jaxpr) -> set[tuple[int, ...]]:
    """The shapes of every loop's outputs (its final carries, and a scan's stacked ones)."""
    return {v.aval.shape for eqn, _ in equations(jaxpr, LOOPS) for v in eqn.outvars}


def contracted_axes_in_loops(jaxpr) -> list[tuple[int, ...]]:
    """The second operand's contracted axes of every product inside a loop of a jaxpr."""
    return [
        tuple(eqn.params["dimension_numbers"][0][1]) for eqn, inside in products(jaxpr) if inside
    ]
