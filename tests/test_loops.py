"""The loop driver: every loop kind and option against the plain-Python loop it documents."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LOOP_VARIANTS, TOL, assert_close, count_compilations, has_reverse_mode
from hypothesis import given, settings
from hypothesis import strategies as st

import loopgrad_jax as lg
from loopgrad_jax.bench.cases import residual_bytes


def body(carry, x):
    """A body with a pytree carry and pytree outputs, nonlinear in both."""
    total, prod = carry
    total = total + jnp.sin(x["a"]) * prod
    prod = prod * 0.9 + x["b"]
    return (total, prod), {"t": total, "p2": prod**2}


def oracle(init, xs, length, reverse):
    """The docstring of run_loop, verbatim."""
    carry, ys = init, [None] * length
    for i in reversed(range(length)) if reverse else range(length):
        carry, ys[i] = body(carry, jax.tree.map(lambda a, i=i: a[i], xs))
    if length == 0:
        return carry, {"t": jnp.zeros((0, 3)), "p2": jnp.zeros((0, 3))}
    return carry, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)


@settings(max_examples=12, deadline=None)
@given(
    length=st.integers(0, 13),
    reverse=st.booleans(),
    loop=st.sampled_from(LOOP_VARIANTS + ("remat:chunk=5", "scan:unroll=20")),
    seed=st.integers(0, 1000),
)
def test_matches_python_oracle(length, reverse, loop, seed):
    ka, kb = jax.random.split(jax.random.key(seed))
    xs = {"a": jax.random.normal(ka, (length, 3)), "b": jax.random.normal(kb, (length, 3))}
    init = (jnp.zeros(3), jnp.ones(3))
    result = lg.run_loop(body, init, xs, length=length, loop=loop, reverse=reverse)
    assert_close(result, oracle(init, xs, length, reverse), TOL["float64"], loop)


@pytest.mark.parametrize("loop", [v for v in LOOP_VARIANTS if has_reverse_mode(v)])
def test_reverse_mode_matches_oracle(loop):
    xs = {"a": jnp.linspace(-1, 1, 21).reshape(7, 3), "b": jnp.linspace(0, 2, 21).reshape(7, 3)}

    def loss(xs, run):
        carry, ys = run(xs)
        return carry[0].sum() + ys["p2"].sum() * 0.1 + ys["t"][2].sum()

    def ours(xs):
        return lg.run_loop(body, (jnp.zeros(3), jnp.ones(3)), xs, length=7, loop=loop)

    def plain(xs):
        return oracle((jnp.zeros(3), jnp.ones(3)), xs, 7, False)

    assert_close(jax.grad(loss)(xs, ours), jax.grad(loss)(xs, plain), TOL["float64"], loop)


@pytest.mark.parametrize(
    "text",
    [
        "python",
        "scan",
        "scan:unroll=8",
        "fori:unroll=2",
        "remat",
        "remat:chunk=10",
        "remat:policy=dots_saveable:chunk=3",
        "while",
        "while:max_steps=64",
        "remat:checkpoints=8",
        "while:max_steps=64:checkpoints=8",
        "parallel",
        "parallel:jacobian=diag:iters=200",
        "parallel:iters=7:tol=1e-08",
    ],
)
def test_text_form_round_trips(text):
    loop = lg.Loop.parse(text)
    assert lg.Loop.parse(str(loop)) == loop
    assert str(loop) == text


def test_chunked_remat_stores_less():
    # Reverse mode through remat keeps a carry per step; chunked remat one per chunk.
    params = lg.init_rnn(jax.random.key(0), 8, 64, 1, dtype=jnp.float32)
    x = jnp.zeros((400, 8, 8), jnp.float32)
    y = jnp.zeros((400, 8, 1), jnp.float32)

    def temp_bytes(loop):
        # The inputs are arguments, as in a training step: closed over, they are
        # constants that XLA may fold, which hides any copy the loop makes of them.
        grad = jax.jit(jax.grad(lambda p, x, y: lg.rnn_loss(p, x, y, loop=loop)))
        analysis = grad.lower(params, x, y).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    scan, remat, chunked = temp_bytes("scan"), temp_bytes("remat"), temp_bytes("remat:chunk=20")
    carries = 400 * 8 * 64 * 4  # one float32 (B, H) carry per step
    assert remat < scan
    assert remat >= carries  # every step's carry is stored
    # 20 + 20 carries, one chunk's residuals and a few weight-sized buffers (16 KiB each):
    # long enough a loop that the carries, not those, decide it.
    assert chunked < carries / 2


def _scan_carries(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of what every scan's body returns, at any depth: its carry, and one step's ys.

    A ``(length, ...)`` array among them is carried whole from step to step (one step's
    outputs never have the loop's length as leading axis in these tests).
    """
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"]
            shapes += [tuple(v.aval.shape) for v in getattr(body, "jaxpr", body).outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _scan_carries(sub)
    return shapes


@pytest.mark.parametrize("reverse", [False, True])
def test_fori_reverse_mode_carries_no_output_array(reverse):
    # Carried through the loop, the (length, ...) output arrays and their cotangent were
    # copied at every step: reverse mode was quadratic in the length (stack at T=10000:
    # 157 ms against scan's 0.32 ms). Written once per slot, they are scan's outputs.
    length = 37
    xs = {"a": jnp.linspace(-1, 1, 3 * length).reshape(length, 3), "b": jnp.ones((length, 3))}

    def loss(scale):
        init = (jnp.zeros(3), scale * jnp.ones(3))
        carry, ys = lg.run_loop(body, init, xs, length=length, loop="fori", reverse=reverse)
        return carry[0].sum() + ys["p2"].sum()

    forward = jax.make_jaxpr(loss)(1.5)  # the primal: a fori_loop writing into its arrays
    assert (length, 3) in _scan_carries(forward.jaxpr)
    carries = _scan_carries(jax.make_jaxpr(jax.grad(loss))(1.5).jaxpr)
    assert carries and all(shape[:1] != (length,) for shape in carries), carries
    want = jax.grad(lambda s: _oracle_loss(s, xs, length, reverse))(1.5)
    assert_close(jax.grad(loss)(1.5), want, TOL["float64"])


def _oracle_loss(scale, xs, length, reverse):
    carry, ys = oracle((jnp.zeros(3), scale * jnp.ones(3)), xs, length, reverse)
    return carry[0].sum() + ys["p2"].sum()


@pytest.mark.parametrize("kind", lg.CELLS)
def test_fori_keeps_for_reverse_mode_what_scan_keeps(kind):
    # fori's rule differentiates only the inputs that have a tangent. Given as arrays of
    # zeros, the inputs' tangent was projected at every step and its projection kept:
    # one more (T, B, G*H) array than scan (a GRU at I=64, H=256, B=32, T=1000: 321
    # against 227 MiB).
    t, b, d, h = 9, 3, 4, 5
    keys = jax.random.split(jax.random.key(0), 3)
    if kind == "article":
        params = lg.init_rnn(keys[0], input_size=d, hidden_size=h)
    else:
        params = lg.init_cell(keys[0], kind, input_size=d, hidden_size=h)
    x = jax.random.normal(keys[1], (t, b, d), jnp.float32)
    y = jax.random.normal(keys[2], (t, b, 1), jnp.float32)

    def kept(loop):  # bytes of the residuals, counted by shape: nothing runs
        return residual_bytes(lambda p: lg.rnn_loss(p, x, y, loop=loop), params)

    # Beside scan's, at most the initial state (h, and an LSTM's c), kept whole.
    state = (2 if kind == "lstm" else 1) * b * h * x.dtype.itemsize
    assert kept("fori") <= kept("scan") + state


def test_fori_forward_mode_and_second_derivatives():
    # The rule that keeps fori's reverse mode linear is a JVP, so forward mode and
    # derivatives of any order go through it.
    xs = {"a": jnp.linspace(-1, 1, 15).reshape(5, 3), "b": jnp.linspace(0, 1, 15).reshape(5, 3)}

    def loss(scale, run):
        carry, ys = run((jnp.zeros(3), scale * jnp.ones(3)))
        return carry[0].sum() + ys["t"].sum() ** 2

    def ours(init):
        return lg.run_loop(body, init, xs, length=5, loop="fori")

    def plain(init):
        return oracle(init, xs, 5, False)

    for derivative in (jax.jacfwd, jax.grad, jax.hessian, lambda f: jax.jacfwd(jax.grad(f))):
        assert_close(derivative(loss)(1.5, ours), derivative(loss)(1.5, plain), TOL["float64"])


# ------------------------------------------------------------- while:max_steps=N

N = 6  # max_steps of the bounded while loops below


def _padded(seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return {"a": jax.random.normal(ka, (N, 3)), "b": jax.random.normal(kb, (N, 3))}


@pytest.mark.parametrize("reverse", [pytest.param(False, marks=pytest.mark.slow), True])
def test_bounded_while_with_a_traced_length_is_the_loop_of_that_length(reverse):
    # lax.while_loop's semantics with a trip count known only at run time: the first n
    # rows of xs are read, ys has N rows, zero from row n on; values and gradients equal
    # the plain loop of length n, and one compiled program serves every n.
    xs = _padded()
    loop = f"while:max_steps={N}"

    def loss(scale, xs, n):
        init = (jnp.zeros(3), scale * jnp.ones(3))
        carry, ys = lg.run_loop(body, init, xs, length=n, loop=loop, reverse=reverse)
        return carry[0].sum() + (ys["p2"] * jnp.arange(1.0, N + 1)[:, None]).sum(), (carry, ys)

    def plain(scale, xs, n):
        rows = jax.tree.map(lambda a: a[:n], xs)
        carry, ys = oracle((jnp.zeros(3), scale * jnp.ones(3)), rows, n, reverse)
        ys = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((N - n, 3))]), ys)
        return carry[0].sum() + (ys["p2"] * jnp.arange(1.0, N + 1)[:, None]).sum(), (carry, ys)

    ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    ours(1.5, xs, 0)  # compiles
    with count_compilations() as lowered:
        got = [ours(1.5, xs, n) for n in range(N + 1)]
    assert lowered == []
    for n in range(N + 1):
        want = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(1.5, xs, n)
        assert_close(got[n], want, TOL["float64"], f"n={n}")


