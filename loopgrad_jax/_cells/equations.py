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
import numpy as np

from loopgrad_jax import _checks
from loopgrad_jax._cell import Cell
from loopgrad_jax._cells.params import CellParams, LayerParams
from loopgrad_jax._precision import Precision, einsum, matmul, matmul_pair, matmul_t
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

    ``b_hh`` is ``(1, G*H)``, or ``None`` where :func:`loop_form` moved it into
    ``gi`` (or the module has no biases). An LSTM with ``proj_size`` projects its new
    ``h`` by ``w_hr`` ``(P, H)``: ``h' = (sigmoid(o) * tanh(c')) W_hr^T``. Returns
    ``(new state, new h)``. Under ``policy`` each product is
    :func:`loopgrad_jax._precision.matmul`'s and the new state is rounded to
    ``policy.state_dtype``.

    The step is :func:`combine` of ``gi`` and ``h W_hh^T`` (the one product on the
    recurrent path), then :func:`update`, the gates, elementwise.
    """
    h = state[0] if kind == "lstm" else state
    new = update(kind, combine(kind, gi, matmul_t(h, w_hh, policy), b_hh), state)
    if w_hr is not None:
        new = (matmul_t(new[0], w_hr, policy), new[1])
    if policy is not None:
        new = policy.round_state(new)
    return new, (new[0] if kind == "lstm" else new)


def combine(kind: str, gi: jax.Array, hw: jax.Array, b_hh: jax.Array | None) -> jax.Array:
    """The step's pre-activations, what :func:`update` reads, from ``gi`` and ``hw = h W_hh^T``.

    ``gi + hw + b_hh`` (``(B, G*H)``) for ``nn.RNN`` and ``nn.LSTM``; for ``nn.GRU``,
    whose ``n`` gate multiplies the recurrent part by ``r``, ``[x_r + h_r, x_z + h_z,
    x_n, h_n]`` (``(B, 4*H)``) with ``h_* = (hw + b_hh)_*``. Linear in ``gi`` and ``hw``:
    :func:`combine_transpose` maps its cotangent back to theirs.
    """
    if kind != "gru":
        return _plus(gi + hw, b_hh)
    size = gi.shape[-1] // 3
    gh = _plus(hw, b_hh)
    rz = gi[..., : 2 * size] + gh[..., : 2 * size]
    return jnp.concatenate([rz, gi[..., 2 * size :], gh[..., 2 * size :]], axis=-1)


def combine_blocks(kind: str, gi: tuple, hw: tuple) -> tuple:
    """:func:`combine` (without ``b_hh``) on gate blocks: ``gi`` and ``hw`` each hold one
    ``(..., H)`` array per gate, and so does the result, one per block of ``pre``'s
    columns: ``gi_k + hw_k``; for ``nn.GRU`` ``(x_r + h_r, x_z + h_z, x_n, h_n)``.
    Taken over every step at once, it reads and writes no array of joined columns."""
    if kind != "gru":
        return tuple(a + b for a, b in zip(gi, hw, strict=True))
    return (gi[0] + hw[0], gi[1] + hw[1], gi[2], hw[2])


def combine_transpose(kind: str, dpre: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cotangents of :func:`combine`'s ``gi`` and ``hw`` (``b_hh``'s sums ``hw``'s)."""
    if kind != "gru":
        return dpre, dpre
    size = dpre.shape[-1] // 4
    rz, xn, hn = dpre[..., : 2 * size], dpre[..., 2 * size : 3 * size], dpre[..., 3 * size :]
    return jnp.concatenate([rz, xn], axis=-1), jnp.concatenate([rz, hn], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def update(kind: str, pre: jax.Array, state: Any) -> Any:
    """The gates, elementwise: the new state from :func:`combine`'s ``pre`` and the old state.

    ``nn.RNN``: ``h' = act(pre)``; ``nn.LSTM`` (reads the old ``c``):
    ``i, f, g, o = activate(pre)``, ``c' = f c + i g``, ``h' = o tanh(c')``, the new
    state ``(h', c')`` (``h'`` before any projection); ``nn.GRU`` (reads the old ``h``):
    ``r, z, x_n, h_n = activate(pre)``, ``h' = (1 - z) tanh(x_n + r h_n) + z h``.

    Its derivative is :func:`gates_tangent` of the coefficients
    :func:`gates_linearized` returns beside the new state: reverse mode through any
    loop stores those per step, one array each, not every intermediate the tangent
    touches (JAX's rules, op by op, store 12 ``(B, H)`` arrays per LSTM step, 9 per
    GRU step).
    """
    return gates_linearized(kind, pre, state)[0]


@update.defjvp
def _update_jvp(kind, primals, tangents):
    new, coefs = gates_linearized(kind, *primals)
    return new, gates_tangent(kind, coefs, *tangents)


def gates_linearized(kind: str, pre: jax.Array, state: Any) -> tuple[Any, tuple]:
    """:func:`update`'s new state and the coefficients of its linearization.

    The coefficients fold every activation's derivative into one factor per
    pre-activation column (``sigmoid' = a (1 - a)``, ``tanh' = 1 - a^2``), plus the
    factors on the old state's tangent, each a ``(B, H)`` array of its own: an LSTM's
    four gates, ``f`` and ``d h' / d c'``; a GRU's five; an ``nn.RNN``'s one. Kept as
    separate arrays, not joined: a loop that stores them reads each back from its own
    buffer, and XLA's CPU backend ran an elementwise step several times slower when it
    read several column blocks of one stored array (``docs/notes.md``).
    """
    acts = activate(kind, pre)
    if kind == "lstm":
        c = state[1]
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        gates = (g * i * (1 - i), c * f * (1 - f), i * (1 - g) * (1 + g), tanh_c * o * (1 - o))
        return (o * tanh_c, c_new), (*gates, f, o * (1 - tanh_c) * (1 + tanh_c))
    if kind == "gru":
        h = state
        r, z, xn, hn = jnp.split(acts, 4, axis=-1)
        n = jnp.tanh(xn + r * hn)
        # d h' = coefs . [d r_pre, d z_pre, d x_n, d h_n, d h], with n_pre = x_n + r h_n.
        dn = (1 - z) * (1 - n) * (1 + n)
        return (1 - z) * n + z * h, (dn * hn * r * (1 - r), (h - n) * z * (1 - z), dn, dn * r, z)
    return acts, (output_slope(kind, acts),)


def output_slope(kind: str, h: jax.Array) -> jax.Array:
    """An ``nn.RNN`` layer's ``d h' / d pre`` from ``h'`` itself: ``1 - h'^2`` or ``[h' > 0]``."""
    return _SLOPES[ACTIVATIONS[kind][0]](h)


def gates_tangent(kind: str, coefs: tuple, dpre: jax.Array, dstate: Any) -> Any:
    """The tangent of :func:`update`'s new state: linear in ``dpre`` and ``dstate``."""
    if kind == "lstm":
        *gates, f, dh_dc = coefs
        di, df, dg, do = (c * d for c, d in zip(gates, jnp.split(dpre, 4, axis=-1), strict=True))
        dc_new = f * dstate[1] + di + df + dg
        return do + dh_dc * dc_new, dc_new
    if kind == "gru":
        dr, dz, dxn, dhn = jnp.split(dpre, 4, axis=-1)
        return coefs[0] * dr + coefs[1] * dz + coefs[2] * dxn + coefs[3] * dhn + coefs[4] * dstate
    return coefs[0] * dpre


#: Each kind's activation per block of ``H`` columns of :func:`combine`'s ``pre``.
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "rnn_tanh": ("tanh",),
    "rnn_relu": ("relu",),
    "lstm": ("sigmoid", "sigmoid", "tanh", "sigmoid"),  # i, f, g, o
    "gru": ("sigmoid", "sigmoid", "identity", "identity"),  # r, z; x_n, h_n as they are
}


