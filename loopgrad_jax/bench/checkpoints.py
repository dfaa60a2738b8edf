"""Checkpointed reverse mode: equinox's checkpointed scan, and body evaluations counted.

``loopgrad-bench --peers equinox:checkpoints=C`` times, beside ``loop="remat:checkpoints=C"``
on the article's model, the full-sequence gradient of::

  equinox.internal.scan(body, h0, (inputs, targets), kind="checkpointed", checkpoints=C)

whose body is the library's step, ``h = lg.rnn_cell(params, h, x)`` then
``lg.step_loss(params, h, y)``. ``loopgrad-bench --evaluations`` counts, for each such row
and each JAX loop kind, the body evaluations of one gradient (:func:`evaluations`), in a
separately compiled copy whose body calls ``jax.debug.callback``; with ``C`` checkpoints
the fewest possible are ``lg.checkpointed_evaluations(T, C)``.

``loopgrad-bench --preset checkpoints`` runs both at the article's size (the preset's
flags: :data:`loopgrad_jax.bench.cli.PRESETS`). Equinox is a benchmark extra (``pip
install 'loopgrad_jax[bench]'``), never a dependency of the library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import loopgrad_jax as lg


def _equinox_scan() -> Callable | None:
    try:
        import equinox.internal as eqxi
    except ImportError:
        return None
    return eqxi.scan


def _article_body(params, count: bool = False) -> Callable:
    def body(h, xy):
        if count:  # on the carry, so that no transformation moves it out of the loop
            jax.debug.callback(_tick, h)
        x, y = xy
        h = lg.rnn_cell(params, h, x)
        return h, lg.step_loss(params, h, y)

    return body


_TICKS = [0]


def _tick(_) -> None:
    _TICKS[0] += 1


def _zero_hidden(params, inputs) -> jax.Array:
    """The article's initial hidden state, zeros of shape (B, H): what rnn_loss starts from."""
    return jnp.zeros((inputs.shape[1], params.i2h_weight.shape[0]), inputs.dtype)


def loss(setting: str, count: bool = False) -> Callable:
    """``(params, inputs, targets) -> loss`` for a setting (a loop kind, or equinox's)."""
    if setting.startswith("equinox:checkpoints="):
        scan, c = _equinox_scan(), int(setting.partition("=")[2])

        def equinox_loss(params, inputs, targets):
            body, h0 = _article_body(params, count), _zero_hidden(params, inputs)
            _, losses = scan(body, h0, (inputs, targets), kind="checkpointed", checkpoints=c)
            return losses.sum()

        return equinox_loss
    if not count:
        return lambda params, inputs, targets: lg.rnn_loss(params, inputs, targets, loop=setting)

    def counted_loss(params, inputs, targets):  # the loop rnn_loss runs, on a counting body
        body, h0 = _article_body(params, count), _zero_hidden(params, inputs)
        _, losses = lg.run_loop(body, h0, (inputs, targets), length=inputs.shape[0], loop=setting)
        return losses.sum()

    return counted_loss


def _gradient(setting: str, count: bool = False) -> Callable:
    def f(params, inputs, targets):
        value, grads = jax.value_and_grad(loss(setting, count))(params, inputs, targets)
        return (value, *jax.tree.leaves(grads))

    return f


def counts(setting: str) -> bool:
    """Whether :func:`evaluations` can count ``setting``: a loop kind with reverse mode, or
    equinox's checkpointed scan."""
    if setting.startswith("equinox:checkpoints="):
        return True
    try:
        return lg.Loop.parse(setting).reverse_mode
    except (TypeError, ValueError):
        return False


def evaluations(setting: str, args: Sequence[Any]) -> int:
    """Body evaluations of one gradient of the article's ``rnn_loss`` with ``setting`` (a
    loop kind, or ``equinox:checkpoints=C``) on ``args = (params, inputs, targets)``,
    counted by a callback in the body."""
    gradient = jax.jit(_gradient(setting, count=True))
    jax.block_until_ready(gradient(*args))  # compile and run once
    jax.effects_barrier()
    _TICKS[0] = 0
    jax.block_until_ready(gradient(*args))
    jax.effects_barrier()
    return _TICKS[0]
