"""PyTorch's module call: :func:`rnn`, ``outputs, h_n = module(inputs, h_0)``.

:func:`bind_module` checks the arguments once, at the door, and returns a
:class:`BoundModule` in the library's layout (time-major, batched); :func:`rnn` runs
it with any loop kind and returns the results in the caller's layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from loopgrad_jax import _checks
from loopgrad_jax._cells import cudnn
from loopgrad_jax._cells.layers import module_forward
from loopgrad_jax._cells.params import (
    CellParams,
    bind_precision,
    check_hidden0,
    check_params,
    set_precision,
    to_carry,
    to_public,
)
from loopgrad_jax._loops import Loop, compiled, require_reverse

PyTree = Any


class BoundModule(NamedTuple):
    """A module call's checked arguments, in the library's layout."""

    params: CellParams
    inputs: jax.Array  # (T, B, I): time-major and batched, whatever the caller gave
    hidden0: PyTree  # PyTorch's (D*L, B, H_out), and (h0, c0) for an LSTM
    lengths: jax.Array | None  # (B,) integers, or None
    dropout_key: jax.Array | None
    batch_first: bool  # static: the caller's layout
    unbatched: bool  # static: the caller gave (T, I)


def bind_module(
    params: object,
    inputs: jax.typing.ArrayLike,
    hidden0: PyTree | None,
    lengths: jax.typing.ArrayLike | None,
    batch_first: bool | None,
    dropout_key: jax.Array | None,
) -> BoundModule:
    """Validates a module call's arguments against each other; raises naming what is wrong."""
    if not isinstance(params, CellParams):
        raise TypeError(
            "params must be a CellParams of PyTorch's nn.RNN / nn.LSTM / nn.GRU or a cell "
            "module (lg.init_cell, lg.from_torch); the article's SimpleRNN (RNNParams) is "
            f"no PyTorch module: run it with lg.rnn_loss, got {type(params).__name__}."
        )
    params, sizes = check_params(params)
    if batch_first is None:
        batch_first = params.batch_first
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool or None, got {batch_first!r}.")
    inputs = _checks.float_array("inputs", inputs)
    i = sizes["input"]
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if inputs.ndim not in (2, 3) or inputs.shape[-1] != i or 0 in inputs.shape:
        raise ValueError(
            f"inputs must have shape {layout} (batch_first={batch_first}) or, unbatched, "
            f"(T, I), with I={i} and T, B >= 1, got shape {tuple(inputs.shape)}."
        )
    unbatched = inputs.ndim == 2
    if unbatched:
        inputs = inputs[:, None, :]
    elif batch_first:
        inputs = jnp.swapaxes(inputs, 0, 1)
    t, b = inputs.shape[:2]
    lengths = _check_lengths(lengths, t, b, unbatched, batch_first, inputs)
    states = sizes["layers"] * sizes["directions"]
    if unbatched and hidden0 is not None:
        hidden0 = jax.tree.map(lambda a: jnp.asarray(a)[:, None, :], hidden0)
    hidden0 = _check_hidden0(params.kind, hidden0, states, b, sizes, inputs, batch_first)
    _checks.same_dtype(
        [
            *((f"params{jax.tree_util.keystr(p)}", v) for p, v in _leaves(params)),
            ("inputs", inputs),
            *((f"hidden0{jax.tree_util.keystr(p)}", v) for p, v in _leaves(hidden0)),
        ]
    )
    if dropout_key is not None:
        if not isinstance(dropout_key, jax.Array) or not (
            jnp.issubdtype(dropout_key.dtype, jax.dtypes.prng_key)
            or (dropout_key.dtype == jnp.uint32 and dropout_key.shape == (2,))
        ):
            raise TypeError(
                "dropout_key must be a JAX random key (jax.random.key(seed), or the raw "
                f"uint32 (2,) of jax.random.PRNGKey), got {_describe(dropout_key)}."
            )
    return BoundModule(params, inputs, hidden0, lengths, dropout_key, batch_first, unbatched)