def activate(kind: str, pre: jax.Array) -> jax.Array:
    """Each block of ``pre``'s columns through its activation (:data:`ACTIVATIONS`).

    A sigmoid is computed as ``(1 + tanh(x / 2)) / 2``, the same function: where
    every block is a tanh or a sigmoid (an LSTM's four gates) that is one ``tanh``
    over all the columns, each scaled and shifted by constants, which XLA's CPU
    backend ran in about half the time of three sigmoids and a tanh on their slices
    (the LSTM's forward loop at I=64, H=256, B=32, T=1000: 226 against 390 ms).
    """
    names = ACTIVATIONS[kind]
    if set(names) <= {"tanh", "sigmoid"} and len(names) > 1:
        size = pre.shape[-1] // len(names)
        half = np.repeat([n == "sigmoid" for n in names], size)
        lead = (1,) * (pre.ndim - 1)
        scale = jnp.asarray(np.where(half, 0.5, 1.0).reshape(lead + (-1,)), pre.dtype)
        shift = jnp.asarray(np.where(half, 0.5, 0.0).reshape(lead + (-1,)), pre.dtype)
        return jnp.tanh(pre * scale) * scale + shift
    blocks = jnp.split(pre, len(names), axis=-1) if len(names) > 1 else [pre]
    out = [_FUNCTIONS[name](block) for name, block in zip(names, blocks, strict=True)]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


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


