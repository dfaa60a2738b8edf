"""Layers over the whole sequence, one after another, as fused RNN kernels run them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from loopgrad_jax._cells.equations import _plus, _project, _row, layer_step
from loopgrad_jax._cells.params import CellParams
from loopgrad_jax._loops import Loop, run_loop

# ------------------------------------------------------- hoisted: layer by layer


def hoisted_forward(
    params: CellParams, inputs: jax.Array, carry0: tuple, loop: Loop
) -> tuple[tuple, jax.Array]:
    """Every layer over the whole sequence in turn, as fused RNN kernels run it.

    The same numbers as stepping all layers together (layer ``k`` at step ``t``
    reads only layer ``k - 1`` at ``t`` and itself at ``t - 1``). Plain-Python
    semantics::

      x = inputs                                     # (T, B, I)
      for k, layer in enumerate(layers):
        gi = x @ W_ih^T + b_ih                       # all T steps: one product
        state, hs = carry0[k], []
        for t in range(T):
          state = step(layer, state, gi[t]); hs.append(h of state)
        finals[k], x = state, stack(hs)
      return finals, x                               # x: the last layer's h, (T, B, H)

    Each layer's recurrence differentiates through :func:`_layer_sequence`, whose
    rule turns the gradient of ``W_hh`` and ``b_hh`` into one product after the
    loop; the input side's (``W_ih``, ``b_ih``) is one product already. With
    ``remat`` loops it does not: the rule's linearisation would store what the
    checkpoints recompute, so those keep JAX's own rule for the loop.
    """
    finals, x = [], inputs
    for layer, state0 in zip(params.layers, carry0, strict=True):
        gi = _project(layer, x)
        w_hh, b_hh = layer.weight_hh, layer.bias_hh
        if loop.kind == "remat":
            state, x = _run_layer(params.kind, loop, w_hh, b_hh, gi, None, state0)
        else:
            state, x = _layer_sequence(params.kind, loop, w_hh, b_hh, gi, state0)
        finals.append(state)
    return tuple(finals), x


def _run_layer(kind, loop, w_hh, b_hh, gi, extra, state0):
    """One layer over the sequence; ``extra[t]`` (if given) joins the recurrent pre-activation."""

    def body(state, xs):
        g, e = xs
        b = _row(b_hh) if e is None else _plus(e, _row(b_hh))
        return layer_step(kind, w_hh, b, state, g)

    return run_loop(body, state0, (gi, extra), length=gi.shape[0], loop=loop)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _layer_sequence(kind, loop, w_hh, b_hh, gi, state0):
    """``(final state, h of every step (T, B, H))`` of one layer, given its ``gi`` (T, B, G*H)."""
    return _run_layer(kind, loop, w_hh, b_hh, gi, None, state0)


@_layer_sequence.defjvp
def _layer_sequence_jvp(kind, loop, primals, tangents):
    # d(h W_hh^T + b_hh) = dh W_hh^T + (h dW_hh^T + db_hh). The first term is the
    # recurrence's own, with W_hh held fixed; the second, for every step at once, is
    # one product of the stored h_{t-1} (T, B, H) and dW_hh, fed in as the tangent of
    # a per-step term added to the recurrent pre-activation. Reverse mode transposes
    # that product into dW_hh = sum_t dpre_t^T h_{t-1}: one (G*H, T*B) x (T*B, H)
    # product after the loop, where JAX's rule for a loop would add T rank-B
    # products into dW_hh inside it.
    w_hh, b_hh, gi, state0 = primals
    dw_hh, db_hh, dgi, dstate0 = tangents
    out, linear = jax.linearize(
        lambda gi, extra, state0: _run_layer(kind, loop, w_hh, b_hh, gi, extra, state0),
        gi,
        jnp.zeros_like(gi),
        state0,
    )
    h0 = state0[0] if kind == "lstm" else state0
    h_prev = jnp.concatenate([h0[None], out[1][:-1]], axis=0)
    dextra = _plus(jnp.einsum("tbh,gh->tbg", h_prev, dw_hh), _row(db_hh, 2))
    return out, linear(dgi, dextra, dstate0)
