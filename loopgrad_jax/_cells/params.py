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
from loopgrad_jax._precision import Precision, check_param_dtypes, check_precision
from loopgrad_jax._rnn import RNNParams, init_rnn


@dataclasses.dataclass(frozen=True, eq=False)
class LayerParams:
    """One layer's weights, as PyTorch names them without the ``_l{k}`` suffix."""

    weight_ih: jax.Array  # (G*H, I) for the first layer, (G*H, D*H_out) after
    weight_hh: jax.Array  # (G*H, H_out)
    bias_ih: jax.Array | None  # (G*H,); None in a module built with bias=False
    bias_hh: jax.Array | None  # (G*H,); None then too, and inside a loop after loop_form
    weight_hr: jax.Array | None = None  # (P, H): an LSTM's projection (proj_size=P), or None


@dataclasses.dataclass(frozen=True, eq=False)
class CellParams:
    """The weights of an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and its ``nn.Linear`` head.

    A pytree whose leaves are the arrays; ``kind`` (one of :data:`TORCH_CELLS`) is
    static, so ``jax.grad`` returns a ``CellParams`` of the same kind, which
    :func:`to_torch` names as PyTorch does. A module built with ``bias=False`` has
    no layer biases: every layer's ``bias_ih`` and ``bias_hh`` are ``None`` (no
    leaves, so no gradients and no updates either); the head keeps its bias.

    The module's options are static fields, as PyTorch keeps them: ``bidirectional``
    (``layers`` then holds layer ``l``'s forward direction at ``2*l`` and its reverse
    at ``2*l + 1``, PyTorch's order of ``h_n``), an LSTM's ``proj_size`` (every layer's
    ``weight_hr``), ``batch_first`` and ``dropout`` (the defaults
    :func:`loopgrad_jax.rnn` takes for them), and ``cell_module``: imported from an
    ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` (one layer, whose state dict
    keys have no ``_l0``). ``head_weight`` and ``head_bias`` are ``None`` without a head.
    ``precision`` is the mixed-precision policy the entry points set from their
    ``precision=`` argument (:class:`loopgrad_jax.Precision`); ``None``: every
    operation in the parameters' dtype.
    """

    layers: tuple[LayerParams, ...]
    head_weight: jax.Array | None  # (O, D*H_out), or None without a head
    head_bias: jax.Array | None  # (O,)
    kind: str = "rnn_tanh"
    bidirectional: bool = False
    batch_first: bool = False
    dropout: float = 0.0
    cell_module: bool = False
    precision: Precision | None = None

    @property
    def directions(self) -> int:
        """``D``: 2 for a bidirectional module, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def num_layers(self) -> int:
        return len(self.layers) // self.directions


jax.tree_util.register_dataclass(
    LayerParams, data_fields=[*LAYER_FIELDS, "weight_hr"], meta_fields=[]
)
jax.tree_util.register_dataclass(
    CellParams,
    data_fields=["layers", "head_weight", "head_bias"],
    meta_fields=["kind", "bidirectional", "batch_first", "dropout", "cell_module", "precision"],
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
    """``params`` with float array leaves, and its sizes; raises naming the wrong leaf.

    The sizes: ``input`` (I), ``hidden`` (H), ``proj`` (an LSTM's proj_size P, or 0),
    ``state`` (H_out: P, or H without a projection), ``output`` (O, or 0 without a
    head), ``layers`` (L) and ``directions`` (D).
    """
    if params.kind not in TORCH_CELLS:
        raise ValueError(
            f"params.kind must be one of {', '.join(map(repr, TORCH_CELLS))}, got {params.kind!r}."
        )
    if not isinstance(params.layers, tuple) or not params.layers:
        raise ValueError(
            f"params.layers must be a non-empty tuple of LayerParams, got {params.layers!r}."
        )
    d = params.directions
    if len(params.layers) % d:
        raise ValueError(
            f"params.layers of a bidirectional module holds two layers (both directions) per "
            f"layer, so an even number, got {len(params.layers)}."
        )
    if not isinstance(params.dropout, int | float) or not 0 <= params.dropout < 1:
        raise ValueError(f"params.dropout must be a number in [0, 1), got {params.dropout!r}.")
    gates = GATES[params.kind]
    for k, layer in enumerate(params.layers):
        if not isinstance(layer, LayerParams):
            raise TypeError(
                f"params.layers[{k}] must be a LayerParams, got {type(layer).__name__}."
            )
    bias = params.layers[0].bias_ih is not None
    proj = params.layers[0].weight_hr is not None
    if proj and params.kind != "lstm":
        raise ValueError(
            f"params.layers[0].weight_hr is an LSTM's projection (proj_size), got one with "
            f"kind={params.kind!r}."
        )
    layers = []
    for k, layer in enumerate(params.layers):
        for f, present, meaning in (
            *((f, bias, "both biases (bias=True) or none (bias=False)") for f in LAYER_FIELDS[2:]),
            ("weight_hr", proj, "a projection (proj_size > 0) or none"),
        ):
            value = getattr(layer, f)
            if (value is None) == present:
                raise ValueError(
                    f"params.layers[{k}].{f} must be {'an array' if present else 'None'} as "
                    f"params.layers[0]'s is: every layer has {meaning}, got {_describe(value)}."
                )
        leaves = {
            f: _checks.float_array(f"params.layers[{k}].{f}", getattr(layer, f))
            for f in (*_fields(bias), *(("weight_hr",) if proj else ()))
        }
        layers.append(LayerParams(**{f: None for f in LAYER_FIELDS} | leaves))
    first = layers[0]
    _checks.shape("params.layers[0].weight_hh", first.weight_hh, (None, None), "(G*H, H_out)")
    g = first.weight_hh.shape[0]
    if g % gates:
        raise ValueError(
            f"params.layers[0].weight_hh must have shape (G*H, H_out) with G={gates} gates for "
            f"kind={params.kind!r}, got shape {tuple(first.weight_hh.shape)}."
        )
    h, h_out = g // gates, first.weight_hh.shape[1]
    _checks.shape(
        "params.layers[0].weight_ih", first.weight_ih, (g, None), f"(G*H, I) with G*H={g}"
    )
    i = first.weight_ih.shape[1]
    sizes = f"G={gates}, H={h}, H_out={h_out}, D={d}"
    for k, layer in enumerate(layers):
        name = f"params.layers[{k}]"
        width, meaning = (i, "I") if k < d else (d * h_out, "D*H_out")
        _checks.shape(
            f"{name}.weight_ih", layer.weight_ih, (g, width), f"(G*H, {meaning}) with {sizes}"
        )
        _checks.shape(
            f"{name}.weight_hh", layer.weight_hh, (g, h_out), f"(G*H, H_out) with {sizes}"
        )
        for f in _fields(bias)[2:]:
            _checks.shape(f"{name}.{f}", getattr(layer, f), (g,), f"(G*H,) with {sizes}")
        if proj:
            _checks.shape(f"{name}.weight_hr", layer.weight_hr, (h_out, h), f"(P, H) with {sizes}")
    head_w, head_b, o = params.head_weight, params.head_bias, 0
    if (head_w is None) != (head_b is None):
        raise ValueError(
            "params.head_weight and params.head_bias come together (a head) or are both None "
            f"(no head), got {_describe(head_w)} and {_describe(head_b)}."
        )
    if head_w is not None:
        head_w = _checks.float_array("params.head_weight", head_w)
        head_b = _checks.float_array("params.head_bias", head_b)
        _checks.shape(
            "params.head_weight",
            head_w,
            (None, d * h_out),
            f"(O, D*H_out) with D*H_out={d * h_out}: the head reads the last layer's output",
        )
        o = head_w.shape[0]
        _checks.shape("params.head_bias", head_b, (o,), f"(O,) with O={o}")
    checked = dataclasses.replace(
        params, layers=tuple(layers), head_weight=head_w, head_bias=head_b
    )
    sizes = {
        "input": i,
        "hidden": h,
        "proj": h_out if proj else 0,
        "state": h_out,
        "output": o,
        "layers": len(layers) // d,
        "directions": d,
    }
    return checked, sizes


def check_hidden0(
    kind: str,
    hidden0: Any,
    num_layers: int,
    batch: int,
    hidden: int,
    dtype: jnp.dtype,
    inputs: jax.Array | None = None,
    *,
    state: int | None = None,
) -> Any:
    """``hidden0`` in PyTorch's layout; raises naming what is wrong.

    ``num_layers`` counts the states, ``D * num_layers`` for a bidirectional module;
    ``h`` has ``state`` units (an LSTM's ``proj_size``, if it has one; else
    ``hidden``), an LSTM's ``c`` has ``hidden``. Zeros when ``None``, their batch axis
    split as that of ``inputs`` (``(T, B, I)``), if given, is
    (:func:`loopgrad_jax._checks.batch_zeros`).
    """
    state = hidden if state is None else state
    shape = (num_layers, batch, state)
    meaning = f"(D*num_layers, B, H_out) with D*num_layers={num_layers}, B={batch}, H_out={state}"
    if kind == "lstm":
        c_shape = (num_layers, batch, hidden)
        c_meaning = f"(D*num_layers, B, H) with D*num_layers={num_layers}, B={batch}, H={hidden}"
        if hidden0 is None:
            return tuple(_checks.batch_zeros(s, dtype, inputs) for s in (shape, c_shape))
        if not isinstance(hidden0, tuple | list) or len(hidden0) != 2:
            raise ValueError(
                f"hidden0 of an LSTM must be the pair (h0, c0) of a {meaning} and a "
                f"{c_meaning} array, as nn.LSTM takes it, got {_describe(hidden0)}."
            )
        h0, c0 = (
            _checks.float_array(n, v)
            for n, v in zip(("hidden0[0] (h0)", "hidden0[1] (c0)"), hidden0, strict=True)
        )
        if state != hidden and (h0.shape, c0.shape) == (c_shape, shape):
            raise ValueError(
                f"hidden0 of an LSTM is the pair (h0, c0), h0 {meaning} and c0 {c_meaning}, "
                f"got them the other way round (shapes {tuple(h0.shape)} and {tuple(c0.shape)})."
            )
        _checks.shape("hidden0[0] (h0)", h0, shape, meaning)
        _checks.shape("hidden0[1] (c0)", c0, c_shape, c_meaning)
        return (h0, c0)
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
    output_size: int | None = 1,
    num_layers: int = 1,
    *,
    bias: bool = True,
    bidirectional: bool = False,
    proj_size: int = 0,
    batch_first: bool = False,
    dropout: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
) -> CellParams | RNNParams:
    """Draws weights from the distributions PyTorch's modules use.

    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` draw every weight and bias uniformly on
    ``[-1/sqrt(H), 1/sqrt(H)]``; the head ``nn.Linear(D * H_out, O)`` draws on the same
    interval. ``kind="article"`` is :func:`init_rnn` (one layer only). The sizes may be
    given by position or by name, as for :func:`init_rnn`. The module's options are
    PyTorch's: ``bias=False`` (no layer biases: each ``bias_ih`` and ``bias_hh`` is
    ``None``; the head keeps its own), ``bidirectional``, an LSTM's ``proj_size``,
    ``batch_first`` and ``dropout`` (the defaults :func:`loopgrad_jax.rnn` uses);
    ``output_size=None``: no head.

    Examples:
      >>> import jax, loopgrad_jax as lg
      >>> p = lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=4,
      ...                  num_layers=2)
      >>> p.layers[1].weight_ih.shape, p.head_weight.shape
      ((16, 4), (1, 4))
      >>> b = lg.init_cell(jax.random.key(0), "gru", 3, 4, None, 2, bidirectional=True)
      >>> len(b.layers), b.layers[2].weight_ih.shape, b.head_weight
      (4, (12, 8), None)
    """
    kind = _checks.one_of("kind", kind, CELLS)
    sizes = {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers}
    i, h, layers = (_checks.static_length(n, v, minimum=1) for n, v in sizes.items())
    o = (
        None
        if output_size is None
        else _checks.static_length("output_size", output_size, minimum=1)
    )
    p = _checks.static_length("proj_size", proj_size)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {jnp.dtype(dtype)}.")
    for name, flag in (
        ("bias", bias),
        ("bidirectional", bidirectional),
        ("batch_first", batch_first),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}.")
    if p and (kind != "lstm" or p >= h):
        raise ValueError(
            f"proj_size is an LSTM's, below hidden_size={h}, got proj_size={p} with kind={kind!r}."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")
    if kind == "article":
        plain = {
            "num_layers": (layers, 1),
            "bias": (bias, True),
            "bidirectional": (bidirectional, False),
            "batch_first": (batch_first, False),
            "dropout": (dropout, 0.0),
        }
        for name, (given, only) in plain.items():
            if given != only:
                raise ValueError(
                    f"the article's SimpleRNN is one time-major layer with biases and a head: "
                    f"{name} must be {only!r}, got {given!r}."
                )
        if o is None:
            raise ValueError("the article's SimpleRNN has a head (h2o): got output_size=None.")
        return init_rnn(key, i, h, o, dtype=dtype)
    bound = 1.0 / math.sqrt(h)
    g, h_out, d = GATES[kind] * h, p or h, 2 if bidirectional else 1
    keys = iter(jax.random.split(key, (5 if p else 4) * layers * d + 2))

    def uniform(shape):
        return jax.random.uniform(next(keys), shape, dtype, minval=-bound, maxval=bound)

    def layer(width: int) -> LayerParams:
        w_ih, w_hh = uniform((g, width)), uniform((g, h_out))
        b_ih, b_hh = (uniform((g,)), uniform((g,))) if bias else (None, None)
        return LayerParams(w_ih, w_hh, b_ih, b_hh, uniform((p, h)) if p else None)

    stack = tuple(layer(i if k == 0 else d * h_out) for k in range(layers) for _ in range(d))
    head = (None, None) if o is None else (uniform((o, d * h_out)), uniform((o,)))
    return CellParams(
        stack, *head, kind, bidirectional=bidirectional, batch_first=batch_first, dropout=dropout
    )


def set_precision(tree: Any, policy: Precision | None) -> Any:
    """``tree`` with every :class:`CellParams` in it (params, gradients, an optimizer's
    state) under ``policy``: the entry points set it on the way in, and clear it
    (``None``) on what they return, so that results keep the caller's structure."""
    return jax.tree.map(
        lambda node: (
            dataclasses.replace(node, precision=policy) if isinstance(node, CellParams) else node
        ),
        tree,
        is_leaf=lambda node: isinstance(node, CellParams),
    )


def bind_precision(precision: object, params: Any) -> Precision | None:
    """The checked policy of ``precision=`` for ``params``; raises naming what is wrong."""
    policy = check_precision(precision)
    if policy is None:
        return None
    if not isinstance(params, CellParams):
        raise TypeError(
            f"precision={precision!r} applies to PyTorch's modules (a CellParams from "
            f"lg.init_cell or lg.from_torch), got params of type {type(params).__name__}; "
            "pass precision=None."
        )
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    check_param_dtypes(((f"params{jax.tree_util.keystr(p)}", v) for p, v in leaves), policy)
    return policy
