"""Any cell over a whole sequence: the forward pass every scenario shares, and its loss.

:func:`bind` checks a model's arguments (the article's :class:`RNNParams`, a
:class:`CellParams` of PyTorch's modules, or a user's :class:`Cell` with any
params) and :func:`rnn_forward` runs it with any loop kind.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from loopgrad_jax import _cells, _checks
from loopgrad_jax._as_written import Dims
from loopgrad_jax._cell import (
    REDUCTIONS,
    Cell,
    LossFn,
    cell_step_loss,
    check_cell,
    reduce_losses,
    step_loss,
)
from loopgrad_jax._cells import TORCH_CELL, CellParams, cudnn
from loopgrad_jax._loops import Loop, check_loop, compiled, run_loop
from loopgrad_jax._parallel import Shards, batch_spec, check_mesh
from loopgrad_jax._rnn import ARTICLE_CELL, RNNParams, check_article_args

PyTree = Any


class Bound(NamedTuple):
    """A model's checked arguments: what every entry point runs."""

    cell: Cell  # static
    kind: str | None  # one of CELLS, or None for a user's cell; static
    params: PyTree
    inputs: jax.Array
    targets: jax.Array
    hidden0: PyTree  # in the API's layout (PyTorch's for CellParams)
    dims: Dims
    prediction: jax.ShapeDtypeStruct  # the readout's (B, O) output at one step


def bind(
    params: PyTree,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    hidden0: PyTree | None,
    cell: Cell | None,
    loss_fn: LossFn | None = None,
) -> Bound:
    """Validates a model's arguments against each other; fills in a zero ``hidden0``.

    Without ``loss_fn`` the targets must be float ``(T, B, O)``, like the readout's
    outputs; with it, any array ``(T, B, ...)`` that ``loss_fn`` takes (:func:`check_loss_fn`).
    """
    if loss_fn is None:
        return _bind_model(params, inputs, targets, hidden0, cell)
    bound = _bind_model(params, inputs, None, hidden0, cell)
    targets = check_loss_fn(loss_fn, targets, bound.dims.length, bound.dims.batch, bound.prediction)
    return bound._replace(targets=targets)


def _bind_model(params, inputs, targets, hidden0, cell) -> Bound:
    if cell is not None:
        return _bind_custom(check_cell(cell), params, inputs, targets, hidden0)
    if isinstance(params, RNNParams):
        params, inputs, targets, hidden0, sizes = check_article_args(
            params, inputs, targets, hidden0
        )
        out = jax.ShapeDtypeStruct((sizes.batch, sizes.output), inputs.dtype)
        return Bound(ARTICLE_CELL, "article", params, inputs, targets, hidden0, Dims.of(sizes), out)
    if isinstance(params, CellParams):
        return _bind_torch(params, inputs, targets, hidden0)
    raise TypeError(
        "params must be an RNNParams (the article's model, lg.init_rnn) or a CellParams "
        "(lg.init_cell, lg.from_torch); for your own cell pass cell=lg.Cell(step, readout), "
        f"got {type(params).__name__} and cell=None."
    )


def _sequence_args(inputs, targets, o: int | None) -> tuple[jax.Array, jax.Array | None]:
    inputs = _checks.float_array("inputs", inputs)
    if inputs.ndim != 3 or inputs.shape[0] < 1:
        raise ValueError(
            f"inputs must have shape (T, B, I) with T >= 1 (time-major), got shape "
            f"{tuple(inputs.shape)}."
        )
    if targets is not None:
        targets = _checks.float_array("targets", targets)
        t, b = inputs.shape[:2]
        _checks.shape("targets", targets, (t, b, o), f"(T, B, O) with T={t}, B={b} from inputs")
    return inputs, targets


def _named_targets(targets: jax.Array | None) -> list[tuple[str, jax.Array]]:
    """``targets`` for :func:`_checks.same_dtype`: none when a ``loss_fn`` takes them."""
    return [] if targets is None else [("targets", targets)]


