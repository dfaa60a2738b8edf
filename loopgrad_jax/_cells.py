"""PyTorch's recurrent modules as cells: ``nn.RNN`` (tanh, relu), ``nn.LSTM``, ``nn.GRU``.

Parameters keep PyTorch's layout and names (``weight_ih_l{k}`` is
``(G*H, I_k)`` with ``G`` gates, stacked in PyTorch's order), so state dicts
load without transposes or reordering. One step of layer ``k`` (``x`` its input,
``h``/``c`` its state), exactly as PyTorch documents it::

  rnn_tanh:  h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)         (relu for rnn_relu)
  lstm:      i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh, 4)
             c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')
  gru:       r, z, n over split(x W_ih^T + b_ih, 3) and split(h W_hh^T + b_hh, 3):
             r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z);  n = tanh(x_n + r * h_n)
             h' = (1 - z) * n + z * h

Layer ``k > 0`` reads layer ``k - 1``'s new ``h``; the head ``nn.Linear(H, O)``
reads the last layer's. Inside the loop the carry is a tuple with one entry per
layer (``h``, or ``(h, c)`` for an LSTM), batch first; at the API it is
PyTorch's ``(num_layers, B, H)`` (and the pair ``(h, c)`` of two for an LSTM).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopgrad_jax import _checks
from loopgrad_jax._cell import Cell
from loopgrad_jax._loops import Loop, run_loop
from loopgrad_jax._rnn import RNNParams, init_rnn

#: Every built-in cell kind: the article's ``SimpleRNN`` and PyTorch's modules.
CELLS: tuple[str, ...] = ("article", "rnn_tanh", "rnn_relu", "lstm", "gru")
#: The kinds that are PyTorch modules (:class:`CellParams`).
TORCH_CELLS: tuple[str, ...] = CELLS[1:]
#: Gates per kind: rows of ``weight_ih`` per hidden unit.
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
_MODULES = {"RNN": ("rnn_tanh", "rnn_relu"), "LSTM": ("lstm",), "GRU": ("gru",)}
_LAYER_FIELDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerParams:
    """One layer's weights, as PyTorch names them without the ``_l{k}`` suffix."""

    weight_ih: jax.Array  # (G*H, I) for the first layer, (G*H, H) after
    weight_hh: jax.Array  # (G*H, H)
    bias_ih: jax.Array | None  # (G*H,); None in a module built with bias=False
    bias_hh: jax.Array | None  # (G*H,); None then too, and inside a loop after loop_form


@dataclasses.dataclass(frozen=True, eq=False)
class CellParams:
    """The weights of an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and its ``nn.Linear`` head.

    A pytree whose leaves are the arrays; ``kind`` (one of :data:`TORCH_CELLS`) is
    static, so ``jax.grad`` returns a ``CellParams`` of the same kind, which
    :func:`to_torch` names as PyTorch does. A module built with ``bias=False`` has
    no layer biases: every layer's ``bias_ih`` and ``bias_hh`` are ``None`` (no
    leaves, so no gradients and no updates either); the head keeps its bias.
    """

    layers: tuple[LayerParams, ...]
    head_weight: jax.Array  # (O, H)
    head_bias: jax.Array  # (O,)
    kind: str = "rnn_tanh"

    @property
    def num_layers(self) -> int:
        return len(self.layers)


jax.tree_util.register_dataclass(LayerParams, data_fields=list(_LAYER_FIELDS), meta_fields=[])
jax.tree_util.register_dataclass(
    CellParams, data_fields=["layers", "head_weight", "head_bias"], meta_fields=["kind"]
)


# ------------------------------------------------------------------- the cells


