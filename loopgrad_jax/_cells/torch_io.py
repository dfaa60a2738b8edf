"""PyTorch's modules and state dicts in and out: :func:`from_torch`, :func:`to_torch`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from loopgrad_jax import _checks
from loopgrad_jax._cells.kinds import GATES, LAYER_FIELDS, MODULES, TORCH_CELLS
from loopgrad_jax._cells.params import CellParams, LayerParams, check_params
from loopgrad_jax._rnn import RNNParams

#: PyTorch's recurrent modules and cell modules, by class name, and the kinds each can be.
_MODULES = {**MODULES, **{f"{name}Cell": kinds for name, kinds in MODULES.items()}}
#: A layer's fields as PyTorch names them, in the order of its state dict.
_FIELDS = (*LAYER_FIELDS, "weight_hr")
#: A module's key (``weight_ih_l1_reverse``) or a cell module's (``weight_ih``).
_KEY = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(\d+)(_reverse)?)?")


def from_torch(
    rnn: Any,
    head: Any = None,
    *,
    kind: str | None = None,
    batch_first: bool | None = None,
    dropout: float | None = None,
) -> CellParams:
    """The weights of a PyTorch recurrent module (and of its ``nn.Linear`` head, if any).

    Every option of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` is taken: any ``num_layers``,
    ``bidirectional``, an LSTM's ``proj_size``, ``bias=False``, ``batch_first`` and
    ``dropout`` (these two become ``params.batch_first`` and ``params.dropout``, the
    defaults :func:`loopgrad_jax.rnn` uses); and ``nn.RNNCell`` / ``nn.LSTMCell`` /
    ``nn.GRUCell``, one-layer models with ``params.cell_module`` set.

    Args:
      rnn: the module, or its state dict: a mapping of PyTorch's key names
        (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``,
        ``weight_hr_l{k}``, each with ``_reverse`` for a second direction; a cell
        module's ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) to array-likes
        (tensors, NumPy or JAX arrays). The structure (layers, directions, projection,
        biases, cell module) is read from the keys; torch is not imported for a state
        dict of arrays. A whole model's state dict (``lstm.weight_ih_l0``, ``fc.weight``)
        is refused with the way to select the module's keys.
      head: ``None`` (no head), or an ``nn.Linear(D*H_out, O)`` or its state dict
        (``weight``, ``bias``), applied to the last layer's outputs by the losses.
      kind: one of :data:`TORCH_CELLS`; required for a state dict, read off a module
        (and checked against it if given).
      batch_first, dropout: the module's options, which a state dict does not hold
        (default ``False`` and ``0.0``); read off a module that has them (and checked
        against it if given).

    Examples:
      >>> import numpy as np, loopgrad_jax as lg
      >>> rng = np.random.default_rng(0)
      >>> state = {f"{w}_l0{d}": rng.normal(size=s).astype(np.float32)
      ...          for w, s in [("weight_ih", (12, 3)), ("weight_hh", (12, 4))]
      ...          for d in ("", "_reverse")}
      >>> p = lg.from_torch(state, kind="gru", batch_first=True)
      >>> p.kind, p.num_layers, p.bidirectional, p.batch_first, p.layers[0].bias_ih
      ('gru', 1, True, True, None)
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
        kind, batch_first, dropout = _module_options(rnn, kind, batch_first, dropout)
        state = dict(rnn.state_dict())
    if not isinstance(batch_first, bool | None):
        raise TypeError(f"batch_first must be a bool, got {batch_first!r}.")
    layers, directions, cell_module = _layers_from_state(state, kind)
    width = directions * layers[0].weight_hh.shape[1]
    head_w, head_b = _head(head, width)
    params = CellParams(
        tuple(layers),
        head_w,
        head_b,
        kind,
        bidirectional=directions == 2,
        batch_first=bool(batch_first),
        dropout=0.0 if dropout is None else dropout,
        cell_module=cell_module,
    )
    return check_params(params)[0]


def to_torch(params: CellParams | RNNParams) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(rnn_state, head_state)``: the module's and the head's state dicts.

    Exactly the module's keys, in its order (``_reverse`` for a second direction, an
    LSTM's ``weight_hr_l{k}``, no bias keys for ``bias=False``, a cell module's own
    ``weight_ih`` ... without ``_l0``), so ``rnn.load_state_dict(rnn_state)`` loads
    them (strict) into a module of the same options. The values are ``torch.Tensor``
    (on the CPU) when torch can be imported, NumPy arrays when it cannot.
    ``head_state`` is ``None`` without a head.

    Works on anything shaped like the params, leaf for leaf: weights, a gradient
    from ``jax.grad``, one update's slice of :attr:`TrainResult.grads`
    (``jax.tree.map(lambda g: g[t], result.grads)``) or the whole stack (each
    array then leads with the update axis). For the article's :class:`RNNParams` the
    keys are the ``SimpleRNN``'s: ``i2h.weight``, ``i2h.bias`` in the first dict and
    ``h2o``'s ``weight``, ``bias`` in the head's.
    """
    out = _converter()
    if isinstance(params, RNNParams):
        return (
            {"i2h.weight": out(params.i2h_weight), "i2h.bias": out(params.i2h_bias)},
            {"weight": out(params.h2o_weight), "bias": out(params.h2o_bias)},
        )
    if not isinstance(params, CellParams):
        raise TypeError(
            f"params must be a CellParams or RNNParams (or a gradient of one), got "
            f"{type(params).__name__}."
        )
    d = params.directions
    if params.cell_module and len(params.layers) != 1:
        raise ValueError(
            "params of a cell module (cell_module=True: nn.RNNCell, nn.LSTMCell, nn.GRUCell) "
            f"hold one layer in one direction, got {len(params.layers)} layers."
        )
    rnn_state = {
        f + ("" if params.cell_module else _suffix(k // d, k % d)): out(getattr(layer, f))
        for k, layer in enumerate(params.layers)
        for f in _FIELDS
        if getattr(layer, f) is not None
    }
    if params.head_weight is None:
        return rnn_state, None
    return rnn_state, {"weight": out(params.head_weight), "bias": out(params.head_bias)}


def _converter() -> Callable[[Any], Any]:
    """Array to ``torch.Tensor`` if torch imports, else to a NumPy array."""
    try:
        import torch
    except ImportError:
        return np.asarray
    # np.array copies: a writable array, which torch.from_numpy takes without a warning.
    return lambda a: torch.from_numpy(np.array(a))


def _field(key: str) -> str:
    """The field a state dict key names: ``weight_ih_l1_reverse`` -> ``weight_ih``."""
    return _KEY.fullmatch(key).group(1)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _module_options(
    rnn: Any, kind: str | None, batch_first: bool | None, dropout: float | None
) -> tuple[str, bool | None, float | None]:
    """The kind, ``batch_first`` and ``dropout`` of a module, checked against those given."""
    name = next((c.__name__ for c in type(rnn).__mro__ if c.__name__ in _MODULES), None)
    if name is None or not hasattr(rnn, "state_dict"):
        raise TypeError(
            "rnn must be a torch.nn.RNN, LSTM or GRU module, an nn.RNNCell, LSTMCell or "
            "GRUCell, or the state dict of one (a mapping of 'weight_ih_l0'-style keys to "
            f"arrays), got {type(rnn).__name__}."
        )
    found = _MODULES[name][0]
    if name.startswith("RNN"):
        found = {"tanh": "rnn_tanh", "relu": "rnn_relu"}[rnn.nonlinearity]
    options = {"kind": (kind, found)}
    if not name.endswith("Cell"):  # a cell module has neither option
        options |= {
            "batch_first": (batch_first, rnn.batch_first),
            "dropout": (dropout, rnn.dropout),
        }
    for option, (given, own) in options.items():
        if given is not None and given != own:
            raise ValueError(
                f"{option}={given!r} does not match the module, an nn.{name} with "
                f"{option}={own!r}; leave {option} out to take the module's."
            )
    values = {option: own for option, (_, own) in options.items()}
    return found, values.get("batch_first", batch_first), values.get("dropout", dropout)


def _layers_from_state(state: dict[str, Any], kind: str) -> tuple[list[LayerParams], int, bool]:
    """The layers a state dict holds, layer ``l``'s direction ``d`` at ``l*D + d``;
    ``D``; and whether it is a cell module's."""
    keys = [str(k) for k in state]
    _refuse_whole_model(keys)
    found = [m for m in map(_KEY.fullmatch, keys) if m]
    cell_module = any(m.group(2) is None for m in found)
    bias = any(m.group(1).startswith("bias") for m in found)
    fields = [f for f in _FIELDS if (bias or not f.startswith("bias"))]
    if cell_module:
        layers, d, proj = 1, 1, False
        names = [[f for f in fields if f != "weight_hr"]]
    else:
        layers = 1 + max((int(m.group(2)) for m in found), default=-1)
        d = 2 if any(m.group(3) for m in found) else 1
        proj = any(m.group(1) == "weight_hr" for m in found)
        if proj and kind != "lstm":
            raise ValueError(
                f"rnn holds weight_hr_l{{l}} keys, an LSTM's projection (proj_size > 0), but "
                f"kind={kind!r}: pass kind='lstm' for an nn.LSTM's state dict."
            )
        names = [
            [f + _suffix(k // d, k % d) for f in fields if proj or f != "weight_hr"]
            for k in range(layers * d)
        ]
    expected = {n for layer in names for n in layer}
    missing = [n for layer in names for n in layer if n not in state]
    extra = [k for k in keys if k not in expected]
    if not layers or missing or extra:
        raise ValueError(
            "rnn's state dict must hold a module's weight_ih_l{l}, weight_hh_l{l}, and "
            "bias_ih_l{l}, bias_hh_l{l} unless built with bias=False, and an LSTM's "
            "weight_hr_l{l} if proj_size > 0, for every layer l = 0..L-1 (and the same with "
            "'_reverse' for a bidirectional one); or a cell module's weight_ih, weight_hh (and "
            f"bias_ih, bias_hh); got missing {missing}, unexpected {extra}."
        )
    arrays = [{n: _array(f"rnn['{n}']", state[n]) for n in layer} for layer in names]
    _check_shapes(arrays, kind, d, proj)
    result = [
        LayerParams(**{f: None for f in LAYER_FIELDS} | {_field(n): v for n, v in a.items()})
        for a in arrays
    ]
    return result, d, cell_module


def _check_shapes(arrays: list[dict[str, jax.Array]], kind: str, d: int, proj: bool) -> None:
    """Every array's shape against the first layer's ``weight_hh`` (and ``weight_hr``)."""
    gates = GATES[kind]
    (whh_name, whh), *_ = ((n, a) for n, a in arrays[0].items() if n.startswith("weight_hh"))
    rows = whh.shape[0] if whh.ndim == 2 else 0
    if not rows or rows % gates or (not proj and rows != gates * whh.shape[1]):
        want = "(G*H, P) with P=proj_size" if proj else "(G*H, H)"
        raise ValueError(
            f"rnn['{whh_name}'] must have shape {want} with G={gates} gates for kind={kind!r}, "
            f"got shape {tuple(whh.shape)}."
        )
    h, h_out = rows // gates, whh.shape[1]
    sizes = f"G={gates} gates for kind={kind!r}, H={h}" + (f", P={h_out}" if proj else "")
    shapes = {
        "weight_hh": ((rows, h_out), "(G*H, P)" if proj else "(G*H, H)"),
        "bias_ih": ((rows,), "(G*H,)"),
        "bias_hh": ((rows,), "(G*H,)"),
        "weight_hr": ((h_out, h), "(P, H)"),
    }
    for k, layer in enumerate(arrays):
        first = k < d
        width, meaning = (None, "I") if first else (d * h_out, "D*P" if proj else "D*H")
        for name, arr in layer.items():
            want, text = shapes.get(_field(name), ((rows, width), f"(G*H, {meaning})"))
            extra = "" if first else f", D={d}"
            _checks.shape(f"rnn['{name}']", arr, want, f"{text} with {sizes}{extra}")


def _refuse_whole_model(keys: list[str]) -> None:
    """Raises for a whole model's state dict (dotted keys: ``lstm.weight_ih_l0``)."""
    dotted = [k for k in keys if "." in k]
    if not dotted:
        return
    owners = [k.rpartition(".")[0] for k in dotted if _KEY.fullmatch(k.rpartition(".")[2])]
    prefix = (owners[0] if owners else "lstm") + "."
    shown = ", ".join(map(repr, keys[:12])) + (
        f" and {len(keys) - 12} more" if len(keys) > 12 else ""
    )
    raise ValueError(
        f"rnn must be the recurrent module's own state dict, got a whole model's (keys {shown}): "
        f"select the module's keys, e.g. {{k.removeprefix({prefix!r}): v for k, v in "
        f"sd.items() if k.startswith({prefix!r})}} (or pass the module itself, model."
        f"{prefix[:-1]}); a head goes in head=, selected the same way."
    )


def _head(head: Any, width: int) -> tuple[jax.Array | None, jax.Array | None]:
    """The head's weight ``(O, width)`` and bias ``(O,)``, or ``(None, None)`` without one."""
    if head is None:
        return None, None
    if isinstance(head, Mapping):
        state = head
    elif any(c.__name__ == "Linear" for c in type(head).__mro__) and hasattr(head, "state_dict"):
        state = head.state_dict()
    else:
        raise TypeError(
            "head must be None, a torch.nn.Linear(D*H_out, O) or its state dict {'weight', "
            f"'bias'}}, got {type(head).__name__}."
        )
    keys = set(state)
    if keys == {"weight"}:
        raise ValueError(
            "head has no 'bias' (an nn.Linear built with bias=False); the head here always "
            "adds one: pass {'weight': head.weight, 'bias': torch.zeros(O)}, the same map."
        )
    if keys != {"weight", "bias"}:
        raise ValueError(
            "head must hold exactly 'weight' (O, D*H_out) and 'bias' (O,), got keys "
            f"{sorted(keys)}."
        )
    weight = _array("head['weight']", state["weight"])
    bias = _array("head['bias']", state["bias"])
    meaning = f"(O, D*H_out) with D*H_out={width}: the head reads the last layer's outputs"
    _checks.shape("head['weight']", weight, (None, width), meaning)
    _checks.shape("head['bias']", bias, (weight.shape[0],), f"(O,) with O={weight.shape[0]}")
    return weight, bias


def _array(name: str, value: Any) -> jax.Array:
    """A PyTorch tensor, NumPy or JAX array as a JAX array of its own floating dtype."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    return _checks.float_array(name, value)
