"""The article's per-step training loop, with PyTorch's gradient, two exact ways.

Write ``h_t = cell(p_t, h_{t-1}, x_t)`` and ``L_t = loss(p_t, h_t)``, where
``p_t`` are the weights after ``t`` updates. Under
``allow_mutation_on_saved_tensors`` PyTorch's ``L_t.backward()`` accumulates
into the one leaf tensor ``p`` a contribution from every use of it::

  g_t = dL_t/dp_t  +  sum over s <= t of  a_s^T  d cell(p_s, h_{s-1}, x_s) / dp_s
  where  a_t = dL_t/dh_t,   a_{s-1} = a_s^T d cell(p_s, h_{s-1}, x_s) / dh_{s-1}

- ``forward`` carries ``S_t = dh_t/dp`` (every use up to ``t``) forward in time:
  ``S_t = dcell/dh S_{t-1} + dcell/dp`` and ``g_t = dL_t/dp_t + a_t^T S_t``. Per
  step: one Jacobian of the cell per example (:func:`cell_jacobians`) and one
  batched ``(H, H) x (H, P)`` product; ``O(T*B*H*H*P)`` time, ``O(B*H*P)`` memory.
- ``reverse`` keeps the weights and hidden states of every step and runs the
  ``a_s`` recursion backward from ``t`` at every step, as PyTorch's retained
  graph does: ``T*(T+1)/2`` cell VJPs in all, ``O(T**2 * B*H*(I+H))`` time,
  ``O(T*(B*H + P))`` memory.

Both take any :class:`~loopgrad_jax.Cell` (its ``step(params, carry, x)`` is the
``cell`` above, ``h`` its carry, a pytree for an LSTM or several layers).
:func:`as_written_cost` counts their FLOPs and compiled memory;
:func:`choose_method` (``as_written_method="auto"``) picks the one a time model
fitted to measurements finds faster.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from loopgrad_jax import _checks
from loopgrad_jax._cell import Cell, LossFn, cell_step_loss, reduce_losses
from loopgrad_jax._cells import CELLS, GATES, carry_per_example
from loopgrad_jax._loops import Loop, run_loop
from loopgrad_jax._parallel import LOCAL, Shards
from loopgrad_jax._result import (
    TrainResult,
    apply_optimizer,
    keep_init,
    keep_result,
    keep_step,
)
from loopgrad_jax._rnn import RNNSizes

#: Values of ``train_rnn(as_written_method=...)``.
METHODS: tuple[str, ...] = ("auto", "forward", "reverse")

#: ``auto`` never picks ``forward`` when its sensitivity would exceed this many bytes.
FORWARD_MEMORY_LIMIT = 1 << 30


class Dims(NamedTuple):
    """The sizes the cost of an as-written run depends on, for any cell."""

    length: int  # T
    batch: int  # B
    input: int  # I
    carry: int  # N: numbers of state per example (H; 2*L*H for an L-layer LSTM)
    params: int  # P: numbers of weights, the head's included
    cell_macs: int  # multiply-adds of one step of the cell, per example
    head_macs: int  # multiply-adds of the readout, per example

    @classmethod
    def of(cls, sizes: RNNSizes) -> Dims:
        """The article's ``SimpleRNN`` of these sizes."""
        t, b, i, h, o = sizes
        return cls(t, b, i, h, h * (i + h) + h + o * h + o, h * (i + h), o * h)

    @classmethod
    def of_cell(
        cls,
        kind: str,
        length: int,
        batch: int,
        input: int,
        hidden: int,
        output: int,
        num_layers: int = 1,
    ) -> Dims:
        """A cell of ``kind`` (one of :data:`~loopgrad_jax.CELLS`) with these sizes."""
        if kind == "article":
            if num_layers != 1:
                raise ValueError(f"the article's SimpleRNN has one layer, got {num_layers=}.")
            return cls.of(RNNSizes(length, batch, input, hidden, output))
        g, h = GATES[kind] * hidden, hidden
        widths = [input] + [h] * (num_layers - 1)
        macs = sum(g * (w + h) for w in widths)
        params = macs + 2 * g * num_layers + output * h + output
        n = carry_per_example(kind, h, num_layers)
        return cls(length, batch, input, n, params, macs, output * h)


