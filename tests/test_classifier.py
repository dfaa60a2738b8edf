"""The README's sentiment classifier, ported from PyTorch end to end.

``nn.Embedding`` -> a 2-layer bidirectional ``nn.LSTM(batch_first=True)`` fed through
``pack_padded_sequence`` -> ``nn.Linear`` on the top layer's two final states ->
``nn.CrossEntropyLoss``, trained with ``torch.optim.Adam``. The JAX side is the
README's code: the embedding a table lookup, the LSTM ``lg.rnn`` with ``lengths``, the
loss optax's cross-entropy, Adam optax's. Same weights, same batches: the losses of
every step must agree (float64, the parity tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TOL, assert_close

import loopgrad_jax as lg

VOCAB, EMBED, HIDDEN, CLASSES, T, B = 50, 6, 8, 3, 7, 4


def logits(params, tokens, lengths):
    """The README's forward pass: (B, T) token ids and (B,) lengths -> (B, C) logits."""
    x = params["embed"][tokens]  # nn.Embedding: (B, T, E)
    _, (h_n, _) = lg.rnn(params["lstm"], x, lengths=lengths)
    last = jnp.concatenate([h_n[-2], h_n[-1]], axis=-1)  # the top layer, both directions
    return last @ params["fc"]["weight"].T + params["fc"]["bias"][None, :]


def loss(params, tokens, lengths, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, tokens, lengths), labels
    ).mean()


@pytest.mark.torch
def test_the_ported_classifier_trains_as_pytorchs():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, EMBED).double()
    lstm = torch.nn.LSTM(EMBED, HIDDEN, num_layers=2, batch_first=True, bidirectional=True).double()
    fc = torch.nn.Linear(2 * HIDDEN, CLASSES).double()
    modules = (embed, lstm, fc)
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=0.05)

    params = {
        "embed": jnp.asarray(embed.weight.detach().numpy()),
        "lstm": lg.from_torch(lstm),
        "fc": {k: jnp.asarray(v.detach().numpy()) for k, v in fc.state_dict().items()},
    }
    assert params["lstm"].batch_first and params["lstm"].bidirectional
    adam = optax.adam(0.05)
    state = adam.init(params)

    @jax.jit
    def step(params, state, tokens, lengths, labels):
        value, grads = jax.value_and_grad(loss)(params, tokens, lengths, labels)
        updates, state = adam.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(0)
    for _ in range(4):
        tokens = rng.integers(0, VOCAB, (B, T))
        lengths = np.array([T, 1, 4, 6])
        labels = rng.integers(0, CLASSES, B)
        # PyTorch, as the classifier is written there.
        opt.zero_grad()
        x = embed(torch.from_numpy(tokens))
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = lstm(packed)
        out = fc(torch.cat([h_n[-2], h_n[-1]], dim=-1))
        expected = torch.nn.functional.cross_entropy(out, torch.from_numpy(labels))
        expected.backward()
        opt.step()
        # optax's Adam mixes its int32 step count with Python floats, which this suite's
        # strict dtype promotion refuses; users run with JAX's standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            params, state, value = step(params, state, tokens, lengths, labels)
        assert_close(value, expected.item(), TOL["float64"], "loss")
    rnn_state, _ = lg.to_torch(params["lstm"])
    assert_close(
        {k: np.asarray(v) for k, v in rnn_state.items()},
        {k: v.detach().numpy() for k, v in lstm.state_dict().items()},
        TOL["float64"],
        "trained weights",
    )
