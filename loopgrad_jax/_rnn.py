"""The article's scenario 3: ``SimpleRNN`` and its full-sequence loss.

Parameters use PyTorch's layout (a ``Linear`` weight is ``(out_features,
in_features)``), so PyTorch state dicts and fixtures load without transposes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopgrad_jax import _checks
from loopgrad_jax._loops import Loop, check_loop, compiled, run_loop


class RNNParams(NamedTuple):
    """The weights of the article's ``SimpleRNN``, in PyTorch's layout.

    ``i2h = nn.Linear(I + H, H)`` acts on ``concat([input, hidden])`` and
    ``h2o = nn.Linear(H, O)`` reads the new hidden state.
    """

    i2h_weight: jax.Array  # (H, I + H)
    i2h_bias: jax.Array  # (H,)
    h2o_weight: jax.Array  # (O, H)
    h2o_bias: jax.Array  # (O,)


class RNNSizes(NamedTuple):
    """Sizes read off validated arguments."""

    length: int  # T
    batch: int  # B
    input: int  # I
    hidden: int  # H
    output: int  # O


def init_rnn(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    output_size: int = 1,
    dtype: jnp.dtype = jnp.float32,
) -> RNNParams:
    """Draws weights from the distribution PyTorch's ``nn.Linear`` uses.

    Weights and biases of a ``Linear`` with ``fan_in`` inputs are uniform on
    ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (Kaiming-uniform with ``a=sqrt(5)``).

    Examples:
      >>> import jax, loopgrad_jax as lg
      >>> p = lg.init_rnn(jax.random.key(0), input_size=10, hidden_size=5)
      >>> [w.shape for w in p]
      [(5, 15), (5,), (1, 5), (1,)]
    """
    sizes = {"input_size": input_size, "hidden_size": hidden_size, "output_size": output_size}
    i, h, o = (_checks.static_length(name, v, minimum=1) for name, v in sizes.items())
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {jnp.dtype(dtype)}.")
    k = jax.random.split(key, 4)

    def uniform(key, shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return RNNParams(
        i2h_weight=uniform(k[0], (h, i + h), i + h),
        i2h_bias=uniform(k[1], (h,), i + h),
        h2o_weight=uniform(k[2], (o, h), h),
        h2o_bias=uniform(k[3], (o,), h),
    )


def rnn_cell(params: RNNParams, hidden: jax.Array, x: jax.Array) -> jax.Array:
    """One step of the article's ``SimpleRNN.forward``: the new hidden state.

    ``tanh(i2h(concat([x, hidden], axis=1)))`` for ``x (B, I)``, ``hidden (B, H)``.
    """
    combined = jnp.concatenate([x, hidden], axis=1)
    return jnp.tanh(combined @ params.i2h_weight.T + params.i2h_bias[None, :])


def step_loss(params: RNNParams, hidden: jax.Array, target: jax.Array) -> jax.Array:
    """``mean((h2o(hidden) - target) ** 2)``, the article's per-step loss."""
    output = hidden @ params.h2o_weight.T + params.h2o_bias[None, :]
    return jnp.mean((output - target) ** 2)


def input_projection(params: RNNParams, inputs: jax.Array) -> jax.Array:
    """``inputs @ W_x^T + b`` for every time step at once: ``(T, B, I) -> (T, B, H)``.

    ``W_x = i2h_weight[:, :I]`` is the part of ``i2h`` that reads the input; it
    does not depend on the hidden state, so it can leave the loop.
    """
    w_x = params.i2h_weight[:, : inputs.shape[-1]]
    return jnp.einsum("tbi,hi->tbh", inputs, w_x) + params.i2h_bias[None, None, :]


def hoisted_cell(params: RNNParams, hidden: jax.Array, projected: jax.Array) -> jax.Array:
    """:func:`rnn_cell` given the step's :func:`input_projection`: ``tanh(u + h W_h^T)``."""
    w_h = params.i2h_weight[:, params.i2h_weight.shape[1] - hidden.shape[1] :]
    return jnp.tanh(projected + hidden @ w_h.T)