def _dims(sizes: RNNSizes | Dims) -> Dims:
    if isinstance(sizes, Dims):
        return sizes
    if isinstance(sizes, RNNSizes):
        return Dims.of(sizes)
    raise TypeError(f"sizes must be an RNNSizes, got {type(sizes).__name__}.")


class Cost(NamedTuple):
    """An estimate of one as-written training run."""

    flops: float  # multiply-adds counted as 2
    memory_bytes: float  # temp bytes of the compiled run: what the method keeps


#: Seconds per unit of each of :func:`work_counts`, per method: ``auto``'s time model,
#: ``seconds = sum(TIME_MODEL[method][k] * work_counts(sizes, method)[k])``. Fitted by
#: ``loopgrad-bench as-written-grid --fit`` to the float32 medians of
#: ``bench/results/cpu_as_written_grid_calibration.json`` (a 2-core x86 CPU, 65 timed
#: points); checked on another run, ``cpu_as_written_grid.json``. A price of 0 means the
#: fit found that count's cost already in the others (reverse's per-VJP overhead is in
#: ``slot`` and ``activation``).
TIME_MODEL: dict[str, dict[str, float]] = {
    "forward": {
        "call": 4.1e-4,
        "step": 5.2e-6,
        "row": 1.9e-6,
        "number": 6.7e-10,
        "flop": 7.5e-12,
        "batched_flop": 1.1e-11,
    },
    "reverse": {
        "call": 4.1e-4,
        "slot": 1.5e-6,
        "vjp": 0.0,
        "weight": 1.2e-9,
        "activation": 3.2e-9,
        "flop": 1.9e-11,
    },
}

#: ``auto`` picks ``forward`` only where its estimate is below this fraction of
#: ``reverse``'s. Near the crossover the two are close and ``forward``'s time moves more
#: from run to run (its batched products are split over the cores: at I=64, H=16, B=32,
#: T=100 it took 1.03x to 1.31x ``reverse``'s in five runs); ``reverse`` is the steadier
#: pick there. Over the calibration run and the earlier check run this margin kept
#: every pick within 1.2x of the faster method, where picking the smaller estimate missed
#: at that point.
FORWARD_MARGIN = 0.85


def pick_method(forward_s: float, reverse_s: float) -> str:
    """The method ``auto`` picks from the two estimates (:data:`FORWARD_MARGIN`)."""
    return "forward" if forward_s < FORWARD_MARGIN * reverse_s else "reverse"


#: Fixed bytes the compiled program's temp space holds beside the method's arrays
#: (small buffers, each aligned), measured with :func:`jax.stages.Compiled.memory_analysis`.
_FIXED_BYTES = {"forward": 1024, "reverse": 2048}


def num_params(sizes: RNNSizes | Dims) -> int:
    """``P``, the number of scalars in the params (the article's for :class:`RNNSizes`)."""
    return _dims(sizes).params