def _bind_torch(params: CellParams, inputs, targets, hidden0) -> Bound:
    params, sizes = _cells.check_params(params)
    if params.head_weight is None:
        raise ValueError(
            "params has no head (head_weight is None), and the loss compares the head's output "
            "with targets: pass the head to lg.from_torch(rnn, head), or run the module with "
            "lg.rnn and apply your own head and loss to its outputs."
        )
    inputs, targets = _sequence_args(inputs, targets, sizes["output"])
    _checks.shape(
        "inputs", inputs, (None, None, sizes["input"]), f"(T, B, I) with I={sizes['input']}"
    )
    t, b = inputs.shape[:2]
    kind = params.kind
    states = sizes["layers"] * sizes["directions"]
    hidden0 = _cells.check_hidden0(
        kind, hidden0, states, b, sizes["hidden"], inputs.dtype, inputs, state=sizes["state"]
    )
    _checks.same_dtype(
        [
            *((f"params{jax.tree_util.keystr(p)}", v) for p, v in _leaves(params)),
            ("inputs", inputs),
            *_named_targets(targets),
            *((f"hidden0{jax.tree_util.keystr(p)}", v) for p, v in _leaves(hidden0)),
        ]
    )
    dims = Dims.of_cell(
        kind, t, b, sizes["input"], sizes["hidden"], sizes["output"], sizes["layers"]
    )
    out = jax.ShapeDtypeStruct((b, sizes["output"]), inputs.dtype)
    return Bound(TORCH_CELL, kind, params, inputs, targets, hidden0, dims, out)


def _bind_custom(cell: Cell, params, inputs, targets, hidden0) -> Bound:
    leaves = _leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one array for a custom cell, got none.")
    checked = [_checks.float_array(f"params{jax.tree_util.keystr(p)}", v) for p, v in leaves]
    params = jax.tree.unflatten(jax.tree.structure(params), checked)
    inputs, targets = _sequence_args(inputs, targets, None)
    t, b = inputs.shape[:2]
    if hidden0 is None:
        raise ValueError(
            "hidden0 is required with a custom cell: its carry's structure and shapes are "
            "the cell's to choose (every leaf leading with the batch axis B)."
        )
    carry_leaves = _leaves(hidden0)
    checked = [_checks.float_array(f"hidden0{jax.tree_util.keystr(p)}", v) for p, v in carry_leaves]
    hidden0 = jax.tree.unflatten(jax.tree.structure(hidden0), checked)
    for path, leaf in _leaves(hidden0):
        if leaf.ndim < 1 or leaf.shape[0] != b:
            raise ValueError(
                f"hidden0{jax.tree_util.keystr(path)} must lead with the batch axis B={b} "
                f"(from inputs), got shape {tuple(leaf.shape)}."
            )
    try:
        new = jax.eval_shape(cell.step, params, hidden0, inputs[0])
        out = jax.eval_shape(cell.readout, params, hidden0)
    except Exception as err:  # noqa: BLE001 - the user's function; say where it failed
        raise ValueError(
            f"calling the cell on one step failed: {type(err).__name__}: {err}"
        ) from err
    want = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), hidden0)
    if jax.tree.structure(new) != jax.tree.structure(want) or any(
        (n.shape, n.dtype) != (w.shape, w.dtype)
        for n, w in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True)
    ):
        raise ValueError(
            f"cell.step must return a carry shaped like hidden0, {_spec(want)}, got {_spec(new)}."
        )
    if targets is None:
        if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[0] != b:
            raise ValueError(
                f"cell.readout must return (B, O) with B={b} (from inputs), got {_spec(out)}."
            )
    elif not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (b, targets.shape[2]):
        raise ValueError(
            f"cell.readout must return (B, O) = {(b, targets.shape[2])} (B from inputs, O from "
            f"targets), got {_spec(out)}."
        )
    _checks.same_dtype(
        [
            *((f"params{jax.tree_util.keystr(p)}", v) for p, v in _leaves(params)),
            ("inputs", inputs),
            *_named_targets(targets),
            *((f"hidden0{jax.tree_util.keystr(p)}", v) for p, v in _leaves(hidden0)),
        ]
    )
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    carry = sum(leaf.size for leaf in jax.tree.leaves(hidden0)) // b
    dims = Dims(t, b, inputs.shape[2], carry, size, size, 0)
    return Bound(cell, None, params, inputs, targets, hidden0, dims, out)


