"""What a training run returns, and the one optimizer update every mode shares."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from loopgrad_jax._rnn import RNNParams


class TrainResult(NamedTuple):
    """What :func:`train_rnn` returns."""

    params: RNNParams  # the weights after the last update
    losses: jax.Array  # (T,): the loss of each step, at the weights used for it
    grads: RNNParams  # leaves (U, ...): the gradient used by each of the U updates
    hidden: jax.Array  # (B, H): the final hidden state


def apply_optimizer(optimizer, grads, opt_state, params):
    """One optimizer update: ``(new_params, new_opt_state)``."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
