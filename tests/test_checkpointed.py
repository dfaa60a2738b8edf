"""``remat:checkpoints=C``: scan's results and gradients, the optimal count of body
evaluations, at most C carries kept, and a program whose size does not grow with T."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, assert_close, count_compilations

import loopgrad_jax as lg


def make_body(weights, ticks=None):
    """A body with a closed-over weight, a pytree carry holding an integer counter,
    and float and integer leaves in each row and each output."""

    def body(carry, x):
        if ticks is not None:  # on the carry: nothing can move the count out of the loop
            jax.debug.callback(lambda _: ticks.append(1), carry["h"])
        h = jnp.tanh(weights @ carry["h"] + x["a"]) * x["scale"] + x["k"].astype(x["a"].dtype)
        return {"h": h, "n": carry["n"] + 1}, {"h": h, "n": carry["n"]}

    return body


def problem(length, seed=0):
    rng = np.random.default_rng(seed)
    weights = jnp.asarray(rng.standard_normal((4, 4)) * 0.5)
    xs = {
        "a": jnp.asarray(rng.standard_normal((length, 4))),
        "scale": jnp.linspace(0.5, 1.5, length),
        "k": jnp.arange(length, dtype=jnp.int32) % 3,  # read by the body, not differentiated
    }
    return weights, {"h": jnp.ones(4), "n": jnp.zeros((), jnp.int32)}, xs


def loss(weights, init, xs, loop, reverse=False, ticks=None):
    carry, ys = lg.run_loop(
        make_body(weights, ticks), init, xs, length=xs["a"].shape[0], loop=loop, reverse=reverse
    )
    position = jnp.arange(ys["h"].shape[0], dtype=ys["h"].dtype)[:, None]
    count = (carry["n"] + ys["n"].sum(dtype=jnp.int32)).astype(position.dtype)
    return (carry["h"] ** 2).sum() + (ys["h"] * position).sum() + count


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("length", "checkpoints"), [(1, 1), (9, 1), (17, 3), (17, 40)])
def test_values_and_gradients_are_scans(length, checkpoints, reverse):
    weights, init, xs = problem(length)
    loop = f"remat:checkpoints={checkpoints}"
    grad = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)
    assert_close(
        loss(weights, init, xs, loop, reverse), loss(weights, init, xs, "scan", reverse), 0
    )
    grad = jax.jit(grad, static_argnums=(3, 4))
    got, want = grad(weights, init, xs, loop, reverse), grad(weights, init, xs, "scan", reverse)
    floats = [
        (g, w)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        if jnp.issubdtype(w.dtype, jnp.inexact)
    ]
    assert len(floats) == 4  # weights, init["h"], xs["a"], xs["scale"]
    for g, w in floats:
        assert_close(g, w, TOL["float64"], loop)


@pytest.mark.parametrize(
    ("length", "checkpoints", "reverse"),
    [(1, 1, False), (6, 1, True), (25, 2, False), (40, 4, True), (40, 40, False)],
)
def test_body_evaluations_are_the_offline_optimum(length, checkpoints, reverse):
    weights, init, xs = problem(length)
    ticks = []
    grad = jax.jit(
        jax.grad(lambda w: loss(w, init, xs, f"remat:checkpoints={checkpoints}", reverse, ticks))
    )
    jax.block_until_ready(grad(weights))
    jax.effects_barrier()
    assert len(ticks) == lg.checkpointed_evaluations(length, checkpoints)
    # ... which is the forward sweep alone when every carry fits (remat's 2T, less one).
    assert lg.checkpointed_evaluations(length, length) == max(2 * length - 1, 0)


@pytest.mark.parametrize("reverse", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_bounded_while_with_a_traced_length_checkpoints_its_steps(reverse):
    # while:max_steps=N:checkpoints=C is while:max_steps=N (a scan of N steps, those at
    # or past the trip count skipped), reversed storing at most C carries.
    weights, init, xs = problem(12)

    def loss_n(w, n, loop):
        carry, ys = lg.run_loop(make_body(w), init, xs, length=n, loop=loop, reverse=reverse)
        return (carry["h"] ** 2).sum() + (ys["h"] * jnp.arange(1.0, 13.0)[:, None]).sum()

    ours = jax.jit(
        jax.value_and_grad(lambda w, n: loss_n(w, n, "while:max_steps=12:checkpoints=3"))
    )
    plain = jax.jit(jax.value_and_grad(lambda w, n: loss_n(w, n, "while:max_steps=12")))
    with count_compilations() as compiled:
        for n in (0, 1, 5, 12):
            assert_close(ours(weights, n), plain(weights, n), TOL["float64"], n)
    assert len(compiled) == 2  # one program each, for every trip count
    # A static trip count runs every step: then it is the checkpointed scan itself.
    static = jax.grad(lambda w: loss_n(w, 12, "while:max_steps=12:checkpoints=3"))(weights)
    assert_close(static, jax.grad(lambda w: loss_n(w, 12, "scan"))(weights), TOL["float64"])


def _equations(jaxpr) -> int:
    """Equations in a jaxpr and every jaxpr inside it."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _equations(sub)
    return count