def _layer_step(
    kind: str, w_hh: jax.Array, b_hh: jax.Array, state: Any, gi: jax.Array
) -> tuple[Any, jax.Array]:
    """One layer's step given its input-side pre-activation ``gi = x W_ih^T + b_ih``.

    ``b_hh`` is ``(1, G*H)``, or ``(B, G*H)`` when :func:`_layer_sequence`'s rule adds
    a per-step term to the recurrent pre-activation, or ``None`` where :func:`loop_form`
    moved it into ``gi``. Returns ``(new state, new h)``.
    """
    if kind == "lstm":
        h, c = _lstm(w_hh, b_hh, state[0], state[1], gi)
        return (h, c), h
    if kind == "gru":
        h = _gru(w_hh, b_hh, state, gi)
        return h, h
    h = _ACTIVATION[kind](_plus(gi + state @ w_hh.T, b_hh))
    return h, h


@jax.custom_jvp
def _tanh(x: jax.Array) -> jax.Array:
    """``jnp.tanh`` whose derivative reverse mode stores as one array, not two."""
    return jnp.tanh(x)


@_tanh.defjvp
def _tanh_jvp(primals, tangents):
    # JAX's rule, (dx + dx * y) * (1 - y), leaves reverse mode storing y and 1 - y every
    # step; this one stores (1 - y) * (1 + y) only: the same derivative up to rounding,
    # one (B, H) array fewer written and read per step. The article's model with the
    # joined step (loop_form), lax.scan, T=1000: at I=64, H=256, B=32, unroll=8, 192
    # against 210 ms (interleaved); at its own size 0.31 against 0.76 ms (same script,
    # separate runs: with JAX's rule XLA fused the joined step's reverse pass worse).
    (x,), (dx,) = primals, tangents
    y = jnp.tanh(x)
    return y, dx * ((1 - y) * (1 + y))


