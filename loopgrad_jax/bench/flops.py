"""The FLOP count behind the RNN cases' GFLOP/s.

Only the matrix products are counted, a multiply-add as 2 FLOPs; ``tanh``, gates,
bias adds, the loss and the SGD update are left out. Per time step::

  cell = 2 * B * H * (I + H)    # i2h: (B, I+H) @ (I+H, H)
  head = 2 * B * H * O          # h2o: (B, H) @ (H, O)

With ``--cell`` and ``--layers`` (``G`` gates: 1 for ``rnn_tanh`` and ``rnn_relu``,
4 for ``lstm``, 3 for ``gru``; layer ``k`` reads ``I_0 = I``, then ``I_k = H``)::

  cell = 2 * B * sum over k of G*H * (I_k + H)   # x W_ih^T and h W_hh^T of every layer

A bidirectional module (``rnn_module --bidirectional``) runs each layer twice, and its
layers after the first read both directions' outputs: ``cell`` doubles, with
``I_k = 2 * H`` for ``k > 0``.

A backward pass through a product costs twice its forward (one product for the
weight's gradient, one for the input's), so a gradient costs 3x the forward:

- ``rnn_loss`` (value and full BPTT gradient) and ``train_tbptt`` (every step is
  run forward once and backward once, inside its window)::

    3 * T * (cell + head)

- ``rnn_module`` (value and gradient of a loss of the module's outputs; no head, and
  every step counted, padded ones too, as ``lg.rnn`` computes them all)::

    3 * T * cell

- ``train_as_written`` as PyTorch's retained graph runs it (the ``eager`` peer):
  step ``t`` (1-based) runs forward once, back through its head, and back
  through all ``t`` cells so far::

    sum over t of (cell + head + 2 * head + 2 * t * cell)
      = T * (cell + 3 * head) + T * (T + 1) * cell

The as-written loop's other implementations do other work, so :func:`case_flops`
counts each by what it does: JAX's ``forward`` and ``reverse`` methods, and the
``rtrl`` peer (the ``forward`` algorithm in PyTorch), by
:func:`loopgrad_jax.as_written_cost`, the core library's own count of its methods.
"""

from __future__ import annotations

import loopgrad_jax as lg
from loopgrad_jax._cells import GATES

#: Scenarios with a FLOP count; the scalar ones have none.
RNN_SCENARIOS: tuple[str, ...] = (
    "rnn_loss",
    "rnn_loss_hoisted",
    "train_as_written",
    "train_tbptt",
    "rnn_module",
)


def rnn_flops(
    scenario: str,
    *,
    length: int,
    batch: int,
    input: int,
    hidden: int,
    output: int = 1,
    cell: str = "article",
    layers: int = 1,
    directions: int = 1,
) -> int:
    """FLOPs of one call of an RNN case, by the count in this module's docstring.

    Examples:
      >>> rnn_flops("rnn_loss", length=5, batch=2, input=3, hidden=4)
      1920
      >>> rnn_flops("rnn_loss", length=5, batch=2, input=3, hidden=4, cell="lstm")
      6960
    """
    g = GATES.get(cell, 1) * hidden
    widths = [input] + [directions * hidden] * (layers - 1)
    cell_flops = 2 * batch * directions * sum(g * (w + hidden) for w in widths)
    head = 2 * batch * hidden * output
    if scenario == "rnn_module":
        return 3 * length * cell_flops
    if scenario in ("rnn_loss", "rnn_loss_hoisted", "train_tbptt"):  # same products, moved
        return 3 * length * (cell_flops + head)
    if scenario == "train_as_written":
        return length * (cell_flops + 3 * head) + length * (length + 1) * cell_flops
    raise ValueError(
        f"scenario must be one of {', '.join(map(repr, RNN_SCENARIOS))}, got {scenario!r}."
    )


#: The as-written loop's PyTorch peers -> the JAX method that runs the same algorithm.
PEER_METHODS: dict[str, str] = {"eager": "reverse", "rtrl": "forward"}


def case_flops(
    scenario: str,
    *,
    length: int,
    batch: int,
    input: int,
    hidden: int,
    output: int = 1,
    method: str | None = None,
    peer: str | None = None,
    cell: str = "article",
    layers: int = 1,
    directions: int = 1,
) -> int | None:
    """FLOPs of one call of a case, counted by what its implementation does.

    ``None`` for the scalar scenarios. For ``train_as_written``, a JAX ``method``
    (``"forward"``, ``"reverse"``) or the ``rtrl`` peer is counted by
    :func:`loopgrad_jax.as_written_cost`; the ``eager`` peer (PyTorch's retained
    graph) by :func:`rnn_flops`.
    """
    if scenario not in RNN_SCENARIOS:
        return None
    sizes = dict(length=length, batch=batch, input=input, hidden=hidden, output=output)
    if scenario != "train_as_written" or peer == "eager":
        return rnn_flops(scenario, **sizes, cell=cell, layers=layers, directions=directions)
    algorithm = PEER_METHODS[peer] if peer is not None else method
    if algorithm is None:
        raise ValueError(
            "train_as_written needs a method ('forward' or 'reverse') or a peer "
            f"({', '.join(map(repr, PEER_METHODS))}), got neither."
        )
    rnn_sizes = lg.RNNSizes(length, batch, input, hidden, output)
    cost = lg.as_written_cost(rnn_sizes, algorithm, 4, kind=cell, num_layers=layers)
    return int(round(cost.flops))
