"""One layer's recurrence with a layer-level rule, as cuDNN and oneDNN differentiate it.

The forward loop stores, per step, the coefficients of the gates' linearization
(:func:`gates_linearized`); the tangent loop carries only the state's tangent and
multiplies by them; the recurrent weights' tangent enters as one product over every
step before it. Reverse mode transposes that: a backward loop carrying the state's
cotangent and emitting each step's pre-activation cotangent ``dpre``, then
``dW_hh = dpre^T h_prev``, a 2-D product over all ``T * B`` rows per gate block, and
``b_hh``'s one sum. The input side's gradients (``W_ih``, ``b_ih``, the inputs) come
from the caller's products ``gi = x W_ih^T + b_ih`` over every step, one per gate
block (:func:`project_blocks`), as ``dgi`` comes back for all steps at once, block by
block. Nothing here restates a cell: the rule reads the cell's own :func:`combine`,
:func:`combine_blocks`, :func:`gates_linearized` and :func:`gates_tangent`, the
pieces :func:`update`'s derivative is made of.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from loopgrad_jax._cells.equations import (
    _row,
    combine,
    combine_blocks,
    gates_linearized,
    gates_tangent,
    output_slope,
    project_blocks,
    update,
)
from loopgrad_jax._loops import Loop, run_loop
from loopgrad_jax._precision import Precision, matmul_t, product_t

#: The loop kinds the rule runs under: those whose reverse mode stores every step. The
#: remat kinds and checkpoints recompute instead (the rule would store what they do
#: not), ``while`` without ``max_steps`` has no reverse mode, and ``parallel`` solves
#: the whole recurrence at once.
RULE_LOOPS: tuple[str, ...] = ("python", "scan", "fori", "nnx_scan", "nnx_fori")


#: The rule runs ``fori``'s loops as ``lax.scan`` (and ``nnx_fori``'s as ``nnx.scan``):
#: the same steps and results, and the way the library differentiates ``fori`` anyway. Run
#: as a fori loop, the tangent loop's transpose copied a (T, ...) cotangent every step:
#: the rnn_tanh gradient at I=64, H=256, B=32, T=1000 took 4.1 s against scan's 0.26 s.
_RULE_KIND = {"fori": "scan", "nnx_fori": "nnx_scan"}


def uses_rule(loop: Loop) -> bool:
    """Whether :func:`layer_recurrence` runs ``loop`` with the layer-level rule."""
    return loop.kind in RULE_LOOPS


def layer_recurrence(
    kind: str,
    loop: Loop,
    policy: Precision | None,
    w_hh: jax.Array,
    b_hh: jax.Array | None,
    gi: tuple[jax.Array, ...],
    state0: Any,
    live: jax.Array | None = None,
    *,
    reverse: bool = False,
) -> tuple[Any, jax.Array]:
    """``(final state, outputs (T, B, H))`` of one layer in one direction, given its ``gi``.

    ``gi`` is the input side ``x W_ih^T + b_ih`` of every step as one ``(T, B, H)``
    array per gate (:func:`project_blocks`). Plain-Python semantics (``live[t, b]``:
    whether step ``t`` of example ``b`` is real; ``None``: every step)::

      state, out = state0, zeros(T, B, H)
      for t in (reversed(range(T)) if reverse else range(T)):
        pre = combine(kind, concatenate([g[t] for g in gi], -1), h(state) @ w_hh.T, b_hh)
        new = update(kind, pre, state)                 # rounded under ``policy``
        state = where(live[t], new, state)
        out[t] = where(live[t], h(new), 0)
      return state, out

    Under :data:`RULE_LOOPS` the loop differentiates by the layer-level rule (module
    docstring): ``jax.jvp`` and ``jax.grad`` equal those of the plain loop up to the
    order of floating-point sums, and higher derivatives go through it (the rule is
    JAX code). Other loop kinds run the plain loop with JAX's own rule.
    """
    args = (w_hh, b_hh, gi, state0, live)
    if not uses_rule(loop):
        return _forward(kind, loop, policy, reverse, *args)
    loop = loop._replace(kind=_RULE_KIND.get(loop.kind, loop.kind))
    return _recurrence(kind, loop, policy, reverse, *args)


def _h(kind: str, state: Any) -> jax.Array:
    return state[0] if kind == "lstm" else state


def finish_step(kind: str, policy: Precision | None, new: Any, state: Any, keep) -> tuple:
    """The step's ``(new carry, output h)`` from its new state: rounded to the policy's
    state dtype (none for ``None``), then masked: where ``keep[b]`` is False (a padded
    step of a packed batch) the carry stays ``state`` and the output is zero."""
    if policy is not None:
        new = policy.round_state(new)
    h = _h(kind, new)
    if keep is None:
        return new, h
    new = jax.tree.map(lambda n, o: jnp.where(keep[:, None], n, o), new, state)
    return new, jnp.where(keep[:, None], h, jnp.zeros_like(h))


# nn.RNN's coefficient, d h' / d pre, is a function of h' alone: the tangent loop
# computes it from the outputs rather than the forward loop storing it.
_RNN = ("rnn_tanh", "rnn_relu")


def _forward(kind, loop, policy, reverse, w_hh, b_hh, gi, state0, live, *, coefs=False):
    """The plain loop: ``(final, outputs)``, and with ``coefs`` also what the rule
    reads, ``(each step's gates_linearized coefficients, each carry's h)``: ``None``
    for what the outputs already hold (an nn.RNN's coefficients; without a mask, the
    carries' h), so that it is stored once. The rule never reads an LSTM's ``c``."""
    bias = _row(b_hh)

    def body(state, xs):
        g, keep = xs
        pre = combine(kind, join_blocks(g), matmul_t(_h(kind, state), w_hh, policy), bias)
        if not coefs or kind in _RNN:
            new, out = finish_step(kind, policy, update(kind, pre, state), state, keep)
            step_coefs = None
        else:
            new, step_coefs = gates_linearized(kind, pre, state)
            new, out = finish_step(kind, policy, new, state, keep)
        if not coefs:
            return new, out
        return new, (out, step_coefs, None if keep is None else _h(kind, new))

    final, ys = run_loop(
        body, state0, (gi, live), length=gi[0].shape[0], loop=loop, reverse=reverse
    )
    return (final, ys) if not coefs else (final, *ys)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _recurrence(kind, loop, policy, reverse, w_hh, b_hh, gi, state0, live):
    return _forward(kind, loop, policy, reverse, w_hh, b_hh, gi, state0, live)


@_recurrence.defjvp
def _recurrence_jvp(kind, loop, policy, reverse, primals, tangents):
    # The tangent loop carries only the state's tangent, and is linear in it: every
    # step multiplies by the coefficients the forward loop stored (gates_tangent), so
    # reverse mode's partial evaluation moves nothing of it into the forward pass. The
    # recurrent weights' tangent enters as one product over every step before the loop,
    # h_prev dW_hh^T + db_hh, joined with dgi by combine. Reverse mode transposes this
    # code: a backward loop carrying the state's cotangent and emitting each step's
    # pre-activation cotangent, then dW_hh = dpre^T h_prev, one 2-D product over all
    # T * B rows, after it.
    w_hh, b_hh, gi, state0, live = primals
    dw_hh, db_hh, dgi, dstate0, _ = tangents
    final, out, coefs, hs = _forward(kind, loop, policy, reverse, *primals, coefs=True)
    # Checkpointed: reverse mode keeps the tangent loop's inputs (the outputs, the stored
    # coefficients) and recomputes what it derives from them, h_prev and an nn.RNN's
    # coefficients, in the backward pass; stored, each was one more (T, B, H) array.
    tangent = jax.checkpoint(functools.partial(_tangent, kind, loop, policy, reverse))
    dfinal, dout = tangent(w_hh, state0, out, coefs, hs, live, dw_hh, db_hh, dgi, dstate0)
    return (final, out), (dfinal, dout)


def _tangent(kind, loop, policy, reverse, w_hh, state0, out, coefs, hs, live, *tangents):
    """The tangent loop: ``(dfinal, dout)``, linear in ``tangents``; see
    :func:`_forward` for ``coefs`` and ``hs``."""
    dw_hh, db_hh, dgi, dstate0 = tangents
    if kind in _RNN:
        coefs = (output_slope(kind, out),)
    h_prev = _shift(_h(kind, state0), out if hs is None else hs, reverse=reverse)
    # h_prev dW_hh^T + db_hh one gate block at a time, so that reverse mode computes
    # dW_hh block by block from the loop's cotangents as they come: joined, they were
    # one more (T, B, G*H) array written and read.
    extra = project_blocks(h_prev, dw_hh, db_hh, policy, len(dgi))

    def body(dstate, xs):
        dpre_t, coefs_t, keep = xs
        dhw = product_t(_h(kind, dstate), w_hh, policy)
        dpre = join_blocks(dpre_t) + combine(kind, jnp.zeros_like(dhw), dhw, None)
        return finish_step(kind, policy, gates_tangent(kind, coefs_t, dpre, dstate), dstate, keep)

    xs = (combine_blocks(kind, dgi, extra), coefs, live)
    return run_loop(body, dstate0, xs, length=out.shape[0], loop=loop, reverse=reverse)


def join_blocks(xs: tuple[jax.Array, ...]) -> jax.Array:
    """One step's gate blocks (:func:`project_blocks`) joined: ``(B, G*H)``.

    The blocks reach the loop as separate arrays and are joined inside the step: read
    as column blocks of one stored array, XLA's CPU backend ran the step's elementwise
    gate arithmetic several times slower (a GRU's forward loop at B=32, H=256, T=1000:
    388 against 187 ms; ``docs/notes.md``).
    """
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)


def _shift(first: jax.Array, hs: jax.Array, *, reverse: bool) -> jax.Array:
    """``first`` then ``hs`` without their last (in the loop's order), indexed by step."""
    if reverse:
        return jnp.concatenate([hs[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], hs[:-1]], axis=0)