@pytest.mark.parametrize("loop", [f"while:max_steps={N}", f"while:max_steps={N}:checkpoints=2"])
@pytest.mark.parametrize("n", [-1, N + 1])
def test_bounded_while_poisons_a_traced_length_out_of_range(n, loop):
    # A compiled function cannot raise on a value: every floating-point leaf is NaN, and
    # so is every derivative (a finite zero gradient would stall an optimizer silently).
    def run(scale, n):
        init = (jnp.zeros(3), scale * jnp.ones(3))
        return lg.run_loop(body, init, _padded(), length=n, loop=loop)

    def total(scale, n):
        return sum(leaf.sum() for leaf in jax.tree.leaves(run(scale, n)))

    assert all(bool(jnp.isnan(leaf).all()) for leaf in jax.tree.leaves(jax.jit(run)(1.5, n)))
    assert jnp.isnan(jax.jit(jax.grad(total))(1.5, n))
    assert jnp.isfinite(jax.jit(jax.grad(total))(1.5, N))
    if lg.Loop.parse(loop).forward_mode:
        _, tangents = jax.jit(lambda n: jax.jvp(lambda s: run(s, n), (1.5,), (1.0,)))(n)
        assert all(bool(jnp.isnan(leaf).all()) for leaf in jax.tree.leaves(tangents))


