"""The derivative of a whole run through every loop kind reverse mode runs through.

A run's weights, losses and final state are differentiated with respect to ``lr``, the
inputs, ``hidden0`` and the initial weights (what meta-learning does), in float64 against
finite differences (``check_grads``). Inside a run a loop's body closes over the run's
step index, an integer tracer: the custom rules of ``fori`` and ``remat:checkpoints``
must take it as an argument, or ``jax.grad`` of the run fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, random_rnn_problem
from jax import lax
from jax.test_util import check_grads

import loopgrad_jax as lg
from loopgrad_jax import _as_written

#: Every kind and option reverse mode runs through, each a different code path.
#: The quick tier runs the kinds whose custom rules close over the body (fori, the
#: checkpointed scan); remat, its chunks, the bounded while with and without checkpoints
#: (JAX's rules for remat and scan; the checkpointed scan's rule), and the python and
#: nnx kinds, which differentiate as scan does and cost the most to trace, run in the
#: full tier.
OUTER_LOOPS = (
    "fori",
    pytest.param("python", marks=pytest.mark.slow),
    pytest.param("remat", marks=pytest.mark.slow),
    pytest.param("remat:chunk=2", marks=pytest.mark.slow),
    "remat:checkpoints=2",
    pytest.param("while:max_steps=5", marks=pytest.mark.slow),
    pytest.param("while:max_steps=5:checkpoints=2", marks=pytest.mark.slow),
    pytest.param("nnx_scan", marks=pytest.mark.slow),
    pytest.param("nnx_fori", marks=pytest.mark.slow),
    pytest.param("nnx_remat", marks=pytest.mark.slow),
    pytest.param("parallel", marks=pytest.mark.slow),  # DEER: a whole run is slow to trace
)

RUNS = {
    "as_written_forward": {"mode": "as_written", "as_written_method": "forward"},
    "as_written_reverse": {"mode": "as_written", "as_written_method": "reverse"},
    "tbptt": {"mode": "tbptt", "window": 2},  # a window of 2 and a last one of 1
}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("loop", OUTER_LOOPS)
def test_outer_gradients_match_finite_differences(loop, run):
    if loop.startswith("nnx_"):
        pytest.importorskip("flax")
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(30), 3, 1, 2, 2, 1)

    def train(lr, inputs, hidden0, params):
        r = lg.train_rnn(params, inputs, targets, lr=lr, hidden0=hidden0, loop=loop, **RUNS[run])
        return r.params, r.losses, r.hidden

    args = (jnp.float64(0.3), inputs, hidden0, params)
    spec = lg.Loop.parse(loop)
    if run == "tbptt" and spec.checkpoints is not None:
        # Each window's gradient is reverse mode through the loop; the run's derivative
        # would be reverse mode of it, which a checkpointed loop refuses, saying so.
        with pytest.raises(ValueError, match="Reverse mode of reverse mode"):
            jax.grad(lambda lr: train(lr, *args[1:])[1].sum())(args[0])
        return
    check_grads(train, args, order=1, modes=["fwd", "rev"] if spec.forward_mode else ["rev"])


def test_auto_method_grad_under_jit_matches_finite_differences():
    # The example: float32 sizes at which "auto" picks the reverse method (in
    # float64 it picks forward), so the run's inner loop closes over the step index.
    # Expected: a float64 central difference of the same run (eps = 1e-6: truncation
    # 1e-12, rounding 1e-10 relative), within float32's tolerance.
    sizes = lg.RNNSizes(length=10, batch=1, input=10, hidden=5, output=1)
    assert _as_written.choose_method(sizes, jnp.float32) == "reverse"
    problem = random_rnn_problem(jax.random.key(31), 10, 1, 10, 5, 1)[:3]

    def last_loss(lr, dtype):
        params, inputs, targets = jax.tree.map(lambda a: a.astype(dtype), problem)
        run = lg.train_rnn(params, inputs, targets, lr=lr, mode="as_written", loop="fori")
        return run.losses[-1]

    grad = jax.jit(jax.grad(last_loss), static_argnums=1)(jnp.float32(0.05), jnp.float32)
    eps = 1e-6
    central = (last_loss(0.05 + eps, jnp.float64) - last_loss(0.05 - eps, jnp.float64)) / (2 * eps)
    np.testing.assert_allclose(grad, central, rtol=TOL["float32"], atol=TOL["float32"])


_XS = jnp.asarray([0.5, -1.0, 2.0], jnp.float64)


def _outer_scan(w, loop):
    """A ``lax.scan`` over 4 steps whose body runs ``loop`` reading the scan's index ``i``:
    ``h <- w * h + i * x`` over ``_XS``, from the scan's carry."""

    def outer(h, i):
        def body(h, x):
            return w * h + i.astype(x.dtype) * x, h

        h, ys = lg.run_loop(body, h, _XS, length=3, loop=loop)
        return h, ys.sum()

    h, sums = lax.scan(outer, jnp.float64(1.0), jnp.arange(4))
    return h + sums.sum()


def _outer_scan_by_hand(w):
    h, total = 1.0, 0.0
    for i in range(4):
        for x in (0.5, -1.0, 2.0):
            total += h
            h = w * h + i * x
    return h + total


@pytest.mark.parametrize("loop", ["fori", "remat:checkpoints=2", "while:max_steps=4:checkpoints=2"])
def test_loop_inside_scan_reading_its_index(loop):
    # The body closes over the enclosing scan's integer index. The value is a polynomial
    # in w; its derivative is checked against a float64 central difference of the plain
    # Python loop (eps = 1e-6: truncation 1e-12, rounding 1e-10 relative).
    w = 0.7
    assert np.isclose(_outer_scan(w, loop), _outer_scan_by_hand(w), rtol=1e-14)
    eps = 1e-6
    central = (_outer_scan_by_hand(w + eps) - _outer_scan_by_hand(w - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(_outer_scan)(w, loop), central, rtol=1e-8)
    np.testing.assert_allclose(
        jax.jit(jax.grad(_outer_scan), static_argnums=1)(w, loop), central, rtol=1e-8
    )
    if lg.Loop.parse(loop).forward_mode:
        _, tangent = jax.jvp(lambda w: _outer_scan(w, loop), (w,), (1.0,))
        np.testing.assert_allclose(tangent, central, rtol=1e-8)
