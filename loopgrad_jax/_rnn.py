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
from loopgrad_jax._cell import Cell
from loopgrad_jax._precision import matmul_t


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
    h, joined = params.i2h_weight.shape
    x, hidden = jnp.asarray(x), jnp.asarray(hidden)
    _checks.shape("x", x, (None, joined - h), f"(B, I) with I={joined - h}")
    _checks.shape("hidden", hidden, (x.shape[0], h), f"(B, H) with B={x.shape[0]}, H={h}")
    # i2h(concat([x, h])) = x W_x^T + h W_h^T + b, with W = [W_x, W_h]: the same sum
    # without building the concatenation, which at the article's size (B=1, I=10, H=5)
    # cost most of a scan step's time (its gradient at T=1000: 1.75 ms against 0.66 ms).
    w_x, w_h = params.i2h_weight[:, : x.shape[1]], params.i2h_weight[:, x.shape[1] :]
    return jnp.tanh(matmul_t(x, w_x, None) + matmul_t(hidden, w_h, None) + params.i2h_bias[None, :])


def step_loss(params: RNNParams, hidden: jax.Array, target: jax.Array) -> jax.Array:
    """``mean((h2o(hidden) - target) ** 2)``, the article's per-step loss."""
    return jnp.mean((article_readout(params, hidden) - target) ** 2)


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
    return jnp.tanh(projected + matmul_t(hidden, w_h, None))


def article_readout(params: RNNParams, hidden: jax.Array) -> jax.Array:
    """``h2o(hidden)``: the article's output, ``(B, O)``."""
    return matmul_t(hidden, params.h2o_weight, None) + params.h2o_bias[None, :]


#: The article's ``SimpleRNN`` as a :class:`~loopgrad_jax.Cell`.
ARTICLE_CELL = Cell(rnn_cell, article_readout, input_projection, hoisted_cell)


def check_article_args(
    params: RNNParams,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike | None,
    hidden0: jax.typing.ArrayLike | None,
) -> tuple[RNNParams, jax.Array, jax.Array | None, jax.Array, RNNSizes]:
    """Validates the RNN arguments against each other; fills in ``hidden0``.

    ``targets=None`` skips the targets (a ``loss_fn`` checks its own).
    """
    if not isinstance(params, RNNParams):
        raise TypeError(
            f"params must be an RNNParams(i2h_weight, i2h_bias, h2o_weight, h2o_bias), "
            f"got {type(params).__name__}."
        )
    params = RNNParams(
        *(_checks.float_array(f"params.{f}", v) for f, v in params._asdict().items())
    )
    inputs = _checks.float_array("inputs", inputs)
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
    if targets is not None:
        targets = _checks.float_array("targets", targets)
        meaning = f"(T, B, O) with T={t}, B={b} from inputs, O={o}"
        _checks.shape("targets", targets, (t, b, o), meaning)
    if hidden0 is None:
        hidden0 = _checks.batch_zeros((b, h), inputs.dtype, inputs)
    hidden0 = _checks.float_array("hidden0", hidden0)
    _checks.shape("hidden0", hidden0, (b, h), f"(B, H) with B={b} from inputs, H={h} from params")
    _checks.same_dtype(
        [
            *((f"params.{f}", v) for f, v in params._asdict().items()),
            ("inputs", inputs),
            *([] if targets is None else [("targets", targets)]),
            ("hidden0", hidden0),
        ]
    )
    return params, inputs, targets, hidden0, RNNSizes(t, b, i, h, o)