def as_written_cost(
    sizes: RNNSizes | Dims,
    method: str,
    itemsize: int = 4,
    *,
    kind: str = "article",
    num_layers: int = 1,
) -> Cost:
    """Estimates the work (FLOPs) and memory of ``method`` for these sizes.

    ``kind`` and ``num_layers`` name the cell (one of :data:`~loopgrad_jax.CELLS`);
    below, ``H`` stands for ``N``, the numbers of state one example carries
    (``L*H``, and ``2*L*H`` for an LSTM), and ``c`` for the cell's products.

    FLOPs count the matrix products, a multiply-add as 2. With ``P`` weights,
    ``c = 2*B*H*(I+H)`` for the article's cell (``2*B*sum_k G*H*(I_k+H)`` for
    ``L`` layers of ``G`` gates) and ``d = 2*B*H*O`` for the head's, every step
    runs the cell and the head forward and the head backward: ``c + 3d``.
    Beyond that, per step:

    - ``forward``: the per-example Jacobians (the cell again, ``c``, and ``N``
      one-hot VJPs of two products each, ``2*N*c``), the chain term
      ``dcell/dh @ S`` (``2*B*N*N*P``) and ``a_t^T S_t`` (``2*B*N*P``).
    - ``reverse``: step ``t`` runs ``t + 1`` cell VJPs (forward and two
      backward products, ``3c``): ``3c * T*(T+1)/2`` in all.

    ``memory_bytes`` is what ``jax.jit(train_rnn).lower(...).compile()``'s
    ``memory_analysis().temp_size_in_bytes`` reports with ``loop="scan"``, to
    within 2x (``tests/test_as_written.py`` checks a grid of sizes; inputs and
    outputs, such as the ``(T, P)`` gradients returned, are not temp):

    - ``forward``: ``S`` and its update (``2*B*H*P`` numbers), ``dcell/dh``
      (``B*H*H``) and a few weight- and state-sized buffers (``4*(P + B*H)``);
    - ``reverse``: the history, the weights and input state of every step
      (``T*(P + B*H)``), and a few weight- and state-sized buffers (``4*(P + B*H)``);

    plus about 1-2 KiB of small buffers. (With ``T = 1`` XLA removes the loop
    and needs less.)

    Args:
      sizes: the run's :class:`RNNSizes` (``T, B, I, H, O``).
      method: ``"forward"`` or ``"reverse"``.
      itemsize: bytes per number (4 for float32, 8 for float64).
      kind: the cell, one of :data:`~loopgrad_jax.CELLS`.
      num_layers: its layers (1 for ``"article"``).

    Returns:
      A :class:`Cost`.

    Examples:
      >>> import loopgrad_jax as lg
      >>> sizes = lg.RNNSizes(length=100, batch=8, input=10, hidden=16, output=1)
      >>> lstm = lg.as_written_cost(sizes, "forward", kind="lstm", num_layers=2)
      >>> rnn = lg.as_written_cost(sizes, "forward", kind="rnn_tanh", num_layers=2)
      >>> round(lstm.memory_bytes / rnn.memory_bytes, 1)  # twice the state, ~4x the weights
      7.8
    """
    _check_method(method)
    if not isinstance(sizes, Dims):
        if not isinstance(sizes, RNNSizes):
            raise TypeError(f"sizes must be an RNNSizes, got {type(sizes).__name__}.")
        kind = _checks.one_of("kind", kind, CELLS)
        num_layers = _checks.static_length("num_layers", num_layers, minimum=1)
        sizes = Dims.of_cell(kind, *sizes, num_layers=num_layers)
    t, b, _, h, p, macs, head_macs = sizes
    cell, head = 2.0 * b * macs, 2.0 * b * head_macs
    every_step = t * (cell + 3 * head)
    if method == "forward":
        per_step = cell + 2 * h * cell + 2.0 * b * h * h * p + 2.0 * b * h * p
        numbers = 2 * b * h * p + b * h * h + 4 * (p + b * h)
        flops = every_step + t * per_step
    else:
        numbers = (t + 4) * (p + b * h)
        flops = every_step + 3 * cell * t * (t + 1) / 2
    return Cost(flops=flops, memory_bytes=float(numbers * itemsize + _FIXED_BYTES[method]))


