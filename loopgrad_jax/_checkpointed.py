"""``remat:checkpoints=C``: a scan whose reverse mode stores at most ``C`` carries.

The primal is ``lax.scan``. Reverse mode follows :func:`loopgrad_jax._revolve.schedule`:
the forward sweep stores the carries the schedule asks for and keeps the last step's
pullback; the backward pass is one ``lax.scan`` over the schedule's remaining rows, each
restoring a carry, advancing it with a ``lax.fori_loop`` of a run-time trip count,
storing it, and reversing one step with ``jax.vjp`` of the body. The body is traced a
fixed number of times whatever the length, so compile time does not grow with it, and
it is evaluated ``T + forward_steps(T, C)`` times, the offline optimum.

Reverse mode only: ``jax.jvp`` / ``jax.jacfwd`` through it raise JAX's error for a
``custom_vjp`` function. The backward pass is ordinary JAX code, so forward mode runs
through it: ``jax.jvp`` of ``jax.grad``, ``jax.jacfwd(jax.jacrev(f))`` and
``jax.hessian`` work. Reverse mode does not (``jax.grad`` of ``jax.grad``,
``jax.jacrev(jax.jacrev(f))``): the loops that move carries forward have run-time trip
counts, and their outputs are marked so that it raises :data:`REVERSE_TWICE`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from loopgrad_jax import _checks, _revolve
from loopgrad_jax._forward_only import forward_only

PyTree = Any

#: The error reverse mode of the backward pass raises.
REVERSE_TWICE = (
    "Reverse mode of reverse mode (jax.grad of jax.grad, jax.jacrev of jax.jacrev, or "
    "jax.grad of a train_rnn(mode='tbptt') run) does not run through a loop with "
    "checkpoints=C: its backward pass moves stored carries forward with loops whose trip "
    "counts are known only at run time, and reverse mode needs static trip counts. "
    "Forward over reverse works (jax.hessian, jax.jacfwd(jax.jacrev(f)), jax.jvp of "
    "jax.grad); for reverse over reverse, use 'remat' or 'remat:chunk=k'."
)


def checkpointed_scan(
    body: Callable, init: PyTree, xs: PyTree, length: int, reverse: bool, checkpoints: int
) -> tuple[PyTree, PyTree]:
    """``lax.scan(body, init, xs, length=length, reverse=reverse)``; its reverse mode
    stores at most ``checkpoints`` carries (the initial one included)."""
    if length == 0:
        return lax.scan(body, init, xs, length=0, reverse=reverse)
    closed, consts = closure_convert(body, init, _row(xs, 0))
    # Only floating-point leaves are differentiated; the others ride along unchanged.
    consts_d, consts_n, consts_tree = _split(consts)
    init_d, init_n, init_tree = _split(init)
    xs_d, xs_n, xs_tree = _split(xs)
    trees = (consts_tree, init_tree, xs_tree)
    static = _Static(closed, length, reverse, checkpoints, trees)
    return _scan(static, consts_d, init_d, xs_d, consts_n, init_n, xs_n)


def closure_convert(fn: Callable, *example_args: PyTree) -> tuple[Callable, list]:
    """``(converted, consts)`` with ``converted(*args, *consts) == fn(*args)``.

    ``consts`` are all the tracers ``fn`` closes over, integer ones included, so that
    a custom derivative rule can take them as arguments. ``jax.closure_convert``
    hoists only the values that can carry a tangent: an integer tracer (an enclosing
    loop's step index) stayed inside the converted function and was used after its
    trace had ended (``jax.grad`` of a ``train_rnn`` run, or of a ``lax.scan`` whose
    body runs a ``fori`` loop reading the scan's index, failed).
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    hoist = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    n = len(example_args)

    def converted(*args_and_consts):
        new = iter(args_and_consts[n:])
        consts = [next(new) if h else c for c, h in zip(closed.consts, hoist, strict=True)]
        run = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, consts))
        out = run(*jax.tree.leaves(args_and_consts[:n]))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return converted, [c for c, h in zip(closed.consts, hoist, strict=True) if h]


