"""The registry of cell kinds: their names, gates and PyTorch modules."""

from __future__ import annotations

#: Every built-in cell kind: the article's ``SimpleRNN`` and PyTorch's modules.
CELLS: tuple[str, ...] = ("article", "rnn_tanh", "rnn_relu", "lstm", "gru")
#: The kinds that are PyTorch modules (:class:`CellParams`).
TORCH_CELLS: tuple[str, ...] = CELLS[1:]
#: Gates per kind: rows of ``weight_ih`` per hidden unit.
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
#: PyTorch's module class names and the kinds each can be.
MODULES = {"RNN": ("rnn_tanh", "rnn_relu"), "LSTM": ("lstm",), "GRU": ("gru",)}
#: A layer's parameters, as PyTorch names them without the ``_l{k}`` suffix.
LAYER_FIELDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