def work_counts(sizes: RNNSizes | Dims, method: str) -> dict[str, float]:
    """What one run of ``method`` does, counted in the units :data:`TIME_MODEL` prices.

    - ``call``: 1, the run itself (dispatch, buffers);
    - ``forward``: ``step``, ``T`` loop iterations; ``row``, ``T*B`` per-example
      Jacobians (small products whose cost at small ``H`` is mostly per call);
      ``number``, the ``T*B*H*P`` entries of ``S`` updated (each read and
      written a few times per step); :func:`as_written_cost`'s FLOPs, as
      ``flop`` when ``B == 1`` and as ``batched_flop`` when ``B > 1``: the
      chain term is then ``B`` products of one example each, which XLA's CPU
      backend runs at a lower rate than one product;
    - ``reverse``: ``slot``, ``T**2`` iterations of the history loop, ``T*(T+1)/2``
      of which (``vjp``) run a cell VJP and the rest skip; ``weight``, the ``P``
      stored weights each VJP reads (``vjp * P``), which bound it at small ``B``;
      ``activation``, the ``B*(I+H)`` inputs each VJP reads and whose cotangent
      it writes (``vjp * B*(I+H)``), elementwise work that dominates at small ``H``;
      ``flop``, :func:`as_written_cost`'s FLOPs.
    """
    sizes = _dims(sizes)
    cost = as_written_cost(sizes, method)
    t, b, i, h, p, _, _ = sizes
    if method == "forward":
        flop, batched = (cost.flops, 0.0) if b == 1 else (0.0, cost.flops)
        return {
            "call": 1,
            "step": t,
            "row": t * b,
            "number": t * b * h * p,
            "flop": flop,
            "batched_flop": batched,
        }
    vjp = t * (t + 1) / 2
    return {
        "call": 1,
        "slot": t * t,
        "vjp": vjp,
        "weight": vjp * p,
        "activation": vjp * b * (i + h),
        "flop": cost.flops,
    }


def estimated_seconds(
    sizes: RNNSizes | Dims,
    method: str,
    itemsize: int = 4,
    model: dict[str, dict[str, float]] | None = None,
) -> float:
    """Seconds for one run of ``method`` by ``model`` (default :data:`TIME_MODEL`).

    FLOPs and numbers read of ``itemsize``-byte floats are taken as ``itemsize / 4``
    times slower than float32 ones (a vector register holds half as many
    float64s); the grid measured float32 only.
    """
    prices = (TIME_MODEL if model is None else model)[method]
    wider = max(itemsize / 4, 1.0)
    return sum(
        prices[k] * n * (1.0 if k in ("call", "step", "row", "slot", "vjp") else wider)
        for k, n in work_counts(sizes, method).items()
    )


def choose_method(sizes: RNNSizes | Dims, dtype: jnp.dtype) -> str:
    """``auto``: the method :func:`estimated_seconds` finds faster, within the memory cap.

    ``forward`` is chosen when its estimate is below :data:`FORWARD_MARGIN` times
    ``reverse``'s (:func:`pick_method`), and never when its :func:`as_written_cost`
    memory exceeds :data:`FORWARD_MEMORY_LIMIT`.
    """
    itemsize = jnp.dtype(dtype).itemsize
    sizes = _dims(sizes)
    if as_written_cost(sizes, "forward", itemsize).memory_bytes > FORWARD_MEMORY_LIMIT:
        return "reverse"
    forward = estimated_seconds(sizes, "forward", itemsize)
    reverse = estimated_seconds(sizes, "reverse", itemsize)
    return pick_method(forward, reverse)


def _check_method(method: str) -> None:
    if method not in ("forward", "reverse"):
        raise ValueError(f"method must be 'forward' or 'reverse', got {method!r}.")