def _check_lengths(lengths, t, b, unbatched, batch_first, inputs) -> jax.Array | None:
    if lengths is None:
        return None
    if unbatched:
        raise ValueError(
            "lengths give each example of a batch its number of steps; unbatched inputs (T, I) "
            "have one example of T steps: leave lengths out, or pass inputs (T, 1, I)."
        )
    shape = getattr(lengths, "shape", None) or jnp.shape(lengths)
    other = inputs.shape[0]  # the axis batch_first says is time
    if len(shape) == 1 and shape[0] != b and shape[0] == other and other != b:
        raise ValueError(
            f"lengths has {shape[0]} entries, one per example, but inputs of shape "
            f"{tuple(jnp.swapaxes(inputs, 0, 1).shape if batch_first else inputs.shape)} hold "
            f"B={b} with batch_first={batch_first}: their layout looks like "
            f"batch_first={not batch_first}; pass batch_first={not batch_first}."
        )
    return _checks.check_lengths(lengths, t, b)


def _check_hidden0(kind, hidden0, states, b, sizes, inputs, batch_first) -> PyTree:
    try:
        return check_hidden0(
            kind, hidden0, states, b, sizes["hidden"], inputs.dtype, inputs, state=sizes["state"]
        )
    except ValueError as err:
        # hidden0 tells B; inputs whose other leading axis is B were laid out the other way.
        given = jax.tree.leaves(hidden0)
        if given and jnp.ndim(given[0]) == 3 and jnp.shape(given[0])[1] == inputs.shape[0] != b:
            raise ValueError(
                f"{err} Its batch axis, {inputs.shape[0]}, is the inputs' "
                f"{'batch' if not batch_first else 'time'} axis with batch_first="
                f"{not batch_first}: pass batch_first={not batch_first}."
            ) from err
        raise


def _leaves(tree: PyTree) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _describe(value: Any) -> str:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None:
        return f"{type(value).__name__} {value!r}"
    return f"an array of shape {tuple(shape)} and dtype {dtype}"


