"""PyTorch's modules and state dicts in and out: :func:`from_torch`, :func:`to_torch`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from loopgrad_jax import _checks
from loopgrad_jax._cells.kinds import GATES, LAYER_FIELDS, MODULES, TORCH_CELLS
from loopgrad_jax._cells.params import CellParams, LayerParams, _fields, check_params
from loopgrad_jax._rnn import RNNParams


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
    if name not in MODULES or not hasattr(rnn, "state_dict"):
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
    found = MODULES[name][0]
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
        result.append(LayerParams(**{f: None for f in LAYER_FIELDS} | leaves))
    return result


def _array(name: str, value: Any) -> jax.Array:
    """A PyTorch tensor, NumPy or JAX array as a JAX array of its own floating dtype."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    return _checks.float_array(name, value)
