"""Scenario 3's full-sequence loss: ``rnn_loss`` and its gradient (full BPTT) against PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    LOOP_VARIANTS,
    TOL,
    assert_close,
    assert_passes,
    count_compilations,
    grad_modes,
    parity_params,
    random_rnn_problem,
    value_and_grad,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import loopgrad_jax as lg
from loopgrad_jax import parity


@pytest.mark.parametrize(
    "check", parity_params(parity.checks(["rnn_loss"], grid="suite"), quick_every=2)
)
def test_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.parametrize(
    ("loop", "hoist"),
    [(loop, False) for loop in LOOP_VARIANTS] + [("scan", True), ("remat", True)],
)
def test_check_grads(loop, hoist):
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(0), 5, 2, 3, 4, 2)

    @jax.jit
    def fn(params, hidden0):
        return lg.rnn_loss(params, inputs, targets, hidden0=hidden0, loop=loop, hoist_input=hoist)

    check_grads(fn, (params, hidden0), order=1, modes=grad_modes(loop))


@settings(max_examples=2, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    t=st.integers(1, 12),
    b=st.integers(1, 3),
    i=st.integers(1, 4),
    h=st.integers(1, 5),
    o=st.integers(1, 3),
    loop=st.sampled_from(LOOP_VARIANTS),
    hoist=st.booleans(),
)
def test_loop_kinds_agree(seed, t, b, i, h, o, loop, hoist):
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(seed), t, b, i, h, o)

    def loss_of(params, loop, hoist):
        return lg.rnn_loss(params, inputs, targets, hidden0=hidden0, loop=loop, hoist_input=hoist)

    reference = jax.value_and_grad(loss_of)(params, "scan", False)
    other = value_and_grad(lambda p: loss_of(p, loop, hoist), loop)(params)
    assert_close(other, reference, TOL["float64"])


def test_python_oracle():
    # The docstring's plain-Python semantics, written with NumPy, against every loop kind.
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(3), 6, 2, 3, 4, 2)
    w, b, wo, bo = (np.asarray(p) for p in params)
    hidden, total = np.asarray(hidden0), 0.0
    for x, y in zip(np.asarray(inputs), np.asarray(targets), strict=True):
        hidden = np.tanh(np.concatenate([x, hidden], axis=1) @ w.T + b)
        total += np.mean((hidden @ wo.T + bo - y) ** 2)
    for loop in LOOP_VARIANTS:
        for hoist in (False, True):
            loss = lg.rnn_loss(
                params, inputs, targets, hidden0=hidden0, loop=loop, hoist_input=hoist
            )
            np.testing.assert_allclose(loss, total, rtol=TOL["float64"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_init_rnn_matches_pytorch_distribution(dtype):
    # nn.Linear(fan_in, out): weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    params = lg.init_rnn(jax.random.key(0), 60, 40, 30, dtype=dtype)
    assert [p.shape for p in params] == [(40, 100), (40,), (30, 40), (30,)]
    assert all(p.dtype == dtype for p in params)
    for p, fan_in in zip(params, (100, 100, 40, 40), strict=True):
        bound = 1 / math.sqrt(fan_in)
        assert float(jnp.max(jnp.abs(p))) <= bound
        assert float(jnp.max(jnp.abs(p))) > 0.9 * bound  # fills the interval
    # Var of U(-a, a) is a^2/3; 4000 draws give a standard error of about 2.2% on it.
    w = params.i2h_weight
    np.testing.assert_allclose(float(jnp.var(w)), (1 / 100) / 3, rtol=0.1)


def _good():
    return random_rnn_problem(jax.random.key(0), 4, 2, 3, 5, 1)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"inputs": jnp.ones((4, 2, 7))}, ValueError, r"inputs must have shape \(\?, \?, 3\)"),
        ({"inputs": jnp.ones((4, 3))}, ValueError, r"inputs must have shape .* got shape \(4, 3\)"),
        ({"targets": jnp.ones((5, 2, 1))}, ValueError, r"targets must have shape \(4, 2, 1\)"),
        ({"hidden0": jnp.ones((2, 4))}, ValueError, r"hidden0 must have shape \(2, 5\)"),
        ({"inputs": jnp.ones((0, 2, 3))}, ValueError, r"at least one time step"),
        ({"inputs": jnp.ones((4, 2, 3), jnp.int32)}, TypeError, r"inputs must have a floating"),
        ({"inputs": jnp.ones((4, 2, 3), jnp.float32)}, TypeError, r"share one floating-point"),
        ({"params": (1, 2)}, TypeError, r"params must be an RNNParams"),
        ({"loop": "for"}, ValueError, r"loop must be one of 'python', 'scan', 'fori', .*'for'"),
    ],
)
def test_bad_input(change, error, match):
    params, inputs, targets, hidden0 = _good()
    kwargs = {"params": params, "inputs": inputs, "targets": targets, "hidden0": hidden0}
    kwargs.update(change)
    with pytest.raises(error, match=match):
        lg.rnn_loss(**kwargs)


def test_bad_params_shapes():
    params, inputs, targets, _ = _good()
    bad = params._replace(h2o_bias=jnp.ones((3,)))
    with pytest.raises(ValueError, match=r"params.h2o_bias must have shape \(1,\)"):
        lg.rnn_loss(bad, inputs, targets)
    with pytest.raises(ValueError, match=r"input_size must be an int >= 1, got 0"):
        lg.init_rnn(jax.random.key(0), 0, 3)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype, got int32"):
        lg.init_rnn(jax.random.key(0), 2, 3, dtype=jnp.int32)


@pytest.mark.parametrize(
    ("x", "hidden", "match"),
    [
        (
            jnp.ones(3),
            jnp.ones((2, 5)),
            r"x must have shape \(\?, 3\) = \(B, I\) .* got shape \(3,\)",
        ),
        (jnp.ones((2, 4)), jnp.ones((2, 5)), r"x must have shape \(\?, 3\) .* got shape \(2, 4\)"),
        (
            jnp.ones((2, 3)),
            jnp.ones(5),
            r"hidden must have shape \(2, 5\) = \(B, H\) .* got shape \(5,\)",
        ),
        (
            jnp.ones((2, 3)),
            jnp.ones((1, 5)),
            r"hidden must have shape \(2, 5\) .* got shape \(1, 5\)",
        ),
    ],
)
def test_rnn_cell_names_a_bad_shape(x, hidden, match):
    # One example without its batch axis is the likely slip: x of shape (I,).
    params = _good()[0]
    assert lg.rnn_cell(params, jnp.ones((2, 5)), jnp.ones((2, 3))).shape == (2, 5)
    with pytest.raises(ValueError, match=match):
        lg.rnn_cell(params, hidden, x)


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_repeated_eager_gradients_compile_once(loop):
    # Eager jax.grad(lg.rnn_loss) used to compile on every call (290-315 ms at T=100).
    t = {"scan": 11, "python": 12}[loop]
    # Sizes no other test uses, so the first call compiles (clearing JAX's caches instead
    # made every later test in the process compile again).
    first = random_rnn_problem(jax.random.key(0), t, 3, 5, 7, 1)
    second = random_rnn_problem(jax.random.key(1), t, 3, 5, 7, 1)

    def grad(params, inputs, targets, hidden0):
        return jax.grad(lg.rnn_loss)(params, inputs, targets, hidden0=hidden0, loop=loop)

    with count_compilations() as lowered:
        grad(*first)
    assert lowered
    with count_compilations() as lowered:
        grad(*second)
    assert lowered == []


def test_the_dtype_message_says_which_dtypes_pass_and_what_happens_to_them():
    params, inputs, targets, hidden0 = _good()
    message = (
        "inputs must have a floating-point dtype, got int32: any JAX float type (bfloat16, "
        "float16, float32, float64, ...), the same for every array, which the model then "
        "computes in, nothing cast; cast it first, e.g. inputs.astype(jnp.float32)."
    )
    with pytest.raises(TypeError) as raised:
        lg.rnn_loss(params, inputs.astype(jnp.int32), targets, hidden0=hidden0)
    assert str(raised.value) == message
    for dtype in (jnp.bfloat16, jnp.float16):  # as the message says: accepted, computed in
        cast = jax.tree.map(lambda a, dtype=dtype: a.astype(dtype), (params, inputs, targets))
        loss, grads = jax.value_and_grad(lg.rnn_loss)(*cast)
        assert {leaf.dtype for leaf in [loss, *jax.tree.leaves(grads)]} == {jnp.dtype(dtype)}