def train(
    params,
    inputs,
    targets,
    hidden0,
    *,
    method,
    loop,
    optimizer,
    opt_state,
    keep_grads,
    cell: Cell,
    shards: Shards = LOCAL,
    loss_fn: LossFn | None = None,
    weights: jax.Array | None = None,
    reduction: str = "sum",
) -> TrainResult:
    """Runs the article's loop with ``method`` (``"forward"`` or ``"reverse"``).

    Step ``t``'s loss is :func:`~loopgrad_jax._cell.step_loss` of the readout,
    ``targets[t]`` and ``weights[t]`` (``(T, B)`` or ``None``), with ``loss_fn``,
    reduced as ``reduction`` says over the update's one step
    (:func:`~loopgrad_jax._cell.reduce_losses`: ``"mean"`` divides by the number of
    the step's real examples over ``B``).

    ``cell`` is the model (``hidden0`` its carry, ``TrainResult.hidden`` too);
    ``forward`` assumes it treats the rows of the carry and ``x`` independently.

    The retained history starts here: a call that continues an earlier run
    (given its ``params``, ``opt_state`` and ``hidden``) treats ``hidden0`` as a
    constant, as PyTorch does for a tensor from a graph that no longer exists.

    With a mesh (``shards``) each device runs its part of the batch and every step's
    gradient and loss are averaged over the devices once, before the update.
    """
    steps = inputs.shape[0]
    gradient = _Forward(cell) if method == "forward" else _Reverse(cell, inputs, loop)

    def body(carry, xyt):
        params, opt_state, hidden, state, kept = carry
        x, y, w, t = xyt
        local = shards.vary(params)  # this device's gradient, averaged once below
        new_hidden = cell.step(local, hidden, x)

        def loss_of(p, h):  # the update's one step, reduced as a tbptt window is
            loss = cell_step_loss(cell, p, h, y, loss_fn, w)[None]
            return reduce_losses(loss, reduction, None if w is None else w[None], shards)[0]

        # dL_t/dp_t (this step's own use of the head and cell) and a_t = dL_t/dh_t.
        loss, (grad_now, adjoint) = jax.value_and_grad(loss_of, argnums=(0, 1))(local, new_hidden)
        grads, state = gradient.step(state, local, hidden, x, t, adjoint, grad_now)
        loss, grads = shards.mean((loss, grads))
        params, opt_state = apply_optimizer(optimizer, grads, opt_state, params, value=loss)
        kept, out = keep_step(keep_grads, kept, grads)
        return (params, opt_state, new_hidden, state, kept), (loss, out)

    state = shards.vary(gradient.init(params, hidden0, steps))
    carry = (params, opt_state, hidden0, state, keep_init(keep_grads, params))
    xs = (inputs, targets, weights, jnp.arange(steps))
    (params, opt_state, hidden, _, kept), (losses, grads) = run_loop(
        body, carry, xs, length=steps, loop=loop
    )
    grads = keep_result(keep_grads, kept, grads)
    return TrainResult(params, losses, grads, hidden, opt_state)


def flatten_rows(carry: Any) -> jax.Array:
    """A carry whose leaves lead with ``B`` as one ``(B, N)`` array, leaf after leaf."""
    leaves = jax.tree.leaves(carry)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def unflatten_rows(like: Any, rows: jax.Array) -> Any:
    """The inverse of :func:`flatten_rows`: ``(b, N)`` rows in the structure of ``like``."""
    leaves, tree = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = leaf[0].size
        out.append(rows[:, start : start + size].reshape(rows.shape[0], *leaf.shape[1:]))
        start += size
    return jax.tree.unflatten(tree, out)


def cell_jacobians(cell: Cell, params, hidden: Any, x) -> tuple[Any, jax.Array]:
    """Each example's ``dcell/dp`` and ``dcell/dh``, by reverse mode over its ``N`` outputs.

    ``hidden`` is the carry (any pytree whose leaves lead with ``B``), flattened per
    example into ``N`` numbers (:func:`flatten_rows`). Returns ``(jac_p, jac_h)``:
    ``jac_p`` is shaped like ``params`` with every leaf ``(B, N, *leaf.shape)``,
    and ``jac_h`` is ``(B, N, N)``. As plain Python::

      for b in range(B):
        new = lambda p, h: flat(cell.step(p, h[None], x[b][None]))[0]   # (N,)
        jac_p[b], jac_h[b] = d new / d p, d new / d h   at (params, flat(hidden)[b])

    This is the whole Jacobian of ``cell`` only if row ``b`` of the new hidden
    state depends on row ``b`` of ``hidden`` and ``x`` alone, as in every
    recurrent cell without batch statistics; the cross-example blocks are taken
    to be zero. ``H`` VJPs of one example each cost ``B`` times less than
    ``B*H`` VJPs of the whole batch.
    """

    def one_example(params, h, x):
        carry = unflatten_rows(hidden, h[None])
        new = cell.step(params, carry, jax.tree.map(lambda a: a[None], x))
        return flatten_rows(new)[0]

    jacobians = jax.vmap(jax.jacrev(one_example, argnums=(0, 1)), in_axes=(None, 0, 0))
    return jacobians(params, flatten_rows(hidden), x)


