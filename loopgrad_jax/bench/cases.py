"""The benchmark's cases: each scenario, once, as a JAX function of its inputs.

A case is a scenario run by one loop kind at one set of sizes. :data:`SCENARIOS`
is the one place that maps a scenario's name to the function it times; every
loop kind of :data:`loopgrad_jax.LOOPS` runs the same function, only ``loop=``
changes. What each times, as plain Python (``T`` static)::

  accumulate(x):     return value_and_grad(lambda x: lg.accumulate_loss(x, T, loop=loop))(x)
  stack(x):          return value_and_grad(lambda x: lg.stack_loss(x, T, loop=loop))(x)
  rnn_loss(p, xs, ys):
    loss, grads = value_and_grad(lg.rnn_loss)(p, xs, ys, loop=loop)   # full BPTT
    return (loss, *leaves(grads))
  train_as_written(p, xs, ys):   # once per method: "forward" and "reverse"
    r = lg.train_rnn(p, xs, ys, lr=LR, mode="as_written", as_written_method=method, loop=loop)
    return (r.losses, *leaves(r.params))
  train_tbptt(p, xs, ys):
    r = lg.train_rnn(p, xs, ys, lr=LR, mode="tbptt", window=W, loop=loop)  # T/W updates
    return (r.losses, *leaves(r.params))
  rnn_module(p, xs, lengths):    # PyTorch's module forward, packed when lengths is given
    def loss(p):
      outputs, _ = lg.rnn(p, xs, lengths=lengths, loop=loop)  # no head: p has none
      return sum(outputs ** 2)
    loss, grads = value_and_grad(loss)(p)
    return (loss, *leaves(grads))

``rnn_module`` is the one scenario ``--bidirectional`` and ``--lengths-spread S`` apply
to (``lengths`` then drawn uniformly from ``ceil((1-S)*T)..T``, at least 1, by its own
NumPy stream of ``--seed``, in no order); it is left out of the default scenarios.

``p`` is the article's :class:`loopgrad_jax.RNNParams`, or with ``--cell`` a
:class:`loopgrad_jax.CellParams` of that kind and ``--layers`` layers; ``leaves`` is
``jax.tree.leaves``, PyTorch's parameter order (per layer ``weight_ih``, ``weight_hh``,
``bias_ih``, ``bias_hh``; then the head's ``weight``, ``bias``). The outputs are what
the PyTorch peers return too, so the two can be compared.

:func:`saved_bytes` is what each case keeps for its backward pass, the JAX side
of the PyTorch peers' ``saved_bytes``: the residuals ``jax.vjp`` keeps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import loopgrad_jax as lg
from loopgrad_jax._cells import GATES
from loopgrad_jax._parallel import check_mesh

#: The learning rate of both training scenarios (PyTorch's ``optim.SGD(lr=LR)``).
LR = 0.01


class Sizes(NamedTuple):
    """The sizes of one case."""

    length: int  # T: loop iterations (time steps)
    batch: int  # B
    input: int  # I
    hidden: int  # H
    window: int  # steps per update in train_tbptt
    output: int = 1  # O: the article's regression head
    cell: str = "article"  # the RNN scenarios' cell, one of lg.CELLS
    layers: int = 1  # its layers (1 for the article's)
    precision: str | None = None  # RNN scenarios: lg.rnn_loss's precision= (None: float32)
    bidirectional: bool = False  # rnn_module: the module's bidirectional=
    spread: float | None = None  # rnn_module: --lengths-spread (None: no lengths, no packing)


class Limits(NamedTuple):
    """Lengths above which a case is skipped."""

    max_unroll: int  # python-loop cases
    max_quadratic: int  # PyTorch's as-written loop


class Data(NamedTuple):
    """The inputs every case of one size reads, as NumPy arrays (float32).

    The same arrays feed JAX and the PyTorch peers, so both compute on the same
    numbers.
    """

    x: np.ndarray  # (B, I): the variable of the scalar scenarios
    params: lg.RNNParams | lg.CellParams  # initial weights, PyTorch's layout
    inputs: np.ndarray  # (T, B, I)
    targets: np.ndarray  # (T, B, O)
    lengths: np.ndarray | None = None  # (B,) int64: rnn_module with --lengths-spread


class Scenario(NamedTuple):
    """How to build and feed one scenario."""

    build: Callable[[str, Sizes, str | None], Callable[..., tuple]]  # (loop, sizes, method)
    args: Callable[[Data], tuple]  # which parts of Data ``f`` takes
    rnn: bool  # whether FLOPs (and GFLOP/s) apply
    reverse: bool  # whether it differentiates through the loop in reverse mode
    doc: str
    saved: Callable[[str, Sizes, Data, str | None], int | None]  # see saved_bytes
    methods: tuple[str | None, ...] = (None,)  # the as-written loop's exact methods


def make_data(sizes: Sizes, seed: int) -> Data:
    """Draws the inputs with NumPy (no JAX compilation before the timed ones).

    Weights follow PyTorch's init: the article's ``nn.Linear`` layers are uniform on
    ``+-1/sqrt(fan_in)`` (as :func:`loopgrad_jax.init_rnn`), the weights of
    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and their head on ``+-1/sqrt(H)`` (as
    :func:`loopgrad_jax.init_cell`); ``x``, inputs and targets are standard normal.
    """
    rng = np.random.default_rng(seed)
    t, b, i, h, o = sizes.length, sizes.batch, sizes.input, sizes.hidden, sizes.output

    def uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    def normal(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    if sizes.cell == "article":
        params = lg.RNNParams(
            i2h_weight=uniform((h, i + h), i + h),
            i2h_bias=uniform((h,), i + h),
            h2o_weight=uniform((o, h), h),
            h2o_bias=uniform((o,), h),
        )
    else:
        g, d = gates(sizes.cell) * h, 2 if sizes.bidirectional else 1
        layers = tuple(
            lg.LayerParams(
                uniform((g, i if k == 0 else d * h), h),
                uniform((g, h), h),
                uniform((g,), h),
                uniform((g,), h),
            )
            for k in range(sizes.layers)
            for _ in range(d)  # PyTorch's order: layer k's forward, then its reverse
        )
        head = uniform((o, d * h), h), uniform((o,), h)
        params = lg.CellParams(layers, *head, sizes.cell, bidirectional=sizes.bidirectional)
    return Data(
        x=normal((b, i)),
        params=params,
        inputs=normal((t, b, i)),
        targets=normal((t, b, o)),
        lengths=None if sizes.spread is None else draw_lengths(t, b, sizes.spread, seed),
    )


def draw_lengths(length: int, batch: int, spread: float, seed: int) -> np.ndarray:
    """``batch`` lengths uniform in ``ceil((1 - spread) * length)..length`` (at least 1),
    from their own stream of ``seed`` (so the other arrays stay as without them).

    Examples:
      >>> draw_lengths(10, 4, 0.5, 0).tolist(), draw_lengths(10, 2, 0.0, 0).tolist()
      ([8, 10, 10, 8], [10, 10])
    """
    shortest = max(1, math.ceil((1 - spread) * length - 1e-9))
    return np.random.default_rng([seed, 1]).integers(shortest, length + 1, batch)


def gates(cell: str) -> int:
    """Rows of ``weight_ih`` per hidden unit: 4 for an LSTM, 3 for a GRU, else 1."""
    return GATES.get(cell, 1)


def _scalar(loss_fn: Callable[..., jax.Array]) -> Callable[[str, Sizes, None], Callable]:
    """Builds ``x -> (loss, dloss/dx)`` for a scalar scenario."""

    def build(loop: str, sizes: Sizes, method: None = None) -> Callable:
        del method

        def f(x):
            return jax.value_and_grad(lambda x: loss_fn(x, sizes.length, loop=loop))(x)

        return f

    return build


def _rnn_loss(hoist_input: bool) -> Callable[..., Callable]:
    """Builds ``(params, inputs, targets) -> (loss, *dloss/dparams)``: full BPTT."""

    def build(loop: str, sizes: Sizes, method: None = None, mesh: Mesh | None = None) -> Callable:
        del method  # the sizes are read off the shapes, but for the precision

        def f(params, inputs, targets):
            loss, grads = jax.value_and_grad(lg.rnn_loss)(
                params,
                inputs,
                targets,
                loop=loop,
                hoist_input=hoist_input,
                mesh=mesh,
                precision=sizes.precision,
            )
            return (loss, *jax.tree.leaves(grads))

        return f

    return build


def _train(mode: str) -> Callable[..., Callable]:
    """Builds ``(params, inputs, targets) -> (losses, *final_params)`` for ``mode``."""

    def build(
        loop: str, sizes: Sizes, method: str | None = None, mesh: Mesh | None = None
    ) -> Callable:
        window = sizes.window if mode == "tbptt" else None
        options = {"as_written_method": method} if mode == "as_written" else {}

        def f(params, inputs, targets):
            result = lg.train_rnn(
                params,
                inputs,
                targets,
                lr=LR,
                mode=mode,
                window=window,
                loop=loop,
                mesh=mesh,
                precision=sizes.precision,
                **options,
            )
            return (result.losses, *jax.tree.leaves(result.params))

        return f

    return build


def _module_loss(params, inputs, lengths, loop: str, precision: str | None) -> jax.Array:
    outputs, _ = lg.rnn(params, inputs, lengths=lengths, loop=loop, precision=precision)
    return jax.numpy.sum(outputs**2)


def _rnn_module(loop: str, sizes: Sizes, method: None = None, mesh: Mesh | None = None):
    """Builds ``(params, inputs, lengths) -> (loss, *dloss/dparams)``, params headless."""
    del method
    if mesh is not None:
        raise ValueError("lg.rnn takes no mesh: rnn_module runs on one device.")

    def f(params, inputs, lengths):
        loss, grads = jax.value_and_grad(_module_loss)(
            params, inputs, lengths, loop, sizes.precision
        )
        return (loss, *jax.tree.leaves(grads))

    return f


def residual_bytes(f: Callable[..., jax.Array], *primals: Any) -> int:
    """Bytes of the residuals ``jax.vjp(f, *primals)`` keeps for its pullback.

    The pullback is a ``jax.tree_util.Partial`` whose leaves are the residuals: every
    array reverse mode will read, including inputs it keeps whole (``remat`` keeps the
    inputs to recompute from), each array once however many uses keep it (``jax.vjp``
    holds it once). Counted by shape under ``jax.eval_shape``: nothing runs.
    """
    pullback = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *primals)
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(pullback))


def _scalar_saved(loss_fn: Callable[..., jax.Array]) -> Callable:
    def saved(loop: str, sizes: Sizes, data: Data, method: None = None) -> int:
        return residual_bytes(lambda x: loss_fn(x, sizes.length, loop=loop), data.x)

    return saved


def _rnn_loss_saved(hoist_input: bool) -> Callable:
    def saved(loop: str, sizes: Sizes, data: Data, method: None = None) -> int:
        def loss(params):
            return lg.rnn_loss(
                params, data.inputs, data.targets, loop=loop, hoist_input=hoist_input
            )

        return residual_bytes(loss, data.params)

    return saved


def _tbptt_saved(loop: str, sizes: Sizes, data: Data, method: None = None) -> int:
    """One window's residuals: TBPTT frees each window's before the next."""
    w = sizes.window

    def loss(params):
        return lg.rnn_loss(params, data.inputs[:w], data.targets[:w], loop=loop)

    return residual_bytes(loss, data.params)


def _as_written_saved(loop: str, sizes: Sizes, data: Data, method: str | None) -> int:
    """The method's own account (``lg.as_written_cost``) of what it keeps between steps.

    No reverse pass runs through the loop: ``forward`` carries ``dh/dp`` (``B*H*P``
    numbers), ``reverse`` the weights and hidden state of every step so far.
    """
    del loop, data
    rnn_sizes = lg.RNNSizes(sizes.length, sizes.batch, sizes.input, sizes.hidden, sizes.output)
    cost = lg.as_written_cost(rnn_sizes, method, 4, kind=sizes.cell, num_layers=sizes.layers)
    return int(cost.memory_bytes)


def _module_saved(loop: str, sizes: Sizes, data: Data, method: None = None) -> int:
    params, inputs, lengths = _module_args(data)
    return residual_bytes(lambda p: _module_loss(p, inputs, lengths, loop, None), params)


def _x(data: Data) -> tuple:
    return (data.x,)


def _rnn(data: Data) -> tuple:
    return (data.params, data.inputs, data.targets)


def _module_args(data: Data) -> tuple:
    """The module's weights without the head (the loss reads the outputs), the inputs
    and the lengths (``None``: the whole sequence, no packing)."""
    params = dataclasses.replace(data.params, head_weight=None, head_bias=None)
    return (params, data.inputs, data.lengths)


#: Scenario name -> how to build and feed it. The names are the CLI's ``--scenarios``.
SCENARIOS: dict[str, Scenario] = {
    "accumulate": Scenario(
        _scalar(lg.accumulate_loss),
        _x,
        rnn=False,
        reverse=True,
        doc="value and gradient of lg.accumulate_loss(x, T), x of shape (B, I)",
        saved=_scalar_saved(lg.accumulate_loss),
    ),
    "stack": Scenario(
        _scalar(lg.stack_loss),
        _x,
        rnn=False,
        reverse=True,
        doc="value and gradient of lg.stack_loss(x, T), x of shape (B, I)",
        saved=_scalar_saved(lg.stack_loss),
    ),
    "rnn_loss": Scenario(
        _rnn_loss(hoist_input=False),
        _rnn,
        rnn=True,
        reverse=True,
        doc="value and full-sequence gradient (BPTT) of lg.rnn_loss",
        saved=_rnn_loss_saved(hoist_input=False),
    ),
    "rnn_loss_hoisted": Scenario(
        _rnn_loss(hoist_input=True),
        _rnn,
        rnn=True,
        reverse=True,
        doc="rnn_loss with hoist_input=True: input projection as one product before the loop",
        saved=_rnn_loss_saved(hoist_input=True),
    ),
    "train_as_written": Scenario(
        _train("as_written"),
        _rnn,
        rnn=True,
        reverse=False,  # neither exact method reverse-differentiates through the loop
        doc="lg.train_rnn(mode='as_written'): T SGD updates, the article's loop; "
        "each exact method (forward, reverse)",
        saved=_as_written_saved,
        methods=lg.AS_WRITTEN_METHODS[1:],  # forward, reverse: "auto" picks one of them
    ),
    "train_tbptt": Scenario(
        _train("tbptt"),
        _rnn,
        rnn=True,
        reverse=True,
        doc="lg.train_rnn(mode='tbptt', window=W): one SGD update per window",
        saved=_tbptt_saved,
    ),
    "rnn_module": Scenario(
        _rnn_module,
        _module_args,
        rnn=True,
        reverse=True,
        doc="value and gradient of sum(lg.rnn(p, xs, lengths=...)[0] ** 2): PyTorch's module "
        "forward (--bidirectional, --lengths-spread: packed), no head; a --cell of PyTorch's",
        saved=_module_saved,
    ),
}

#: ``--scenarios`` when not given: all but ``rnn_module`` (with ``--bidirectional`` or
#: ``--lengths-spread``, ``rnn_module`` alone).
DEFAULT_SCENARIOS: tuple[str, ...] = tuple(s for s in SCENARIOS if s != "rnn_module")


def build_case(
    scenario: str, loop: str, sizes: Sizes, method: str | None = None, mesh: Mesh | None = None
) -> Callable[..., tuple]:
    """A new function object for the case, so no JAX trace or compile cache is reused.

    With ``mesh`` (the RNN scenarios only) the batch splits over its devices
    (``lg.rnn_loss(..., mesh=mesh)``, ``lg.train_rnn(..., mesh=mesh)``).
    """
    if mesh is None:
        return SCENARIOS[scenario].build(loop, sizes, method)
    if not SCENARIOS[scenario].rnn:
        raise ValueError(f"{scenario} has no batch to split over devices.")
    return SCENARIOS[scenario].build(loop, sizes, method, mesh)


def batch_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A mesh of ``devices`` along one axis, ``"batch"``: what a data-parallel row runs on."""
    return jax.make_mesh((len(devices),), ("batch",), devices=list(devices))