def rnn(
    params: CellParams,
    inputs: jax.typing.ArrayLike,
    hidden0: PyTree | None = None,
    *,
    lengths: jax.typing.ArrayLike | None = None,
    batch_first: bool | None = None,
    loop: str | Loop = "scan",
    dropout_key: jax.Array | None = None,
    precision: object = None,
) -> tuple[jax.Array, PyTree]:
    """PyTorch's module forward, exactly: ``outputs, h_n`` (``outputs, (h_n, c_n)``).

    ``lg.rnn(params, inputs, hidden0)`` is ``module(inputs, hidden0)`` for the
    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` whose weights ``params`` holds (the head,
    if any, is not applied: it is yours, with your loss). With ``lengths`` it is::

      packed = pack_padded_sequence(inputs, lengths, batch_first, enforce_sorted=False)
      outputs, h_n = module(packed, hidden0)
      outputs, _ = pad_packed_sequence(outputs, batch_first, total_length=T)

    so outputs are zero from step ``lengths[b]`` on, the forward direction's final
    state is the one after step ``lengths[b] - 1``, and the reverse direction starts
    there. Layouts are PyTorch's: ``inputs`` ``(T, B, I)``, ``(B, T, I)`` with
    ``batch_first``, or unbatched ``(T, I)``; ``outputs`` ``(T, B, D * H_out)`` in the
    same layout (``H_out`` is an LSTM's ``proj_size`` if it has one, else ``H``);
    ``h_n`` ``(D * num_layers, B, H_out)``, layer ``l``'s direction ``d`` at
    ``l * D + d``, and an LSTM's ``c_n`` ``(D * num_layers, B, H)`` (no ``B`` axis for
    unbatched inputs). A cell module (``nn.LSTMCell`` ...) runs over the sequence as a
    Python loop calling it would, its states in the one-layer module's layout.

    ``jax.grad``, ``jax.jit`` and ``jax.vmap`` go through it with every loop kind that
    runs reverse mode, for any loss of the outputs and final states.

    Args:
      params: a :class:`CellParams` (:func:`loopgrad_jax.from_torch`,
        :func:`loopgrad_jax.init_cell`).
      inputs: the sequence, in the layout above.
      hidden0: PyTorch's ``h_0`` (``(h_0, c_0)`` for an LSTM); zeros when ``None``.
      lengths: ``(B,)`` integers in ``1..T``, any order: each example's number of real
        steps. A traced one outside ``1..T`` makes every output NaN, and its gradients.
      batch_first: the layout of ``inputs`` and ``outputs``; ``None`` takes the
        module's own (``params.batch_first``, read by ``from_torch``).
      loop: any loop kind that runs reverse mode (:data:`loopgrad_jax.REVERSE_LOOPS`,
        ``"while:max_steps=N"``, the ``nnx_*`` kinds), as text or a :class:`Loop`; or,
        for an LSTM on a CUDA GPU, ``"cudnn"`` (:data:`loopgrad_jax.FUSED_LOOPS`): the
        whole module in cuDNN's fused kernel, ``jax.experimental.rnn.lstm``, float32,
        no ``proj_size``, ``precision`` or ``dropout_key`` (each refused by name).
      dropout_key: a JAX random key: dropout between layers at ``params.dropout``,
        as the module applies it in training mode (inverted dropout on every layer's
        outputs but the last; the same key gives the same masks). ``None``: no
        dropout, the module in eval mode.
      precision: ``None`` (every operation in the parameters' dtype, as without it),
        ``"bf16"`` or a :class:`loopgrad_jax.Precision`: mixed precision. Under
        ``"bf16"`` the parameters must be float32 (as must ``inputs`` and
        ``hidden0``); every matrix product rounds its operands to bfloat16 and
        accumulates in float32, and the rest (biases, gates, the hidden and cell
        state, ``outputs``) is float32: PyTorch's ``torch.autocast("cpu",
        torch.bfloat16)`` on the products, with the state kept float32 each step
        (``tests/test_precision.py`` says where the two differ).

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> p = lg.init_cell(jax.random.key(0), "gru", input_size=3, hidden_size=4,
      ...                  num_layers=2)
      >>> x = jnp.ones((5, 2, 3), jnp.float32)
      >>> outputs, h_n = lg.rnn(p, x, lengths=jnp.array([5, 2]))
      >>> outputs.shape, h_n.shape, float(jnp.abs(outputs[2:, 1]).max())
      ((5, 2, 4), (2, 2, 4), 0.0)
    """
    loop = require_reverse(loop, "lg.rnn")
    policy = bind_precision(precision, params)
    bound = bind_module(params, inputs, hidden0, lengths, batch_first, dropout_key)
    params = set_precision(bound.params, policy)
    if loop.kind == cudnn.KIND:
        cudnn.check(params, bound.inputs, needed_by="lg.rnn", dropout_key=dropout_key)
    return _rnn(
        params,
        bound.inputs,
        bound.hidden0,
        bound.lengths,
        bound.dropout_key,
        loop=loop,
        batch_first=bound.batch_first,
        unbatched=bound.unbatched,
    )


@compiled("loop", "batch_first", "unbatched")
def _rnn(params, inputs, hidden0, lengths, dropout_key, *, loop, batch_first, unbatched):
    carry0 = to_carry(params.kind, hidden0)
    live = None if lengths is None else jnp.arange(inputs.shape[0])[:, None] < lengths[None, :]
    if loop.kind == cudnn.KIND:
        finals, outputs = cudnn.module_forward(params, inputs, carry0, live=live)
    else:
        finals, outputs = module_forward(
            params, inputs, carry0, loop, live=live, dropout_key=dropout_key
        )
    h_n = to_public(params.kind, finals)
    if lengths is not None:  # a traced length outside 1..T: every result NaN
        bad = jnp.any((lengths < 1) | (lengths > inputs.shape[0]))
        poison = jnp.where(bad, jnp.nan, 1.0).astype(inputs.dtype)
        outputs, h_n = jax.tree.map(lambda a: a * poison, (outputs, h_n))
    if unbatched:
        return outputs[:, 0], jax.tree.map(lambda a: a[:, 0], h_n)
    if batch_first:
        outputs = jnp.swapaxes(outputs, 0, 1)
    return outputs, h_n