_FUNCTIONS = {
    "tanh": _tanh,
    "relu": jax.nn.relu,
    "sigmoid": lambda a: 0.5 * jnp.tanh(0.5 * a) + 0.5,
    "identity": lambda a: a,
}
_SLOPES = {
    "tanh": lambda a: (1 - a) * (1 + a),
    "relu": lambda a: (a > 0).astype(a.dtype),
    "sigmoid": lambda a: a * (1 - a),
    "identity": jnp.ones_like,
}


@dataclasses.dataclass(frozen=True, eq=False)
class JoinedLayer:
    """An ``nn.RNN`` layer as its loop runs it: ``h' = act([x, h] @ weight.T + bias)``.

    ``weight`` is ``[W_ih, W_hh]``, ``(H, I + H)``, ``kernel`` its transpose and
    ``bias`` is ``b_ih + b_hh``: all built once before the loop by :func:`joined`
    (the same pre-activation as PyTorch's, its terms summed in another order). The
    step multiplies by them with :func:`loopgrad_jax._precision.matmul_pair`: the
    forward product and the weight's gradient, accumulated every step, in ``kernel``'s
    layout, and reverse mode's per-step product with ``weight`` as stored.
    """

    weight: jax.Array
    kernel: jax.Array
    bias: jax.Array | None


jax.tree_util.register_dataclass(
    JoinedLayer, data_fields=["weight", "kernel", "bias"], meta_fields=[]
)


def joined(weight: jax.Array, bias: jax.Array | None) -> JoinedLayer:
    """The :class:`JoinedLayer` of ``[W_ih, W_hh]`` and its one bias (``kernel = weight.T``)."""
    return JoinedLayer(weight, weight.T, bias)


def _joined_step(kind: str, layer: JoinedLayer, h: jax.Array, x: jax.Array, policy) -> jax.Array:
    xh = jnp.concatenate([x, h], axis=-1)
    pre = matmul_pair(xh, layer.weight, layer.kernel, policy)
    h = activate(kind, _plus(pre, _row(layer.bias)))
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
    per step over ``[x, h]``, its two weights side by side, and one bias;
    without, it keeps its two weights, with ``bias_hh`` added into ``bias_ih`` (and
    ``None``), as an LSTM layer does either way. A GRU comes back unchanged: its
    ``b_hn`` sits inside ``r * (h W_hn^T + b_hn)``.

    Inside a loop, reverse mode accumulates each weight's and bias's gradient every
    step; built before it, each is accumulated once per layer and reaches PyTorch's
    own parameters (both biases included) through these few operations after the
    loop. :func:`loopgrad_jax._sequence.rnn_forward` joins where reverse mode stores
    every step (``docs/notes.md`` has the measurements).
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
            joined(jnp.concatenate([layer.weight_ih, layer.weight_hh], axis=1), _biases(layer))
            for layer in params.layers
        )
    return dataclasses.replace(params, layers=layers)


def article_loop_form(params: RNNParams) -> CellParams:
    """The article's ``SimpleRNN`` as :func:`loop_form` builds an ``rnn_tanh`` layer.

    ``i2h(concat([x, h]))`` is ``[x, h] @ W^T + b``: ``i2h_weight`` is already
    ``[W_x, W_h]``, already the joined layer's weight.
    """
    layer = joined(params.i2h_weight, params.i2h_bias)
    return CellParams((layer,), params.h2o_weight, params.h2o_bias, "rnn_tanh")


def article_layer_form(params: RNNParams) -> CellParams:
    """The article's ``SimpleRNN`` as an ``rnn_tanh`` layer of :class:`LayerParams`.

    ``i2h_weight`` is ``[W_x, W_h]``: its first ``I`` columns are ``W_ih``, the rest
    ``W_hh``; ``i2h_bias`` is the one bias (``bias_hh`` ``None``, as :func:`loop_form`
    leaves a layer). The same pre-activation, for :func:`hoisted_forward`.
    """
    hidden = params.i2h_weight.shape[0]
    size = params.i2h_weight.shape[1] - hidden
    layer = LayerParams(
        params.i2h_weight[:, :size], params.i2h_weight[:, size:], params.i2h_bias, None
    )
    return CellParams((layer,), params.h2o_weight, params.h2o_bias, "rnn_tanh")