def mesh_args(scenario: str, data: Data, mesh: Mesh) -> tuple[Any, ...]:
    """The scenario's arguments laid out as a user of ``mesh`` would: weights on every
    device, the sequences split over the batch."""
    params, inputs, targets = case_args(scenario, data)
    check_mesh(mesh, inputs.shape[1])  # the library's own error, before any placement
    split = NamedSharding(mesh, P(None, "batch"))
    return (
        jax.device_put(params, NamedSharding(mesh, P())),
        jax.device_put(inputs, split),
        jax.device_put(targets, split),
    )


def saved_bytes(
    scenario: str, loop: str, sizes: Sizes, data: Data, method: str | None = None
) -> int | None:
    """What the case keeps for its backward pass, in bytes; ``None`` if it cannot say.

    The gradient scenarios: the residuals of ``jax.vjp`` of the differentiated function
    (:func:`residual_bytes`), ``train_tbptt`` one window's. ``train_as_written``: what
    the method keeps between steps, by ``lg.as_written_cost``.
    """
    try:
        return SCENARIOS[scenario].saved(loop, sizes, data, method)
    except (TypeError, ValueError):  # a loop kind that cannot run the case
        return None


def parallel_iterations(scenario: str, loop: str, data: Data) -> int | None:
    """The Newton iterations a ``parallel`` loop runs for the article cell's hidden states
    in ``rnn_loss`` (from a zero state, as there); ``None`` for any other case."""
    spec = lg.Loop.parse(loop)
    if spec.kind != "parallel" or not scenario.startswith("rnn_loss"):
        return None
    if not isinstance(data.params, lg.RNNParams):
        return None
    hidden0 = np.zeros((data.inputs.shape[1], data.params.i2h_weight.shape[0]), np.float32)

    def step(hidden, x):
        return lg.rnn_cell(data.params, hidden, x), None

    options = {"iters": spec.iters, "tol": spec.tol, "jacobian": spec.jacobian}
    run = jax.jit(lambda h, xs: lg.parallel_scan_info(step, h, xs, len(xs), **options)[2])
    return int(run(hidden0, data.inputs).iterations)