class _Forward:
    """Real-time recurrent learning: the state is ``S_{t-1} = dh_{t-1}/dp``.

    ``S`` is shaped like the parameters, every leaf ``(B, N, *leaf.shape)`` for a
    carry of ``N`` numbers per example: ``B*N*P`` numbers. One block per leaf
    (rather than one ``(B, N, P)`` array) saves concatenating the Jacobian's
    blocks every step, which XLA's CPU backend does slowly.
    """

    def __init__(self, cell: Cell):
        self.cell = cell

    def init(self, params, hidden0: Any, steps: int):
        shape = flatten_rows(hidden0).shape
        return jax.tree.map(lambda a: jnp.zeros((*shape, *a.shape), a.dtype), params)

    def step(self, sens, params, hidden, x, t, adjoint, grad_now):
        """``S_t = dcell/dh S_{t-1} + dcell/dp`` and ``g_t = dL_t/dp_t + a_t^T S_t``."""
        del t
        jac_p, jac_h = cell_jacobians(self.cell, params, hidden, x)
        adjoint = flatten_rows(adjoint)

        def update(s, direct):  # (B, H, ...) blocks; one batched (H, H) x (H, n) product
            return jnp.einsum("bkj,bj...->bk...", jac_h, s) + direct

        sens = jax.tree.map(update, sens, jac_p)
        grads = jax.tree.map(
            lambda g, s: g + jnp.einsum("bh,bh...->...", adjoint, s), grad_now, sens
        )
        return grads, sens


class _Reverse:
    """Re-differentiates the stored history: the state is every ``(p_s, h_{s-1})``."""

    def __init__(self, cell: Cell, inputs: jax.Array, loop: str | Loop):
        self.cell = cell
        self.inputs = inputs
        self.loop = loop

    def init(self, params, hidden0: Any, steps: int):
        def history(a):
            # Replicated zeros (train() marks them per-device under mesh=), except for a
            # value an Explicit mesh splits: zeros broadcast from its own type keep the
            # split, which the loop's carry must match.
            if all(axis is None for axis in jax.typeof(a).sharding.spec):
                return jnp.zeros((steps, *a.shape), a.dtype)
            return jnp.broadcast_to(jnp.zeros_like(a), (steps, *a.shape))

        return jax.tree.map(history, params), jax.tree.map(history, hidden0)

    def step(self, history, params, hidden, x, t, adjoint, grad_now):
        """Stores step ``t``, then runs the adjoint recursion over steps ``t, ..., 0``.

        The loop runs over all ``T`` slots (its length must be static), from the last
        to the first; a ``lax.cond`` skips the slots after ``t``, which hold no step
        yet, so only ``t + 1`` cell VJPs run and nothing is evaluated on empty slots.
        """
        del x
        params_hist, hidden_hist = history
        params_hist = jax.tree.map(lambda buf, p: buf.at[t].set(p), params_hist, params)
        # h_{t-1}, the input of step t
        hidden_hist = jax.tree.map(lambda buf, h: buf.at[t].set(h), hidden_hist, hidden)
        steps = self.inputs.shape[0]

        def backward_step(acc, past):
            p_s, h_prev, x_s, s = past

            def through_step(acc):
                adjoint, grads = acc
                _, pullback = jax.vjp(lambda p, h: self.cell.step(p, h, x_s), p_s, h_prev)
                grad_p, grad_h = pullback(adjoint)
                return grad_h, jax.tree.map(jnp.add, grads, grad_p)

            # Steps after t are not in L_t's graph yet.
            return lax.cond(s <= t, through_step, lambda acc: acc, acc), None

        past = (params_hist, hidden_hist, self.inputs, jnp.arange(steps))
        (_, grads), _ = run_loop(
            backward_step, (adjoint, grad_now), past, length=steps, loop=self.loop, reverse=True
        )
        return grads, (params_hist, hidden_hist)