def rnn_forward(
    params: RNNParams,
    inputs: jax.Array,
    targets: jax.Array,
    hidden0: jax.Array,
    *,
    loop: str | Loop,
    hoist_input: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Runs the RNN over the sequence: ``(final_hidden, losses (T,))``.

    Plain-Python semantics::

      hidden, losses = hidden0, []
      for t in range(T):
        hidden = rnn_cell(params, hidden, inputs[t])
        losses.append(step_loss(params, hidden, targets[t]))
      return hidden, stack(losses)

    With ``hoist_input`` the input half of ``i2h`` runs as one matrix product
    before the loop (:func:`input_projection`) and only the recurrent product
    stays inside; the result is the same up to the order of floating-point sums.
    """
    cell, xs = rnn_cell, inputs
    if hoist_input:
        cell, xs = hoisted_cell, input_projection(params, inputs)

    def body(hidden, xy):
        x, y = xy
        hidden = cell(params, hidden, x)
        return hidden, step_loss(params, hidden, y)

    return run_loop(body, hidden0, (xs, targets), length=inputs.shape[0], loop=loop)


def rnn_loss(
    params: RNNParams,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    hidden0: jax.typing.ArrayLike | None = None,
    loop: str | Loop = "scan",
    hoist_input: bool = False,
) -> jax.Array:
    """The summed per-step loss over a whole sequence.

    Plain-Python semantics::

      hidden, total = hidden0, 0
      for t in range(T):
        hidden = tanh(i2h(concat([inputs[t], hidden])))
        total += mean((h2o(hidden) - targets[t]) ** 2)
      return total

    ``jax.grad`` of it is full backpropagation through time: what PyTorch's
    single ``loss.backward()`` after the loop computes. It runs as one
    ``jax.jit``-compiled function per shapes and options, so repeated calls,
    eager ones included, compile once (``loop="python"`` runs as a Python loop).

    Args:
      params: :class:`RNNParams`.
      inputs: ``(T, B, I)``.
      targets: ``(T, B, O)``.
      hidden0: ``(B, H)``; zeros when ``None``.
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its text form.
      hoist_input: compute the input projection of all steps as one matrix
        product before the loop; only the recurrent product stays inside.

    Returns:
      A scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> p = lg.init_rnn(jax.random.key(0), input_size=3, hidden_size=4)
      >>> x, y = jnp.ones((6, 2, 3), jnp.float32), jnp.zeros((6, 2, 1), jnp.float32)
      >>> grads = jax.grad(lg.rnn_loss)(p, x, y, loop="fori")
      >>> grads.i2h_weight.shape
      (4, 7)
    """
    params, inputs, targets, hidden0, _ = check_rnn_args(params, inputs, targets, hidden0)
    if not isinstance(hoist_input, bool):
        raise TypeError(f"hoist_input must be a bool, got {type(hoist_input).__name__}.")
    return _rnn_loss(
        params, inputs, targets, hidden0, loop=check_loop(loop), hoist_input=hoist_input
    )


@compiled("loop", "hoist_input")
def _rnn_loss(params, inputs, targets, hidden0, *, loop: Loop, hoist_input: bool) -> jax.Array:
    """:func:`rnn_loss` after its checks: one compiled function per shapes and options."""
    _, losses = rnn_forward(params, inputs, targets, hidden0, loop=loop, hoist_input=hoist_input)
    return losses.sum()


def check_rnn_args(
    params: RNNParams,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    hidden0: jax.typing.ArrayLike | None,
) -> tuple[RNNParams, jax.Array, jax.Array, jax.Array, RNNSizes]:
    """Validates the RNN arguments against each other; fills in ``hidden0``."""
    if not isinstance(params, RNNParams):
        raise TypeError(
            f"params must be an RNNParams(i2h_weight, i2h_bias, h2o_weight, h2o_bias), "
            f"got {type(params).__name__}."
        )
    params = RNNParams(
        *(_checks.float_array(f"params.{f}", v) for f, v in params._asdict().items())
    )
    inputs = _checks.float_array("inputs", inputs)
    targets = _checks.float_array("targets", targets)
    _checks.shape("params.i2h_bias", params.i2h_bias, (None,), "(H,)")
    h = params.i2h_bias.shape[0]
    _checks.shape("params.i2h_weight", params.i2h_weight, (h, None), f"(H, I + H) with H={h}")
    i = params.i2h_weight.shape[1] - h
    if i < 1:
        raise ValueError(
            f"params.i2h_weight must have shape (H, I + H) with I >= 1 and H={h}, "
            f"got shape {tuple(params.i2h_weight.shape)}."
        )
    _checks.shape("params.h2o_weight", params.h2o_weight, (None, h), f"(O, H) with H={h}")
    o = params.h2o_weight.shape[0]
    _checks.shape("params.h2o_bias", params.h2o_bias, (o,), f"(O,) with O={o}")
    _checks.shape("inputs", inputs, (None, None, i), f"(T, B, I) with I={i} from params")
    t, b = inputs.shape[:2]
    if t < 1:
        raise ValueError(
            f"inputs must hold at least one time step (T >= 1), got shape {inputs.shape}."
        )
    _checks.shape("targets", targets, (t, b, o), f"(T, B, O) with T={t}, B={b} from inputs, O={o}")
    if hidden0 is None:
        hidden0 = jnp.zeros((b, h), inputs.dtype)
    hidden0 = _checks.float_array("hidden0", hidden0)
    _checks.shape("hidden0", hidden0, (b, h), f"(B, H) with B={b} from inputs, H={h} from params")
    _checks.same_dtype(
        [
            *((f"params.{f}", v) for f, v in params._asdict().items()),
            ("inputs", inputs),
            ("targets", targets),
            ("hidden0", hidden0),
        ]
    )
    return params, inputs, targets, hidden0, RNNSizes(t, b, i, h, o)