_ACTIVATION = {"rnn_tanh": _tanh, "rnn_relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True, eq=False)
class JoinedLayer:
    """An ``nn.RNN`` layer as its loop runs it: ``h' = act([x, h] @ kernel + bias)``.

    ``kernel`` is ``[W_ih, W_hh]^T``, ``(I + H, H)``, and ``bias`` is ``b_ih + b_hh``:
    both built once before the loop by :func:`loop_form` (the same pre-activation
    as PyTorch's, its terms summed in another order).
    """

    kernel: jax.Array
    bias: jax.Array


jax.tree_util.register_dataclass(JoinedLayer, data_fields=["kernel", "bias"], meta_fields=[])


def _joined_step(kind: str, layer: JoinedLayer, h: jax.Array, x: jax.Array) -> jax.Array:
    return _ACTIVATION[kind](
        _plus(jnp.concatenate([x, h], axis=-1) @ layer.kernel, _row(layer.bias))
    )


def _plus(a: jax.Array, b: jax.Array | None) -> jax.Array:
    """``a + b``, or ``a`` where a bias is ``None`` (folded, or a module without biases)."""
    return a if b is None else a + b


def _row(bias: jax.Array | None, lead: int = 1) -> jax.Array | None:
    """``bias`` behind ``lead`` axes of size 1 (``bias[None, :]`` for one), or ``None``."""
    return None if bias is None else bias[(None,) * lead]


def _biases(layer: LayerParams) -> jax.Array | None:
    """``bias_ih + bias_hh``, or ``None`` for a layer without biases."""
    return None if layer.bias_ih is None else layer.bias_ih + layer.bias_hh


def loop_form(params: CellParams, *, join: bool = True) -> CellParams:
    """``params`` as a loop over them runs fastest: built once, before the loop.

    With ``join``, an ``nn.RNN`` layer becomes a :class:`JoinedLayer`: one product
    per step over ``[x, h]``, its weight in the ``(in, out)`` layout, and one bias;
    without, it keeps its two weights, with ``bias_hh`` added into ``bias_ih`` (and
    ``None``), as an LSTM layer does either way. A GRU comes back unchanged: its
    ``b_hn`` sits inside ``r * (h W_hn^T + b_hn)``.

    Inside a loop, reverse mode accumulates each weight's and bias's gradient every
    step; built before it, each is accumulated once per layer and reaches PyTorch's
    own parameters (both biases included) through these few operations after the
    loop. :func:`loopgrad_jax._sequence.rnn_forward` joins where reverse mode stores
    every step (``bench/README.md`` has the measurements).
    """
    if params.kind == "gru":
        return params
    if params.kind == "lstm" or not join:
        layers = tuple(
            dataclasses.replace(layer, bias_ih=_biases(layer), bias_hh=None)
            for layer in params.layers
        )
    else:
        layers = tuple(
            JoinedLayer(
                jnp.concatenate([layer.weight_ih, layer.weight_hh], axis=1).T, _biases(layer)
            )
            for layer in params.layers
        )
    return dataclasses.replace(params, layers=layers)


def article_loop_form(params: RNNParams) -> CellParams:
    """The article's ``SimpleRNN`` as :func:`loop_form` builds an ``rnn_tanh`` layer.

    ``i2h(concat([x, h]))`` is ``[x, h] @ W^T + b``: ``i2h_weight`` is already
    ``[W_x, W_h]``, so the layer's kernel is its transpose, made once before the loop.
    """
    layer = JoinedLayer(params.i2h_weight.T, params.i2h_bias)
    return CellParams((layer,), params.h2o_weight, params.h2o_bias, "rnn_tanh")


# The LSTM and GRU steps below carry their own JVP rules. JAX's rules, op by op, make
# reverse mode store every intermediate the tangent touches: 12 (B, H) arrays per LSTM
# step and 9 per GRU step. Each rule here folds the activations' derivatives into one
# coefficient per gate pre-activation first, so reverse mode stores those coefficients
# as one array, the gate that carries the cell state and the step's input state: 7 H
# numbers per example (LSTM, with its output gate's factor) and 6 (GRU). Fewer, larger
# stores per step; the same derivative (only the order of float operations differs),
# and forward mode, vmap and higher derivatives go through the rule as through any
# jax.numpy code.


@jax.custom_jvp
def _lstm(w_hh, b_hh, h, c, gi):
    i, f, g, o = jnp.split(_plus(gi + h @ w_hh.T, b_hh), 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


@_lstm.defjvp
def _lstm_jvp(primals, tangents):
    w_hh, b_hh, h, c, gi = primals
    dw_hh, db_hh, dh, dc, dgi = tangents
    i, f, g, o = jnp.split(_plus(gi + h @ w_hh.T, b_hh), 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = jnp.tanh(c_new)
    h_new = o * tanh_c
    # d c_new = f dc + sum over i, f, g of coef * d(pre-activation); d h_new adds o's.
    coef = jnp.concatenate(
        [g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], axis=-1
    )
    dpre = _plus(dgi + dh @ w_hh.T + h @ dw_hh.T, db_hh)
    di, df, dg, do = jnp.split(dpre * coef, 4, axis=-1)
    dc_new = f * dc + di + df + dg
    return (h_new, c_new), (do + o * (1 - tanh_c * tanh_c) * dc_new, dc_new)


@jax.custom_jvp
def _gru(w_hh, b_hh, h, gi):
    xr, xz, xn = jnp.split(gi, 3, axis=-1)
    hr, hz, hn = jnp.split(_plus(h @ w_hh.T, b_hh), 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    return (1 - z) * jnp.tanh(xn + r * hn) + z * h


@_gru.defjvp
def _gru_jvp(primals, tangents):
    w_hh, b_hh, h, gi = primals
    dw_hh, db_hh, dh, dgi = tangents
    xr, xz, xn = jnp.split(gi, 3, axis=-1)
    hr, hz, hn = jnp.split(_plus(h @ w_hh.T, b_hh), 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h_new = (1 - z) * n + z * h
    # d h_new = coef . [d r_pre, d z_pre, d xn, d hn, dh], with n_pre = xn + r * hn.
    dn = (1 - z) * (1 - n * n)
    coef = jnp.concatenate([dn * hn * r * (1 - r), (h - n) * z * (1 - z), dn, dn * r, z], axis=-1)
    dxr, dxz, dxn = jnp.split(dgi, 3, axis=-1)
    dhr, dhz, dhn = jnp.split(_plus(dh @ w_hh.T + h @ dw_hh.T, db_hh), 3, axis=-1)
    terms = jnp.concatenate([dxr + dhr, dxz + dhz, dxn, dhn, dh], axis=-1) * coef
    dr, dz, dxn_term, dhn_term, dh_term = jnp.split(terms, 5, axis=-1)
    return h_new, dr + dz + dxn_term + dhn_term + dh_term


def _step(params: CellParams, carry: tuple, x: jax.Array, projected: bool = False) -> tuple:
    new = []
    for k, layer in enumerate(params.layers):
        if isinstance(layer, JoinedLayer):
            x = _joined_step(params.kind, layer, carry[k], x)
            new.append(x)
            continue
        gi = x if (k == 0 and projected) else _plus(x @ layer.weight_ih.T, _row(layer.bias_ih))
        state, x = _layer_step(params.kind, layer.weight_hh, _row(layer.bias_hh), carry[k], gi)
        new.append(state)
    return tuple(new)


def torch_step(params: CellParams, carry: tuple, x: jax.Array) -> tuple:
    """One step of every layer: the new carry (a tuple with one state per layer)."""
    return _step(params, carry, x)


def torch_readout(params: CellParams, carry: tuple) -> jax.Array:
    """The head applied to the last layer's ``h``: ``(B, O)``."""
    last = carry[-1][0] if params.kind == "lstm" else carry[-1]
    return last @ params.head_weight.T + params.head_bias[None, :]


def torch_project(params: CellParams, inputs: jax.Array) -> jax.Array:
    """The first layer's ``x W_ih^T + b_ih`` for every step at once: ``(T, B, G*H)``."""
    return _project(params.layers[0], inputs)


def _project(layer: LayerParams, xs: jax.Array) -> jax.Array:
    """``layer``'s input side for every step at once: ``(T, B, I_k) -> (T, B, G*H)``."""
    return _plus(jnp.einsum("tbi,gi->tbg", xs, layer.weight_ih), _row(layer.bias_ih, 2))


def torch_step_projected(params: CellParams, carry: tuple, projected: jax.Array) -> tuple:
    """:func:`torch_step` given the step's :func:`torch_project`."""
    return _step(params, carry, projected, projected=True)


#: The cell of every kind in :data:`TORCH_CELLS` (the kind is read off the params).
TORCH_CELL = Cell(torch_step, torch_readout, torch_project, torch_step_projected)


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
        return _layer_step(kind, w_hh, b, state, g)

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


def to_carry(kind: str, hidden: Any) -> Any:
    """PyTorch's ``(L, B, H)`` state (``(h, c)`` for an LSTM) as the loop's carry."""
    if kind == "lstm":
        h, c = hidden
        return tuple((h[k], c[k]) for k in range(h.shape[0]))
    return tuple(hidden[k] for k in range(hidden.shape[0]))


def to_public(kind: str, carry: tuple) -> Any:
    """The inverse of :func:`to_carry`."""
    if kind == "lstm":
        return jnp.stack([h for h, _ in carry]), jnp.stack([c for _, c in carry])
    return jnp.stack(carry)


# ------------------------------------------------------------------- sizes and checks


def carry_per_example(kind: str, hidden: int, num_layers: int = 1) -> int:
    """Numbers of state one example carries from step to step."""
    return (2 if kind == "lstm" else 1) * num_layers * hidden


def check_params(params: CellParams) -> tuple[CellParams, dict[str, int]]:
    """``params`` with float array leaves, and its sizes; raises naming the wrong leaf."""
    if params.kind not in TORCH_CELLS:
        raise ValueError(
            f"params.kind must be one of {', '.join(map(repr, TORCH_CELLS))}, got {params.kind!r}."
        )
    if not isinstance(params.layers, tuple) or not params.layers:
        raise ValueError(
            f"params.layers must be a non-empty tuple of LayerParams, got {params.layers!r}."
        )
    gates = GATES[params.kind]
    for k, layer in enumerate(params.layers):
        if not isinstance(layer, LayerParams):
            raise TypeError(
                f"params.layers[{k}] must be a LayerParams, got {type(layer).__name__}."
            )
    bias = params.layers[0].bias_ih is not None
    layers = []
    for k, layer in enumerate(params.layers):
        for f in _LAYER_FIELDS[2:]:
            value = getattr(layer, f)
            if (value is None) == bias:
                raise ValueError(
                    f"params.layers[{k}].{f} must be {'an array' if bias else 'None'} as "
                    "params.layers[0].bias_ih is: every layer has both biases (PyTorch's "
                    f"bias=True) or none (bias=False: both None), got {_describe(value)}."
                )
        leaves = {
            f: _checks.float_array(f"params.layers[{k}].{f}", getattr(layer, f))
            for f in _fields(bias)
        }
        layers.append(LayerParams(**{f: None for f in _LAYER_FIELDS} | leaves))
    head_w = _checks.float_array("params.head_weight", params.head_weight)
    head_b = _checks.float_array("params.head_bias", params.head_bias)
    first = layers[0]
    _checks.shape("params.layers[0].weight_hh", first.weight_hh, (None, None), "(G*H, H)")
    h = first.weight_hh.shape[1]
    g = gates * h
    _checks.shape(
        "params.layers[0].weight_ih", first.weight_ih, (g, None), f"(G*H, I) with G*H={g}"
    )
    i = first.weight_ih.shape[1]
    for k, layer in enumerate(layers):
        name = f"params.layers[{k}]"
        width = i if k == 0 else h
        _checks.shape(
            f"{name}.weight_ih",
            layer.weight_ih,
            (g, width),
            f"(G*H, {'I' if k == 0 else 'H'}) with G={gates}, H={h}",
        )
        _checks.shape(
            f"{name}.weight_hh", layer.weight_hh, (g, h), f"(G*H, H) with G={gates}, H={h}"
        )
        for f in _fields(bias)[2:]:
            _checks.shape(f"{name}.{f}", getattr(layer, f), (g,), f"(G*H,) with G={gates}, H={h}")
    _checks.shape("params.head_weight", head_w, (None, h), f"(O, H) with H={h}")
    o = head_w.shape[0]
    _checks.shape("params.head_bias", head_b, (o,), f"(O,) with O={o}")
    checked = CellParams(tuple(layers), head_w, head_b, params.kind)
    sizes = {"input": i, "hidden": h, "output": o, "layers": len(layers)}
    return checked, sizes


def check_hidden0(
    kind: str,
    hidden0: Any,
    num_layers: int,
    batch: int,
    hidden: int,
    dtype: jnp.dtype,
    inputs: jax.Array | None = None,
) -> Any:
    """``hidden0`` in PyTorch's layout; raises naming what is wrong.

    Zeros when ``None``, their batch axis split as that of ``inputs`` (``(T, B, I)``),
    if given, is (:func:`loopgrad_jax._checks.batch_zeros`).
    """
    shape = (num_layers, batch, hidden)
    meaning = f"(num_layers, B, H) with num_layers={num_layers}, B={batch}, H={hidden}"
    if kind == "lstm":
        if hidden0 is None:
            zeros = _checks.batch_zeros(shape, dtype, inputs)
            return (zeros, zeros)
        if not isinstance(hidden0, tuple | list) or len(hidden0) != 2:
            raise ValueError(
                f"hidden0 of an LSTM must be the pair (h0, c0) of two {meaning} arrays, as "
                f"nn.LSTM takes it, got {_describe(hidden0)}."
            )
        pair = []
        for name, value in zip(("hidden0[0] (h0)", "hidden0[1] (c0)"), hidden0, strict=True):
            arr = _checks.float_array(name, value)
            _checks.shape(name, arr, shape, meaning)
            pair.append(arr)
        return tuple(pair)
    if hidden0 is None:
        return _checks.batch_zeros(shape, dtype, inputs)
    if isinstance(hidden0, tuple | list):
        raise ValueError(
            f"hidden0 of a {kind} cell must be one {meaning} array, got a {type(hidden0).__name__}."
        )
    arr = _checks.float_array("hidden0", hidden0)
    _checks.shape("hidden0", arr, shape, meaning)
    return arr


def _fields(bias: bool) -> tuple[str, ...]:
    """The fields of a layer that hold arrays: the weights, and the biases if it has them."""
    return _LAYER_FIELDS if bias else _LAYER_FIELDS[:2]


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}"
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__


# ------------------------------------------------------------------- creating params


def init_cell(
    key: jax.Array,
    kind: str,
    input_size: int,
    hidden_size: int,
    output_size: int = 1,
    num_layers: int = 1,
    *,
    bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
) -> CellParams | RNNParams:
    """Draws weights from the distributions PyTorch's modules use.

    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` draw every weight and bias uniformly on
    ``[-1/sqrt(H), 1/sqrt(H)]``; the head ``nn.Linear(H, O)`` draws on the same
    interval (its ``fan_in`` is ``H``). ``kind="article"`` is :func:`init_rnn`
    (one layer only). The sizes may be given by position or by name, as for
    :func:`init_rnn`. ``bias=False`` is PyTorch's: the layers have no biases (each
    ``bias_ih`` and ``bias_hh`` is ``None``); the head keeps its own.

    Examples:
      >>> import jax, loopgrad_jax as lg
      >>> p = lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=4,
      ...                  num_layers=2)
      >>> p.layers[1].weight_ih.shape, p.head_weight.shape
      ((16, 4), (1, 4))
    """
    kind = _checks.one_of("kind", kind, CELLS)
    sizes = {
        "input_size": input_size,
        "hidden_size": hidden_size,
        "output_size": output_size,
        "num_layers": num_layers,
    }
    i, h, o, layers = (_checks.static_length(n, v, minimum=1) for n, v in sizes.items())
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {jnp.dtype(dtype)}.")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}.")
    if kind == "article":
        if layers != 1:
            raise ValueError(f"the article's SimpleRNN has one layer, got num_layers={layers}.")
        if not bias:
            raise ValueError(
                "the article's SimpleRNN has biases (its nn.Linear layers'), got bias=False."
            )
        return init_rnn(key, i, h, o, dtype=dtype)
    bound = 1.0 / math.sqrt(h)
    g = GATES[kind] * h
    keys = iter(jax.random.split(key, 4 * layers + 2))

    def uniform(shape):
        return jax.random.uniform(next(keys), shape, dtype, minval=-bound, maxval=bound)

    def biases():
        return (uniform((g,)), uniform((g,))) if bias else (None, None)

    stack = tuple(
        LayerParams(uniform((g, i if k == 0 else h)), uniform((g, h)), *biases())
        for k in range(layers)
    )
    return CellParams(stack, uniform((o, h)), uniform((o,)), kind)


def from_torch(rnn: Any, head: Any, *, kind: str | None = None) -> CellParams:
    """The weights of a PyTorch ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and its ``nn.Linear`` head.

    Args:
      rnn: the module, or its state dict: a mapping of PyTorch's key names
        (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``)
        to array-likes (tensors, NumPy or JAX arrays). The number of layers
        comes from the keys. torch is not imported for a state dict of arrays.
      head: the ``nn.Linear(H, O)`` head, or its state dict (``weight``, ``bias``).
      kind: one of :data:`TORCH_CELLS`; required for a state dict, read off a
        module (and checked against it if given).

    Only the layout this library computes in is accepted: time-major inputs
    ``(T, B, I)`` (``batch_first=False``; for ``batch_first=True`` data, pass
    ``inputs.transpose(1, 0, 2)``), one direction, no LSTM projection
    (``proj_size=0``) and no dropout between layers. Anything else is refused with
    a ``ValueError`` that says so. A module built with ``bias=False`` (a state dict
    without ``bias_*`` keys) gives layers without biases (``None``), as in PyTorch.

    Examples:
      >>> import numpy as np, loopgrad_jax as lg
      >>> rng = np.random.default_rng(0)
      >>> state = {f"{w}_l0": rng.normal(size=s).astype(np.float32) for w, s in
      ...          [("weight_ih", (12, 3)), ("weight_hh", (12, 4)),
      ...           ("bias_ih", (12,)), ("bias_hh", (12,))]}
      >>> head = {"weight": np.ones((1, 4), np.float32), "bias": np.zeros(1, np.float32)}
      >>> p = lg.from_torch(state, head, kind="gru")
      >>> p.kind, p.num_layers
      ('gru', 1)
    """
    if isinstance(rnn, Mapping):
        if kind is None:
            raise ValueError(
                "kind is required when rnn is a state dict: one of "
                f"{', '.join(map(repr, TORCH_CELLS))}."
            )
        kind = _checks.one_of("kind", kind, TORCH_CELLS)
        state = dict(rnn)
    else:
        kind = _module_kind(rnn, kind)
        state = dict(rnn.state_dict())
    head_state = _head_state(head)
    layers = _layers_from_state(state, kind)
    head_w = _array("head['weight']", head_state["weight"])
    head_b = _array("head['bias']", head_state["bias"])
    h = layers[0].weight_hh.shape[-1] if layers[0].weight_hh.ndim == 2 else None
    if head_w.ndim != 2 or head_w.shape[1] != h:
        raise ValueError(
            f"head['weight'] must have shape (O, H) with H={h}, the rnn's hidden size (the "
            f"head reads the last layer's hidden state), got shape {tuple(head_w.shape)}."
        )
    params = CellParams(tuple(layers), head_w, head_b, kind)
    return check_params(params)[0]


def to_torch(params: CellParams | RNNParams) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(rnn_state, head_state)``: NumPy arrays under PyTorch's key names.

    Works on anything shaped like the params, leaf for leaf: weights, a gradient
    from ``jax.grad``, one update's slice of :attr:`TrainResult.grads`
    (``jax.tree.map(lambda g: g[t], result.grads)``) or the whole stack (each
    array then leads with the update axis). ``rnn.load_state_dict(rnn_state)``
    loads weights into a module of the same shape. For the article's
    :class:`RNNParams` the keys are the ``SimpleRNN``'s: ``i2h.weight``,
    ``i2h.bias`` in the first dict and ``h2o``'s ``weight``, ``bias`` in the head's.
    """
    if isinstance(params, RNNParams):
        return (
            {"i2h.weight": np.asarray(params.i2h_weight), "i2h.bias": np.asarray(params.i2h_bias)},
            {"weight": np.asarray(params.h2o_weight), "bias": np.asarray(params.h2o_bias)},
        )
    if not isinstance(params, CellParams):
        raise TypeError(
            f"params must be a CellParams or RNNParams (or a gradient of one), got "
            f"{type(params).__name__}."
        )
    rnn_state = {
        f"{f}_l{k}": np.asarray(getattr(layer, f))
        for k, layer in enumerate(params.layers)
        for f in _fields(layer.bias_ih is not None)
    }
    head_state = {"weight": np.asarray(params.head_weight), "bias": np.asarray(params.head_bias)}
    return rnn_state, head_state


def _module_kind(rnn: Any, kind: str | None) -> str:
    name = type(rnn).__name__
    if name not in _MODULES or not hasattr(rnn, "state_dict"):
        raise TypeError(
            "rnn must be a torch.nn.RNN, LSTM or GRU module or its state dict (a mapping of "
            f"'weight_ih_l0'-style keys to arrays), got {name}."
        )
    refusals = {
        "bidirectional": (
            getattr(rnn, "bidirectional", False),
            "bidirectional modules are not supported: run two modules, one on the "
            "reversed sequence",
        ),
        "proj_size": (getattr(rnn, "proj_size", 0), "an LSTM with proj_size > 0 is not supported"),
        "batch_first": (
            getattr(rnn, "batch_first", False),
            "batch_first=True is not supported: this library is time-major, inputs "
            "(T, B, I); pass inputs.transpose(1, 0, 2) and keep the module's weights",
        ),
        "dropout": (
            getattr(rnn, "dropout", 0.0),
            "dropout between layers is not supported: the cells are deterministic",
        ),
    }
    for attr, (value, why) in refusals.items():
        if value:
            raise ValueError(f"rnn.{attr}={getattr(rnn, attr)!r}: {why}.")
    found = _MODULES[name][0]
    if name == "RNN":
        found = {"tanh": "rnn_tanh", "relu": "rnn_relu"}[rnn.nonlinearity]
    if kind is not None and kind != found:
        raise ValueError(
            f"kind={kind!r} does not match the module, an nn.{name} of kind {found!r}."
        )
    return found


def _head_state(head: Any) -> Mapping[str, Any]:
    if isinstance(head, Mapping):
        state = head
    elif type(head).__name__ == "Linear" and hasattr(head, "state_dict"):
        state = head.state_dict()
    else:
        raise TypeError(
            "head must be a torch.nn.Linear(H, O) or its state dict {'weight', 'bias'}, got "
            f"{type(head).__name__}."
        )
    keys = set(state)
    if keys != {"weight", "bias"}:
        raise ValueError(
            "head must hold exactly 'weight' (O, H) and 'bias' (O,) (nn.Linear with "
            f"bias=True), got keys {sorted(keys)}."
        )
    return state


def _layers_from_state(state: dict[str, Any], kind: str) -> list[LayerParams]:
    keys = sorted(state)
    if any(k.endswith("_reverse") for k in keys):
        raise ValueError(
            "rnn holds '_reverse' keys, a bidirectional module: not supported; run two modules, "
            "one on the reversed sequence."
        )
    if any(k.startswith("weight_hr_") for k in keys):
        raise ValueError(
            "rnn holds 'weight_hr_l*' keys, an LSTM with proj_size > 0: not supported."
        )
    pattern = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")
    found = [pattern.match(k) for k in keys]
    indices = {int(m.group(2)) for m in found if m}
    layers = max(indices) + 1 if indices else 0
    fields = _fields(any(m.group(1).startswith("bias") for m in found if m))
    expected = {f"{f}_l{k}" for k in range(layers) for f in fields}
    missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
    if layers == 0 or missing or extra:
        raise ValueError(
            "rnn's state dict must hold weight_ih_l{k} and weight_hh_l{k} for every layer "
            "k = 0..L-1, and bias_ih_l{k} and bias_hh_l{k} for every layer or none (a module "
            f"built with bias=False), got missing {missing}, unexpected {extra}."
        )
    gates = GATES[kind]
    whh = _array("rnn['weight_hh_l0']", state["weight_hh_l0"])
    if whh.ndim != 2 or whh.shape[0] != gates * whh.shape[1]:
        raise ValueError(
            f"rnn['weight_hh_l0'] must have shape (G*H, H) with G={gates} gates for "
            f"kind={kind!r}, got shape {tuple(whh.shape)}."
        )
    h = whh.shape[1]
    result = []
    for k in range(layers):
        leaves = {f: _array(f"rnn['{f}_l{k}']", state[f"{f}_l{k}"]) for f in fields}
        expected_shapes = {
            "weight_ih": ((gates * h, None if k == 0 else h), "(G*H, I)" if k == 0 else "(G*H, H)"),
            "weight_hh": ((gates * h, h), "(G*H, H)"),
            "bias_ih": ((gates * h,), "(G*H,)"),
            "bias_hh": ((gates * h,), "(G*H,)"),
        }
        for f in fields:
            want, meaning = expected_shapes[f]
            _checks.shape(
                f"rnn['{f}_l{k}']",
                leaves[f],
                want,
                f"{meaning} with G={gates} gates for kind={kind!r} and H={h}",
            )
        result.append(LayerParams(**{f: None for f in _LAYER_FIELDS} | leaves))
    return result


def _array(name: str, value: Any) -> jax.Array:
    """A PyTorch tensor, NumPy or JAX array as a JAX array of its own floating dtype."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    return _checks.float_array(name, value)
