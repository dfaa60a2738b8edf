"""The weights of PyTorch's modules (:class:`CellParams`), their checks and creation.

Parameters keep PyTorch's layout and names (``weight_ih_l{k}`` is ``(G*H, I_k)``
with ``G`` gates, stacked in PyTorch's order), so state dicts load without
transposes or reordering. Inside a loop the carry is a tuple with one entry per
layer (``h``, or ``(h, c)`` for an LSTM), batch first; at the API it is PyTorch's
``(num_layers, B, H)`` (and the pair ``(h, c)`` of two for an LSTM).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from loopgrad_jax import _checks
from loopgrad_jax._cells.kinds import CELLS, GATES, LAYER_FIELDS, TORCH_CELLS
from loopgrad_jax._rnn import RNNParams, init_rnn


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


jax.tree_util.register_dataclass(LayerParams, data_fields=list(LAYER_FIELDS), meta_fields=[])
jax.tree_util.register_dataclass(
    CellParams, data_fields=["layers", "head_weight", "head_bias"], meta_fields=["kind"]
)


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
        for f in LAYER_FIELDS[2:]:
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
        layers.append(LayerParams(**{f: None for f in LAYER_FIELDS} | leaves))
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
    return LAYER_FIELDS if bias else LAYER_FIELDS[:2]


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