def _step(params: CellParams, carry: tuple, x: jax.Array, projected: bool = False) -> tuple:
    new, policy = [], params.precision
    for k, layer in enumerate(params.layers):
        if isinstance(layer, JoinedLayer):
            x = _joined_step(params.kind, layer, carry[k], x, policy)
            new.append(x)
            continue
        gi = x
        if not (k == 0 and projected):
            gi = _plus(matmul_t(x, layer.weight_ih, policy), _row(layer.bias_ih))
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
    return matmul_t(last, params.head_weight, params.precision) + params.head_bias[None, :]


def torch_project(params: CellParams, inputs: jax.Array) -> jax.Array:
    """The first layer's ``x W_ih^T + b_ih`` for every step at once: ``(T, B, G*H)``."""
    return _project(params.layers[0], inputs, params.precision)


def _project(layer: LayerParams, xs: jax.Array, policy: Precision | None) -> jax.Array:
    """``layer``'s input side for every step at once: ``(T, B, I_k) -> (T, B, G*H)``."""
    return _plus(rows_product(xs, layer.weight_ih, policy), _row(layer.bias_ih, 2))


def project_blocks(
    xs: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    policy: Precision | None,
    gates: int,
) -> tuple:
    """``xs @ weight.T + bias`` over every step, ``(T, B, K)``, as one ``(T, B, H)``
    array per gate: one :func:`rows_product` per block of ``gates`` blocks of
    ``weight``'s rows (and of ``bias``; ``None``: no bias).

    A layer's input side (``W_ih``, ``b_ih``) and the layer rule's recurrent tangent
    (``dW_hh``, ``db_hh``) are made so: the same numbers as splitting one product's
    columns, without writing and reading the joined ``(T, B, G*H)`` array, and reverse
    mode's products (each block's weight gradient and its part of ``dx``) read the
    blocks' cotangents as they come, unjoined. At I=64, H=256, T*B=32000 rows XLA's
    CPU backend took 27 ms for a GRU's three products against 57 ms for one product and
    its split, and 29 against 51 ms for ``dW_ih`` from the three cotangents against
    from their concatenation.
    """
    biases = (None,) * gates if bias is None else jnp.split(bias, gates)
    return tuple(
        _plus(rows_product(xs, w, policy), _row(b, 2))
        for w, b in zip(jnp.split(weight, gates), biases, strict=True)
    )


def rows_product(xs: jax.Array, weight: jax.Array, policy: Precision | None) -> jax.Array:
    """``xs @ weight.T`` over every step at once, ``(T, B, K) -> (T, B, N)``.

    One 2-D product over the ``T * B`` rows, and so are the two that reverse mode
    makes of it (``dW = dY^T X`` and ``dX = dY W``), as fused RNN kernels compute them.
    Where an Explicit mesh splits the batch axis (no reshape can merge it) it is the
    3-D ``einsum``.
    """
    if _checks.batch_split(xs):
        return einsum("tbk,nk->tbn", xs, weight, policy)
    return _rows_product(xs, weight, policy)


# Checkpointed so that reverse mode keeps ``xs`` itself, not its reshape: where ``xs`` is
# also kept for another reason (a layer's outputs, read by the next product and by the
# layer's own rule) it is then kept once. The reshape it recomputes moves no data.
@functools.partial(jax.checkpoint, static_argnums=(2,))
def _rows_product(xs: jax.Array, weight: jax.Array, policy: Precision | None) -> jax.Array:
    t, b, k = xs.shape
    # The barrier keeps weight.T a product operand of its own. Reverse mode then computes
    # the weight's gradient as xs^T dY, (K, N), and transposes that small result; without
    # it XLA folds the transpose into the product, dY^T xs, which its CPU backend ran 30%
    # slower at T * B = 32000 rows (156 against 112 ms for a (1024, 256) weight).
    weight_t = jax.lax.optimization_barrier(weight.T)
    return matmul(xs.reshape(t * b, k), weight_t, policy).reshape(t, b, -1)


def torch_step_projected(params: CellParams, carry: tuple, projected: jax.Array) -> tuple:
    """:func:`torch_step` given the step's :func:`torch_project`."""
    return _step(params, carry, projected, projected=True)


#: The cell of every kind in :data:`TORCH_CELLS` (the kind is read off the params).
TORCH_CELL = Cell(torch_step, torch_readout, torch_project, torch_step_projected)