def test_program_does_not_grow_with_the_length():
    # The schedule is data the backward pass reads; the body is traced a fixed number of
    # times, so tracing and compiling cost the same at every length.
    sizes = []
    for length in (10, 100, 2000):
        weights, init, xs = problem(length)
        grad = jax.grad(lambda w, h, xs: loss(w, h, xs, "remat:checkpoints=8"))
        sizes.append(_equations(jax.make_jaxpr(grad)(weights, init, xs).jaxpr))
    assert sizes[0] == sizes[1] == sizes[2], sizes


def test_keeps_at_most_c_carries():
    # 8 x 64 float32 carries, 200 steps: remat keeps all 200 carries (409,600 bytes);
    # checkpoints=4 keeps 4, whatever else one step's VJP needs.
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 64)) * 0.1, jnp.float32)
    xs = jnp.asarray(rng.standard_normal((200, 1, 64)), jnp.float32)

    def temp_bytes(loop):
        def total(w, h0):
            body = lambda h, x: (jnp.tanh(h @ w + x), None)  # noqa: E731
            return lg.run_loop(body, h0, xs, length=200, loop=loop)[0].sum()

        compiled = jax.jit(jax.grad(total)).lower(w, jnp.ones((8, 64), jnp.float32)).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    carries = 200 * 8 * 64 * 4
    assert temp_bytes("remat") >= carries
    assert temp_bytes("remat:checkpoints=4") < carries / 4


@pytest.mark.slow  # the full tier (2.7 s)
def test_vmap_of_the_gradient():
    weights, init, xs = problem(9)
    batch = jnp.stack([weights, 2 * weights])

    def grad(loop):
        return jax.vmap(jax.grad(lambda w: loss(w, init, xs, loop)))(batch)

    assert_close(grad("remat:checkpoints=2"), grad("scan"), TOL["float64"])


def test_forward_mode_is_refused_by_jax():
    weights, init, xs = problem(5)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda w: loss(w, init, xs, "remat:checkpoints=2"), (weights,), (weights,))
    assert not lg.Loop.parse("remat:checkpoints=2").forward_mode
    assert lg.Loop.parse("remat:checkpoints=2").reverse_mode


def test_forward_over_reverse_is_scans():
    # jax.hessian is jax.jacfwd of jax.jacrev: forward mode through the backward pass.
    weights, init, xs = problem(9)

    def hessian(loop):
        return jax.jit(jax.hessian(lambda w: loss(w, init, xs, loop)))(weights)

    assert_close(hessian("remat:checkpoints=2"), hessian("scan"), TOL["float64"])

    def jvp_of_grad(loop):
        grad = jax.grad(lambda w: loss(w, init, xs, loop))
        return jax.jvp(grad, (weights,), (jnp.ones_like(weights),))

    assert_close(
        jvp_of_grad("while:max_steps=9:checkpoints=3"), jvp_of_grad("scan"), TOL["float64"]
    )


@pytest.mark.parametrize("loop", ["remat:checkpoints=2", "while:max_steps=9:checkpoints=3"])
def test_reverse_over_reverse_is_refused_with_our_message(loop):
    weights, init, xs = problem(9)
    grad = jax.grad(lambda w: loss(w, init, xs, loop))
    with pytest.raises(ValueError, match=r"Reverse mode of reverse mode .* checkpoints=C.*'remat'"):
        jax.jacrev(grad)(weights)