def check_loss_fn(
    loss_fn: object, targets: object, t: int, b: int, prediction: jax.ShapeDtypeStruct
) -> jax.Array:
    """``targets`` as an array ``(T, B, ...)``; refuses a ``loss_fn`` that does not map
    one step's ``(prediction_t, targets[t])`` to a floating-point scalar (``prediction``:
    the readout's ``(B, O)`` output at one step)."""
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be a function loss_fn(prediction_t, target_t) -> scalar, got "
            f"{type(loss_fn).__name__} {loss_fn!r}."
        )
    if targets is None:
        raise TypeError("targets must be an array (T, B, ...) that loss_fn takes, got None.")
    targets = targets if isinstance(targets, jax.Array) else jnp.asarray(targets)
    if targets.ndim < 2 or targets.shape[:2] != (t, b):
        raise ValueError(
            f"targets must have shape (T, B, ...) with T={t}, B={b} from inputs, got shape "
            f"{tuple(targets.shape)}."
        )
    target = jax.ShapeDtypeStruct(targets.shape[1:], targets.dtype)
    given = f"prediction_t {_spec(prediction)} and target_t {_spec(target)}"
    try:
        out = jax.eval_shape(loss_fn, prediction, target)
    except Exception as err:  # noqa: BLE001 - the user's function; say where it failed
        raise ValueError(
            f"calling loss_fn on one step ({given}) failed: {type(err).__name__}: {err}"
        ) from err
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise ValueError(
            f"loss_fn must return a floating-point scalar (one step's loss), got {_spec(out)} "
            f"for {given}."
        )
    return targets


def step_weights(lengths: jax.Array, length: int, dtype: jnp.dtype) -> jax.Array:
    """``(T, B)`` weights of every step's examples: which steps are real.

    Plain-Python semantics::

      w[t][b] = nan if not 1 <= lengths[b] <= T else (1 if t < lengths[b] else 0)

    NaN marks a length that was traced, so could not be refused: every step's loss is
    multiplied by its weights, so the loss and every derivative of it are NaN.
    """
    bad = (lengths < 1) | (lengths > length)
    real = jnp.arange(length, dtype=lengths.dtype)[:, None] < lengths[None, :]
    # A where, not a product: XLA rewrites (0/1 from a bool) * nan as a select, giving 0.
    return jnp.where(bad[None, :], jnp.nan, real.astype(dtype)).astype(dtype)