def test_bounded_while_with_a_static_length_runs_every_step():
    xs = jax.tree.map(lambda a: a[:4], _padded())
    init = (jnp.zeros(3), jnp.ones(3))
    got = lg.run_loop(body, init, xs, length=4, loop=f"while:max_steps={N}", reverse=True)
    assert_close(got, oracle(init, xs, 4, True), TOL["float64"])


@pytest.mark.parametrize(
    ("loop", "length", "error", "match"),
    [
        ("while:max_steps=6", 7, ValueError, r"length=7 exceeds the loop's max_steps=6 \(loop="),
        (
            "while:max_steps=6",
            jnp.float32(3),
            TypeError,
            r"length must be a Python int or an "
            r"integer scalar array, got an array of shape \(\) and dtype float32",
        ),
        (
            "while:max_steps=6",
            jnp.array([3]),
            TypeError,
            r"integer scalar array, got an array "
            r"of shape \(1,\)",
        ),
        ("scan", jnp.int32(3), TypeError, r"length must be a static Python int, got a JAX array"),
        ("while", jnp.int32(3), TypeError, r"length must be a static Python int, got a JAX array"),
        ("scan:max_steps=6", 3, ValueError, r"loop max_steps applies to 'while' only, got kind"),
        ("while:max_steps=-1", 3, ValueError, r"loop max_steps must be an int >= 0, got -1"),
    ],
    ids=["static_over", "float", "not_scalar", "traced_scan", "traced_while", "on_scan", "neg"],
)
def test_bounded_while_bad_input(loop, length, error, match):
    xs = jax.tree.map(lambda a: a[:3], _padded())
    with pytest.raises(error, match=match):
        lg.run_loop(body, (jnp.zeros(3), jnp.ones(3)), xs, length=length, loop=loop)


