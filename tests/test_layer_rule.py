"""The layer-level reverse rule: jax.grad equals that of the plain loop (JAX's own rule)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopgrad_jax._cells import GATES
from loopgrad_jax._cells.equations import combine, combine_blocks
from loopgrad_jax._cells.layer_rule import RULE_LOOPS, _forward, layer_recurrence
from loopgrad_jax._loops import check_loop

T, B, H = 5, 3, 4
KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def _case(kind: str, seed: int = 0, bias: bool = True):
    keys = jax.random.split(jax.random.key(seed), 6)
    g = GATES[kind] * H
    w_hh = jax.random.normal(keys[0], (g, H), jnp.float64) * 0.5
    b_hh = jax.random.normal(keys[1], (g,), jnp.float64) * 0.5 if bias else None
    gi = tuple(jax.random.normal(keys[2], (GATES[kind], T, B, H), jnp.float64))
    h0 = jax.random.normal(keys[3], (B, H), jnp.float64) * 0.5
    state0 = (h0, jax.random.normal(keys[4], (B, H), jnp.float64) * 0.5) if kind == "lstm" else h0
    weights = jax.random.normal(keys[5], (T, B, H), jnp.float64)
    return w_hh, b_hh, gi, state0, weights


def _loss(run, kind, weights, w_hh, b_hh, gi, state0):
    final, out = run(w_hh, b_hh, gi, state0)
    final_h = final[0] if kind == "lstm" else final
    extra = jnp.sum(final[1] ** 2) if kind == "lstm" else 0.0
    return jnp.sum(out * weights) + jnp.sum(jnp.sin(final_h)) + extra


def _runs(kind, loop, live, reverse):
    spec = check_loop(loop)

    def fast(w_hh, b_hh, gi, state0):
        return layer_recurrence(kind, spec, None, w_hh, b_hh, gi, state0, live, reverse=reverse)

    def plain(w_hh, b_hh, gi, state0):
        return _forward(kind, spec, None, reverse, w_hh, b_hh, gi, state0, live)

    return fast, plain


LIVE = np.array([[t < n for n in (5, 2, 4)] for t in range(T)])


def _grid():
    """Every kind, loop kind, packing and direction; the quick tier runs scan on every
    kind (full forward, packed reverse) and each other loop kind on one case (an LSTM,
    packed, reverse), the full tier all."""
    for kind in KINDS:
        for loop in RULE_LOOPS:
            for masked in (False, True):
                for reverse in (False, True):
                    quick = (loop == "scan" and masked == reverse) or (
                        kind == "lstm" and masked and reverse
                    )
                    ids = f"{kind}-{loop}-{'packed' if masked else 'full'}-"
                    ids += "reverse" if reverse else "forward"
                    marks = [] if quick else [pytest.mark.slow]
                    yield pytest.param(kind, loop, masked, reverse, id=ids, marks=marks)


@pytest.mark.parametrize(("kind", "loop", "masked", "reverse"), list(_grid()))
def test_gradient_equals_the_plain_loops(kind, loop, masked, reverse):
    live = jnp.asarray(LIVE) if masked else None
    w_hh, b_hh, gi, state0, weights = _case(kind)
    fast, plain = _runs(kind, loop, live, reverse)
    args = (w_hh, b_hh, gi, state0)
    got = jax.grad(functools.partial(_loss, fast, kind, weights), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(functools.partial(_loss, plain, kind, weights), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    # The values too: the rule's forward is the plain loop.
    for g, w in zip(jax.tree.leaves(fast(*args)), jax.tree.leaves(plain(*args)), strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "kind", [k if k == "rnn_tanh" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS]
)
def test_forward_mode_and_second_derivatives_equal_the_plain_loops(kind):
    # The rule is a JVP rule: jax.jvp runs it directly, reverse mode transposes it, and
    # a Hessian-vector product (forward over reverse) and reverse over reverse go
    # through it as through any JAX code.
    live = jnp.asarray(LIVE)
    w_hh, b_hh, gi, state0, weights = _case(kind, seed=1)
    fast, plain = _runs(kind, "scan", live, reverse=True)
    args = (w_hh, b_hh, gi, state0)
    tangents = jax.tree.map(
        lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), args
    )

    def jvp(run):
        return jax.jvp(functools.partial(_loss, run, kind, weights), args, tangents)

    def hvp(run):
        grad = jax.grad(functools.partial(_loss, run, kind, weights), argnums=(0, 1, 2, 3))
        return jax.jvp(grad, args, tangents)[1]

    def rev_rev(run):
        grad = jax.grad(functools.partial(_loss, run, kind, weights))
        return jax.grad(lambda w: jnp.sum(jnp.sin(grad(w, b_hh, gi, state0))))(w_hh)

    for check in (jvp, hvp, rev_rev):
        for g, w in zip(jax.tree.leaves(check(fast)), jax.tree.leaves(check(plain)), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)


def test_vmap_over_a_batch_of_sequences_equals_one_at_a_time():
    w_hh, b_hh, gi, state0, weights = _case("lstm", seed=2)
    fast, _ = _runs("lstm", "scan", None, reverse=False)
    grad = jax.grad(functools.partial(_loss, fast, "lstm", weights), argnums=2)
    gis = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), gi)
    batched = jax.vmap(lambda g: grad(w_hh, b_hh, g, state0))(gis)
    for k in range(2):
        one = grad(w_hh, b_hh, tuple(g[k] for g in gis), state0)
        for got, want in zip(batched, one, strict=True):
            np.testing.assert_allclose(got[k], want, rtol=1e-13)


@pytest.mark.parametrize("loop", ["fori", "fori:unroll=2"])
def test_fori_runs_the_rule_as_a_scan(loop):
    # Run as a fori loop, the tangent loop's transpose copied a (T, ...) cotangent every
    # step (the rnn_tanh gradient at I=64, H=256, B=32, T=1000: 4.1 s against scan's
    # 0.26 s); the rule runs fori's loops as lax.scan, with the same results.
    w_hh, b_hh, gi, state0, weights = _case("gru", seed=3)
    fast, _ = _runs("gru", loop, None, reverse=False)
    scan, _ = _runs("gru", loop.replace("fori", "scan"), None, reverse=False)
    grad = jax.grad(functools.partial(_loss, fast, "gru", weights), argnums=(0, 1, 2))
    want = jax.grad(functools.partial(_loss, scan, "gru", weights), argnums=(0, 1, 2))
    args = (w_hh, b_hh, gi, state0)
    # The same program: no (T, ...) output buffer carried through either loop.
    assert str(jax.make_jaxpr(grad)(*args)) == str(jax.make_jaxpr(want)(*args))
    for g, w in zip(grad(*args), want(*args), strict=True):
        np.testing.assert_array_equal(g, w)


def _scan_xs_shapes(jaxpr) -> list[list[tuple[int, ...]]]:
    """The per-step inputs (xs) of every ``lax.scan`` in ``jaxpr``, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            first = eqn.params["num_consts"] + eqn.params["num_carry"]
            found.append([tuple(v.aval.shape) for v in eqn.invars[first:]])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    found += _scan_xs_shapes(sub)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_each_gate_reaches_the_loop_as_its_own_array(kind):
    # The step reads each gate's (B, H) input and, in reverse mode, each stored coefficient
    # from a separate array, never as column blocks of one (docs/notes.md: XLA's CPU code
    # ran the gate arithmetic several times slower that way).
    w_hh, b_hh, gi, state0, weights = _case(kind)
    fast, _ = _runs(kind, "scan", None, False)
    loss = functools.partial(_loss, fast, kind, weights)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2)))(w_hh, b_hh, gi, state0).jaxpr
    per_step = [s for xs in _scan_xs_shapes(jaxpr) for s in xs if s[:1] == (T,)]
    assert per_step, "no loop over the steps"
    assert all(s[-1] == H for s in per_step), per_step