def _leaves(tree: PyTree) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _spec(tree: PyTree) -> str:
    return str(jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", tree))


def to_carry(kind: str | None, hidden: PyTree) -> PyTree:
    """The API's hidden state as the loop's carry (PyTorch's layer axis split off)."""
    return _cells.to_carry(kind, hidden) if kind in _cells.TORCH_CELLS else hidden


def to_public(kind: str | None, carry: PyTree) -> PyTree:
    """The inverse of :func:`to_carry`."""
    return _cells.to_public(kind, carry) if kind in _cells.TORCH_CELLS else carry


def sequence_specs(kind: str | None, hidden0: PyTree, axis: str | None) -> tuple:
    """``shard_map`` specs of ``(inputs, targets, hidden0)``: each split over its batch axis.

    Sequences are ``(T, B, ...)``; the hidden state is PyTorch's ``(num_layers, B, H)``
    for its modules and leads with ``B`` otherwise.
    """
    hidden_dim = 1 if kind in _cells.TORCH_CELLS else 0
    return P(None, axis), P(None, axis), batch_spec(hidden0, hidden_dim, axis)


def rnn_forward(
    cell: Cell,
    params: PyTree,
    inputs: jax.Array,
    targets: Any,
    carry0: PyTree,
    *,
    loop: str | Loop,
    hoist_input: bool = False,
    loss_fn: LossFn | None = None,
    weights: jax.Array | None = None,
) -> tuple[PyTree, jax.Array]:
    """Runs ``cell`` over the sequence: ``(final_carry, losses (T,))``.

    Plain-Python semantics (:func:`loopgrad_jax._cell.step_loss`; by default
    ``mean((prediction - target) ** 2)``, every example weighted 1)::

      carry, losses = carry0, []
      for t in range(T):
        carry = cell.step(params, carry, inputs[t])
        prediction = cell.readout(params, carry)
        losses.append(step_loss(loss_fn, prediction, targets[t], weights[t]))
      return carry, stack(losses)

    With the loops of :func:`_readout_after` the loop runs the steps only and the
    readout and loss run on every step's carry at once after it (the same numbers,
    up to the order of floating-point sums).

    With ``hoist_input`` the cell's input-side work runs as one product before the
    loop (``cell.project``) and only ``cell.step_projected`` stays inside; the
    result is the same up to the order of floating-point sums. PyTorch's modules
    (:data:`TORCH_CELL`) then run as fused RNN kernels do: layer after layer over
    the whole sequence (:func:`loopgrad_jax._cells.hoisted_forward`), each layer's
    input projection before its loop, its recurrent weights' gradient as one
    product after it, and the head on every step at once.
    """
    if cell is ARTICLE_CELL and hoist_input and weights is None:
        # The article's model is an nn.RNN (tanh) layer with one bias and its own head:
        # layer by layer, as PyTorch's modules run hoisted, with the layer rule. (With
        # lengths, PyTorch's modules would stop each example's state at its last step;
        # the article's model keeps stepping, as its own loop below does.)
        cell, params, carry0 = TORCH_CELL, _cells.article_layer_form(params), (carry0,)
        final, losses = rnn_forward(
            cell,
            params,
            inputs,
            targets,
            carry0,
            loop=loop,
            hoist_input=True,
            loss_fn=loss_fn,
            weights=weights,
        )
        return final[0], losses
    loop = check_loop(loop)
    fused = loop.kind == cudnn.KIND
    if cell is TORCH_CELL and (hoist_input or fused or _whole_module(params, weights)):
        live = None if weights is None else weights != 0  # NaN: poisoned below anyway
        if fused:  # the whole module in one kernel call (rnn_loss checked it can)
            final, hs = cudnn.module_forward(params, inputs, carry0, live=live)
        elif _whole_module(params, weights):
            final, hs = _cells.module_forward(params, inputs, carry0, loop, live=live)
        else:
            final, hs = _cells.hoisted_forward(params, inputs, carry0, loop)
        head = _cells.rows_product(hs, params.head_weight, params.precision)
        out = head + params.head_bias[None, None, :]
        return final, every_step_loss(loss_fn, out, targets, weights)
    # Where reverse mode stores every step (the loops that take the readout after),
    # an nn.RNN layer runs as one product over [x, h] per step; the article's model is
    # such a layer with one bias and its own head. Under remat and checkpoints they keep
    # their two products: there, at the article's size, the joined one took twice as long.
    join = _readout_after(loop) and not hoist_input
    if cell is ARTICLE_CELL and join:
        final, losses = _run(
            TORCH_CELL,
            _cells.article_loop_form(params),
            inputs,
            targets,
            (carry0,),
            loop,
            False,
            loss_fn,
            weights,
        )
        return final[0], losses
    if cell is TORCH_CELL:
        params = _cells.loop_form(params, join=join)
    return _run(cell, params, inputs, targets, carry0, loop, hoist_input, loss_fn, weights)


def _whole_module(params: CellParams, weights: jax.Array | None) -> bool:
    """Whether PyTorch's module runs as a whole, layer by layer (:func:`_cells.module_forward`):
    both directions, a packed batch (``weights``: the step weights of ``lengths``, so the
    final states are those after each example's last real step, as PyTorch's), or an
    LSTM's projection. Otherwise every layer runs within each step."""
    return params.bidirectional or weights is not None or params.layers[0].weight_hr is not None


def _run(cell, params, inputs, targets, carry0, loop: Loop, hoist_input: bool, loss_fn, weights):
    step, xs = cell.step, inputs
    if hoist_input:
        step, xs = cell.step_projected, cell.project(params, inputs)
    if _readout_after(loop):

        def step_only(carry, x):
            carry = step(params, carry, x)
            return carry, _readout_input(cell, carry)

        final, kept = run_loop(step_only, carry0, xs, length=inputs.shape[0], loop=loop)
        out = _readout_every_step(cell, params, kept)
        return final, every_step_loss(loss_fn, out, targets, weights)

    def body(carry, xyw):
        x, y, w = xyw
        carry = step(params, carry, x)
        return carry, cell_step_loss(cell, params, carry, y, loss_fn, w)

    return run_loop(body, carry0, (xs, targets, weights), length=inputs.shape[0], loop=loop)


def every_step_loss(
    loss_fn: LossFn | None, out: jax.Array, targets: Any, weights: jax.Array | None
) -> jax.Array:
    """:func:`step_loss` of every step at once: ``(T,)`` from the readouts ``(T, B, O)``."""
    return jax.vmap(lambda o, y, w: step_loss(loss_fn, o, y, w))(out, targets, weights)


def _readout_after(loop: Loop) -> bool:
    """Whether :func:`rnn_forward` applies the readout and the loss after ``loop``.

    After the loop, on every step at once, wherever reverse mode stores every step
    anyway: then the loop keeps only the cell (what it stores of it holds the
    readout's input already). Inside the loop, the readout and the loss were a third
    of the article's body's operations, and at its size each operation's fixed cost
    is most of a step's time. The remat kinds and ``while`` with checkpoints keep them
    inside, so as not to store every step's readout input where they store fewer
    carries; so does ``while`` without ``max_steps`` (forward mode stores nothing).
    ``while:max_steps=N`` runs here as a scan (the length is the inputs' static one).
    """
    if loop.kind == "while":
        return loop.max_steps is not None and loop.checkpoints is None
    return loop.kind in ("python", "scan", "fori", "nnx_scan", "nnx_fori")


def _readout_input(cell: Cell, carry: PyTree) -> PyTree:
    """What the readout reads of a step's carry: the last layer's ``h`` for PyTorch's modules."""
    if cell is TORCH_CELL:
        last = carry[-1]
        return last[0] if isinstance(last, tuple) else last
    return carry


def _readout_every_step(cell: Cell, params: PyTree, kept: PyTree) -> jax.Array:
    """The readout of every step at once, ``(T, B, O)``, from the stacked ``kept``."""
    policy = None
    if cell is TORCH_CELL:
        weight, bias, policy = params.head_weight, params.head_bias, params.precision
    elif cell is ARTICLE_CELL:
        weight, bias = params.h2o_weight, params.h2o_bias
    else:
        return jax.vmap(cell.readout, in_axes=(None, 0))(params, kept)
    return _cells.rows_product(kept, weight, policy) + bias[None, None, :]


def check_hoist(hoist_input: object, cell: Cell) -> bool:
    """Refuses a non-bool ``hoist_input``, or ``True`` for a cell with nothing to hoist."""
    if not isinstance(hoist_input, bool):
        raise TypeError(f"hoist_input must be a bool, got {type(hoist_input).__name__}.")
    if hoist_input and cell.project is None:
        raise ValueError(
            "hoist_input=True needs the cell's input projection, but this cell has none: "
            "give Cell(step, readout, project=..., step_projected=...)."
        )
    return hoist_input


def rnn_loss(
    params: PyTree,
    inputs: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    hidden0: PyTree | None = None,
    loop: str | Loop = "scan",
    hoist_input: bool = False,
    cell: Cell | None = None,
    mesh: Mesh | None = None,
    reduction: str = "sum",
    loss_fn: LossFn | None = None,
    lengths: jax.typing.ArrayLike | None = None,
    precision: object = None,
) -> jax.Array:
    """The per-step losses over a whole sequence, summed or averaged, for any cell.

    Plain-Python semantics::

      hidden, total = hidden0, 0
      for t in range(T):
        hidden = cell(params, hidden, inputs[t])         # every layer
        total += loss_fn(head(last layer's hidden), targets[t])
      return total if reduction == "sum" else total / T

    ``loss_fn`` is ``mean((prediction - target) ** 2)`` by default, so
    ``reduction="mean"`` is ``nn.MSELoss()`` over the whole ``(T, B, O)`` output.
    With ``lengths`` step ``t`` of example ``b`` counts only if ``t < lengths[b]``::

      total = sum over t of  sum over b with t < lengths[b] of
              loss_fn(prediction_t[b:b+1], targets[t][b:b+1]) / B
      return total if reduction == "sum" else total * B / sum(lengths)

    (each example alone, as a batch of one; ``"mean"`` is the mean over the real steps).

    ``jax.grad`` of it is full backpropagation through time: what PyTorch's
    single ``loss.backward()`` after the loop computes. It runs as one
    ``jax.jit``-compiled function per shapes and options, so repeated calls,
    eager ones included, compile once (``loop="python"`` runs as a Python loop).

    Args:
      params: the article's :class:`RNNParams` (:func:`init_rnn`), a
        :class:`CellParams` (:func:`init_cell`, :func:`from_torch`), or, with
        ``cell``, any pytree of float arrays.
      inputs: ``(T, B, I)``, time-major.
      targets: ``(T, B, O)``.
      hidden0: the initial state; zeros when ``None``. ``(B, H)`` for
        :class:`RNNParams`; PyTorch's ``(num_layers, B, H)`` for a
        :class:`CellParams`, and for an LSTM the pair ``(h0, c0)`` of two; with
        ``cell``, required, the cell's carry.
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its text
        form; or ``"cudnn"`` for an LSTM's :class:`CellParams` on a CUDA GPU (the module
        in cuDNN's fused kernel, then the head and the loss on every step; float32, no
        ``proj_size``, ``precision`` or ``mesh``: see :func:`loopgrad_jax.rnn`).
      hoist_input: compute the input projection of all steps as one matrix
        product before the loop; only the recurrent product stays inside. For a
        :class:`CellParams` the layers then run one after another over the whole
        sequence, as fused RNN kernels do, and the gradient of each layer's
        recurrent weights is one product per gate block after its loop (same
        values; it keeps less for backward but needs more scratch memory: for an
        LSTM at I=64, H=256, B=32, T=1000 the compiled gradient's temp bytes were
        1.8x the per-step body's, 500 against 282 MiB, ``memory_analysis()`` on
        CPU with jax 0.10.2, ``bench/results/cpu_lstm.json``).
      cell: your own :class:`Cell`; ``None`` for the built-in kinds, read off ``params``.
      mesh: a ``jax.sharding.Mesh`` to split the batch over, data-parallel: its axis
        named ``"batch"``, or its only axis, of ``n`` devices; ``B`` must be a
        multiple of ``n``. Each device runs ``B/n`` examples; the loss is still the
        mean over the whole batch, and its gradient is summed over the devices once,
        after the loop (as PyTorch's ``DistributedDataParallel`` averages). Equal to
        the single-device result up to the order of floating-point sums. Your own
        ``cell`` must treat the examples independently (no batch statistics).
      reduction: one of :data:`REDUCTIONS`: ``"sum"`` of the step losses, or their
        ``"mean"`` over the steps.
      loss_fn: ``loss_fn(prediction_t, target_t) -> scalar``, one step's loss of the
        readout's ``(B, O)`` output and ``targets[t]``; it replaces the squared error,
        and ``targets`` may then be any array ``(T, B, ...)`` it takes, e.g. integer
        classes ``(T, B)`` with
        ``lambda p, y: optax.softmax_cross_entropy_with_integer_labels(p, y).mean()``
        (``nn.CrossEntropyLoss()``). A static option: pass the same function to reuse
        the compiled one. It must be a mean over the batch for ``lengths`` to drop
        padded examples as PyTorch's masked losses do.
      lengths: ``(B,)`` integers in ``1..T``, each example's number of real steps;
        the padded steps after them do not count (their targets must still give a
        finite loss). A traced length outside ``1..T`` cannot be refused: it makes
        the loss and its derivatives NaN.
      precision: ``None`` (every operation in the parameters' dtype), ``"bf16"`` or a
        :class:`loopgrad_jax.Precision`, for a :class:`CellParams`: float32
        parameters, inputs and targets; every matrix product (the layers' and the
        head's) with bfloat16 operands accumulated in float32; the state, the loss
        and the gradients float32 (:func:`loopgrad_jax.rnn` has the details).

    Returns:
      A scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> p = lg.init_rnn(jax.random.key(0), input_size=3, hidden_size=4)
      >>> x, y = jnp.ones((6, 2, 3), jnp.float32), jnp.zeros((6, 2, 1), jnp.float32)
      >>> grads = jax.grad(lg.rnn_loss)(p, x, y, loop="fori")
      >>> grads.i2h_weight.shape
      (4, 7)
      >>> lstm = lg.init_cell(jax.random.key(1), "lstm", input_size=3, hidden_size=4)
      >>> jax.grad(lg.rnn_loss)(lstm, x, y).layers[0].weight_hh.shape
      (16, 4)
    """
    policy = _cells.bind_precision(precision, params)
    bound = bind(params, inputs, targets, hidden0, cell, loss_fn)
    hoist_input = check_hoist(hoist_input, bound.cell)
    loop = check_loop(loop)
    params = _cells.set_precision(bound.params, policy)
    if loop.kind == cudnn.KIND:
        cudnn.check(
            params,
            bound.inputs,
            needed_by="lg.rnn_loss",
            mesh=mesh,
            custom_cell=cell is not None,
        )
    reduction = _checks.one_of("reduction", reduction, REDUCTIONS)
    lengths = _checks.check_lengths(lengths, bound.dims.length, bound.dims.batch)
    shards = check_mesh(mesh, bound.dims.batch)
    return _rnn_loss(
        params,
        bound.inputs,
        bound.targets,
        bound.hidden0,
        lengths,
        cell=bound.cell,
        kind=bound.kind,
        loop=loop,
        hoist_input=hoist_input,
        shards=shards,
        reduction=reduction,
        loss_fn=loss_fn,
    )


@compiled("cell", "kind", "loop", "hoist_input", "shards", "reduction", "loss_fn")
def _rnn_loss(
    params,
    inputs,
    targets,
    hidden0,
    lengths,
    *,
    cell,
    kind,
    loop,
    hoist_input,
    shards: Shards,
    reduction,
    loss_fn,
) -> jax.Array:
    """:func:`rnn_loss` after its checks: one compiled function per shapes and options."""
    weights = None if lengths is None else step_weights(lengths, inputs.shape[0], inputs.dtype)

    def local(params, inputs, ys, hidden0):
        targets, weights = ys
        _, losses = rnn_forward(
            cell,
            shards.vary(params),
            inputs,
            targets,
            to_carry(kind, hidden0),
            loop=loop,
            hoist_input=hoist_input,
            loss_fn=loss_fn,
            weights=weights,
        )
        return shards.mean(reduce_losses(losses, reduction, weights, shards).sum())

    specs = (P(), *sequence_specs(kind, hidden0, shards.axis))
    return shards.run(local, (params, inputs, (targets, weights), hidden0), specs, P())