def test_while_refuses_reverse_mode_with_a_reason():
    with pytest.raises(ValueError, match=r"loop='while' cannot be used with f\(\)"):
        lg._loops.require_reverse("while", "f()")
    assert lg._loops.require_reverse("remat:chunk=2", "f()") == lg.Loop("remat", chunk=2)
    bounded = lg._loops.require_reverse("while:max_steps=8", "f()")
    assert bounded == lg.Loop("while", max_steps=8) and bounded.reverse_mode
    # REVERSE_LOOPS lists the kinds of LOOPS that run reverse mode with any options.
    assert lg.REVERSE_LOOPS == tuple(k for k in lg.LOOPS if lg.Loop(k).reverse_mode)


def test_while_forward_mode_works():
    xs = {"a": jnp.linspace(-1, 1, 15).reshape(5, 3), "b": jnp.ones((5, 3))}

    def total(scale, loop):
        carry, _ = lg.run_loop(body, (jnp.zeros(3), scale * jnp.ones(3)), xs, length=5, loop=loop)
        return carry[0].sum()

    fwd = jax.jacfwd(total)(1.5, "while")
    np.testing.assert_allclose(fwd, jax.grad(total)(1.5, "scan"), rtol=TOL["float64"])


@pytest.mark.parametrize(
    ("loop", "error", "match"),
    [
        ("scan:chunk=4", ValueError, r"loop chunk applies to 'remat' only, got kind 'scan'"),
        ("remat:chunk=0", ValueError, r"loop chunk must be an int >= 1, got 0"),
        ("remat:chunk=x", TypeError, r"loop chunk must be a Python int, got str 'x'"),
        ("scan:unroll", ValueError, r"loop options are ':unroll=<int>'"),
        ("scan:unroll=2:unroll=4", ValueError, r"loop option 'unroll' is given twice in loop="),
        ("remat:checkpoints=0", ValueError, r"loop checkpoints must be an int >= 1, got 0"),
        ("remat:checkpoints=x", TypeError, r"loop checkpoints must be a Python int, got str 'x'"),
        ("scan:checkpoints=4", ValueError, r"checkpoints applies to 'remat' and to a bounded"),
        ("while:checkpoints=4", ValueError, r"bounded 'while:max_steps=N', got 'while:check"),
        (
            "remat:chunk=4:checkpoints=4",
            ValueError,
            r"checkpoints=4 .* does not combine with chunk",
        ),
        ("remat:unroll=2:checkpoints=4", ValueError, r"does not combine with unroll"),
        ("remat:policy=dots_saveable:checkpoints=2", ValueError, r"does not combine with policy"),
        (lg.Loop("python", unroll=4), ValueError, r"unroll applies to 'scan', 'fori', 'remat'"),
        ("scan:iters=3", ValueError, r"loop iters applies to 'parallel' only, got kind 'scan'"),
        ("remat:jacobian=diag", ValueError, r"loop jacobian applies to 'parallel' only"),
        ("while:tol=0.1", ValueError, r"loop tol applies to 'parallel' only, got kind 'while'"),
        ("parallel:iters=0", ValueError, r"loop iters must be an int >= 1, got 0"),
        ("parallel:jacobian=lu", ValueError, r"loop jacobian must be one of 'full', 'diag'"),
        ("parallel:tol=x", TypeError, r"loop tol must be a Python float or None, got str 'x'"),
        ("parallel:tol=-1", ValueError, r"loop tol must be a finite float >= 0 or None, got -1"),
        ("parallel:unroll=2", ValueError, r"unroll applies to .* with kind 'parallel'"),
    ],
)
def test_bad_loop(loop, error, match):
    with pytest.raises(error, match=match):
        lg.run_loop(body, (jnp.zeros(3), jnp.ones(3)), None, length=2, loop=loop)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_users_grad_through_while_raises_ours(jit):
    # Not only our own reverse uses (require_reverse): a user's jax.grad reads the same reason.
    xs = {"a": jnp.linspace(-1, 1, 15).reshape(5, 3), "b": jnp.ones((5, 3))}

    def total(scale):
        carry, ys = lg.run_loop(
            body, (jnp.zeros(3), scale * jnp.ones(3)), xs, length=5, loop="while"
        )
        return carry[0].sum() + ys["p2"].sum()

    grad = jax.jit(jax.grad(total)) if jit else jax.grad(total)
    with pytest.raises(ValueError) as error:
        grad(1.5)
    assert str(error.value) == lg._loops._no_reverse_message(
        lg.Loop("while"), "jax.grad or jax.vjp"
    )
    for kind in lg.REVERSE_LOOPS:
        assert repr(kind) in str(error.value)