def case_args(scenario: str, data: Data) -> tuple[Any, ...]:
    """The arguments the scenario's function takes."""
    return SCENARIOS[scenario].args(data)


#: The longest training run the ``parallel`` kinds (DEER) are timed on: their memory grows
#: as T times the square of the carry, and a training run carries its weights (at T=10000
#: the as-written forward method asked for 188 GB).
DEER_TRAIN_MAX_T = 1000

#: The most bytes of Jacobians one Newton iteration of ``parallel`` (full DEER) may hold:
#: ``T * n**2`` float32 numbers for a carry of ``n`` numbers (the whole batch's state). At
#: I=64, H=256, B=32, T=1000 that is 268 GB, which hung a run instead of failing it.
DEER_MAX_JACOBIAN_BYTES = 2**31


def skip_reason(
    scenario: str, loop: str | None, sizes: Sizes, limits: Limits, method: str | None = None
) -> str | None:
    """Why this case is not run, or ``None`` when it is.

    ``loop`` is ``None`` for a PyTorch peer, whose eager loop never unrolls into a
    compiled program. ``method`` is the as-written loop's algorithm (a PyTorch peer's
    too: its retained graph is ``"reverse"``), whose work is quadratic in ``T``.
    """
    if scenario == "rnn_module" and sizes.cell == "article":
        return "lg.rnn runs PyTorch's modules, not the article's SimpleRNN: pick a --cell"
    if scenario == "train_tbptt" and sizes.window > sizes.length:
        return f"window={sizes.window} is longer than the sequence (T={sizes.length})"
    spec = lg.Loop.parse(loop) if loop is not None else None
    kind = spec.kind if spec is not None else None
    if spec is not None and not spec.reverse_mode and SCENARIOS[scenario].reverse:
        return f"the {loop!r} loop has no reverse mode, which {scenario} needs"
    if kind == "python" and sizes.length > limits.max_unroll:
        return (
            "a python loop unrolls into the program, so its compile time grows with T; "
            f"T={sizes.length} > --max-unroll={limits.max_unroll}"
        )
    cells = sizes.length * (sizes.length + 1) // 2
    if kind == "python" and method == "reverse" and cells > limits.max_unroll:
        return (
            "the reverse method's python loops unroll T*(T+1)/2 cell gradients into the "
            f"program; {cells} > --max-unroll={limits.max_unroll}"
        )
    if kind == "parallel" and scenario.startswith("train_") and sizes.length > DEER_TRAIN_MAX_T:
        return (
            "DEER keeps T*n*n Jacobian numbers per Newton iteration for a carry of n numbers, "
            "and the training scenarios carry the weights and optimizer state (the forward "
            f"method also their sensitivities): T={sizes.length} > {DEER_TRAIN_MAX_T}"
        )
    if kind == "parallel" and spec.jacobian == "full" and SCENARIOS[scenario].rnn:
        states = 2 if sizes.cell == "lstm" else 1
        carry = sizes.batch * sizes.hidden * sizes.layers * states * (1 + sizes.bidirectional)
        jacobians = sizes.length * carry**2 * 4
        if jacobians > DEER_MAX_JACOBIAN_BYTES:
            return (
                f"full DEER holds T*n*n Jacobian numbers per Newton iteration for a carry of "
                f"n={carry} numbers (B*H*layers*states): {jacobians / 2**30:,.1f} GiB > "
                f"{DEER_MAX_JACOBIAN_BYTES / 2**30:g} GiB; parallel:jacobian=diag holds T*n"
            )
    if method == "reverse" and sizes.length > limits.max_quadratic:
        who = "PyTorch's retained graph" if loop is None else "the reverse method"
        return (
            f"{who} does O(T**2) work (each step's backward walks every earlier step); "
            f"T={sizes.length} > --max-quadratic={limits.max_quadratic}"
        )
    return None
