"""What a training run returns, and the optimizer update every mode shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from loopgrad_jax._cells import CellParams
from loopgrad_jax._rnn import RNNParams

PyTree = Any

#: Values of ``train_rnn(keep_grads=...)``: every update's gradient, the last one, or none.
KEEP_GRADS: tuple[str, ...] = ("all", "last", "none")


class TrainResult(NamedTuple):
    """What :func:`train_rnn` and :func:`flax_train` return.

    ``params``, ``opt_state`` and ``hidden`` are what a following call takes as
    ``params``, ``opt_state=`` and ``hidden0=`` to continue the run.

    Attributes:
      params: the weights after the last update, of the type given: an
        :class:`RNNParams`, a :class:`CellParams`, a user :class:`Cell`'s pytree
        (``flax_train``: the model's ``nnx.State``).
      losses: ``(T,)``, the loss of each step at the weights used for it (with
        ``reduction="mean"`` divided as its update's loss is, so that an update's
        steps sum to its loss).
      grads: ``keep_grads="all"``: ``params``' structure with leaves ``(U, ...)``,
        the gradient of each of the ``U`` updates; ``"last"``: the last update's
        gradient, shaped like ``params``; ``"none"``: ``None``.
      hidden: the final hidden state, in ``hidden0``'s layout: ``(B, H)`` for the
        article's model, ``(num_layers, B, H)`` for a :class:`CellParams` (for an
        LSTM the pair ``(h, c)`` of two), a user cell's carry.
      opt_state: the optimizer's state after the last update.
    """

    params: CellParams | RNNParams | PyTree
    losses: jax.Array
    grads: CellParams | RNNParams | PyTree | None
    hidden: jax.Array | tuple[jax.Array, jax.Array] | PyTree
    opt_state: optax.OptState


def apply_optimizer(
    optimizer: optax.GradientTransformation,
    grads: PyTree,
    opt_state: optax.OptState,
    params: PyTree,
    *,
    value: jax.Array,
    value_fn: Callable[[PyTree], jax.Array] | None = None,
) -> tuple[PyTree, optax.OptState]:
    """One optimizer update: ``(new_params, new_opt_state)``.

    Transformations that take extra arguments get ``value`` (the loss the
    gradient belongs to: ``optax.contrib.reduce_on_plateau``), ``grad`` and,
    where the mode has one, ``value_fn`` (a line search: ``optax.lbfgs``).
    Plain transformations ignore them.
    """
    extra: dict[str, Any] = {"value": value, "grad": grads}
    if value_fn is not None:
        extra["value_fn"] = value_fn
    update = optax.with_extra_args_support(optimizer).update
    updates, opt_state = update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state


def keep_init(keep_grads: str, params: PyTree) -> PyTree:
    """The loop-carried slot for ``keep_grads="last"`` (``None`` otherwise)."""
    return jax.tree.map(jnp.zeros_like, params) if keep_grads == "last" else None


def keep_step(keep_grads: str, kept: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """``(new carried slot, this update's stacked output)`` for ``keep_grads``."""
    if keep_grads == "all":
        return kept, grads
    if keep_grads == "last":
        return grads, None
    return kept, None


def keep_result(keep_grads: str, kept: PyTree, stacked: PyTree) -> PyTree:
    """``TrainResult.grads`` from the carried slot and the stacked outputs."""
    return stacked if keep_grads == "all" else kept