@pytest.mark.parametrize("loop", LOOP_VARIANTS)
@pytest.mark.parametrize(("rows", "length"), [(3, 5), (5, 3), (0, 2)])
def test_leading_axis_must_equal_length(loop, rows, length):
    # Before the check, python/fori/while reused the last row (3 rows, length 5) or read
    # only the first rows (5 rows, length 3), and remat:chunk raised a reshape error.
    xs = {"a": jnp.ones((length, 3)), "b": jnp.ones((rows, 3))}
    want = rf"xs\['b'\] must have leading axis length={length} .*got shape \({rows}, 3\)"
    with pytest.raises(ValueError, match=want):
        lg.run_loop(body, (jnp.zeros(3), jnp.ones(3)), xs, length=length, loop=loop)


def test_scalar_leaf_is_refused():
    with pytest.raises(ValueError, match=r"xs must have leading axis length=2 .*got shape \(\)"):
        lg.run_loop(lambda c, x: (c + x, x), 0.0, jnp.float32(1.0), length=2, loop="scan")


def test_entry_points_inline_into_a_callers_program_and_stay_one_call_eagerly():
    # Traced into a caller's jax.jit the body joins the caller's program (a nested call
    # made the article-size gradient 2.5x slower); called eagerly it stays one compiled
    # call, jax.grad included (tests/test_rnn.py checks that it compiles once).
    from loopgrad_jax._loops import _staging

    seen = {}

    def probe(name):
        def f(x):
            seen[name] = _staging((x,))
            return x

        return f

    probe("eager")(1.0)
    jax.grad(probe("grad"))(1.0)
    jax.vmap(probe("vmap"))(jnp.ones(2))
    jax.jit(probe("jit"))(1.0)
    jax.jit(jax.grad(probe("jit(grad)")))(1.0)
    lax_scan_body = probe("scan body")
    jax.lax.scan(lambda c, x: (lax_scan_body(c), x), 0.0, jnp.ones(2))
    assert seen == {
        "eager": False, "grad": False, "vmap": False,
        "jit": True, "jit(grad)": True, "scan body": True,
    }  # fmt: skip

    p = lg.init_rnn(jax.random.key(0), 3, 4, dtype=jnp.float64)
    x, y = jnp.ones((5, 2, 3), jnp.float64), jnp.zeros((5, 2, 1), jnp.float64)
    staged = jax.make_jaxpr(jax.grad(lambda p: lg.rnn_loss(p, x, y, loop="scan")))(p)
    assert [e.primitive.name for e in staged.eqns if e.primitive.name in ("jit", "pjit")] == []
    assert "scan" in {e.primitive.name for e in staged.eqns}


