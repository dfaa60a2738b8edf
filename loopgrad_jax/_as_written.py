"""The article's per-step training loop, with PyTorch's gradient, two exact ways.

Write ``h_t = cell(p_t, h_{t-1}, x_t)`` and ``L_t = loss(p_t, h_t)``, where
``p_t`` are the weights after ``t`` updates. Under
``allow_mutation_on_saved_tensors`` PyTorch's ``L_t.backward()`` accumulates
into the one leaf tensor ``p`` a contribution from every use of it::

  g_t = dL_t/dp_t  +  sum over s <= t of  a_s^T  d cell(p_s, h_{s-1}, x_s) / dp_s
  where  a_t = dL_t/dh_t,   a_{s-1} = a_s^T d cell(p_s, h_{s-1}, x_s) / dh_{s-1}

- ``forward`` carries ``S_t = dh_t/dp`` (every use up to ``t``) forward in time:
  ``S_t = dcell/dh S_{t-1} + dcell/dp`` and ``g_t = dL_t/dp_t + a_t^T S_t``.
- ``reverse`` keeps the weights and hidden states of every step and runs the
  ``a_s`` recursion backward from ``t`` at every step, as PyTorch's retained
  graph does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from loopgrad_jax._loops import Loop, run_loop
from loopgrad_jax._result import (
    TrainResult,
    apply_optimizer,
    keep_init,
    keep_result,
    keep_step,
)
from loopgrad_jax._rnn import RNNParams, RNNSizes, rnn_cell, step_loss

#: Values of ``train_rnn(as_written_method=...)``.
METHODS: tuple[str, ...] = ("auto", "forward", "reverse")

#: ``auto`` never picks ``forward`` when its sensitivity would exceed this many bytes.
FORWARD_MEMORY_LIMIT = 1 << 30


class Cost(NamedTuple):
    """An estimate of one as-written training run."""

    flops: float  # multiply-adds counted as 2
    memory_bytes: float  # what the method keeps beyond the inputs


def num_params(sizes: RNNSizes) -> int:
    """``P``, the number of scalars in :class:`RNNParams`."""
    h, i, o = sizes.hidden, sizes.input, sizes.output
    return h * (i + h) + h + o * h + o


def as_written_cost(sizes: RNNSizes, method: str, itemsize: int = 4) -> Cost:
    """Estimates time (FLOPs) and memory of ``method`` for these sizes.

    The cell's product costs ``c = 2*B*H*(I+H)`` FLOPs. ``forward`` pushes ``P``
    tangents through it every step: ``T*P*c`` FLOPs, ``B*H*P`` numbers.
    ``reverse`` runs a forward and backward cell (about ``3c``) over all ``T``
    stored steps at every step: ``3*T*T*c`` FLOPs, ``T*(B*H + P)`` numbers.
    """
    t, b, i, h, _ = sizes
    p = num_params(sizes)
    cell = 2.0 * b * h * (i + h)
    if method == "forward":
        return Cost(flops=t * p * cell, memory_bytes=float(b * h * p * itemsize))
    if method == "reverse":
        return Cost(flops=3.0 * t * t * cell, memory_bytes=float(t * (b * h + p) * itemsize))
    raise ValueError(f"method must be 'forward' or 'reverse', got {method!r}.")


def choose_method(sizes: RNNSizes, dtype: jnp.dtype) -> str:
    """The cheaper exact method by :func:`as_written_cost`."""
    itemsize = jnp.dtype(dtype).itemsize
    forward = as_written_cost(sizes, "forward", itemsize)
    reverse = as_written_cost(sizes, "reverse", itemsize)
    if forward.memory_bytes > FORWARD_MEMORY_LIMIT or forward.flops > reverse.flops:
        return "reverse"
    return "forward"


def train(
    params, inputs, targets, hidden0, *, method, loop, optimizer, opt_state, keep_grads
) -> TrainResult:
    """Runs the article's loop with ``method`` (``"forward"`` or ``"reverse"``).

    The retained history starts here: a call that continues an earlier run
    (given its ``params``, ``opt_state`` and ``hidden``) treats ``hidden0`` as a
    constant, as PyTorch does for a tensor from a graph that no longer exists.
    """
    steps = inputs.shape[0]
    gradient = _Forward() if method == "forward" else _Reverse(inputs, loop)

    def body(carry, xyt):
        params, opt_state, hidden, state, kept = carry
        x, y, t = xyt
        new_hidden = rnn_cell(params, hidden, x)
        # dL_t/dp_t (this step's own use of the head and cell) and a_t = dL_t/dh_t.
        loss, (grad_now, adjoint) = jax.value_and_grad(step_loss, argnums=(0, 1))(
            params, new_hidden, y
        )
        grads, state = gradient.step(state, params, hidden, x, t, adjoint, grad_now)
        params, opt_state = apply_optimizer(optimizer, grads, opt_state, params, value=loss)
        kept, out = keep_step(keep_grads, kept, grads)
        return (params, opt_state, new_hidden, state, kept), (loss, out)

    state = gradient.init(params, hidden0, steps)
    carry = (params, opt_state, hidden0, state, keep_init(keep_grads, params))
    xs = (inputs, targets, jnp.arange(steps))
    (params, opt_state, hidden, _, kept), (losses, grads) = run_loop(
        body, carry, xs, length=steps, loop=loop
    )
    grads = keep_result(keep_grads, kept, grads)
    return TrainResult(params, losses, grads, hidden, opt_state)


class _Forward:
    """Real-time recurrent learning: the state is ``S_{t-1} = dh_{t-1}/dp``, ``(B, H, P)``."""

    def init(self, params: RNNParams, hidden0: jax.Array, steps: int) -> jax.Array:
        flat, _ = ravel_pytree(params)
        return jnp.zeros((*hidden0.shape, flat.shape[0]), hidden0.dtype)

    def step(self, sens, params, hidden, x, t, adjoint, grad_now):
        """``S_t = dcell/dh S_{t-1} + dcell/dp`` as one batch of ``P`` JVPs."""
        del t
        flat, unravel = ravel_pytree(params)

        def tangent(dp, dh):
            return jax.jvp(lambda p, h: rnn_cell(unravel(p), h, x), (flat, hidden), (dp, dh))[1]

        basis = jnp.eye(flat.shape[0], dtype=flat.dtype)
        sens = jax.vmap(tangent, in_axes=(0, -1), out_axes=-1)(basis, sens)
        through_hidden = unravel(jnp.einsum("bh,bhp->p", adjoint, sens))
        return jax.tree.map(jnp.add, grad_now, through_hidden), sens


class _Reverse:
    """Re-differentiates the stored history: the state is every ``(p_s, h_{s-1})``."""

    def __init__(self, inputs: jax.Array, loop: str | Loop):
        self.inputs = inputs
        self.loop = loop

    def init(self, params: RNNParams, hidden0: jax.Array, steps: int):
        params_hist = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), params)
        return params_hist, jnp.zeros((steps, *hidden0.shape), hidden0.dtype)

    def step(self, history, params, hidden, x, t, adjoint, grad_now):
        """Stores step ``t``, then runs the adjoint recursion over steps ``t, ..., 0``."""
        del x
        params_hist, hidden_hist = history
        params_hist = jax.tree.map(lambda buf, p: buf.at[t].set(p), params_hist, params)
        hidden_hist = hidden_hist.at[t].set(hidden)  # h_{t-1}, the input of step t
        steps = hidden_hist.shape[0]

        def backward_step(acc, past):
            adjoint, grads = acc
            p_s, h_prev, x_s, s = past
            _, pullback = jax.vjp(lambda p, h: rnn_cell(p, h, x_s), p_s, h_prev)
            grad_p, grad_h = pullback(adjoint)
            live = s <= t  # steps after t are not in L_t's graph yet
            grads = jax.tree.map(lambda g, d: jnp.where(live, g + d, g), grads, grad_p)
            return (jnp.where(live, grad_h, adjoint), grads), None

        past = (params_hist, hidden_hist, self.inputs, jnp.arange(steps))
        (_, grads), _ = run_loop(
            backward_step, (adjoint, grad_now), past, length=steps, loop=self.loop, reverse=True
        )
        return grads, (params_hist, hidden_hist)
