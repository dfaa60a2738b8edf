"""Training the article's RNN one update at a time: as written, or truncated.

The article's training loop::

  hidden = zeros(B, H)
  for t in range(T):
    optimizer.zero_grad()
    output, hidden = model(inputs[t], hidden)
    loss = mean((output - targets[t]) ** 2)
    loss.backward(retain_graph=True)
    optimizer.step()

raises in PyTorch at ``t == 2``: the backward pass of step 2 reaches step 1's
``i2h`` product, whose saved weight step 1's ``optimizer.step()`` modified in
place. Under ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` it
runs, and the gradient of step ``t`` then sums every use of the weights since
the start, each at the value the weights had when it was used. ``mode=
"as_written"`` computes exactly that gradient; ``mode="tbptt"`` is the usual
fix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from loopgrad_jax import _as_written, _checks
from loopgrad_jax._loops import Loop, require_reverse, run_loop
from loopgrad_jax._result import TrainResult, apply_optimizer
from loopgrad_jax._rnn import RNNParams, check_rnn_args, rnn_forward

#: Values of ``train_rnn(mode=...)``.
MODES: tuple[str, ...] = ("as_written", "tbptt")


def train_rnn(
    params: RNNParams,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    lr: float = 0.01,
    mode: str = "as_written",
    window: int = 1,
    hidden0: jax.typing.ArrayLike | None = None,
    loop: str | Loop = "scan",
    as_written_method: str = "auto",
    optimizer: optax.GradientTransformation | None = None,
    hoist_input: bool = False,
) -> TrainResult:
    """Trains the RNN over one sequence, updating the weights inside the loop.

    ``mode="as_written"`` (``T`` updates) is the article's loop under PyTorch's
    ``allow_mutation_on_saved_tensors``::

      for t in range(T):
        hidden = cell(params, hidden, inputs[t])      # params_t: the weights now
        loss_t = step_loss(params, hidden, targets[t])
        grad_t = sum over s <= t of d loss_t / d(params used at step s),
                 each evaluated at params_s
        params = params - lr * grad_t

    Two exact methods compute ``grad_t`` (``as_written_method``):

    - ``"forward"``: real-time recurrent learning. The sensitivity
      ``d hidden / d params`` (``B*H*P`` numbers for ``P`` parameters) is carried
      forward in time, one batched ``(H, H) x (H, P)`` product per step:
      ``O(T * B*H*H*P)`` time, ``O(B*H*P)`` memory.
    - ``"reverse"``: each step re-differentiates the stored history (weights and
      hidden states of every past step), like PyTorch's retained graph:
      ``T*(T+1)/2`` cell VJPs, ``O(T**2 * B*H*(I+H))`` time, ``O(T * (B*H + P))``
      memory.
    - ``"auto"`` picks the one a time model, fitted to both methods' measured
      times over a grid of sizes, finds faster; never ``"forward"`` when its
      memory (:func:`as_written_cost`) would exceed 1 GiB.

    ``mode="tbptt"`` (truncated backpropagation through time, ``ceil(T/window)``
    updates)::

      for each window of `window` steps (the last may be shorter):
        hidden0_w = stop_gradient(hidden)               # PyTorch: hidden.detach()
        loss_w = sum of step losses over the window, starting at hidden0_w
        params = params - lr * grad(loss_w)(params)

    ``window=1`` is the usual "detach the hidden state" fix; ``window=T`` is one
    backward pass over the whole sequence.

    Args:
      params: initial :class:`RNNParams`.
      inputs: ``(T, B, I)``.
      targets: ``(T, B, O)``.
      lr: the SGD learning rate (``optax.sgd(lr)``); ignored when ``optimizer`` is given.
      mode: one of :data:`MODES`.
      window: steps per update in ``mode="tbptt"``, ``1 <= window <= T``.
      hidden0: ``(B, H)``; zeros when ``None``.
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its
        text form; every loop (over time steps, windows and the reverse method's
        history) uses it. ``mode="tbptt"`` differentiates through its window
        loop, so it needs a kind in :data:`loopgrad_jax.REVERSE_LOOPS`;
        ``mode="as_written"`` differentiates single cells only and takes every kind.
      as_written_method: ``"auto"``, ``"forward"`` or ``"reverse"``.
      optimizer: any ``optax.GradientTransformation``; its state is carried
        through the loop. Default ``optax.sgd(lr)``, PyTorch's ``optim.SGD(lr=lr)``;
        :func:`loopgrad_jax.torch_optimizer` maps PyTorch's optimizers.
      hoist_input: in ``mode="tbptt"``, compute each window's input projection
        as one matrix product before its loop. (``as_written`` changes the
        weights every step, so there is nothing to hoist.)

    Returns:
      A :class:`TrainResult`.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> p = lg.init_rnn(jax.random.key(0), input_size=10, hidden_size=5)
      >>> x = jax.random.normal(jax.random.key(1), (10, 1, 10), jnp.float32)
      >>> y = jax.random.normal(jax.random.key(2), (10, 1, 1), jnp.float32)
      >>> res = lg.train_rnn(p, x, y, lr=0.01, mode="as_written")
      >>> res.losses.shape, res.grads.i2h_weight.shape
      ((10,), (10, 5, 15))
      >>> lg.train_rnn(p, x, y, mode="tbptt", window=3).grads.i2h_bias.shape
      (4, 5)
    """
    params, inputs, targets, hidden0, sizes = check_rnn_args(params, inputs, targets, hidden0)
    mode = _checks.one_of("mode", mode, MODES)
    method = _checks.one_of("as_written_method", as_written_method, _as_written.METHODS)
    window = _checks.static_length("window", window, minimum=1)
    if mode == "tbptt" and window > sizes.length:
        raise ValueError(
            f"window must be between 1 and T={sizes.length} (the number of time steps), "
            f"got {window}."
        )
    if mode == "as_written" and window != 1:
        raise ValueError(f"window applies only to mode='tbptt', got window={window} with {mode=}.")
    if mode == "tbptt" and method != "auto":
        raise ValueError(
            f"as_written_method applies only to mode='as_written', got {method!r} with {mode=}."
        )
    if hoist_input and mode == "as_written":
        raise ValueError(
            "hoist_input applies only to mode='tbptt': mode='as_written' updates the weights "
            "every step, so the input projection cannot be computed before the loop."
        )
    if mode == "tbptt":
        loop = require_reverse(loop, "train_rnn(mode='tbptt')")
    if optimizer is None:
        _check_lr(lr)
        optimizer = optax.sgd(lr)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )

    if mode == "tbptt":
        return _train_tbptt(params, inputs, targets, hidden0, window, loop, optimizer, hoist_input)
    if method == "auto":
        method = _as_written.choose_method(sizes, inputs.dtype)
    return _as_written.train(params, inputs, targets, hidden0, method, loop, optimizer)


def _train_tbptt(
    params, inputs, targets, hidden0, window, loop, optimizer, hoist_input
) -> TrainResult:
    steps = inputs.shape[0]

    def window_update(carry, xy):
        params, opt_state, hidden = carry
        x, y = xy

        def window_loss(p):
            hidden_end, losses = rnn_forward(p, x, y, hidden, loop=loop, hoist_input=hoist_input)
            return losses.sum(), (hidden_end, losses)

        (_, (hidden, losses)), grads = jax.value_and_grad(window_loss, has_aux=True)(params)
        params, opt_state = apply_optimizer(optimizer, grads, opt_state, params)
        return (params, opt_state, lax.stop_gradient(hidden)), (losses, grads)

    full, rest = divmod(steps, window)
    cut = full * window

    def windows(a):
        return a[:cut].reshape(full, window, *a.shape[1:])

    carry = (params, optimizer.init(params), hidden0)
    carry, (losses, grads) = run_loop(
        window_update, carry, (windows(inputs), windows(targets)), length=full, loop=loop
    )
    losses = losses.reshape(cut)
    if rest:  # the shorter last window also updates
        carry, (last_losses, last_grads) = window_update(carry, (inputs[cut:], targets[cut:]))
        losses = jnp.concatenate([losses, last_losses])
        grads = jax.tree.map(lambda g, last: jnp.concatenate([g, last[None]]), grads, last_grads)
    params, _, hidden = carry
    return TrainResult(params=params, losses=losses, grads=grads, hidden=hidden)


def _check_lr(lr: object) -> None:
    if isinstance(lr, jax.Array):
        return  # a traced or concrete array: optax handles it
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
