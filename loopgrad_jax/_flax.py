"""Every cell kind as a Flax NNX model: PyTorch's weights in ``nnx.Module``\\ s, and back.

:func:`to_flax` builds an :class:`FlaxRNN` from the library's params (the article's
:class:`~loopgrad_jax.RNNParams` or a :class:`~loopgrad_jax.CellParams`), one
``nnx.RNN`` per layer and an ``nnx.Linear`` head; :func:`from_flax` maps a model (or a
gradient merged into one) back. Which cell each kind gets:

==========  ===============================  ==========================================
kind        ``cells="torch"`` (default)      ``cells="flax"`` (Flax's built-in cells)
==========  ===============================  ==========================================
article     ``nnx.SimpleCell`` (exact: the article's ``i2h`` has one bias)
rnn_tanh    :class:`TorchCell`               ``nnx.SimpleCell``, bias ``b_ih + b_hh``
rnn_relu    :class:`TorchCell`               ``nnx.SimpleCell(activation_fn=nnx.relu)``
lstm        :class:`TorchCell`               ``nnx.OptimizedLSTMCell``, bias ``b_ih + b_hh``
gru         :class:`TorchCell`               ``nnx.GRUCell``, bias ``b_ih + (b_hr, b_hz, 0)``;
                                             refuses ``b_hn != 0``
==========  ===============================  ==========================================

Flax's cells keep one bias where PyTorch keeps two: the forward pass and the gradient
are the same (``d loss / d b`` is the gradient of either of PyTorch's biases), but SGD
steps PyTorch's two biases each by ``lr * g``, so their sum moves twice as far: a
different trajectory. ``nnx.GRUCell`` has no ``b_hn`` inside ``r * (W_hn h + b_hn)`` at
all. :class:`TorchCell` keeps PyTorch's four parameters and reproduces its training
runs exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopgrad_jax import _cells, _checks
from loopgrad_jax._cell import REDUCTIONS, Cell, LossFn, reduce_losses
from loopgrad_jax._cells import TORCH_CELLS, CellParams, LayerParams
from loopgrad_jax._loops import Loop, check_loop, compiled, run_loop
from loopgrad_jax._precision import (
    Precision,
    check_param_dtypes,
    check_precision,
    matmul,
    matmul_t,
)
from loopgrad_jax._result import TrainResult
from loopgrad_jax._rnn import RNNParams
from loopgrad_jax._sequence import check_loss_fn, every_step_loss, step_weights
from loopgrad_jax._train import train_rnn

PyTree = Any

#: Values of ``to_flax(cells=...)``: PyTorch's parameterisation, or Flax's built-in cells.
CELL_SETS: tuple[str, ...] = ("torch", "flax")
#: ``nnx.LSTMCell``'s eight Linears, input side and hidden side, in the gate order i, f, g, o.
_LSTM_LINEARS = {"input": ("ii", "if_", "ig", "io"), "hidden": ("hi", "hf", "hg", "ho")}


class TorchCell(nnx.RNNCellBase):
    """One layer of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` with PyTorch's four parameters.

    ``weight_ih`` ``(G*H, I)``, ``weight_hh`` ``(G*H, H)``, ``bias_ih`` and ``bias_hh``
    ``(G*H,)``, named and laid out as in PyTorch's state dict, each an ``nnx.Param``;
    an LSTM with ``proj_size=P`` also ``weight_hr`` ``(P, H)``. One step is PyTorch's (see
    :mod:`loopgrad_jax._cells.equations`); the carry is ``h`` ``(B, H)``, or for an LSTM
    the pair ``(h, c)`` in PyTorch's order (Flax's LSTM cells carry ``(c, h)``), ``h``
    then ``(B, P)`` with a projection. ``__call__(carry, x)`` returns ``(new carry, new
    h)``, as Flax's cells do.
    """

    def __init__(self, kind: str, layer: LayerParams):
        self.kind = _checks.one_of("kind", kind, TORCH_CELLS)
        self.in_features = layer.weight_ih.shape[1]
        self.hidden_features = layer.weight_hh.shape[0] // _cells.GATES[self.kind]  # H
        self.state_features = layer.weight_hh.shape[1]  # h's width: P with a projection
        self.weight_ih = nnx.Param(jnp.asarray(layer.weight_ih))
        self.weight_hh = nnx.Param(jnp.asarray(layer.weight_hh))
        # A bias-free layer (PyTorch's bias=False) holds no bias parameter at all.
        self.bias_ih = _param_or_none(layer.bias_ih)
        self.bias_hh = _param_or_none(layer.bias_hh)
        self.weight_hr = _param_or_none(layer.weight_hr)

    def __call__(self, carry: Any, inputs: jax.Array) -> tuple[Any, jax.Array]:
        return self.step(carry, inputs)

    def step(
        self, carry: Any, inputs: jax.Array, policy: Precision | None = None
    ) -> tuple[Any, jax.Array]:
        """``__call__``; under ``policy`` (``flax_train(precision=)``) each product is
        :func:`loopgrad_jax._precision.matmul_t`'s, as the library's own cells compute it."""
        lead = tuple(range(inputs.ndim - 1))  # the batch axes
        gi = matmul_t(inputs, self.weight_ih[...], policy)
        b_hh = None
        if self.bias_ih is not None:
            gi = gi + jnp.expand_dims(self.bias_ih[...], lead)
            b_hh = jnp.expand_dims(self.bias_hh[...], lead)
        w_hr = _value_or_none(self.weight_hr)
        return _cells.layer_step(self.kind, self.weight_hh[...], b_hh, carry, gi, w_hr, policy)

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None) -> Any:
        batch, dtype = input_shape[:-1], self.weight_hh.dtype
        h = jnp.zeros((*batch, self.state_features), dtype)
        return (h, jnp.zeros((*batch, self.hidden_features), dtype)) if self.kind == "lstm" else h

    @property
    def num_feature_axes(self) -> int:
        return 1


def _param_or_none(value: jax.Array | None) -> nnx.Param | None:
    return None if value is None else nnx.Param(jnp.asarray(value))


def _value_or_none(variable: nnx.Param | None) -> jax.Array | None:
    return None if variable is None else variable[...]


class FlaxRNN(nnx.Module):
    """A stack of recurrent layers and a linear head, in Flax NNX; built by :func:`to_flax`.

    ``model(inputs, hidden0=None, lengths=None)`` runs each layer over the whole
    sequence with ``nnx.RNN`` (``nnx.scan`` over its cell), or for a bidirectional
    model ``nnx.Bidirectional`` (a forward and a reverse ``nnx.RNN``, their outputs
    concatenated as PyTorch does), and returns the head's output at every step,
    ``(T, B, O)``, or without a head the last layer's outputs ``(T, B, D*H_out)``.
    :meth:`module_outputs` returns what PyTorch's module does: ``(outputs, h_n)``.
    In plain Python (one direction)::

      x = inputs                                       # (T, B, I), time-major
      for layer, carry in zip(layers, carries of hidden0):
        hs = []
        for t in range(T):
          carry, h = layer.cell(carry, x[t]); hs.append(h)
        x = stack(hs)                                  # (T, B, H)
      return head(x)                                   # (T, B, O)

    ``lengths`` ``(B,)`` is ``nnx.RNN``'s ``seq_lengths``, with PyTorch's packed
    semantics: the final state is the one after step ``lengths[b] - 1``, the reverse
    direction starts there (``nnx.RNN(reverse=True, keep_order=True)`` flips each
    example's real steps only), and the outputs at padded steps are zero.

    Attributes:
      kind: one of :data:`loopgrad_jax.CELLS` (static).
      bidirectional: whether each layer is an ``nnx.Bidirectional`` (static).
      layers: an ``nnx.List`` of ``nnx.RNN`` (or ``nnx.Bidirectional``), one per layer.
      head: an ``nnx.Linear(D*H_out, O)``, or ``None``.

    The model holds only ``nnx.Param`` variables (its layers keep no RNG stream), so
    ``nnx.state(model)`` is its weights. It is time-major whatever ``params.batch_first``
    says, and runs without dropout (PyTorch's eval mode). ``hidden0`` is in the
    library's layout, as :func:`loopgrad_jax.rnn` takes it: ``(B, H)`` for the
    article's model, PyTorch's ``(D*num_layers, B, H_out)`` otherwise (the pair
    ``(h0, c0)`` for an LSTM); zeros when ``None``.
    """

    def __init__(
        self,
        cells: Sequence[nnx.RNNCellBase],
        head: nnx.Linear | None,
        *,
        kind: str,
        unroll: int = 1,
        bidirectional: bool = False,
    ):
        self.kind = _checks.one_of("kind", kind, _cells.CELLS)
        self.unroll = _checks.static_length("unroll", unroll, minimum=1)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}.")
        self.bidirectional = bidirectional
        rnns = [
            nnx.RNN(cell, time_major=True, return_carry=True, unroll=self.unroll, rngs=False)
            for cell in cells
        ]
        if bidirectional:
            if len(rnns) % 2:
                raise ValueError(
                    "cells of a bidirectional model hold each layer's forward and reverse "
                    f"cell, so an even number, got {len(rnns)}."
                )
            rnns = [
                nnx.Bidirectional(f, b, time_major=True, return_carry=True, rngs=False)
                for f, b in zip(rnns[::2], rnns[1::2], strict=True)
            ]
        self.layers = nnx.List(rnns)
        self.head = head

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def cells(self) -> list[nnx.RNNCellBase]:
        """Every layer's cells in the params' order (layer ``l``'s direction ``d`` at ``l*D+d``)."""
        return [rnn.cell for layer in self.layers for rnn in _directions(layer)]

    @property
    def hidden_size(self) -> int:
        return self.cells[0].hidden_features

    @property
    def state_size(self) -> int:
        """``H_out``: the width of ``h`` (an LSTM's ``proj_size``, else ``H``)."""
        cell = self.cells[0]
        return getattr(cell, "state_features", cell.hidden_features)

    @property
    def output_size(self) -> int:
        """The width of the model's output: the head's ``O``, or ``D*H_out`` without one."""
        return self.directions * self.state_size if self.head is None else self.head.out_features

    def __call__(
        self, inputs: jax.Array, hidden0: Any = None, lengths: jax.Array | None = None
    ) -> jax.Array:
        outputs, _ = self.module_outputs(inputs, hidden0, lengths)
        return outputs if self.head is None else self.head(outputs)

    def module_outputs(
        self, inputs: jax.Array, hidden0: Any = None, lengths: jax.Array | None = None
    ) -> tuple[jax.Array, Any]:
        """``(outputs, h_n)`` as :func:`loopgrad_jax.rnn` returns them (time-major).

        ``outputs`` ``(T, B, D*H_out)`` are the last layer's, zero at padded steps;
        ``h_n`` is PyTorch's ``(D*num_layers, B, H_out)`` (``(h_n, c_n)`` for an
        LSTM), ``(B, H)`` for the article's model.
        """
        inputs = _checks.float_array("inputs", inputs)
        i = self.cells[0].in_features
        _checks.shape("inputs", inputs, (None, None, i), f"(T, B, I) with I={i}, time-major")
        lengths = _checks.check_lengths(lengths, *inputs.shape[:2])
        outputs, finals = _run_layers(self, inputs, self.carries(inputs, hidden0), lengths)
        h_n = self.hidden_of(finals)
        if lengths is not None:  # a traced length outside 1..T: every result NaN, as lg.rnn
            bad = jnp.any((lengths < 1) | (lengths > inputs.shape[0]))
            poison = jnp.where(bad, jnp.nan, 1.0).astype(inputs.dtype)
            outputs, h_n = jax.tree.map(lambda a: a * poison, (outputs, h_n))
        return outputs, h_n

    def carries(self, inputs: jax.Array, hidden0: Any = None) -> tuple:
        """The per-layer carries of ``hidden0`` (library layout), each in its cell's layout;
        a bidirectional layer's is the pair (forward, reverse)."""
        dtype = inputs.dtype
        b, h = inputs.shape[1], self.hidden_size
        if self.kind == "article":
            if hidden0 is None:
                return (jnp.zeros((b, h), dtype),)
            hidden0 = _checks.float_array("hidden0", hidden0)
            _checks.shape("hidden0", hidden0, (b, h), f"(B, H) with B={b}, H={h}")
            return (hidden0,)
        cells = self.cells
        hidden0 = _cells.check_hidden0(
            self.kind, hidden0, len(cells), b, h, dtype, state=self.state_size
        )
        if self.kind == "lstm":
            flat = [_lstm_carry(c, hidden0[0][k], hidden0[1][k]) for k, c in enumerate(cells)]
        else:
            flat = [hidden0[k] for k in range(len(cells))]
        if self.bidirectional:
            return tuple(zip(flat[::2], flat[1::2], strict=True))
        return tuple(flat)

    def hidden_of(self, carries: tuple) -> Any:
        """The inverse of :meth:`carries`: the library's layout of per-layer carries."""
        if self.kind == "article":
            return carries[0]
        if self.bidirectional:
            carries = tuple(c for pair in carries for c in pair)
        if self.kind == "lstm":
            pairs = [_lstm_h_c(cell, c) for cell, c in zip(self.cells, carries, strict=True)]
            return jnp.stack([h for h, _ in pairs]), jnp.stack([c for _, c in pairs])
        return jnp.stack(carries)


def _directions(layer: nnx.Module) -> tuple:
    """A layer's ``nnx.RNN``\\ s: itself, or an ``nnx.Bidirectional``'s forward and reverse."""
    if isinstance(layer, nnx.Bidirectional):
        return (layer.forward_rnn, layer.backward_rnn)
    return (layer,)


def _run_layers(
    model: FlaxRNN, inputs: jax.Array, carries: tuple, lengths: jax.Array | None = None
) -> tuple[jax.Array, tuple]:
    """The last layer's outputs ``(T, B, D*H_out)`` and every layer's final carry."""
    x = inputs
    live = None if lengths is None else (jnp.arange(x.shape[0])[:, None] < lengths[None])[..., None]
    finals = []
    # initial_carry is given explicitly: without it nnx.RNN draws its carry from an
    # RNG stream, which this model does not keep. With seq_lengths nnx.RNN returns
    # the carry after each example's last real step, but its outputs run on past it:
    # PyTorch's are zero there.
    for layer, carry in zip(model.layers, carries, strict=True):
        carry, x = layer(x, initial_carry=carry, seq_lengths=lengths)
        if live is not None:
            x = jnp.where(live, x, 0)
        finals.append(carry)
    return x, tuple(finals)


def _lstm_carry(cell: nnx.Module, h: jax.Array, c: jax.Array) -> tuple:
    return (h, c) if isinstance(cell, TorchCell) else (c, h)


def _lstm_h_c(cell: nnx.Module, carry: tuple) -> tuple:
    return carry if isinstance(cell, TorchCell) else (carry[1], carry[0])


# ------------------------------------------------------------------- to and from


def to_flax(params: CellParams | RNNParams, *, cells: str = "torch", unroll: int = 1) -> FlaxRNN:
    """A :class:`FlaxRNN` holding ``params``' weights, for every kind in :data:`CELLS`.

    Args:
      params: the article's :class:`RNNParams` or a :class:`CellParams` of any number
        of layers (:func:`loopgrad_jax.init_cell`, :func:`loopgrad_jax.from_torch`):
        bidirectional (an ``nnx.Bidirectional`` per layer), an LSTM with a projection
        (``cells="torch"`` only), without a head (the model returns the last layer's
        outputs). A cell module's params build a one-layer model.
      cells: ``"torch"``: :class:`TorchCell`, PyTorch's exact parameterisation (its
        training runs reproduce PyTorch's); ``"flax"``: Flax's built-in cells, the
        same forward pass with one bias per layer (see the module's table). A GRU
        whose ``b_hn`` (the last third of ``bias_hh``) is not zero has no
        ``nnx.GRUCell`` equivalent and raises a ``ValueError``, as does a projection.
        The article's model is an ``nnx.SimpleCell`` either way.
      unroll: ``nnx.RNN``'s ``unroll``: steps per trip through its loop.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> p = lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=4)
      >>> model = lg.to_flax(p)
      >>> x = jnp.ones((6, 2, 3), jnp.float32)
      >>> model(x).shape
      (6, 2, 1)
      >>> back = lg.from_flax(model)
      >>> bool(jnp.all(back.layers[0].weight_hh == p.layers[0].weight_hh))
      True
    """
    cells = _checks.one_of("cells", cells, CELL_SETS)
    if isinstance(params, RNNParams):
        i = params.i2h_weight.shape[1] - params.i2h_weight.shape[0]
        w = jnp.asarray(params.i2h_weight)
        cell = _simple_cell(w[:, :i], w[:, i:], params.i2h_bias, jnp.tanh)
        return FlaxRNN(
            [cell], _head(params.h2o_weight, params.h2o_bias), kind="article", unroll=unroll
        )
    if not isinstance(params, CellParams):
        raise TypeError(
            "params must be an RNNParams (lg.init_rnn) or a CellParams (lg.init_cell, "
            f"lg.from_torch), got {type(params).__name__}."
        )
    params, _ = _cells.check_params(params)
    if cells == "torch":
        stack = [TorchCell(params.kind, layer) for layer in params.layers]
    else:
        if params.layers[0].weight_hr is not None:
            raise ValueError(
                "params has an LSTM projection (proj_size > 0, weight_hr), which Flax's "
                "built-in LSTM cells do not have: use cells='torch' (TorchCell holds "
                "weight_hr)."
            )
        stack = [_builtin_cell(params.kind, k, layer) for k, layer in enumerate(params.layers)]
    head = None if params.head_weight is None else _head(params.head_weight, params.head_bias)
    return FlaxRNN(stack, head, kind=params.kind, unroll=unroll, bidirectional=params.bidirectional)


def _rngs() -> nnx.Rngs:
    # Flax's constructors draw initial weights; to_flax overwrites every one of them.
    return nnx.Rngs(0)


def _set(variable: nnx.Variable, value: Any) -> None:
    variable[...] = jnp.asarray(value, variable.dtype)


def _t(a: Any) -> jax.Array:
    """A matrix transposed (its last two axes, so a stack of gradients maps too)."""
    return jnp.swapaxes(jnp.asarray(a), -1, -2)


def _head(weight: jax.Array, bias: jax.Array) -> nnx.Linear:
    o, h = weight.shape
    dtype = jnp.result_type(weight)
    head = nnx.Linear(h, o, dtype=dtype, param_dtype=dtype, rngs=_rngs())
    _set(head.kernel, _t(weight))
    _set(head.bias, bias)
    return head


def _simple_cell(w_ih, w_hh, bias, activation) -> nnx.SimpleCell:
    h, i = w_ih.shape
    dtype = jnp.result_type(w_ih)
    cell = nnx.SimpleCell(
        i, h, activation_fn=activation, dtype=dtype, param_dtype=dtype, rngs=_rngs()
    )
    _set(cell.dense_i.kernel, _t(w_ih))
    _set(cell.dense_i.bias, bias)
    _set(cell.dense_h.kernel, _t(w_hh))
    return cell


def _builtin_cell(kind: str, k: int, layer: LayerParams) -> nnx.RNNCellBase:
    """Flax's built-in cell with ``layer``'s forward pass; raises where none has it."""
    if layer.bias_ih is None:
        raise ValueError(
            f"params.layers[{k}] has no biases (PyTorch's bias=False), which Flax's built-in "
            "cells always have: zero biases there would be trained. Use cells='torch' "
            "(TorchCell holds no bias for such a layer)."
        )
    w_ih, w_hh = jnp.asarray(layer.weight_ih), jnp.asarray(layer.weight_hh)
    b_ih, b_hh = jnp.asarray(layer.bias_ih), jnp.asarray(layer.bias_hh)
    if kind in ("rnn_tanh", "rnn_relu"):
        activation = jnp.tanh if kind == "rnn_tanh" else jax.nn.relu
        return _simple_cell(w_ih, w_hh, b_ih + b_hh, activation)
    h, i = w_hh.shape[1], w_ih.shape[1]
    dtype = jnp.result_type(w_ih)
    options = {"dtype": dtype, "param_dtype": dtype, "rngs": _rngs()}
    if kind == "lstm":
        cell = nnx.OptimizedLSTMCell(i, h, **options)
        _set(cell.dense_i.kernel, _t(w_ih))
        _set(cell.dense_h.kernel, _t(w_hh))
        _set(cell.dense_h.bias, b_ih + b_hh)
        return cell
    b_hn = _concrete(f"params.layers[{k}].bias_hh", b_hh)[2 * h :]
    if np.any(b_hn != 0):
        raise ValueError(
            f"params.layers[{k}].bias_hh has a non-zero b_hn (its last third, the bias "
            "inside r * (W_hn h + b_hn)), which nnx.GRUCell does not have: its largest "
            f"|b_hn| is {float(np.max(np.abs(b_hn))):.3g}. Use cells='torch' (TorchCell, "
            "PyTorch's parameterisation), or zero b_hn first."
        )
    cell = nnx.GRUCell(i, h, **options)
    _set(cell.dense_i.kernel, _t(w_ih))
    _set(cell.dense_i.bias, b_ih + b_hh.at[2 * h :].set(0))
    _set(cell.dense_h.kernel, _t(w_hh))
    return cell


def _concrete(name: str, value: jax.Array) -> np.ndarray:
    try:
        return np.asarray(value)
    except jax.errors.ConcretizationTypeError as err:
        raise TypeError(
            f"to_flax(cells='flax') reads {name} to check that nnx.GRUCell can hold it, "
            "so it needs concrete weights: call it outside jax.jit."
        ) from err


def from_flax(model: Any) -> CellParams | RNNParams:
    """The library's params of a Flax model: the inverse of :func:`to_flax`.

    ``model`` is a :class:`FlaxRNN`, or Flax's own layers: an ``nnx.RNN`` or an
    ``nnx.Bidirectional`` (merging by concatenation, its default), or a list of them,
    one per layer, of :class:`TorchCell` or Flax's ``nnx.SimpleCell`` (``tanh`` or
    ``relu``, not residual), ``nnx.LSTMCell``, ``nnx.OptimizedLSTMCell`` (their
    default ``sigmoid`` gates and ``tanh``) or ``nnx.GRUCell``; their params have no
    head, ``batch_first`` is ``not time_major``, and :func:`loopgrad_jax.rnn` runs
    them with Flax's results (a Flax LSTM cell's carry is ``(c, h)``, PyTorch's
    ``(h, c)``).

    Applied to a model merged from a gradient (``nnx.merge(graphdef, grads)`` with
    ``grads = nnx.grad(loss)(model)``) it returns the gradient in the params' form,
    which :func:`loopgrad_jax.to_torch` names as PyTorch does. Flax's built-in cells
    keep one bias per layer: it is returned where Flax keeps it (``bias_ih`` for
    ``nnx.SimpleCell`` and ``nnx.GRUCell``, ``bias_hh`` for the LSTM cells), the
    other bias zeros, so the forward pass is the same; the gradient of that bias is
    the gradient of either of PyTorch's (not of a GRU's ``b_hn``, which
    ``nnx.GRUCell`` lacks).

    Raises:
      TypeError: ``model`` is none of these, or one of its cells is not a cell this
        library maps.
      ValueError: a cell's options or the layers' sizes have no PyTorch equivalent.
    """
    if not isinstance(model, FlaxRNN):
        return _from_layers(model)
    head_w, head_b = None, None
    if model.head is not None:
        head_w, head_b = _t(model.head.kernel[...]), model.head.bias[...]
    if model.kind == "article":
        cell = model.layers[0].cell
        w = jnp.concatenate([_t(cell.dense_i.kernel[...]), _t(cell.dense_h.kernel[...])], axis=-1)
        return RNNParams(w, cell.dense_i.bias[...], head_w, head_b)
    d = model.directions
    layers = tuple(
        _layer_of(model.kind, f"model.layers[{k // d}]{_DIRECTION[d][k % d]}.cell", cell)
        for k, cell in enumerate(model.cells)
    )
    return CellParams(layers, head_w, head_b, model.kind, bidirectional=model.bidirectional)


#: Where a direction's cell sits in a layer, for errors: an nnx.RNN, or an nnx.Bidirectional.
_DIRECTION = {1: ("",), 2: (".forward_rnn", ".backward_rnn")}


def _from_layers(model: Any) -> CellParams:
    """:func:`from_flax` of Flax's ``nnx.RNN`` / ``nnx.Bidirectional`` layers."""
    plain = (nnx.RNN, nnx.Bidirectional)
    layers = [model] if isinstance(model, plain) else model
    if not isinstance(layers, list | tuple | nnx.List) or not layers:
        raise TypeError(
            "model must be a loopgrad_jax.FlaxRNN (lg.to_flax), an nnx.RNN, an "
            f"nnx.Bidirectional, or a non-empty list of them, got {type(model).__name__}."
        )
    names = "model" if isinstance(model, plain) else None
    cells, time_major = [], set()
    for k, layer in enumerate(layers):
        where = names or f"model[{k}]"
        if not isinstance(layer, plain):
            raise TypeError(
                f"{where} must be an nnx.RNN or an nnx.Bidirectional, got {type(layer).__name__}."
            )
        if isinstance(layer, nnx.Bidirectional):
            if layer.merge_fn is not nnx.Bidirectional.merge_fn:
                raise ValueError(
                    f"{where}.merge_fn is {getattr(layer.merge_fn, '__name__', layer.merge_fn)}"
                    ": PyTorch concatenates the two directions' outputs, nnx.Bidirectional's "
                    "default merge_fn; build it without merge_fn."
                )
            time_major.add(layer.time_major)
            rnns = [(f"{where}.forward_rnn", layer.forward_rnn)]
            rnns.append((f"{where}.backward_rnn", layer.backward_rnn))
        else:
            if layer.reverse:
                raise ValueError(
                    f"{where} is an nnx.RNN with reverse=True, which no PyTorch layer is: a "
                    "reverse direction belongs in an nnx.Bidirectional."
                )
            time_major.add(layer.time_major)
            rnns = [(where, layer)]
        for name, rnn in rnns:
            if not isinstance(rnn, nnx.RNN):
                raise TypeError(f"{name} must be an nnx.RNN, got {type(rnn).__name__}.")
            cells.append((f"{name}.cell", rnn.cell))
    bidirectional = [isinstance(layer, nnx.Bidirectional) for layer in layers]
    if len(set(bidirectional)) > 1:
        raise ValueError(
            "model's layers must be all nnx.RNN or all nnx.Bidirectional, as a PyTorch "
            f"module's are; got nnx.Bidirectional at {bidirectional}."
        )
    if len(time_major) > 1:
        raise ValueError("model's layers must agree on time_major, got both True and False.")
    kinds = [(name, _kind_of(name, cell)) for name, cell in cells]
    kind = kinds[0][1]
    for name, other in kinds:
        if other != kind:
            raise ValueError(
                f"{name} is a {other!r} cell and {kinds[0][0]} a {kind!r} one: a PyTorch "
                "module has one kind."
            )
    params = CellParams(
        tuple(_layer_of(kind, name, cell) for name, cell in cells),
        None,
        None,
        kind,
        bidirectional=bidirectional[0],
        batch_first=not time_major.pop(),
    )
    return _cells.check_params(params)[0]


def _kind_of(name: str, cell: nnx.Module) -> str:
    """The library kind of a cell; raises where the cell has no PyTorch equivalent."""
    if isinstance(cell, TorchCell):
        return cell.kind
    defaults = {"gate_fn": jax.nn.sigmoid, "activation_fn": jnp.tanh}
    if isinstance(cell, nnx.SimpleCell):
        if cell.residual:
            raise ValueError(f"{name} is a residual nnx.SimpleCell, which no PyTorch RNN is.")
        kinds = {jnp.tanh: "rnn_tanh", jax.nn.relu: "rnn_relu"}
        if cell.activation_fn not in kinds:
            raise ValueError(
                f"{name}.activation_fn must be tanh or relu (nn.RNN's nonlinearity), got "
                f"{getattr(cell.activation_fn, '__name__', cell.activation_fn)}."
            )
        return kinds[cell.activation_fn]
    kinds = {nnx.LSTMCell: "lstm", nnx.OptimizedLSTMCell: "lstm", nnx.GRUCell: "gru"}
    if type(cell) not in kinds:
        raise TypeError(
            f"{name} is a {type(cell).__name__}, which this library does not map: expected "
            "a TorchCell, nnx.SimpleCell, nnx.LSTMCell, nnx.OptimizedLSTMCell or nnx.GRUCell."
        )
    for attr, fn in defaults.items():
        if getattr(cell, attr) is not fn:
            raise ValueError(
                f"{name}.{attr} must be {fn.__name__}, PyTorch's, got "
                f"{getattr(getattr(cell, attr), '__name__', getattr(cell, attr))}."
            )
    return kinds[type(cell)]


def _layer_of(kind: str, where: str, cell: nnx.Module) -> LayerParams:
    if isinstance(cell, TorchCell):
        return LayerParams(
            cell.weight_ih[...],
            cell.weight_hh[...],
            _value_or_none(cell.bias_ih),
            _value_or_none(cell.bias_hh),
            _value_or_none(cell.weight_hr),
        )
    if kind in ("rnn_tanh", "rnn_relu") and isinstance(cell, nnx.SimpleCell):
        b = cell.dense_i.bias[...]
        return LayerParams(
            _t(cell.dense_i.kernel[...]), _t(cell.dense_h.kernel[...]), b, jnp.zeros_like(b)
        )
    if kind == "gru" and isinstance(cell, nnx.GRUCell):
        b = cell.dense_i.bias[...]
        return LayerParams(
            _t(cell.dense_i.kernel[...]), _t(cell.dense_h.kernel[...]), b, jnp.zeros_like(b)
        )
    if kind == "lstm" and isinstance(cell, nnx.OptimizedLSTMCell):
        b = cell.dense_h.bias[...]
        return LayerParams(
            _t(cell.dense_i.kernel[...]), _t(cell.dense_h.kernel[...]), jnp.zeros_like(b), b
        )
    if kind == "lstm" and isinstance(cell, nnx.LSTMCell):
        ins, hs = ([getattr(cell, n) for n in _LSTM_LINEARS[s]] for s in ("input", "hidden"))
        b = jnp.concatenate([d.bias[...] for d in hs], axis=-1)
        return LayerParams(
            _t(jnp.concatenate([d.kernel[...] for d in ins], axis=-1)),
            _t(jnp.concatenate([d.kernel[...] for d in hs], axis=-1)),
            jnp.zeros_like(b),
            b,
        )
    raise TypeError(
        f"{where} is a {type(cell).__name__}, which this library does not map "
        f"for kind={kind!r}: expected a TorchCell or "
        f"{_BUILTIN_NAMES[kind]}."
    )


_BUILTIN_NAMES = {
    "rnn_tanh": "nnx.SimpleCell",
    "rnn_relu": "nnx.SimpleCell",
    "lstm": "nnx.OptimizedLSTMCell or nnx.LSTMCell",
    "gru": "nnx.GRUCell",
}


# ------------------------------------------------------------------- losses and training


def flax_loss(
    model: FlaxRNN,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    hidden0: Any = None,
    loop: str | Loop | None = None,
    lengths: jax.typing.ArrayLike | None = None,
    reduction: str = "sum",
    loss_fn: LossFn | None = None,
) -> jax.Array:
    """The per-step losses of a :class:`FlaxRNN`, summed or averaged, as :func:`rnn_loss`.

    Plain-Python semantics (``loss_fn`` is ``mean((prediction - target) ** 2)`` by
    default)::

      outputs = model(inputs, hidden0, lengths)        # (T, B, O)
      total = sum over t of loss_fn(outputs[t], targets[t])
      return total if reduction == "sum" else total / T

    with ``lengths`` counting step ``t`` of example ``b`` only if ``t < lengths[b]``,
    exactly as :func:`loopgrad_jax.rnn_loss` does (``"mean"`` is then the mean over
    the real steps). With ``loop=None`` the model runs as it is (``nnx.RNN``, layer
    by layer, ``lengths`` as its ``seq_lengths``); with a loop kind (one of
    :data:`loopgrad_jax.LOOPS`, :data:`loopgrad_jax.NNX_LOOPS`, or its text form)
    that loop steps every layer's cell once per step, and the head reads the stacked
    outputs after it (the padded steps run on, but count for nothing). ``nnx.grad``
    of it with respect to the model is full backpropagation through time. It runs as
    one ``jax.jit``-compiled function per shapes, model structure, loop, reduction
    and ``loss_fn`` (``loop="python"`` excepted), as :func:`loopgrad_jax.rnn_loss`
    does: repeated eager calls, ``nnx.grad`` and ``jax.grad`` included, do not
    recompile.

    Args:
      model: a :class:`FlaxRNN` with a head (or without one, ``O`` is then ``D*H_out``).
      inputs: ``(T, B, I)``, time-major.
      targets: ``(T, B, O)``; with ``loss_fn``, any array ``(T, B, ...)`` it takes.
      hidden0: the initial state in the library's layout (see :class:`FlaxRNN`).
      loop: ``None`` (``nnx.RNN``'s own scan) or a loop kind, as above.
      lengths, reduction, loss_fn: as :func:`loopgrad_jax.rnn_loss` takes them.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> from flax import nnx
      >>> model = lg.to_flax(lg.init_cell(jax.random.key(0), "gru", input_size=3,
      ...                                 hidden_size=4))
      >>> x, y = jnp.ones((6, 2, 3), jnp.float32), jnp.zeros((6, 2, 1), jnp.float32)
      >>> grads = nnx.grad(lambda m: lg.flax_loss(m, x, y, loop="nnx_scan"))(model)
      >>> g = lg.from_flax(nnx.merge(nnx.graphdef(model), grads))
      >>> g.layers[0].weight_hh.shape
      (12, 4)
    """
    _check_model(model)
    if loop is not None:
        _stepwise(model, f"flax_loss(loop={loop!r})", "loop=None (nnx.RNN's own scan)")
    reduction = _checks.one_of("reduction", reduction, REDUCTIONS)
    inputs, targets = _sequences(model, inputs, targets, checked=loss_fn is None)
    t, b = inputs.shape[:2]
    if loss_fn is not None:
        prediction = jax.ShapeDtypeStruct((b, model.output_size), inputs.dtype)
        targets = check_loss_fn(loss_fn, targets, t, b, prediction)
    lengths = _checks.check_lengths(lengths, t, b)
    carries = model.carries(inputs, hidden0)
    graphdef, state = nnx.split(model)
    # loop=None runs nnx.RNN's own nnx.scan: compiled as a scan is.
    as_is = loop is None
    loop = Loop("scan") if as_is else check_loop(loop)
    return _loss(
        nnx.as_pure(state),
        inputs,
        targets,
        carries,
        lengths,
        graphdef=graphdef,
        loop=loop,
        as_is=as_is,
        reduction=reduction,
        loss_fn=loss_fn,
    )


@compiled("graphdef", "loop", "as_is", "reduction", "loss_fn")
def _loss(
    state, inputs, targets, carries, lengths, *, graphdef, loop, as_is, reduction, loss_fn
) -> jax.Array:
    """:func:`flax_loss` after its checks: one compiled function per shapes and model graph."""
    # A model merged here is made at this trace level, as nnx.RNN's lifted nnx.scan
    # requires (it refuses one closed over by an outer jax.grad or jax.vmap).
    model = nnx.merge(graphdef, state)
    if as_is:
        out, _ = _run_layers(model, inputs, carries, lengths)
    else:

        def body(carry, x):
            return _step_layers(model, carry, x)

        _, out = run_loop(body, carries, inputs, length=inputs.shape[0], loop=loop)
    if model.head is not None:
        out = model.head(out)
    weights = None if lengths is None else step_weights(lengths, inputs.shape[0], inputs.dtype)
    losses = every_step_loss(loss_fn, out, targets, weights)
    return reduce_losses(losses, reduction, weights).sum()


def _step_layers(
    model: FlaxRNN, carries: tuple, x: jax.Array, policy: Precision | None = None
) -> tuple[tuple, jax.Array]:
    """One step of every layer: ``(new carries, the last layer's new h)``; under
    ``policy`` (TorchCell layers only) each product is the policy's."""
    new = []
    for layer, carry in zip(model.layers, carries, strict=True):
        if policy is None:
            carry, x = layer.cell(carry, x)
        else:
            carry, x = layer.cell.step(carry, x, policy)
        new.append(carry)
    return tuple(new), x


def _check_model(model: object) -> FlaxRNN:
    if not isinstance(model, FlaxRNN):
        raise TypeError(
            f"model must be a loopgrad_jax.FlaxRNN (lg.to_flax), got {type(model).__name__}."
        )
    return model


def _stepwise(model: FlaxRNN, what: str, instead: str) -> None:
    """Refuses a bidirectional model where every layer is stepped once per time step."""
    if model.bidirectional:
        raise ValueError(
            f"{what} steps every layer once per time step, but a bidirectional model's "
            f"reverse direction reads the whole sequence first: use {instead}."
        )


def _sequences(model: FlaxRNN, inputs, targets, checked: bool = True) -> tuple[jax.Array, Any]:
    """``inputs`` checked against the model; ``targets`` too unless a ``loss_fn`` takes them."""
    inputs = _checks.float_array("inputs", inputs)
    i = model.cells[0].in_features
    o = model.output_size
    _checks.shape("inputs", inputs, (None, None, i), f"(T, B, I) with I={i}, time-major")
    weight = ("model.head.kernel", model.head.kernel[...]) if model.head is not None else None
    weight = weight or ("model.cells[0]", jax.tree.leaves(nnx.state(model.cells[0]))[0])
    if not checked:  # check_loss_fn checks them against loss_fn
        _checks.same_dtype([("inputs", inputs), weight])
        return inputs, targets
    targets = _checks.float_array("targets", targets)
    t, b = inputs.shape[:2]
    _checks.shape("targets", targets, (t, b, o), f"(T, B, O) with T={t}, B={b}, O={o}")
    _checks.same_dtype([("inputs", inputs), ("targets", targets), weight])
    return inputs, targets


def _shapes(tree: PyTree) -> tuple:
    leaves, structure = jax.tree.flatten(tree)
    return structure, [(jnp.shape(a), jnp.result_type(a)) for a in leaves]


@functools.lru_cache(maxsize=64)
def _cell_of_graph(graphdef: nnx.GraphDef, policy: Precision | None = None) -> Cell:
    """The library :class:`Cell` whose params are a model's pure ``nnx.State``; under
    ``policy`` every product (the head's too) is the policy's."""

    def step(state, carries, x):
        return _step_layers(nnx.merge(graphdef, state), carries, x, policy)[0]

    def readout(state, carries):
        model = nnx.merge(graphdef, state)
        h = carries[-1]
        cell = model.layers[-1].cell
        if model.kind == "lstm":
            h = _lstm_h_c(cell, h)[0]
        if model.head is None:
            return h
        if policy is None:
            return model.head(h)
        bias = jnp.expand_dims(model.head.bias[...], tuple(range(h.ndim - 1)))
        return matmul(h, model.head.kernel[...], policy) + bias

    return Cell(step, readout)


def _bind_precision(model: FlaxRNN, precision: object) -> Precision | None:
    """``flax_train``'s checked policy: TorchCell layers with float32 parameters only."""
    policy = check_precision(precision)
    if policy is None:
        return None
    builtin = [type(layer.cell).__name__ for layer in model.layers]
    builtin = [name for name in builtin if name != TorchCell.__name__]
    if builtin:
        raise ValueError(
            f"precision={precision!r} applies to a model of lg.TorchCell layers (lg.to_flax("
            f"params), PyTorch's parameterisation), whose products it rounds as lg.train_rnn "
            f"does; got Flax's own {builtin[0]}, which computes in its own dtype=: build the "
            "model with lg.to_flax(params) (cells='torch'), or pass precision=None."
        )
    named = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    check_param_dtypes(((f"model{jax.tree_util.keystr(p)}", v) for p, v in named), policy)
    return policy


def flax_train(
    model: FlaxRNN,
    optimizer: nnx.Optimizer,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    mode: str = "tbptt",
    window: int | None = None,
    hidden0: Any = None,
    loop: str | Loop = "scan",
    as_written_method: str = "auto",
    keep_grads: str = "all",
    loss_fn: LossFn | None = None,
    lengths: jax.typing.ArrayLike | None = None,
    reduction: str = "sum",
    precision: object = None,
) -> TrainResult:
    """Trains a :class:`FlaxRNN` over one sequence, in place, as :func:`train_rnn` does.

    The same modes, loop kinds and methods as :func:`loopgrad_jax.train_rnn`
    (``mode="tbptt"``, the default: one update per window, by default one over the
    whole sequence; ``"as_written"``: an update after every step, each gradient
    summing every past use of the weights at the values they had then), run on the
    model's own parameterisation: ``optimizer.tx`` steps the model's ``nnx.Param``
    variables, so a model of :class:`TorchCell`\\ s follows PyTorch's trajectory and
    one of Flax's built-in cells Flax's. Afterwards the model holds the new weights
    and ``optimizer`` the new optimizer state, its ``step`` advanced by the number of
    updates, as ``optimizer.update`` would leave them.

    Args:
      model: a :class:`FlaxRNN`.
      optimizer: an ``nnx.Optimizer`` of ``model`` with ``wrt=nnx.Param``.
      inputs, targets: ``(T, B, I)`` and ``(T, B, O)`` (with ``loss_fn``, any array
        ``(T, B, ...)`` it takes).
      mode, window, loop, as_written_method, keep_grads, loss_fn, lengths, reduction: as
        :func:`train_rnn` takes them; ``loop`` also takes :data:`loopgrad_jax.NNX_LOOPS`.
        ``lengths`` ``(B,)`` counts only each example's real steps in the losses (the
        model is time-major, ``B`` is ``inputs.shape[1]``); the cells still step over
        the padded steps, so ``hidden`` is the state after all ``T`` steps.
      hidden0: the initial state in the library's layout (see :class:`FlaxRNN`).
      precision: ``None`` (every operation in the parameters' dtype), ``"bf16"`` or a
        :class:`loopgrad_jax.Precision`, as :func:`train_rnn` takes it: for a model of
        :class:`TorchCell` layers (``lg.to_flax(params)``), each product's operands in
        the compute dtype, accumulated in float32, the parameters, optimizer state,
        recurrent state and loss float32. Flax's built-in cells are refused (they
        compute in their own ``dtype=``).

    Returns:
      A :class:`TrainResult` whose ``params`` is the model's new ``nnx.State``,
      ``grads`` each update's gradient as an ``nnx.State`` (leaves ``(U, ...)``;
      ``lg.from_flax(nnx.merge(nnx.graphdef(model), jax.tree.map(lambda g: g[u],
      result.grads)))`` is update ``u``'s in the library's form), ``hidden`` the
      final state in the library's layout.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, loopgrad_jax as lg
      >>> from flax import nnx
      >>> model = lg.to_flax(lg.init_rnn(jax.random.key(0), 3, 4))
      >>> opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> x, y = jnp.ones((5, 2, 3), jnp.float32), jnp.zeros((5, 2, 1), jnp.float32)
      >>> result = lg.flax_train(model, opt, x, y)  # one update over the whole sequence
      >>> result.losses.shape, int(opt.step[...])
      ((5,), 1)
    """
    _check_model(model)
    _stepwise(model, "flax_train", "lg.train_rnn of lg.from_flax(model)")
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(f"optimizer must be an nnx.Optimizer, got {type(optimizer).__name__}.")
    if optimizer.wrt != nnx.Param:
        raise ValueError(
            f"optimizer must step the model's nnx.Param variables (wrt=nnx.Param), got "
            f"wrt={optimizer.wrt!r}."
        )
    policy = _bind_precision(model, precision)
    inputs, targets = _sequences(model, inputs, targets, checked=loss_fn is None)
    graphdef, state = nnx.split(model)
    params = nnx.as_pure(state)
    opt_state = nnx.as_pure(optimizer.opt_state)
    if _shapes(jax.eval_shape(optimizer.tx.init, params)) != _shapes(opt_state):
        raise ValueError(
            "optimizer must be an nnx.Optimizer of this model: its state does not match "
            "the model's parameters."
        )
    carries = model.carries(inputs, hidden0)
    result = train_rnn(
        params,
        inputs,
        targets,
        mode=mode,
        window=window,
        hidden0=carries,
        loop=loop,
        as_written_method=as_written_method,
        optimizer=optimizer.tx,
        opt_state=opt_state,
        keep_grads=keep_grads,
        cell=_cell_of_graph(graphdef, policy),
        loss_fn=loss_fn,
        lengths=lengths,
        reduction=reduction,
    )
    # What optimizer.update does with its new state and weights, once for the whole run.
    nnx.update(model, result.params)
    nnx.update(optimizer.opt_state, nnx.state(result.opt_state, graph=optimizer.graph))
    steps = inputs.shape[0]
    updates = steps if mode == "as_written" else -(-steps // (window or steps))
    optimizer.step[...] += updates
    return result._replace(hidden=model.hidden_of(result.hidden))