@pytest.mark.parametrize("kind", KINDS)
def test_reverse_mode_keeps_the_coefficients_and_the_outputs_once(kind):
    # Per step the backward pass needs each gates_linearized coefficient and h_prev,
    # which is the outputs shifted by one step: kept as the outputs themselves (also what
    # a caller's next product keeps), and an nn.RNN's one coefficient, 1 - h^2 or
    # [h > 0], is recomputed from them. So the pullback holds len(coefficients) + 1
    # distinct (T, B, H) arrays (nn.RNN: 1), none more.
    w_hh, b_hh, gi, state0, weights = _case(kind)
    fast, _ = _runs(kind, "scan", None, False)

    def loss(w_hh, b_hh, gi, state0, head):  # the outputs also feed a product (a head)
        out = fast(w_hh, b_hh, gi, state0)[1]
        return jnp.sum(out * weights) + jnp.sum(jnp.einsum("tbh,ho->tbo", out, head))

    head = jnp.ones((H, 2), jnp.float64)
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(loss, *a)[1])(w_hh, b_hh, gi, state0, head).jaxpr
    given = set(map(id, jaxpr.constvars + jaxpr.invars))  # weights, and the primals
    kept = {id(v) for v in jaxpr.outvars if v.aval.shape == (T, B, H) and id(v) not in given}
    stored = {"rnn_tanh": 0, "rnn_relu": 0, "lstm": 6, "gru": 5}[kind]
    assert len(kept) == stored + 1


@pytest.mark.parametrize("kind", KINDS)
def test_combine_blocks_is_combine_on_gate_blocks(kind):
    # The tangent loop's per-step input is combine_blocks of the input side's blocks and
    # the recurrent side's: block for block, the columns combine writes joined.
    keys = jax.random.split(jax.random.key(4))
    gi, hw = (jax.random.normal(k, (T, B, GATES[kind] * H), jnp.float64) for k in keys)

    def blocks(a):
        return tuple(jnp.split(a, GATES[kind], axis=-1))

    got = jnp.concatenate(combine_blocks(kind, blocks(gi), blocks(hw)), axis=-1)
    np.testing.assert_array_equal(got, combine(kind, gi, hw, None))
