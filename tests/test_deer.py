"""parallel_scan (DEER) against lax.scan: values, gradients, tangents, failures.

The expected values are ``lax.scan``'s result and ``jax.grad`` / ``jax.jvp`` through
``lax.scan``, in float64; the scalar scenario's gradient is ``2 * n * x``.
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import loopgrad_jax as lg
from loopgrad_jax import _cells, _deer
from loopgrad_jax._deer import parallel_scan, parallel_scan_info

#: Relative agreement with lax.scan: the largest difference over the largest magnitude.
RTOL = 1e-10


def assert_rel(got, want, rtol=RTOL):
    """Every leaf of ``got`` within ``rtol`` of ``want``, relative to ``want``'s largest entry."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = max(float(jnp.max(jnp.abs(w))), np.finfo(np.float64).tiny) if w.size else 1.0
        assert float(jnp.max(jnp.abs(g - w), initial=0.0)) <= rtol * scale


def cell(kind, hidden, seed=0, inputs=10, length=60):
    """``(body, params, init, xs)``: one of the library's PyTorch cells, B=1, float64."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = lg.init_cell(keys[0], kind, input_size=inputs, hidden_size=hidden, dtype=jnp.float64)
    xs = jax.random.normal(keys[1], (length, 1, inputs), jnp.float64)
    layers = 2 if kind == "lstm" else 1
    hidden0 = 0.1 * jax.random.normal(keys[2], (layers, 1, 1, hidden), jnp.float64)
    init = _cells.to_carry(kind, tuple(hidden0) if kind == "lstm" else hidden0[0])

    def body(params, carry, x):
        carry = _cells.torch_step(params, carry, x)
        return carry, _cells.torch_readout(params, carry)

    return body, params, init, xs


KINDS = ("rnn_tanh", "lstm", "gru")
ITERS = {"full": 60, "diag": 200}


@pytest.mark.parametrize("reverse", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("jacobian", ["full", "diag"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_scan_at_the_articles_size(kind, jacobian, reverse):
    body, params, init, xs = cell(kind, hidden=5, length=80)
    step = functools.partial(body, params)
    want = lax.scan(step, init, xs, reverse=reverse)
    run = jax.jit(
        lambda init, xs: parallel_scan_info(
            step, init, xs, 80, reverse, iters=ITERS[jacobian], jacobian=jacobian
        )
    )
    carry, ys, info = run(init, xs)
    assert bool(info.converged) and 1 <= int(info.iterations) < ITERS[jacobian]
    assert_rel((carry, ys), want)


@pytest.mark.slow  # the full tier: 64 units' full Jacobians (2.7 s a case)
@pytest.mark.parametrize("jacobian", ["full", "diag"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm"])
def test_matches_scan_with_64_hidden_units(kind, jacobian):
    body, params, init, xs = cell(kind, hidden=64, length=12)
    step = functools.partial(body, params)
    got = parallel_scan(step, init, xs, 12, jacobian=jacobian, iters=ITERS[jacobian])
    assert_rel(got, lax.scan(step, init, xs))


def loss(run, body, params, init, xs):
    carry, ys = run(functools.partial(body, params), init, xs)
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(carry)) + jnp.sum(ys**2)


# The gradient rule uses the full Jacobians whatever the solve used: the quick tier runs
# diag's gradient on one kind.
@pytest.mark.parametrize(
    ("kind", "jacobian"),
    [(k, "full") for k in KINDS]
    + [(KINDS[0], "diag")]
    + [pytest.param(k, "diag", marks=pytest.mark.slow) for k in KINDS[1:]],
)
def test_gradients_match_scan(kind, jacobian):
    body, params, init, xs = cell(kind, hidden=5, seed=1, length=50)
    reverse = kind == "gru"  # one cell runs backwards in time

    def deer(step, init, xs):
        return parallel_scan(step, init, xs, 50, reverse, iters=ITERS[jacobian], jacobian=jacobian)

    def scan(step, init, xs):
        return lax.scan(step, init, xs, reverse=reverse)

    grad = jax.jit(jax.grad(loss, (2, 3, 4)), static_argnums=(0, 1))  # params, init, xs
    assert_rel(grad(deer, body, params, init, xs), grad(scan, body, params, init, xs))


@pytest.mark.slow
def test_eager_gradients_match_scan():
    w = jnp.array([[0.5, -0.3], [0.2, 0.4]])
    xs = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)

    def f(run, w, h0, xs):
        def body(h, x):
            h = jnp.tanh(h @ w + x)
            return h, h[0] * h[1]

        carry, ys = run(body, h0, xs)
        return jnp.sum(carry) + jnp.sum(ys)

    deer = functools.partial(parallel_scan, length=4)
    args = (w, jnp.array([0.1, -0.2]), xs)
    want = jax.grad(f, (1, 2, 3))(lax.scan, *args)
    assert_rel(jax.grad(f, (1, 2, 3))(deer, *args), want)


def test_check_grads_on_a_tiny_case():
    w = jnp.array([[0.5, -0.3], [0.2, 0.4]])
    xs = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)

    def f(w, h0, xs):
        def body(h, x):
            h = jnp.tanh(h @ w + x)
            return h, h[0] * h[1]

        carry, ys = parallel_scan(body, h0, xs, 4, jacobian="diag")
        return jnp.sum(carry) + jnp.sum(ys)

    check_grads(jax.jit(f), (w, jnp.array([0.1, -0.2]), xs), order=1, modes=["rev"])


def test_forward_mode_matches_scan():
    body, params, init, xs = cell("lstm", hidden=5, seed=2, length=40)
    tangents = jax.tree.map(
        lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), (params, init, xs)
    )

    def f(run):
        return lambda *primals: loss(run, body, *primals)

    def deer(step, init, xs):
        return parallel_scan(step, init, xs, 40)

    def jvp(run, primals, tangents):
        return jax.jvp(f(run), primals, tangents)

    jvp = jax.jit(jvp, static_argnums=0)
    want = jvp(lax.scan, (params, init, xs), tangents)
    assert_rel(jvp(deer, (params, init, xs), tangents), want)


@pytest.mark.slow  # the full tier (2.6 s)
def test_body_closing_over_weights_and_an_enclosing_scans_integer_index():
    w = jnp.array([[0.6, -0.2], [0.3, 0.5]])
    xs = jnp.linspace(-1.0, 1.0, 10).reshape(5, 2)

    def outer(inner_scan, w, xs):
        def outer_step(h, i):  # i: an int32 tracer the inner body closes over
            def body(h, x):
                h = jnp.tanh(h @ w + x * i.astype(x.dtype))
                return h, jnp.sum(h)

            h, ys = inner_scan(body, h, xs)
            return h, jnp.sum(ys)

        h, totals = lax.scan(outer_step, jnp.array([0.1, 0.2]), jnp.arange(3, dtype=jnp.int32))
        return jnp.sum(h) + jnp.sum(totals)

    deer = functools.partial(parallel_scan, length=5)
    want = jax.grad(outer, (1, 2))(lax.scan, w, xs)
    assert_rel(jax.grad(outer, (1, 2))(deer, w, xs), want)
    assert_rel(jax.jit(jax.grad(outer, (1, 2)), static_argnums=0)(deer, w, xs), want)


@pytest.mark.slow  # the full tier (2 s a case)
@pytest.mark.parametrize("jacobian", ["full", "diag"])
def test_length_iterations_are_exact_even_with_tol_zero(jacobian):
    # Iteration k makes steps 1..k exact, so T iterations are exact for any Jacobian.
    body, params, init, xs = cell("gru", hidden=5, seed=3, length=20)
    step = functools.partial(body, params)
    carry, ys, info = parallel_scan_info(step, init, xs, 20, iters=100, tol=0.0, jacobian=jacobian)
    assert bool(info.converged) and int(info.iterations) <= 20
    assert_rel((carry, ys), lax.scan(step, init, xs))


def test_not_converged_is_nan_with_nan_gradients():
    body, params, init, xs = cell("rnn_tanh", hidden=5, seed=4, length=50)

    def deer(step, init, xs):
        return parallel_scan_info(step, init, xs, 50, iters=2, jacobian="diag")

    carry, ys, info = deer(functools.partial(body, params), init, xs)
    assert int(info.iterations) == 2 and not bool(info.converged)
    assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves((carry, ys)))

    grad = jax.jit(jax.grad(loss, (2, 3, 4)), static_argnums=(0, 1))
    grads = grad(lambda *a: deer(*a)[:2], body, params, init, xs)
    assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(grads))


@pytest.mark.slow  # the full tier (3 s)
def test_the_articles_scalar_scenarios():
    n, xs = 3, jnp.arange(3, dtype=jnp.float64)

    def accumulate(x):
        total, _ = parallel_scan(lambda total, i: (total + x * x + i, None), jnp.zeros(()), xs, n)
        return total

    def stack(x):  # no carry: every step at once
        return jnp.sum(parallel_scan(lambda c, i: (c, x * x + i), None, xs, n)[1])

    x = jnp.float64(2.0)
    assert float(accumulate(x)) == 3 * 4.0 + 0 + 1 + 2
    assert float(jax.grad(accumulate)(x)) == 2 * n * 2.0 == 12.0
    assert float(jax.grad(stack)(x)) == 12.0
    _, _, info = parallel_scan_info(lambda t, i: (t + x * x + i, None), jnp.zeros(()), xs, n)
    assert bool(info.converged) and int(info.iterations) <= n


def test_length_zero_is_lax_scans_result():
    def body(h, x):
        return jnp.tanh(h + x), 2 * h

    init = jnp.ones(3)
    got = parallel_scan(body, init, jnp.zeros((0, 3)), 0)
    assert_rel(got, lax.scan(body, init, jnp.zeros((0, 3))))


def body3(h, x):
    return jnp.tanh(h + x), h


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"iters": 0}, ValueError, "iters must be an int >= 1, got 0"),
        ({"jacobian": "foo"}, ValueError, "jacobian must be one of 'full', 'diag', got 'foo'"),
        ({"tol": -1e-9}, ValueError, "tol must be a finite float >= 0 or None, got -1e-09"),
        ({"tol": "small"}, TypeError, "tol must be a Python float or None, got str"),
    ],
)
def test_bad_options_raise(options, error, message):
    with pytest.raises(error, match=message):
        parallel_scan(body3, jnp.zeros(3), jnp.zeros((4, 3)), 4, **options)


def test_integer_carry_and_bad_xs_raise():
    with pytest.raises(TypeError, match=r"real floating-point leaves only.*init\[1\] of dtype int"):
        parallel_scan(lambda c, x: (c, x), (jnp.zeros(2), jnp.int32(0)), jnp.zeros((4, 2)), 4)
    with pytest.raises(ValueError, match=r"xs must have leading axis length=5.*got shape \(4, 3\)"):
        parallel_scan(body3, jnp.zeros(3), jnp.zeros((4, 3)), 5)
    with pytest.raises(TypeError, match="body must return a carry of init's structure"):
        parallel_scan(lambda c, x: (c[:2], x), jnp.zeros(3), jnp.zeros((4, 3)), 4)


def test_docstring_examples():
    result = doctest.testmod(_deer, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# The training entry points run their loops over the weights and the optimizer state
# (as written: every step; tbptt: every window), so loop="parallel" solves for those too.
# Floating-point state runs (the PyTorch fixtures check SGD, tests/test_train.py); an
# integer in it, Adam's step count, is refused with DEER's error naming the leaf.
def test_as_written_training_with_an_integer_optimizer_state_is_refused():
    # As written, the time loop carries the optimizer's state (Adam's int32 step count),
    # which DEER refuses naming it. (tbptt runs its windows in turn: tests/test_train.py.)
    params, inputs, targets, _ = random_problem()
    with (
        jax.numpy_dtype_promotion("standard"),  # optax's Adam: a float to an int32 power
        pytest.raises(TypeError, match=r"carry must have real floating-point leaves only .*int"),
    ):
        lg.train_rnn(
            params, inputs, targets, mode="as_written", loop="parallel",
            optimizer=lg.torch_optimizer("adam", 1e-2),
        )  # fmt: skip


def random_problem(t=6):
    keys = jax.random.split(jax.random.key(3), 3)
    params = lg.init_rnn(keys[0], 3, 4, 2, dtype=jnp.float64)
    inputs = jax.random.normal(keys[1], (t, 1, 3), jnp.float64)
    targets = jax.random.normal(keys[2], (t, 1, 2), jnp.float64)
    return params, inputs, targets, None