def test_existing_loops_keep_their_value_and_text():
    # The parallel kind's fields default so that no other Loop changes.
    assert lg.Loop("scan", 8) == lg.Loop.parse("scan:unroll=8") and str(lg.Loop("remat")) == "remat"
    assert lg.Loop.parse("parallel:jacobian=diag") == lg.Loop("parallel", jacobian="diag")


# The full tier (4 s): test_deer.py's forward-mode check stays in the quick one.
@pytest.mark.slow
@pytest.mark.parametrize("loop", ["parallel", "parallel:jacobian=diag:iters=200"])
def test_parallel_forward_mode_matches_scan(loop):
    xs = {"a": jnp.linspace(-1, 1, 21).reshape(7, 3), "b": jnp.linspace(0, 2, 21).reshape(7, 3)}

    def run(scale, loop):
        return lg.run_loop(body, (jnp.zeros(3), scale * jnp.ones(3)), xs, length=7, loop=loop)

    got = jax.jvp(lambda s: run(s, loop), (1.5,), (1.0,))
    assert_close(got, jax.jvp(lambda s: run(s, "scan"), (1.5,), (1.0,)), TOL["float64"], loop)


def test_parallel_not_converged_is_nan_and_info_counts():
    xs = {"a": jnp.linspace(-1, 1, 60).reshape(20, 3), "b": jnp.ones((20, 3))}
    init = (jnp.zeros(3), jnp.ones(3))
    carry, ys = lg.run_loop(body, init, xs, length=20, loop="parallel:iters=1")
    assert all(bool(jnp.isnan(leaf).all()) for leaf in jax.tree.leaves((carry, ys)))
    *_, info = lg.parallel_scan_info(body, init, xs, 20, iters=1)
    assert isinstance(info, lg.ParallelScanInfo) and (
        int(info.iterations),
        bool(info.converged),
    ) == (1, False)
    *_, info = lg.parallel_scan_info(body, init, xs, 20)
    assert bool(info.converged) and 1 < int(info.iterations) <= 20


def test_parallel_refuses_an_integer_carry():
    def count(carry, x):
        i, total = carry
        return (i + 1, total + x), total

    with pytest.raises(
        TypeError, match=r"carry must have real floating-point leaves only .*init\[0\] of dtype int"
    ):
        lg.run_loop(count, (jnp.int32(0), jnp.float64(0)), jnp.ones(4), length=4, loop="parallel")