class _Static:
    """What the custom VJP holds fixed: the body and the loop's shape (hashed by identity)."""

    def __init__(self, body, length, reverse, checkpoints, trees):
        self.body, self.length, self.reverse = body, length, reverse
        self.checkpoints = min(checkpoints, length)  # more slots than steps are never used
        self.consts_tree, self.init_tree, self.xs_tree = trees

    def step(self, consts, carry, x):
        """The body, on full carries and rows."""
        return self.body(carry, x, *consts)

    def consts(self, consts_d, consts_n):
        """The body's constants, merged from floating-point and other leaves."""
        return _merge(consts_d, consts_n, self.consts_tree)

    def row(self, k):
        """The row of ``xs`` that step ``k`` reads."""
        return self.length - 1 - k if self.reverse else k


def _split(tree: PyTree) -> tuple[list, list, tuple]:
    """``(floating-point leaves, other leaves, how to merge them back)``."""
    leaves, treedef = jax.tree.flatten(tree)
    mask = tuple(_checks.inexact(leaf) for leaf in leaves)
    diff = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
    other = [leaf for leaf, m in zip(leaves, mask, strict=True) if not m]
    return diff, other, (treedef, mask)


def _merge(diff: list, other: list, how: tuple) -> PyTree:
    treedef, mask = how
    diff_it, other_it = iter(diff), iter(other)
    return jax.tree.unflatten(treedef, [next(diff_it) if m else next(other_it) for m in mask])


def _row(tree: PyTree, i) -> PyTree:
    """Row ``i`` of every leaf of ``tree``."""
    return jax.tree.map(lambda a: a[i], tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static: _Static, consts_d, init_d, xs_d, consts_n, init_n, xs_n):
    init = _merge(init_d, init_n, static.init_tree)
    xs = _merge(xs_d, xs_n, static.xs_tree)
    step = functools.partial(static.step, static.consts(consts_d, consts_n))
    return lax.scan(step, init, xs, length=static.length, reverse=static.reverse)


def _pullback(static: _Static, consts_d, consts_n, carry, x):
    """``(new carry, y), pullback`` of one step, differentiating floating-point leaves only.

    The pullback maps the cotangents of the new carry's and ``y``'s floating-point
    leaves to those of ``consts_d``, of ``carry``'s and of ``x``'s floating-point leaves.
    """
    carry_d, carry_n, carry_how = _split(carry)
    x_d, x_n, x_how = _split(x)

    def step(consts_d, carry_d, x_d):
        consts = static.consts(consts_d, consts_n)
        new, y = static.step(consts, _merge(carry_d, carry_n, carry_how), _merge(x_d, x_n, x_how))
        return (_split(new)[0], _split(y)[0]), (new, y)

    _, pull, out = jax.vjp(step, consts_d, carry_d, x_d, has_aux=True)
    return out, pull


def _store(bank, carry, slot):
    """``bank[slot] = carry`` where ``slot >= 0``; ``bank`` unchanged otherwise."""
    index = jnp.maximum(slot, 0)
    return jax.tree.map(
        lambda b, c: b.at[index].set(jnp.where(slot >= 0, c, b[index])), bank, carry
    )


def _scan_fwd(static: _Static, consts_d, init_d, xs_d, consts_n, init_n, xs_n):
    table = _revolve.schedule(static.length, static.checkpoints)
    first = _revolve.first_turn(table)
    # The first sweep stores each step's entering carry where the schedule's rows before
    # its first turn do (slot 0: the initial carry); -1: not stored.
    slots = np.full(static.length, -1, np.int32)
    slots[0] = 0
    for _, start, advance, store, _ in table[:first]:
        if store >= 0:
            slots[start + advance] = store
    consts = static.consts(consts_d, consts_n)
    init = _merge(init_d, init_n, static.init_tree)
    xs = _merge(xs_d, xs_n, static.xs_tree)
    n = static.length
    bank = jax.tree.map(lambda a: jnp.zeros((static.checkpoints, *jnp.shape(a)), a.dtype), init)
    y_avals = jax.eval_shape(static.step, consts, init, _row(xs, 0))[1]
    ys = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), y_avals)

    def sweep(k, state):
        carry, bank, ys = state
        bank = _store(bank, carry, jnp.asarray(slots)[k])
        i = static.row(k)
        carry, y = static.step(consts, carry, _row(xs, i))
        return carry, bank, jax.tree.map(lambda buf, leaf: buf.at[i].set(leaf), ys, y)

    state = _typed_like_outputs((init, bank, ys), functools.partial(sweep, 0))
    carry, bank, ys = lax.fori_loop(0, n - 1, sweep, state)
    last = static.row(n - 1)  # the first turn: the last step, its pullback kept
    (carry, y), pull = _pullback(static, consts_d, consts_n, carry, _row(xs, last))
    ys = jax.tree.map(lambda buf, leaf: buf.at[last].set(leaf), ys, y)
    return (carry, ys), (consts_d, consts_n, xs_d, xs_n, init_n, bank, pull)


