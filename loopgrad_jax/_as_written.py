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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from loopgrad_jax._loops import Loop, run_loop
from loopgrad_jax._result import TrainResult, apply_optimizer
from loopgrad_jax._rnn import RNNSizes, rnn_cell, step_loss

#: A recurrent step ``cell(params, hidden, x) -> new_hidden``; ``hidden`` is ``(B, H)``.
Cell = Callable[[Any, jax.Array, Any], jax.Array]

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
    params, inputs, targets, hidden0, method, loop, optimizer, *, cell: Cell = rnn_cell
) -> TrainResult:
    """Runs the article's loop with ``method`` (``"forward"`` or ``"reverse"``).

    ``cell(params, hidden, x) -> hidden`` is the recurrent step (:func:`rnn_cell`);
    ``forward`` assumes it treats the rows of ``hidden`` and ``x`` independently.
    """
    steps = inputs.shape[0]
    gradient = _Forward(cell) if method == "forward" else _Reverse(cell, inputs, loop)

    def body(carry, xyt):
        params, opt_state, hidden, state = carry
        x, y, t = xyt
        new_hidden = cell(params, hidden, x)
        # dL_t/dp_t (this step's own use of the head and cell) and a_t = dL_t/dh_t.
        loss, (grad_now, adjoint) = jax.value_and_grad(step_loss, argnums=(0, 1))(
            params, new_hidden, y
        )
        grads, state = gradient.step(state, params, hidden, x, t, adjoint, grad_now)
        params, opt_state = apply_optimizer(optimizer, grads, opt_state, params)
        return (params, opt_state, new_hidden, state), (loss, grads)

    carry = (params, optimizer.init(params), hidden0, gradient.init(params, hidden0, steps))
    xs = (inputs, targets, jnp.arange(steps))
    (params, _, hidden, _), (losses, grads) = run_loop(body, carry, xs, length=steps, loop=loop)
    return TrainResult(params=params, losses=losses, grads=grads, hidden=hidden)


def cell_jacobians(cell: Cell, params, hidden: jax.Array, x) -> tuple[Any, jax.Array]:
    """Each example's ``dcell/dp`` and ``dcell/dh``, by reverse mode over its ``H`` outputs.

    Returns ``(jac_p, jac_h)``: ``jac_p`` is shaped like ``params`` with every
    leaf ``(B, H, *leaf.shape)``, and ``jac_h`` is ``(B, H, H)``. As plain Python::

      for b in range(B):
        new = lambda p, h: cell(p, h[None], x[b][None])[0]       # (H,)
        jac_p[b], jac_h[b] = d new / d p, d new / d h   at (params, hidden[b])

    This is the whole Jacobian of ``cell`` only if row ``b`` of the new hidden
    state depends on row ``b`` of ``hidden`` and ``x`` alone, as in every
    recurrent cell without batch statistics; the cross-example blocks are taken
    to be zero. ``H`` VJPs of one example each cost ``B`` times less than
    ``B*H`` VJPs of the whole batch.
    """

    def one_example(params, h, x):
        return cell(params, h[None], jax.tree.map(lambda a: a[None], x))[0]

    jacobians = jax.vmap(jax.jacrev(one_example, argnums=(0, 1)), in_axes=(None, 0, 0))
    return jacobians(params, hidden, x)


class _Forward:
    """Real-time recurrent learning: the state is ``S_{t-1} = dh_{t-1}/dp``.

    ``S`` is shaped like the parameters, every leaf ``(B, H, *leaf.shape)``:
    ``B*H*P`` numbers. One block per leaf (rather than one ``(B, H, P)`` array)
    saves concatenating the Jacobian's blocks every step, which XLA's CPU
    backend does slowly.
    """

    def __init__(self, cell: Cell):
        self.cell = cell

    def init(self, params, hidden0: jax.Array, steps: int):
        return jax.tree.map(lambda a: jnp.zeros((*hidden0.shape, *a.shape), a.dtype), params)

    def step(self, sens, params, hidden, x, t, adjoint, grad_now):
        """``S_t = dcell/dh S_{t-1} + dcell/dp`` and ``g_t = dL_t/dp_t + a_t^T S_t``."""
        del t
        jac_p, jac_h = cell_jacobians(self.cell, params, hidden, x)

        def update(s, direct):  # (B, H, ...) blocks; one batched (H, H) x (H, n) product
            return jnp.einsum("bkj,bj...->bk...", jac_h, s) + direct

        sens = jax.tree.map(update, sens, jac_p)
        grads = jax.tree.map(
            lambda g, s: g + jnp.einsum("bh,bh...->...", adjoint, s), grad_now, sens
        )
        return grads, sens


class _Reverse:
    """Re-differentiates the stored history: the state is every ``(p_s, h_{s-1})``."""

    def __init__(self, cell: Cell, inputs: jax.Array, loop: str | Loop):
        self.cell = cell
        self.inputs = inputs
        self.loop = loop

    def init(self, params, hidden0: jax.Array, steps: int):
        params_hist = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), params)
        return params_hist, jnp.zeros((steps, *hidden0.shape), hidden0.dtype)

    def step(self, history, params, hidden, x, t, adjoint, grad_now):
        """Stores step ``t``, then runs the adjoint recursion over steps ``t, ..., 0``.

        The loop runs over all ``T`` slots (its length must be static), from the last
        to the first; a ``lax.cond`` skips the slots after ``t``, which hold no step
        yet, so only ``t + 1`` cell VJPs run and nothing is evaluated on empty slots.
        """
        del x
        params_hist, hidden_hist = history
        params_hist = jax.tree.map(lambda buf, p: buf.at[t].set(p), params_hist, params)
        hidden_hist = hidden_hist.at[t].set(hidden)  # h_{t-1}, the input of step t
        steps = hidden_hist.shape[0]

        def backward_step(acc, past):
            p_s, h_prev, x_s, s = past

            def through_step(acc):
                adjoint, grads = acc
                _, pullback = jax.vjp(lambda p, h: self.cell(p, h, x_s), p_s, h_prev)
                grad_p, grad_h = pullback(adjoint)
                return grad_h, jax.tree.map(jnp.add, grads, grad_p)

            # Steps after t are not in L_t's graph yet.
            return lax.cond(s <= t, through_step, lambda acc: acc, acc), None

        past = (params_hist, hidden_hist, self.inputs, jnp.arange(steps))
        (_, grads), _ = run_loop(
            backward_step, (adjoint, grad_now), past, length=steps, loop=self.loop, reverse=True
        )
        return grads, (params_hist, hidden_hist)
