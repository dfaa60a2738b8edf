"""What a recurrent cell is to this library: a step, a readout, and optionally a hoist.

Every model the library trains (the article's ``SimpleRNN``, PyTorch's ``nn.RNN`` /
``nn.LSTM`` / ``nn.GRU``, and a user's own cell) is a :class:`Cell` and a pytree of
parameters. One body per scenario runs any of them with any loop kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from loopgrad_jax._parallel import LOCAL, Shards

PyTree = Any

#: Values of ``reduction=``: the step losses summed, or averaged over the steps that count.
REDUCTIONS: tuple[str, ...] = ("sum", "mean")


class Cell(NamedTuple):
    """A recurrent cell written as pure functions.

    - ``step(params, carry, x) -> carry``: one time step. ``x`` is one step's input,
      ``(B, I)``; ``carry`` is any pytree of arrays whose leaves lead with the
      batch axis ``B`` (the hidden state; for an LSTM the pair ``(h, c)``).
    - ``readout(params, carry) -> (B, O)``: the output the step's loss compares
      with its target, ``mean((readout(params, carry) - target) ** 2)``.
    - ``project(params, inputs) -> projected`` and
      ``step_projected(params, carry, projected[t]) -> carry`` (optional, both or
      neither): the input-side work of every step as one product before the loop
      (``hoist_input=True``), and the step that takes its result.

    The as-written ``"forward"`` method differentiates each example on its own, so
    it needs row ``b`` of the new carry to depend on row ``b`` of ``carry`` and
    ``x`` alone (true of every cell without batch statistics).

    A ``Cell`` is a static argument of the compiled functions, compared by its
    functions: ``Cell(f, g) == Cell(f, g)`` for the same ``f`` and ``g``, but two
    lambdas are never equal, even with the same body. Define the functions once
    (at module level, as below) or build the ``Cell`` once, and repeated calls with
    the same shapes reuse one compiled function; a ``Cell`` of fresh lambdas per
    call compiles again on every call::

      for batch in data:                              # compiles every call
        lg.train_rnn(p, *batch, cell=lg.Cell(lambda p, h, x: ..., lambda p, h: ...))
      elman = lg.Cell(step, readout)                  # once
      for batch in data:                              # compiles once
        lg.train_rnn(p, *batch, cell=elman)

    Examples:
      A minimal Elman cell, ``h' = tanh(W [x, h])``, read out by ``V h``:

      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> def step(p, h, x):
      ...     return jnp.tanh(jnp.concatenate([x, h], axis=1) @ p["w"].T)
      >>> def readout(p, h):
      ...     return h @ p["v"].T
      >>> elman = lg.Cell(step, readout)
      >>> p = {"w": jnp.full((4, 7), 0.1), "v": jnp.ones((1, 4))}
      >>> x, y = jnp.ones((6, 2, 3)), jnp.zeros((6, 2, 1))
      >>> h0 = jnp.zeros((2, 4))
      >>> g = jax.grad(lg.rnn_loss)(p, x, y, hidden0=h0, cell=elman, loop="fori")
      >>> g["w"].shape
      (4, 7)
    """

    step: Callable[[PyTree, PyTree, Any], PyTree]
    readout: Callable[[PyTree, PyTree], jax.Array]
    project: Callable[[PyTree, Any], Any] | None = None
    step_projected: Callable[[PyTree, PyTree, Any], PyTree] | None = None


#: A per-step loss, ``loss_fn(prediction_t, target_t) -> scalar``: ``prediction_t`` is
#: the readout's ``(B, O)`` output at step ``t``, ``target_t`` is ``targets[t]``.
LossFn = Callable[[jax.Array, Any], jax.Array]


def squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """The article's per-step loss, ``mean((prediction - target) ** 2)`` (``nn.MSELoss()``)."""
    return jnp.mean((prediction - target) ** 2)


def step_loss(
    loss_fn: LossFn | None, prediction: jax.Array, target: Any, weight: jax.Array | None
) -> jax.Array:
    """One step's loss: ``loss_fn`` (:func:`squared_error` when ``None``), weighted per example.

    Plain-Python semantics::

      fn = squared_error if loss_fn is None else loss_fn
      if weight is None:
        return fn(prediction, target)
      B = prediction.shape[0]              # each example alone, as a batch of one
      return sum(weight[b] * fn(prediction[b:b+1], target[b:b+1]) for b in range(B)) / B

    With ``weight`` 1 for every example this is ``fn(prediction, target)`` for any
    ``fn`` that is a mean over the batch of per-example losses (``nn.MSELoss()``,
    ``nn.CrossEntropyLoss()``); a weight of 0 (a padded step) drops the example.
    """
    fn = squared_error if loss_fn is None else loss_fn
    if weight is None:
        return fn(prediction, target)
    alone = jax.vmap(lambda p, y: fn(p[None], jax.tree.map(lambda a: a[None], y)))
    return jnp.mean(weight * alone(prediction, target))


def reduce_losses(
    losses: jax.Array, reduction: str, weights: jax.Array | None, shards: Shards = LOCAL
) -> jax.Array:
    """One update's step losses ``(S,)`` under ``reduction``: ``(S,)``, summing to its loss.

    ``losses`` are :func:`step_loss`'s of ``S`` consecutive steps (a whole sequence, a
    window, or one step), ``weights`` their ``(S, B)`` weights or ``None``. Plain-Python
    semantics::

      if reduction == "sum":
        return losses
      if weights is None:
        return losses / S                      # every step counts
      real = sum(weights) / B                  # the real steps, per example
      return losses / (real if real > 0 else 1)   # none real: the losses are all 0

    So ``"mean"`` is ``nn.MSELoss()`` (or ``nn.CrossEntropyLoss()``) over every element
    of the ``S`` steps' outputs, and with ``weights`` the mean over the real ``(t, b)``
    pairs. With a mesh (``shards``) ``weights`` are this device's examples and ``real``
    counts every device's.
    """
    if reduction == "sum":
        return losses
    if weights is None:
        return losses / losses.shape[0]
    real = shards.mean(weights.sum()) / weights.shape[1]
    # A guard, not a where on the quotient: 0/0 would make the gradient NaN. A NaN
    # weight (a traced length out of range) has poisoned the losses already.
    return losses / jnp.where(real > 0, real, jnp.ones_like(real))


def cell_step_loss(
    cell: Cell,
    params: PyTree,
    carry: PyTree,
    target: Any,
    loss_fn: LossFn | None = None,
    weight: jax.Array | None = None,
) -> jax.Array:
    """A step's loss for any cell: :func:`step_loss` of ``cell.readout(params, carry)``."""
    return step_loss(loss_fn, cell.readout(params, carry), target, weight)


def check_cell(cell: object) -> Cell:
    """Returns ``cell`` if it is a usable :class:`Cell`; raises naming what is wrong."""
    if not isinstance(cell, Cell):
        raise TypeError(
            "cell must be a loopgrad_jax.Cell(step, readout) of functions "
            f"step(params, carry, x) -> carry and readout(params, carry) -> (B, O), "
            f"got {type(cell).__name__}."
        )
    for name in ("step", "readout"):
        if not callable(getattr(cell, name)):
            raise TypeError(f"cell.{name} must be callable, got {getattr(cell, name)!r}.")
    if (cell.project is None) != (cell.step_projected is None):
        raise ValueError(
            "cell.project and cell.step_projected come together (both or neither), got "
            f"project={cell.project!r}, step_projected={cell.step_projected!r}."
        )
    return cell
