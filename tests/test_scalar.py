"""Scenarios 1 and 2 (``accumulate_loss``, ``stack_loss``) against PyTorch and mathematics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BASE_LOOPS,
    DTYPES,
    LOOP_VARIANTS,
    TOL,
    assert_close,
    assert_passes,
    count_compilations,
    fixture,
    grad_modes,
    parity_params,
    value_and_grad,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import loopgrad_jax as lg
from loopgrad_jax import parity

SCENARIOS = {"accumulate": lg.accumulate_loss, "stack": lg.stack_loss}


@pytest.mark.parametrize(
    "check", parity_params(parity.checks(SCENARIOS, grid="suite"), scenario_in_id=True)
)
def test_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.parametrize("dtype", DTYPES)
def test_article_gradient_is_twelve_not_four(dtype):
    # The article claims only the last iteration counts (d/dx (x*x + 2) = 4 at x=2).
    # PyTorch, recorded in the fixture, says 12 = 2*n*x: every iteration contributes.
    for scenario in SCENARIOS:
        assert fixture(scenario, dtype).case("article")["grad"].tolist() == [12.0]
        for loop in lg.LOOPS:
            x = jnp.array([2.0], dtype)
            fn = SCENARIOS[scenario]
            _, grad = value_and_grad(lambda x, fn=fn, loop=loop: fn(x, 3, loop=loop), loop)(x)
            assert grad.tolist() == [12.0]


def test_traced_n_with_a_bounded_while_loop():
    # lax.while_loop's trip count may be traced; reverse mode runs through the bound.
    for fn in SCENARIOS.values():
        grad = jax.jit(jax.grad(lambda x, n, fn=fn: fn(x, n, loop="while:max_steps=64")))
        assert grad(2.0, 3) == 12
    with pytest.raises(TypeError, match=r"n must be a static Python int, got a JAX array"):
        jax.jit(lambda x, n: lg.accumulate_loss(x, n, loop="fori"))(2.0, 3)
    with pytest.raises(ValueError, match=r"n=65 exceeds the loop's max_steps=64"):
        lg.stack_loss(2.0, 65, loop="while:max_steps=64")


@pytest.mark.parametrize("dtype", DTYPES)
def test_traced_n_matches_pytorch(dtype):
    # One compiled gradient per scenario serves every fixture case's n (0 to 100).
    for scenario, fn in SCENARIOS.items():
        grad = jax.jit(jax.value_and_grad(lambda x, n, f=fn: f(x, n, loop="while:max_steps=128")))
        for case in fixture(scenario, dtype).cases:
            got = grad(jnp.asarray(case["x"]), case["n"])
            want = (jnp.asarray(case["loss"], dtype), case["grad"])
            assert_close(got, want, TOL[dtype], case["name"])


@settings(max_examples=15, deadline=None)
@given(
    x=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=5),
    n=st.integers(0, 40),
    scenario=st.sampled_from(sorted(SCENARIOS)),
    loop=st.sampled_from(LOOP_VARIANTS),
)
def test_closed_form(x, n, scenario, loop):
    # sum_{i<n} sum_j (x_j^2 + i) = n * sum_j x_j^2 + len(x) * n(n-1)/2, gradient 2*n*x.
    x = jnp.asarray(x, jnp.float64)
    loss, grad = value_and_grad(lambda x: SCENARIOS[scenario](x, n, loop=loop), loop)(x)
    expected = n * jnp.sum(x * x) + x.size * n * (n - 1) / 2
    np.testing.assert_allclose(loss, expected, rtol=TOL["float64"], atol=TOL["float64"])
    np.testing.assert_allclose(grad, 2 * n * x, rtol=TOL["float64"], atol=TOL["float64"])


@pytest.mark.parametrize(
    ("scenario", "loop"),
    [("accumulate", loop) for loop in LOOP_VARIANTS] + [("stack", loop) for loop in lg.LOOPS],
)
def test_check_grads(scenario, loop):
    x = jnp.array([[0.3, -1.2], [2.0, 0.5]], jnp.float64)
    fn = jax.jit(lambda x: SCENARIOS[scenario](x, 4, loop=loop))
    check_grads(fn, (x,), order=2 if loop in BASE_LOOPS else 1, modes=grad_modes(loop))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_while_loop_has_no_reverse_mode(scenario):
    # lax.while_loop cannot be transposed; our message, not JAX's, says why and what to use.
    # Forward mode works (above).
    with pytest.raises(ValueError, match=r"loop='while' cannot be used with jax.grad or jax.vjp"):
        jax.grad(SCENARIOS[scenario])(jnp.array([2.0]), 3, loop="while")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_loop_kinds_agree(scenario):
    x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)
    results = [
        value_and_grad(lambda x, loop=loop: SCENARIOS[scenario](x, 7, loop=loop), loop)(x)
        for loop in LOOP_VARIANTS
    ]
    for loss, grad in results[1:]:
        assert_close((loss, grad), results[0], TOL["float32"])


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": -1}, ValueError, r"n must be an int >= 0, got -1"),
        ({"n": 2.0}, TypeError, r"n must be a Python int, got float 2.0"),
        ({"n": True}, TypeError, r"n must be a Python int, got bool"),
        ({"n": 3, "loop": "for"}, ValueError, r"loop must be one of 'python', 'scan', 'fori'"),
        ({"n": 3, "loop": "scan:unroll=0"}, ValueError, r"loop unroll must be an int >= 1, got 0"),
        ({"n": 3, "loop": "scan:policy=x"}, ValueError, r"loop policy must be one of"),
        ({"n": 3, "loop": "remat:unrol=2"}, ValueError, r"loop options are ':unroll=<int>'"),
        ({"n": 3, "loop": "while:unroll=2"}, ValueError, r"unroll applies to 'scan', 'fori'"),
        ({"n": 3, "loop": "fori:policy=dots_saveable"}, ValueError, r"policy applies to 'remat'"),
        ({"n": 3, "loop": 3}, TypeError, r"loop must be a loop kind .* got int 3"),
        ({"n": 3, "x": jnp.array([1, 2])}, TypeError, r"x must have a floating-point dtype"),
    ],
)
def test_bad_input(scenario, kwargs, error, match):
    kwargs = {"x": jnp.array([2.0]), **kwargs}
    with pytest.raises(error, match=match):
        SCENARIOS[scenario](**kwargs)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_traced_length_explains_static_arguments(scenario):
    with pytest.raises(TypeError, match=r"n must be a static Python int.*static_argnames='n'"):
        jax.jit(SCENARIOS[scenario])(jnp.array([2.0]), 3)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_repeated_eager_calls_compile_once(scenario):
    fn = SCENARIOS[scenario]
    # Sizes no other test uses, so the first call compiles (clearing JAX's caches instead
    # made every later test in the process compile again).
    x = jnp.linspace(-1.0, 1.0, 17)
    other = x + 1.0
    with count_compilations() as lowered:
        jax.grad(fn)(x, 19)
    assert lowered
    with count_compilations() as lowered:
        jax.grad(fn)(other, 19)
    assert lowered == []
