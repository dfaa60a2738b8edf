"""Flax's ``nnx.Bidirectional``: ``loopgrad-bench``'s Flax row of a bidirectional module.

``loopgrad-bench --bidirectional`` (scenario ``rnn_module``) times, beside ``lg.rnn``
and PyTorch's packed module, the same loss written with Flax's own layers
(:func:`bidirectional_case`). The one-direction Flax peers (``nnx.RNN``,
``flax_loss:LOOP``) are in :mod:`loopgrad_jax.bench.peers`.

Flax is a benchmark extra (``pip install 'loopgrad_jax[bench]'``), never a dependency
of the library's core.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from loopgrad_jax.bench import cases

#: ``loopgrad-bench``'s Flax row of ``rnn_module --bidirectional``.
BIDIRECTIONAL = "nnx.Bidirectional"
#: The kinds it runs: Flax's built-in cells that compute PyTorch's (a GRU's b_hn is not).
BIDIRECTIONAL_KINDS = ("rnn_tanh", "rnn_relu", "lstm")


def available() -> bool:
    """Whether Flax is installed (without importing it)."""
    from loopgrad_jax.bench import peers

    return peers.installed("flax")


def module_peers(scenario: str, sizes: cases.Sizes) -> tuple[str, ...]:
    """The Flax rows of a ``loopgrad-bench`` case: :data:`BIDIRECTIONAL` for a
    bidirectional ``rnn_module`` of :data:`BIDIRECTIONAL_KINDS`, else none."""
    if scenario != "rnn_module" or not sizes.bidirectional:
        return ()
    return (BIDIRECTIONAL,) if sizes.cell in BIDIRECTIONAL_KINDS else ()


def bidirectional_case(data: cases.Data) -> tuple[Callable[[], Callable], tuple]:
    """``(build, args)``: ``build()`` is a new ``f(weights, rngs, inputs, lengths)`` returning the
    loss and gradients ``rnn_module`` returns, run as a Flax user would write it::

      layer k = nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell'), time_major=True)
      outputs = layer_L(...layer_1(x, seq_lengths=lengths)..., seq_lengths=lengths)
      loss = sum((outputs * (t < lengths)) ** 2)

    ``cell`` is Flax's built-in one (``nnx.OptimizedLSTMCell`` for an LSTM) holding the
    layer's weights. ``seq_lengths`` gives PyTorch's packed states (the reverse direction
    starts at each example's last real step), but not its outputs: Flax's go on past
    ``lengths`` (PyTorch's are zero there), hence the mask. Each cell keeps one bias
    (``b_ih + b_hh``), whose gradient is returned for both of PyTorch's.
    """
    from flax import nnx

    from loopgrad_jax._flax import _builtin_cell, _layer_of

    params = data.params
    kind = params.kind

    def rnn(j: int) -> nnx.RNN:
        return nnx.RNN(_builtin_cell(kind, j, params.layers[j]), time_major=True)

    stack = nnx.List(
        nnx.Bidirectional(rnn(j), rnn(j + 1), time_major=True)
        for j in range(0, len(params.layers), 2)
    )
    graphdef, weights, rest = nnx.split(stack, nnx.Param, ...)  # rest: RNG state

    def build() -> Callable:
        def loss(weights, rest, inputs, lengths):
            x = inputs
            zeros = jax.numpy.zeros((inputs.shape[1], params.layers[0].weight_hh.shape[1]), x.dtype)
            carry = (zeros, zeros) if kind == "lstm" else zeros  # no RNG draws its zeros
            for layer in nnx.merge(graphdef, weights, rest):
                x = layer(x, initial_carry=(carry, carry), seq_lengths=lengths)
            if lengths is not None:
                live = jax.numpy.arange(x.shape[0])[:, None] < lengths[None, :]
                x = jax.numpy.where(live[..., None], x, 0)
            return jax.numpy.sum(x**2)

        def f(weights, rest, inputs, lengths):
            value, grads = jax.value_and_grad(loss)(weights, rest, inputs, lengths)
            leaves = [value]
            for layer in nnx.merge(graphdef, grads, rest):
                for j, direction in enumerate((layer.forward_rnn, layer.backward_rnn)):
                    g = _layer_of(kind, j, direction.cell)
                    bias = g.bias_ih + g.bias_hh  # one of them is zeros
                    leaves += [g.weight_ih, g.weight_hh, bias, bias]
            return tuple(leaves)

        return f

    return build, (weights, rest, data.inputs, data.lengths)
