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

import inspect
import math
import numbers
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from loopgrad_jax import _as_written, _cells, _checks
from loopgrad_jax._cell import REDUCTIONS, Cell, LossFn, reduce_losses
from loopgrad_jax._cells import cudnn
from loopgrad_jax._loops import Loop, check_loop, compiled, require_reverse, run_loop
from loopgrad_jax._parallel import Shards, check_mesh
from loopgrad_jax._result import (
    KEEP_GRADS,
    TrainResult,
    apply_optimizer,
    keep_init,
    keep_result,
    keep_step,
)
from loopgrad_jax._sequence import (
    bind,
    check_hoist,
    rnn_forward,
    sequence_specs,
    step_weights,
    to_carry,
    to_public,
)

#: Values of ``train_rnn(mode=...)``.
MODES: tuple[str, ...] = ("as_written", "tbptt")

#: The learning rate of the default optimizer, ``optax.sgd(lr)``, when ``lr`` is not given.
DEFAULT_LR = 0.01


def train_rnn(
    params: Any,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    lr: jax.typing.ArrayLike | None = None,
    mode: str = "tbptt",
    window: int | None = None,
    hidden0: jax.typing.ArrayLike | None = None,
    loop: str | Loop = "scan",
    as_written_method: str = "auto",
    optimizer: optax.GradientTransformation | optax.MultiSteps | None = None,
    opt_state: optax.OptState | None = None,
    hoist_input: bool = False,
    keep_grads: str = "all",
    cell: Cell | None = None,
    mesh: Mesh | None = None,
    loss_fn: LossFn | None = None,
    lengths: jax.typing.ArrayLike | None = None,
    reduction: str = "sum",
    precision: object = None,
) -> TrainResult:
    """Trains the RNN over one sequence: by default one update over the whole of it.

    ``mode="tbptt"`` (the default; truncated backpropagation through time,
    ``ceil(T/window)`` updates)::

      for each window of `window` steps (the last may be shorter):
        loss_w = sum of step losses over the window, starting at `hidden`
        params = params - lr * grad(loss_w)(params)   # `hidden` held constant
        hidden = the window's last hidden state

    ``window=None`` (the default) is ``window=T``: PyTorch's ordinary training step,
    one backward pass over the whole sequence and one update. ``window=1`` is the
    usual "detach the hidden state" fix.

    ``mode="as_written"`` (``T`` updates, the weights updated inside the loop) is the
    article's loop under PyTorch's ``allow_mutation_on_saved_tensors``::

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

    A step's loss is ``loss_fn(prediction_t, targets[t])`` (by default
    ``mean((prediction_t - targets[t]) ** 2)``); with ``lengths`` only the real
    steps of each example count. An update's loss is :func:`rnn_loss` with the same
    ``reduction`` over that update's steps (a window's, or in ``mode="as_written"``
    the one step's)::

      loss_w = sum of the window's step losses          # reduction="sum" (default)
      loss_w = that sum / (the window's steps that count)   # reduction="mean"

    ``"mean"`` is what a PyTorch loop computes with ``nn.MSELoss()`` (or
    ``nn.CrossEntropyLoss()``) over each window's ``(window, B, O)`` predictions;
    with ``lengths`` it is the mean over the window's real steps of every example
    (in ``mode="as_written"``: over the step's real examples).

    Continuing a run: pass a result's ``params``, ``opt_state`` and ``hidden`` as
    ``params``, ``opt_state=`` and ``hidden0=`` of the next call. In
    ``mode="tbptt"`` two calls split at a window boundary equal one call. In
    ``mode="as_written"`` the next call starts a new retained history, as a new
    PyTorch graph would (``hidden0`` is a constant, like a detached tensor): its
    first gradient has no terms from the earlier call's steps.

    Differentiating the run: ``jax.grad`` or ``jax.jvp`` of anything this returns,
    with respect to ``params``, ``inputs``, ``targets``, ``hidden0``, a traced ``lr``
    or ``opt_state``, is the exact derivative of what it computes (meta-learning a
    learning rate, for example). Holding the hidden state constant is part of the
    update rule, not a cut in that derivative: the state carried into the next
    window or step still depends on ``hidden0``, ``inputs`` and ``lr``.

    Compilation: the work runs in one ``jax.jit``-compiled function per set of
    shapes and options (``loop="python"`` excepted: it runs as a Python loop,
    unrolled only under your own ``jax.jit``), so repeated calls with the same
    shapes, eager or not, do not recompile. ``lr`` and ``opt_state`` are traced:
    a sweep over ``lr`` values compiles once. ``optimizer`` is a static option:
    pass the same object to reuse the compiled function (a new ``optax.adam(lr)``
    per ``lr`` compiles again; put the learning rate in ``opt_state`` with
    ``optax.inject_hyperparams`` instead). :func:`loopgrad_jax.torch_optimizer`
    returns the same object for equal arguments. ``cell`` is static too: see
    :class:`Cell`.

    Args:
      params: the initial weights: the article's :class:`RNNParams`, a
        :class:`CellParams`, or, with ``cell``, any pytree of float arrays.
      inputs: ``(T, B, I)``.
      targets: ``(T, B, O)``; with ``loss_fn``, any array ``(T, B, ...)`` it takes.
      lr: the learning rate of the default optimizer ``optax.sgd(lr)``, PyTorch's
        ``optim.SGD(lr=lr)``: a number or a scalar array, ``>= 0``; default
        ``0.01``. A traced ``lr`` cannot be checked when it is traced: a negative
        or non-finite one makes every output that depends on it NaN, and every
        derivative of such an output (with respect to ``lr`` too). Give either
        ``lr`` or ``optimizer``, not both.
      mode: one of :data:`MODES`: ``"tbptt"`` (default), or ``"as_written"``, the
        article's update after every step.
      window: steps per update in ``mode="tbptt"``, ``1 <= window <= T``; ``None``
        (default) is ``T``, one update over the whole sequence.
      hidden0: the initial state; zeros when ``None``. ``(B, H)`` for
        :class:`RNNParams`; PyTorch's ``(num_layers, B, H)`` for a
        :class:`CellParams`, and for an LSTM the pair ``(h0, c0)`` of two; with
        ``cell``, required, the cell's carry.
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its
        text form; every loop (over time steps, windows and the reverse method's
        history) uses it. ``mode="tbptt"`` differentiates through its window
        loop, so it needs a kind in :data:`loopgrad_jax.REVERSE_LOOPS` (or a
        bounded ``"while:max_steps=N"``); ``mode="as_written"`` differentiates
        single cells only and takes every kind. ``"while:max_steps=N"`` bounds
        each window's loop in ``mode="tbptt"`` (``window <= N``; the loop over
        the windows runs as many as there are) and the loop over the ``T`` steps
        in ``mode="as_written"`` (``T <= N``). ``"cudnn"``: each window of an LSTM's
        :class:`CellParams` in cuDNN's fused kernel, in ``mode="tbptt"`` only, on a CUDA
        GPU (see :func:`loopgrad_jax.rnn`).
      as_written_method: ``"auto"``, ``"forward"`` or ``"reverse"``.
      optimizer: any ``optax.GradientTransformation``, or an object with methods
        ``init(params)`` and ``update(updates, state, params)`` as
        ``optax.MultiSteps`` has; its state is carried through the loop.
        Transformations that take extra arguments get
        ``value`` (the loss of the update's gradient) and ``grad``, so
        ``optax.contrib.reduce_on_plateau`` works; in ``mode="tbptt"`` they also
        get ``value_fn`` (the window's loss as a function of the weights), so
        ``optax.lbfgs()`` and its line search work. Default ``optax.sgd(lr)``;
        :func:`loopgrad_jax.torch_optimizer` maps PyTorch's optimizers.
      opt_state: the optimizer's state to start from, as a previous
        :class:`TrainResult` returns it; ``optimizer.init(params)`` when ``None``.
      hoist_input: in ``mode="tbptt"``, compute each window's input projection
        as one matrix product before its loop. (``as_written`` changes the
        weights every step, so there is nothing to hoist.)
      keep_grads: which gradients :class:`TrainResult` holds: ``"all"`` (leaves
        ``(U, ...)``, one per update), ``"last"`` (the last update's) or
        ``"none"``. Every update's gradient of the 256-unit RNN at ``I=64``,
        ``B=32``, ``T=1000`` is 339 MB against 0.3 MB of weights.
      cell: your own :class:`Cell` (``params`` then any pytree of float arrays and
        ``hidden0`` its carry); ``None`` for the built-in kinds.
      mesh: a ``jax.sharding.Mesh`` to split the batch over, data-parallel, as in
        :func:`rnn_loss`: each device runs ``B/n`` examples, and each update's
        gradient and loss are averaged over the devices once (one ``psum`` per
        update, as PyTorch's ``DistributedDataParallel`` does), so every device
        applies the same update. ``as_written_method="auto"`` decides for the
        ``B/n`` examples one device holds. ``hidden`` comes back split over the
        mesh like ``inputs``; the weights, losses and gradients replicated.
      loss_fn: one step's loss, ``loss_fn(prediction_t, target_t) -> scalar``, as in
        :func:`rnn_loss`; in ``mode="as_written"`` step ``t``'s update uses it too.
      lengths: ``(B,)`` integers in ``1..T``: step ``t`` of example ``b`` counts only
        if ``t < lengths[b]``, as in :func:`rnn_loss`, in both modes (a window or
        step with no real steps has zero loss and gradient; the optimizer still
        steps). A traced length outside ``1..T`` makes the losses, the gradients
        and the weights NaN.
      reduction: one of :data:`REDUCTIONS`: ``"sum"`` (default) of each update's step
        losses, or their ``"mean"`` over the update's steps that count, as
        :func:`rnn_loss` defines it for those steps (``nn.MSELoss()`` over a window's
        whole output). ``TrainResult.losses`` keeps one entry per step: each step's
        loss divided as its update's, so a window's entries sum to its update's loss
        (in ``mode="as_written"`` each entry is its update's loss).
      precision: ``None`` (every operation in the parameters' dtype), ``"bf16"`` or a
        :class:`loopgrad_jax.Precision`, for a :class:`CellParams`: as in
        :func:`rnn_loss`, every matrix product with bfloat16 operands accumulated
        in float32, the rest float32; the weights, gradients and optimizer state
        stay float32, and come back as the caller's structure.

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
      >>> lg.train_rnn(p, x, y, lr=0.01).grads.i2h_weight.shape  # one update over T
      (1, 5, 15)
      >>> lg.train_rnn(p, x, y, mode="tbptt", window=3).grads.i2h_bias.shape
      (4, 5)
      >>> first = lg.train_rnn(p, x[:6], y[:6], mode="tbptt", window=3)
      >>> rest = lg.train_rnn(first.params, x[6:], y[6:], mode="tbptt", window=3,
      ...                     hidden0=first.hidden, opt_state=first.opt_state)
      >>> bool(jnp.allclose(rest.params.i2h_weight, lg.train_rnn(
      ...     p, x, y, mode="tbptt", window=3).params.i2h_weight))
      True
    """
    policy = _cells.bind_precision(precision, params)
    bound = bind(params, inputs, targets, hidden0, cell, loss_fn)
    params, inputs, targets, hidden0, length = (
        _cells.set_precision(bound.params, policy),
        bound.inputs,
        bound.targets,
        bound.hidden0,
        bound.dims.length,
    )
    mode = _checks.one_of("mode", mode, MODES)
    reduction = _checks.one_of("reduction", reduction, REDUCTIONS)
    method = _checks.one_of("as_written_method", as_written_method, _as_written.METHODS)
    keep_grads = _checks.one_of("keep_grads", keep_grads, KEEP_GRADS)
    if mode == "as_written" and window is not None:
        raise ValueError(f"window applies only to mode='tbptt', got window={window} with {mode=}.")
    window = length if window is None else _checks.static_length("window", window, minimum=1)
    if mode == "tbptt" and window > length:
        raise ValueError(
            f"window must be between 1 and T={length} (the number of time steps), got {window}."
        )
    if getattr(params, "bidirectional", False):
        if mode == "as_written":
            raise ValueError(
                "mode='as_written' updates the weights after every step t from the loss of "
                "steps up to t, but a bidirectional model's output at step t reads the reverse "
                "direction, which starts from the last step: step t cannot see that future. "
                "Train it with mode='tbptt' and window=None (one update over the sequence)."
            )
        if window != length:
            raise ValueError(
                f"a bidirectional model's reverse direction reads the whole sequence, so it "
                f"trains on one window of all T={length} steps (window=None), got "
                f"window={window}."
            )
    lengths = _checks.check_lengths(lengths, length, bound.dims.batch)
    if mode == "tbptt" and method != "auto":
        raise ValueError(
            f"as_written_method applies only to mode='as_written', got {method!r} with {mode=}."
        )
    hoist_input = check_hoist(hoist_input, bound.cell)
    if hoist_input and mode == "as_written":
        raise ValueError(
            "hoist_input applies only to mode='tbptt': mode='as_written' updates the weights "
            "every step, so the input projection cannot be computed before the loop."
        )
    loop = require_reverse(loop, "train_rnn(mode='tbptt')") if mode == "tbptt" else check_loop(loop)
    if loop.kind == cudnn.KIND:
        cudnn.check(
            params,
            inputs,
            needed_by="lg.train_rnn",
            mesh=mesh,
            custom_cell=cell is not None,
            as_written=mode == "as_written",
        )
    _check_bound(loop, mode, window, length)
    if optimizer is None:
        lr = _check_lr(DEFAULT_LR if lr is None else lr, inputs.dtype)
        reference_optimizer = optax.sgd(DEFAULT_LR)  # the default's state structure
    elif lr is not None:
        raise ValueError(
            "lr sets the learning rate of the default optimizer, optax.sgd(lr); with "
            "optimizer= given, set the learning rate on that optimizer instead."
        )
    else:
        optimizer = reference_optimizer = _check_optimizer(optimizer)
    if opt_state is not None:
        opt_state = _cells.set_precision(opt_state, policy)
        opt_state = _check_opt_state(opt_state, jax.eval_shape(reference_optimizer.init, params))
    shards = check_mesh(mesh, bound.dims.batch)
    split = shards.axis is None and _checks.batch_split(inputs)
    if mode == "as_written" and method == "auto":
        local = bound.dims._replace(batch=bound.dims.batch // shards.size)
        method = "reverse" if split else _as_written.choose_method(local, inputs.dtype)
    if mode == "as_written" and method == "forward" and split:
        raise ValueError(
            "as_written_method='forward' differentiates each example on its own, which a "
            "batch split over an Explicit mesh cannot give it without mesh=: pass "
            "mesh=<that mesh> (each device then runs its own examples), or "
            "as_written_method='reverse'."
        )
    result = _train(
        params,
        inputs,
        targets,
        hidden0,
        lr,
        opt_state,
        lengths,
        mode=mode,
        window=window,
        loop=loop,
        method=method,
        optimizer=optimizer,
        hoist_input=hoist_input,
        keep_grads=keep_grads,
        cell=bound.cell,
        kind=bound.kind,
        shards=shards,
        loss_fn=loss_fn,
        reduction=reduction,
    )
    if policy is None:
        return result
    # The policy is the run's, not the results': they keep the caller's structure.
    return result._replace(
        params=_cells.set_precision(result.params, None),
        grads=_cells.set_precision(result.grads, None),
        opt_state=_cells.set_precision(result.opt_state, None),
    )


@compiled(
    "mode",
    "window",
    "loop",
    "method",
    "optimizer",
    "hoist_input",
    "keep_grads",
    "cell",
    "kind",
    "shards",
    "loss_fn",
    "reduction",
)
def _train(
    params,
    inputs,
    targets,
    hidden0,
    lr,
    opt_state,
    lengths,
    *,
    mode,
    window,
    loop,
    method,
    optimizer,
    hoist_input,
    keep_grads,
    cell,
    kind,
    shards: Shards,
    loss_fn,
    reduction,
) -> TrainResult:
    """:func:`train_rnn` after its checks: one compiled function per shapes and options."""
    weights = None if lengths is None else step_weights(lengths, inputs.shape[0], inputs.dtype)

    def local(params, inputs, ys, hidden0, lr, opt_state):
        targets, weights = ys
        nonlocal optimizer
        if optimizer is None:
            # A negative or non-finite traced lr could not be refused when traced: poison it
            # by a factor, so its derivatives are NaN too (a where would drop its cotangent).
            lr = lr * jnp.where(jnp.isfinite(lr) & (lr >= 0), 1, jnp.nan).astype(lr.dtype)
            optimizer = optax.sgd(lr)
        if opt_state is None:
            opt_state = optimizer.init(params)
        carry0 = to_carry(kind, hidden0)
        if mode == "tbptt":
            result = _train_tbptt(
                cell,
                params,
                inputs,
                (targets, weights),
                carry0,
                window,
                loop,
                optimizer,
                opt_state,
                hoist_input,
                keep_grads,
                shards,
                loss_fn,
                reduction,
            )
        else:
            _check_update_arguments(optimizer, opt_state, params)
            result = _as_written.train(
                params,
                inputs,
                targets,
                carry0,
                method=method,
                loop=loop,
                optimizer=optimizer,
                opt_state=opt_state,
                keep_grads=keep_grads,
                cell=cell,
                shards=shards,
                loss_fn=loss_fn,
                weights=weights,
                reduction=reduction,
            )
        return result._replace(hidden=to_public(kind, result.hidden))

    _, _, hidden_spec = specs = sequence_specs(kind, hidden0, shards.axis)
    return shards.run(
        local,
        (params, inputs, (targets, weights), hidden0, lr, opt_state),
        (P(), *specs, P(), P()),
        TrainResult(P(), P(), P(), hidden_spec, P()),
    )


def _train_tbptt(
    cell,
    params,
    inputs,
    targets,
    hidden0,
    window,
    loop,
    optimizer,
    opt_state,
    hoist_input,
    keep_grads,
    shards,
    loss_fn,
    reduction,
) -> TrainResult:
    """``targets`` is the pair ``(targets, weights)``; ``weights`` ``(T, B)`` or ``None``.

    Each window's loss is its step losses reduced as ``reduction`` says
    (:func:`~loopgrad_jax._cell.reduce_losses`); its steps' entries of ``losses`` sum to it.
    """
    steps = inputs.shape[0]

    def window_update(carry, xy):
        params, opt_state, hidden, kept = carry
        x, (y, w) = xy

        def window_loss(p):
            # With a mesh: this device's examples, then one average over the devices
            # (whose backward pass sums the weights' gradient once, where p is varied).
            hidden_end, losses = rnn_forward(
                cell,
                shards.vary(p),
                x,
                y,
                hidden,
                loop=loop,
                hoist_input=hoist_input,
                loss_fn=loss_fn,
                weights=w,
            )
            losses = reduce_losses(shards.mean(losses), reduction, w, shards)
            return losses.sum(), (hidden_end, losses)

        # The gradient holds `hidden` constant (PyTorch's hidden.detach()) because it
        # differentiates with respect to the weights only; no stop_gradient is needed,
        # and none is used, so derivatives of the whole run stay exact.
        (value, (hidden, losses)), grads = jax.value_and_grad(window_loss, has_aux=True)(params)
        params, opt_state = apply_optimizer(
            optimizer, grads, opt_state, params, value=value, value_fn=lambda p: window_loss(p)[0]
        )
        kept, out = keep_step(keep_grads, kept, grads)
        return (params, opt_state, hidden, kept), (losses, out)

    full, rest = divmod(steps, window)
    cut = full * window

    def windows(tree):
        return jax.tree.map(lambda a: a[:cut].reshape(full, window, *a.shape[1:]), tree)

    # A bound on the trip count (while:max_steps=N) bounds each window's loop; the loop
    # over the windows runs once per window, however many there are. The parallel kind
    # solves each window's time loop, and cudnn runs it in one kernel call; the windows,
    # which carry the weights and the optimizer's state from update to update, run one
    # after another.
    outer = loop if loop.max_steps is None else loop._replace(max_steps=full)
    outer = Loop("scan") if loop.kind in ("parallel", cudnn.KIND) else outer
    carry = (params, opt_state, hidden0, keep_init(keep_grads, params))
    carry, (losses, grads) = run_loop(
        window_update, carry, (windows(inputs), windows(targets)), length=full, loop=outer
    )
    losses = losses.reshape(cut)
    if rest:  # the shorter last window also updates
        rest_of = (inputs[cut:], jax.tree.map(lambda a: a[cut:], targets))
        carry, (last_losses, last_grads) = window_update(carry, rest_of)
        losses = jnp.concatenate([losses, last_losses])
        if keep_grads == "all":
            grads = jax.tree.map(
                lambda g, last: jnp.concatenate([g, last[None]]), grads, last_grads
            )
    params, opt_state, hidden, kept = carry
    return TrainResult(params, losses, keep_result(keep_grads, kept, grads), hidden, opt_state)


def _check_bound(loop: Loop, mode: str, window: int, length: int) -> None:
    """Refuses, naming the user's argument, a run longer than ``loop``'s ``max_steps``."""
    if loop.max_steps is None:
        return
    if mode == "tbptt":
        name, steps, bounded = "window", window, "each window's loop"
    else:
        name, steps, bounded = "T", length, "the loop over the T time steps"
    if steps > loop.max_steps:
        raise ValueError(
            f"{name}={steps} exceeds the loop's max_steps={loop.max_steps} (loop="
            f"{str(loop)!r}), which bounds {bounded} in {mode=}; raise max_steps or "
            f"lower {name}."
        )


def _check_optimizer(optimizer: object) -> optax.GradientTransformation:
    """``optimizer`` as an optax transformation: one already, or an object with ``init``
    and ``update`` methods (``optax.MultiSteps``), whose ``update`` gets the extra
    arguments if it takes ``**kwargs``."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    init, update = (getattr(optimizer, name, None) for name in ("init", "update"))
    if not (callable(init) and callable(update)):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation, or an object with methods "
            "init(params) and update(updates, state, params) as optax.MultiSteps has, got "
            f"{type(optimizer).__name__}."
        )
    takes_extra = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(update).parameters.values()
    )
    kind = optax.GradientTransformationExtraArgs if takes_extra else optax.GradientTransformation
    return kind(init, update)  # bound methods: equal for the same object, so no recompiling


def _check_lr(lr: object, dtype: jnp.dtype) -> jax.Array:
    """``lr`` as a scalar of ``dtype``; refuses a negative or non-finite concrete value."""
    if isinstance(lr, bool | np.bool_) or not isinstance(
        lr, numbers.Real | np.ndarray | np.generic | jax.Array
    ):
        raise TypeError(f"lr must be a number or a scalar array, got {type(lr).__name__} {lr!r}.")
    arr = jnp.asarray(lr)
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.number):
        raise TypeError(
            f"lr must be a real scalar, got an array of shape {arr.shape} and dtype {arr.dtype}."
        )
    try:
        value = float(arr)
    except jax.errors.ConcretizationTypeError:
        value = None  # traced: checked where it is used (_train poisons it)
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"lr must be a finite number >= 0 (as torch.optim requires), got {lr!r}.")
    return arr.astype(dtype)


def _check_opt_state(opt_state: object, expected: object) -> object:
    """``opt_state`` with the dtypes of ``expected``; raises unless structure and shapes match.

    A floating-point leaf of another precision (a float64 learning rate set by hand
    in float32 state) is cast, as PyTorch casts a Python-float learning rate.
    """
    got, got_tree = jax.tree_util.tree_flatten_with_path(opt_state)
    want, want_tree = jax.tree_util.tree_flatten_with_path(expected)
    if got_tree != want_tree:
        raise ValueError(
            "opt_state must have the structure optimizer.init(params) gives (pass the "
            f"opt_state of a TrainResult from the same optimizer): expected {want_tree}, "
            f"got {got_tree}."
        )
    leaves = []
    for (path, leaf), (_, spec) in zip(got, want, strict=True):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        same_kind = dtype == spec.dtype or (
            jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(spec.dtype, jnp.floating)
        )
        if shape != spec.shape or not same_kind:
            raise ValueError(
                f"opt_state{jax.tree_util.keystr(path)} must have shape {spec.shape} and dtype "
                f"{spec.dtype}, as optimizer.init(params) gives, got shape {shape} and "
                f"dtype {dtype}."
            )
        leaves.append(jnp.asarray(leaf, spec.dtype))
    return jax.tree.unflatten(got_tree, leaves)


def _check_update_arguments(optimizer, opt_state, params) -> None:
    """Refuses, in our words, an optimizer whose update needs what as_written lacks."""
    dummy_value = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
    try:
        jax.eval_shape(
            lambda: apply_optimizer(optimizer, params, opt_state, params, value=dummy_value)
        )
    except TypeError as err:
        missing = re.search(r"required keyword-only argument: '(\w+)'", str(err))
        if missing is None:
            raise
        raise ValueError(
            f"optimizer's update needs {missing.group(1)!r}, which mode='as_written' cannot "
            "give: its gradient sums every past use of the weights, so it is not the "
            "gradient of one function of them and a line search has nothing to evaluate. "
            "Use mode='tbptt', where value_fn is the window's loss (optax.lbfgs works there)."
        ) from err
