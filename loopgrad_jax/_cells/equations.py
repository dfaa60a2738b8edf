"""The cell equations: one step of each kind, shared by every loop kind and mode.

One step of layer ``k`` (``x`` its input, ``h``/``c`` its state), exactly as
PyTorch documents it::

  rnn_tanh:  h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)         (relu for rnn_relu)
  lstm:      i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh, 4)
             c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')
  gru:       r, z, n over split(x W_ih^T + b_ih, 3) and split(h W_hh^T + b_hh, 3):
             r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z);  n = tanh(x_n + r * h_n)
             h' = (1 - z) * n + z * h

Layer ``k > 0`` reads layer ``k - 1``'s new ``h``; the head ``nn.Linear(H, O)``
reads the last layer's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from loopgrad_jax._cell import Cell
from loopgrad_jax._cells.params import CellParams, LayerParams
from loopgrad_jax._precision import Precision, einsum, matmul
from loopgrad_jax._rnn import RNNParams

# ------------------------------------------------------------------- the cells


def layer_step(
    kind: str,
    w_hh: jax.Array,
    b_hh: jax.Array,
    state: Any,
    gi: jax.Array,
    w_hr: jax.Array | None = None,
    policy: Precision | None = None,
) -> tuple[Any, jax.Array]:
    """One layer's step given its input-side pre-activation ``gi = x W_ih^T + b_ih``.

    ``b_hh`` is ``(1, G*H)``, or ``(B, G*H)`` when :func:`_layer_sequence`'s rule adds
    a per-step term to the recurrent pre-activation, or ``None`` where :func:`loop_form`
    moved it into ``gi``. An LSTM with ``proj_size`` projects its new ``h`` by ``w_hr``
    ``(P, H)``: ``h' = (sigmoid(o) * tanh(c')) W_hr^T``. Returns ``(new state, new h)``.
    Under ``policy`` each product is :func:`loopgrad_jax._precision.matmul`'s and the
    new state is rounded to ``policy.state_dtype``.
    """
    if kind == "lstm":
        h, c = _lstm(policy, w_hh, b_hh, state[0], state[1], gi)
        if w_hr is not None:
            h = matmul(h, w_hr.T, policy)
        new = (h, c)
    elif kind == "gru":
        new = h = _gru(policy, w_hh, b_hh, state, gi)
    else:
        new = h = _ACTIVATION[kind](_plus(gi + matmul(state, w_hh.T, policy), b_hh))
    if policy is not None:
        new = policy.round_state(new)
        h = new[0] if kind == "lstm" else new
    return new, h


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


def _joined_step(kind: str, layer: JoinedLayer, h: jax.Array, x: jax.Array, policy) -> jax.Array:
    pre = matmul(jnp.concatenate([x, h], axis=-1), layer.kernel, policy)
    h = _ACTIVATION[kind](_plus(pre, _row(layer.bias)))
    return h if policy is None else policy.round_state(h)


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _lstm(policy, w_hh, b_hh, h, c, gi):
    i, f, g, o = jnp.split(_plus(gi + matmul(h, w_hh.T, policy), b_hh), 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


@_lstm.defjvp
def _lstm_jvp(policy, primals, tangents):
    w_hh, b_hh, h, c, gi = primals
    dw_hh, db_hh, dh, dc, dgi = tangents
    i, f, g, o = jnp.split(_plus(gi + matmul(h, w_hh.T, policy), b_hh), 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = jnp.tanh(c_new)
    h_new = o * tanh_c
    # d c_new = f dc + sum over i, f, g of coef * d(pre-activation); d h_new adds o's.
    coef = jnp.concatenate(
        [g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], axis=-1
    )
    dpre = _plus(dgi + matmul(dh, w_hh.T, policy) + matmul(h, dw_hh.T, policy), db_hh)
    di, df, dg, do = jnp.split(dpre * coef, 4, axis=-1)
    dc_new = f * dc + di + df + dg
    return (h_new, c_new), (do + o * (1 - tanh_c * tanh_c) * dc_new, dc_new)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gru(policy, w_hh, b_hh, h, gi):
    xr, xz, xn = jnp.split(gi, 3, axis=-1)
    hr, hz, hn = jnp.split(_plus(matmul(h, w_hh.T, policy), b_hh), 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    return (1 - z) * jnp.tanh(xn + r * hn) + z * h


@_gru.defjvp
def _gru_jvp(policy, primals, tangents):
    w_hh, b_hh, h, gi = primals
    dw_hh, db_hh, dh, dgi = tangents
    xr, xz, xn = jnp.split(gi, 3, axis=-1)
    hr, hz, hn = jnp.split(_plus(matmul(h, w_hh.T, policy), b_hh), 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h_new = (1 - z) * n + z * h
    # d h_new = coef . [d r_pre, d z_pre, d xn, d hn, dh], with n_pre = xn + r * hn.
    dn = (1 - z) * (1 - n * n)
    coef = jnp.concatenate([dn * hn * r * (1 - r), (h - n) * z * (1 - z), dn, dn * r, z], axis=-1)
    dxr, dxz, dxn = jnp.split(dgi, 3, axis=-1)
    dh_pre = matmul(dh, w_hh.T, policy) + matmul(h, dw_hh.T, policy)
    dhr, dhz, dhn = jnp.split(_plus(dh_pre, db_hh), 3, axis=-1)
    terms = jnp.concatenate([dxr + dhr, dxz + dhz, dxn, dhn, dh], axis=-1) * coef
    dr, dz, dxn_term, dhn_term, dh_term = jnp.split(terms, 5, axis=-1)
    return h_new, dr + dz + dxn_term + dhn_term + dh_term


def _step(params: CellParams, carry: tuple, x: jax.Array, projected: bool = False) -> tuple:
    new, policy = [], params.precision
    for k, layer in enumerate(params.layers):
        if isinstance(layer, JoinedLayer):
            x = _joined_step(params.kind, layer, carry[k], x, policy)
            new.append(x)
            continue
        gi = x
        if not (k == 0 and projected):
            gi = _plus(matmul(x, layer.weight_ih.T, policy), _row(layer.bias_ih))
        state, x = layer_step(
            params.kind, layer.weight_hh, _row(layer.bias_hh), carry[k], gi, layer.weight_hr, policy
        )
        new.append(state)
    return tuple(new)


def torch_step(params: CellParams, carry: tuple, x: jax.Array) -> tuple:
    """One step of every layer: the new carry (a tuple with one state per layer)."""
    return _step(params, carry, x)


def torch_readout(params: CellParams, carry: tuple) -> jax.Array:
    """The head applied to the last layer's ``h``: ``(B, O)``."""
    last = carry[-1][0] if params.kind == "lstm" else carry[-1]
    return matmul(last, params.head_weight.T, params.precision) + params.head_bias[None, :]


def torch_project(params: CellParams, inputs: jax.Array) -> jax.Array:
    """The first layer's ``x W_ih^T + b_ih`` for every step at once: ``(T, B, G*H)``."""
    return _project(params.layers[0], inputs, params.precision)


def _project(layer: LayerParams, xs: jax.Array, policy: Precision | None) -> jax.Array:
    """``layer``'s input side for every step at once: ``(T, B, I_k) -> (T, B, G*H)``."""
    return _plus(einsum("tbi,gi->tbg", xs, layer.weight_ih, policy), _row(layer.bias_ih, 2))


def torch_step_projected(params: CellParams, carry: tuple, projected: jax.Array) -> tuple:
    """:func:`torch_step` given the step's :func:`torch_project`."""
    return _step(params, carry, projected, projected=True)


#: The cell of every kind in :data:`TORCH_CELLS` (the kind is read off the params).
TORCH_CELL = Cell(torch_step, torch_readout, torch_project, torch_step_projected)