def _scan_bwd(static: _Static, residuals, cts):
    consts_d, consts_n, xs_d, xs_n, init_n, bank, pull = residuals
    consts = static.consts(consts_d, consts_n)
    xs = _merge(xs_d, xs_n, static.xs_tree)
    ct_carry, ct_ys = _split(cts[0])[0], _split(cts[1])[0]  # float0 (integer) leaves drop
    table = _revolve.schedule(static.length, static.checkpoints)
    first = _revolve.first_turn(table)
    last = static.row(static.length - 1)
    g_consts, ct_carry, g_x = pull((ct_carry, _row(ct_ys, last)))
    ct_xs = [jnp.zeros_like(a).at[last].set(g) for a, g in zip(xs_d, g_x, strict=True)]

    def advance(k, carry):
        return static.step(consts, carry, _row(xs, static.row(k)))[0]

    def turn(k, carry, ct_carry, g_consts, ct_xs):
        i = static.row(k)
        _, pull = _pullback(static, consts_d, consts_n, carry, _row(xs, i))
        g_c, ct_carry, g_x = pull((ct_carry, _row(ct_ys, i)))
        g_consts = jax.tree.map(jnp.add, g_consts, g_c)
        ct_xs = [buf.at[i].set(g) for buf, g in zip(ct_xs, g_x, strict=True)]
        return ct_carry, g_consts, ct_xs

    def run_row(state, row):
        bank, ct_carry, g_consts, ct_xs = state
        restore, start, steps, store, is_turn = (row[c] for c in range(5))
        carry = jax.tree.map(lambda b: b[restore], bank)
        carry = lax.fori_loop(start, start + steps, advance, carry)
        carry = forward_only(carry, REVERSE_TWICE)  # before JAX's while_loop error
        bank = _store(bank, carry, store)
        ct_carry, g_consts, ct_xs = lax.cond(
            is_turn > 0,
            functools.partial(turn, start + steps, carry),
            lambda *grads: grads,
            ct_carry,
            g_consts,
            ct_xs,
        )
        return (bank, ct_carry, g_consts, ct_xs), None

    rows = _backward_rows(table, first)
    state = (bank, ct_carry, g_consts, ct_xs)
    if len(rows):
        state = _typed_like_outputs(state, lambda state: run_row(state, rows[0])[0])
    (_, ct_init, g_consts, ct_xs), _ = lax.scan(run_row, state, rows)

    def zeros(leaves):
        return [np.zeros(np.shape(a), jax.dtypes.float0) for a in leaves]

    return g_consts, ct_init, ct_xs, zeros(consts_n), zeros(init_n), zeros(xs_n)


_scan.defvjp(_scan_fwd, _scan_bwd)


def _typed_like_outputs(state: PyTree, step: Callable[[PyTree], PyTree]) -> PyTree:
    """``state`` promoted to the types ``step(state)`` returns.

    Inside ``shard_map`` a value computed from per-device data varies over the mesh's
    axes, and a loop's carry must keep its type from step to step: a buffer of zeros
    that comes to hold such values must vary from the start. Adding zeros of the
    output's type promotes each leaf (and changes nothing outside ``shard_map``).
    """
    for _ in range(2):  # a promoted leaf can promote another on the next step
        out = jax.eval_shape(step, state)
        state = jax.tree.map(lambda leaf, aval: leaf + jnp.zeros_like(aval), state, out)
    return state


def _backward_rows(table: np.ndarray, first: int) -> jax.Array:
    """The rows after the first turn, each restoring its carry from a slot.

    A row that continues from the carry in hand (``restore == -1``) follows a row that
    stored that carry, so it restores it from there: every row then starts the same way,
    and the backward pass carries no carry from row to row.
    """
    rows = table[first + 1 :].copy()
    for k in np.flatnonzero(rows[:, _revolve.RESTORE] < 0):
        before = rows[k - 1] if k > 0 else None
        assert before is not None and before[_revolve.STORE] >= 0 and not before[_revolve.TURN]
        rows[k, _revolve.RESTORE] = before[_revolve.STORE]
    return jnp.asarray(rows)
