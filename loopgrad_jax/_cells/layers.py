"""Layers over the whole sequence, one after another, as fused RNN kernels run them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loopgrad_jax._cells.equations import _row, layer_step, project_blocks
from loopgrad_jax._cells.kinds import GATES
from loopgrad_jax._cells.layer_rule import finish_step, join_blocks, layer_recurrence
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
        gi = x @ W_ih^T + b_ih                       # all T steps: one product per gate
        state, hs = carry0[k], []
        for t in range(T):
          state = step(layer, state, gi[t]); hs.append(h of state)
        finals[k], x = state, stack(hs)
      return finals, x                               # x: the last layer's h, (T, B, H)

    Each layer's recurrence is :func:`layer_recurrence`: under the loop kinds that
    store every step for reverse mode, its reverse rule turns the gradients of
    ``W_hh`` and ``b_hh`` into products after the backward loop (one per gate block),
    and the input side's (``W_ih``, ``b_ih``, ``x``) are the products already.
    """
    finals, x, policy = [], inputs, params.precision
    for layer, state0 in zip(params.layers, carry0, strict=True):
        gi = project_blocks(x, layer.weight_ih, layer.bias_ih, policy, GATES[params.kind])
        state, x = layer_recurrence(
            params.kind, loop, policy, layer.weight_hh, layer.bias_hh, gi, state0
        )
        finals.append(state)
    return tuple(finals), x


# ------------------------------------------- the module's forward: directions, lengths


def module_forward(
    params: CellParams,
    inputs: jax.Array,
    carry0: tuple,
    loop: Loop,
    *,
    live: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[tuple, jax.Array]:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``'s forward: ``(final states, outputs)``.

    ``inputs`` is ``(T, B, I)``; ``carry0`` holds one state per layer and direction,
    layer ``l``'s direction ``d`` at ``l * D + d``; ``outputs`` is ``(T, B, D * H_out)``.
    Plain-Python semantics, with ``live[t, b] = t < lengths[b]`` (``(T, B)``; ``None``:
    every step real) the packed batch of ``lengths`` in ``1..T``::

      x = inputs
      for l in range(num_layers):
        if l > 0 and dropout_key is not None: x = dropout(x, rate=params.dropout)
        for d in range(D):                              # d = 1 runs from t = T-1 down
          state, hs = carry0[l*D + d], zeros(T, B, H_out)
          for t in (range(T) if d == 0 else reversed(range(T))):
            for b in range(B):
              if t < lengths[b]:                        # padded steps: skipped, output 0
                state[b], hs[t, b] = step(layer[l*D + d], state[b], x[t, b])
          finals[l*D + d] = state
        x = concatenate([hs of each direction], axis=-1)
      return finals, x

    The reverse direction of example ``b`` starts at its last real step,
    ``lengths[b] - 1``, from ``carry0``, as PyTorch's packed sequences run it; the
    forward direction's final state is the one after step ``lengths[b] - 1``. Each
    layer's input side is one product per gate block over every step before its loop.
    """
    d = params.directions
    finals, x = [], inputs
    for layer_index in range(params.num_layers):
        if layer_index and dropout_key is not None and params.dropout:
            key = jax.random.fold_in(dropout_key, layer_index)
            x = _dropout(key, x, params.dropout)
        outputs = []
        for direction in range(d):
            k = layer_index * d + direction
            state, hs = _direction(params, params.layers[k], x, carry0[k], live, direction, loop)
            finals.append(state)
            outputs.append(hs)
        x = outputs[0] if d == 1 else jnp.concatenate(outputs, axis=-1)
    return tuple(finals), x


def _direction(params, layer, x, state0, live, direction: int, loop: Loop):
    """One layer in one direction over the sequence: ``(final state, h of every step)``."""
    gi = project_blocks(x, layer.weight_ih, layer.bias_ih, params.precision, GATES[params.kind])
    reverse = direction == 1
    if layer.weight_hr is None:
        return layer_recurrence(
            params.kind,
            loop,
            params.precision,
            layer.weight_hh,
            layer.bias_hh,
            gi,
            state0,
            live,
            reverse=reverse,
        )
    b_hh = _row(layer.bias_hh)

    def body(state, xs):
        g, keep = xs
        new, _ = layer_step(
            params.kind,
            layer.weight_hh,
            b_hh,
            state,
            join_blocks(g),
            layer.weight_hr,
            params.precision,
        )
        return finish_step(params.kind, None, new, state, keep)  # layer_step rounded it

    return run_loop(body, state0, (gi, live), length=x.shape[0], loop=loop, reverse=reverse)


def _dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout, as ``nn.Dropout`` in training mode: zero with probability
    ``rate``, the rest scaled by ``1 / (1 - rate)``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
