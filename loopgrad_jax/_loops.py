"""One loop driver, every loop primitive.

Every scenario is written once, as a ``body(carry, x) -> (carry, y)`` function,
and run by :func:`run_loop` with the loop the user picks. The names of the loop
kinds and their options live here only (:data:`LOOPS`, :class:`Loop`); the API,
the tests and the benchmark CLI all read them from here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from loopgrad_jax import _checks
from loopgrad_jax._checkpointed import checkpointed_scan, closure_convert
from loopgrad_jax._deer import ITERS, JACOBIANS, check_tol, parallel_scan
from loopgrad_jax._forward_only import forward_only
from loopgrad_jax._parallel import LOCAL

Carry = TypeVar("Carry")
PyTree = Any

#: The loop kinds every scenario accepts as ``loop=``.
#:
#: - ``"python"``: a Python ``for`` over ``range(length)``; unrolled when traced by ``jax.jit``.
#: - ``"scan"``: ``jax.lax.scan``.
#: - ``"fori"``: ``jax.lax.fori_loop`` with static bounds, writing each step's output into
#:   preallocated arrays. Static bounds make it lower to a scan, so reverse mode works;
#:   each slot is written once, so it is differentiated as the scan that emits step i's
#:   output as row i (linear in the length: carrying the arrays' cotangent through the
#:   loop made reverse mode quadratic).
#: - ``"remat"``: ``jax.lax.scan`` over ``jax.checkpoint(body)``: reverse mode stores the
#:   carries only and recomputes the rest of each step on the way back.
#:   ``"remat:checkpoints=C"`` stores at most ``C`` carries, on Griewank's optimal
#:   (binomial) schedule: reverse mode only, see :attr:`Loop.checkpoints`.
#: - ``"while"``: ``jax.lax.while_loop`` counting to ``length``. Forward mode only: a while
#:   loop has no static trip count, so reverse mode cannot size its stored residuals;
#:   ``jax.grad`` or ``jax.vjp`` through it raises a ``ValueError`` that says so.
#:   ``"while:max_steps=N"`` bounds the trip count by ``N``: reverse mode works, and
#:   ``length`` may be a traced integer (see :func:`run_loop`). The outputs then have
#:   ``N`` rows (zero from row ``length`` on) for a traced ``length``, and ``length``
#:   rows for a static one.
#: - ``"parallel"``: DEER (:func:`loopgrad_jax._deer.parallel_scan`): Newton's method on
#:   the whole trajectory of carries, each iteration one ``lax.associative_scan`` over
#:   the steps' linearisations (``O(log T)`` sequential depth), then every step's
#:   output at once. Converged, it is ``lax.scan``'s result up to rounding: iteration
#:   ``k`` makes steps ``1..k`` exact, so full DEER converges in at most ``T``
#:   iterations (usually far fewer). Options ``iters=K`` (the most iterations, 50),
#:   ``tol=<float>`` and ``jacobian=full|diag`` (``diag``: quasi-DEER, the Jacobians'
#:   diagonals, cheaper iterations, more of them), see :class:`Loop`. Not converged
#:   within ``iters``, every floating-point output, and its derivatives, is NaN; the
#:   iteration count is :func:`loopgrad_jax.parallel_scan_info`'s. Derivatives (reverse
#:   and forward mode) are a custom JVP at the solution, exact either way. Memory:
#:   ``T * n**2`` Jacobian entries per iteration for a carry of ``n`` numbers
#:   (``diag``: ``T * n``). The carry's leaves must share one floating-point dtype. On
#:   CPUs it is slower than ``scan`` (``bench/RESULTS.md``, ``cpu_deer``); it is meant for GPUs.
LOOPS: tuple[str, ...] = ("python", "scan", "fori", "remat", "while", "parallel")

#: Flax NNX's lifted loop transforms as loop kinds (they need Flax installed:
#: ``pip install loopgrad_jax[flax]``), each the counterpart of a kind in :data:`LOOPS`:
#:
#: - ``"nnx_scan"``: ``flax.nnx.scan`` with the carry as ``nnx.Carry`` and ``xs`` over axis 0.
#: - ``"nnx_fori"``: ``flax.nnx.fori_loop`` writing each step's output into preallocated
#:   arrays, as a user writes it: reverse mode is JAX's rule for the loop, which carries
#:   the output arrays' cotangent from step to step (``"fori"`` differentiates as a scan).
#: - ``"nnx_remat"``: ``flax.nnx.scan`` over ``flax.nnx.remat(body)``; takes ``policy``.
NNX_LOOPS: tuple[str, ...] = ("nnx_scan", "nnx_fori", "nnx_remat")

#: Loop kinds that run a whole module in one fused kernel rather than a body step by
#: step: taken by :func:`loopgrad_jax.rnn`, :func:`loopgrad_jax.rnn_loss` and
#: ``train_rnn(mode="tbptt")`` for the modules they can run, refused elsewhere
#: (:func:`run_loop` has no body to give them):
#:
#: - ``"cudnn"``: an ``nn.LSTM`` (``CellParams`` of kind ``"lstm"``: layers,
#:   bidirectional, ``lengths``, ``bias=False``) through ``jax.experimental.rnn.lstm``,
#:   cuDNN's fused LSTM with its own custom VJP. It needs a CUDA GPU and float32, and
#:   refuses, naming the argument, what it cannot run: other kinds, ``proj_size``,
#:   ``precision="bf16"``, ``dropout_key``, ``mesh=``, ``mode="as_written"``. Reverse
#:   mode (first order) only: no ``jax.jvp``, no ``jax.vmap`` (the kernel has neither
#:   rule). See :mod:`loopgrad_jax._cells.cudnn`.
FUSED_LOOPS: tuple[str, ...] = ("cudnn",)

#: The kinds in :data:`LOOPS` that reverse-mode differentiation runs through with any
#: options. ``"while"`` is not among them, yet runs reverse mode given ``max_steps``
#: (``"while:max_steps=N"``), and every kind in :data:`NNX_LOOPS` does too: whether a
#: given loop does is ``Loop.parse(loop).reverse_mode``.
REVERSE_LOOPS: tuple[str, ...] = tuple(k for k in LOOPS if k != "while")
_REVERSE_KINDS = (*REVERSE_LOOPS, *NNX_LOOPS, *FUSED_LOOPS)

#: Names from ``jax.checkpoint_policies`` that ``Loop(kind="remat", policy=...)`` accepts.
POLICIES: tuple[str, ...] = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)

_UNROLLABLE = ("scan", "fori", "remat", *NNX_LOOPS)
_REMAT = ("remat", "nnx_remat")


class Loop(NamedTuple):
    """A loop kind and its options; ``loop=`` takes one, or its text form.

    The text form is the kind followed by ``:option=value`` pairs, as
    ``str(Loop(...))`` writes it: ``"scan"``, ``"scan:unroll=8"``,
    ``"remat:policy=dots_saveable"``, ``"parallel:jacobian=diag:iters=200"``.

    Attributes:
      kind: one of :data:`LOOPS`, :data:`NNX_LOOPS` or :data:`FUSED_LOOPS`.
      unroll: loop iterations per trip through the compiled loop (``lax.scan``'s
        and ``lax.fori_loop``'s ``unroll``), for ``scan``, ``fori``, ``remat`` and
        the ``nnx_*`` kinds.
      policy: for ``remat`` and ``nnx_remat``, the ``jax.checkpoint_policies`` entry (one of
        :data:`POLICIES`) deciding which intermediates reverse mode may store.
        ``nothing_saveable`` keeps only the carry of each step.
      chunk: for ``remat``, steps per checkpoint. With ``chunk=k > 1`` the scan
        runs over chunks of ``k`` steps and checkpoints each chunk, so reverse
        mode stores one carry per chunk plus one chunk's residuals while it
        recomputes it (``sqrt(T)`` steps per chunk minimises the sum).
      max_steps: for ``while``, an upper bound ``N`` on the trip count. The loop
        then runs ``N`` steps of a ``lax.scan`` at most, each past the trip count
        a ``lax.cond`` that skips the body, so reverse mode works and the trip
        count may be a traced integer; ``None``: no bound (forward mode only).
        With a traced trip count ``xs`` lead with ``N`` rows and the outputs come
        back with ``N`` rows, zero from the trip count on; with a static one both
        have as many rows as the trip count.
      checkpoints: for ``remat``, and ``while`` given ``max_steps``, the most
        carries reverse mode stores, ``C >= 1``
        (the initial carry among them), placed on Griewank's binomial schedule
        (revolve), which evaluates the body the fewest times any schedule storing
        ``C`` carries can: ``lg.checkpointed_evaluations(T, C)`` times for ``T``
        steps, about ``(r + 1) * T`` for the smallest ``r`` with
        ``comb(C + r, C) >= T`` (``remat``: ``2 * T``, storing ``T`` carries). The
        primal is ``lax.scan``; reverse mode is a custom VJP, so forward mode
        (``jax.jvp``) does not run through the loop (:attr:`forward_mode`). It
        runs through the loop's reverse mode: ``jax.hessian``,
        ``jax.jacfwd(jax.jacrev(f))`` and ``jax.jvp`` of ``jax.grad`` work.
        Reverse mode of reverse mode (``jax.grad`` of ``jax.grad``, and so
        ``jax.grad`` of a ``train_rnn(mode="tbptt")`` run) raises a
        ``ValueError`` saying so. Not combined with ``unroll``, ``policy``
        or ``chunk``; ``None``: checkpoint every step. With ``while:max_steps=N``
        the schedule covers the N steps of the bounded loop, skipped ones included.
      iters: for ``parallel``, the most Newton iterations, ``>= 1`` (default 50).
        Full DEER is exact after ``T`` iterations whatever the body, so
        ``iters >= T`` always converges. Not converged, the loop's floating-point
        outputs and their derivatives are NaN: ``lg.parallel_scan_info`` on the same
        body reports the iterations run and whether they converged.
      tol: for ``parallel``, the convergence test: the largest change of a carry
        element in an iteration at most ``tol * max(1, largest |carry element|)``;
        ``None``: 1000 machine epsilons of the carry's dtype.
      jacobian: for ``parallel``, ``"full"`` (DEER: each step's ``n x n`` Jacobian,
        ``T * n**2`` numbers per iteration for a carry of ``n`` numbers) or
        ``"diag"`` (quasi-DEER: its diagonal, ``T * n``; more iterations, and linear
        convergence, so the result is within a few ``tol`` of ``scan``'s).
        Derivatives use full Jacobians either way.
    """

    kind: str = "scan"
    unroll: int = 1
    policy: str = "nothing_saveable"
    chunk: int = 1
    max_steps: int | None = None
    checkpoints: int | None = None
    iters: int = ITERS
    tol: float | None = None
    jacobian: str = "full"

    @property
    def reverse_mode(self) -> bool:
        """Whether reverse-mode differentiation (``jax.grad``) runs through this loop."""
        return self.kind in _REVERSE_KINDS or self.max_steps is not None

    @property
    def forward_mode(self) -> bool:
        """Whether forward-mode differentiation (``jax.jvp``) runs through this loop."""
        return self.checkpoints is None and self.kind not in FUSED_LOOPS

    @classmethod
    def parse(cls, loop: str | Loop) -> Loop:
        """A validated :class:`Loop` from a kind name, its text form or a ``Loop``.

        Examples:
          >>> import loopgrad_jax as lg
          >>> lg.Loop.parse("scan:unroll=8")
          Loop(kind='scan', unroll=8, policy='nothing_saveable', chunk=1, max_steps=None, \
checkpoints=None, iters=50, tol=None, jacobian='full')
          >>> str(lg.Loop("remat", policy="dots_saveable"))
          'remat:policy=dots_saveable'
        """
        return check_loop(loop)

    def __str__(self) -> str:
        text = self.kind
        if self.unroll != 1:
            text += f":unroll={self.unroll}"
        if self.kind in _REMAT and self.policy != "nothing_saveable":
            text += f":policy={self.policy}"
        if self.chunk != 1:
            text += f":chunk={self.chunk}"
        if self.max_steps is not None:
            text += f":max_steps={self.max_steps}"
        if self.checkpoints is not None:
            text += f":checkpoints={self.checkpoints}"
        if self.jacobian != "full":
            text += f":jacobian={self.jacobian}"
        if self.iters != ITERS:
            text += f":iters={self.iters}"
        if self.tol is not None:
            text += f":tol={self.tol!r}"
        return text


def compiled(*static_argnames: str) -> Callable[[Callable], Callable]:
    """Decorates an entry point's body to run as one ``jax.jit``-compiled function.

    Repeated calls with the same shapes and static options reuse the compiled
    function, eager calls included; traced into a caller's program (its ``jax.jit``)
    the body is inlined there. A ``loop`` of kind ``"python"`` is the
    exception: compiling it would unroll it (compile time grows with the
    length), so it runs as the Python loop it is, op by op when called eagerly
    and unrolled only inside the caller's own ``jax.jit``. Split over a mesh
    (a ``shards`` argument with an axis) it is compiled too: ``shard_map`` run op
    by op dispatches every operation to every device, hundreds of times slower.
    """

    def decorate(fn: Callable) -> Callable:
        jitted = jax.jit(fn, static_argnames=static_argnames)
        # Traced into a caller's program (its jax.jit, or jax.grad under it) the body is
        # inlined: kept a nested call, XLA optimized its two sides apart, and a plain
        # lax.scan RNN gradient at the article's size took 0.65 ms against 0.26 ms
        # inlined (interleaved; the library's rnn_tanh gradient: 0.67 against 0.30 ms with
        # rnn_forward's one bias per layer). Called eagerly, jax.grad included, it stays
        # one cached compiled call: inlined there, the backward pass would run op by op
        # and compile its loop again on every call.
        inlined = jax.jit(fn, static_argnames=static_argnames, inline=_INLINE)

        @functools.wraps(fn)
        def call(*args: Any, loop: Loop, **kwargs: Any) -> Any:
            eager = loop.kind == "python" and kwargs.get("shards", LOCAL).axis is None
            if eager:
                return fn(*args, loop=loop, **kwargs)
            return (inlined if _staging(args) else jitted)(*args, loop=loop, **kwargs)

        return call

    return decorate


#: ``jax.jit``'s option to inline a function into the program tracing it: ``True``, or
#: ``jax.Inline.JAX_EARLY`` (the same: inlined while tracing) where JAX has that enum.
_INLINE: Any = jax.Inline.JAX_EARLY if hasattr(jax, "Inline") else True


def _staging(args: Any) -> bool:
    """Whether the caller is being traced into a program (``jax.jit``, a loop body, ...).

    Arrays alone in ``args`` mean an eager call (the probe below costs a dispatch, about
    20 us). Otherwise a constant made now tells: it is a tracer only under a staging
    trace, since eager ``jax.grad`` and ``jax.vmap`` pass constants through to the eager
    level. (A program closing over concrete ``args`` gets the nested call: the same
    numbers.)
    """
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
        return False
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def check_loop(loop: object) -> Loop:
    """Returns ``loop`` as a validated :class:`Loop`; raises naming what is wrong."""
    if isinstance(loop, str):
        kind, *options = loop.split(":")
        fields: dict[str, Any] = {"kind": kind}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in Loop._fields[1:]:
                raise ValueError(
                    "loop options are ':unroll=<int>', ':policy=<name>', ':chunk=<int>', "
                    "':max_steps=<int>', ':checkpoints=<int>', ':iters=<int>', "
                    f"':tol=<float>' and ':jacobian=full|diag', got {option!r} in "
                    f"loop={loop!r}."
                )
            if key in fields:
                raise ValueError(f"loop option {key!r} is given twice in loop={loop!r}.")
            fields[key] = _option_value(key, value)
        loop = Loop(**fields)
    if not isinstance(loop, Loop):
        raise TypeError(
            f"loop must be a loop kind ({', '.join(map(repr, LOOPS))}), its text form such as "
            f"'scan:unroll=8', or a loopgrad_jax.Loop, got {type(loop).__name__} {loop!r}."
        )
    _checks.one_of("loop", loop.kind, (*LOOPS, *NNX_LOOPS, *FUSED_LOOPS))
    unroll = _checks.static_length("loop unroll", loop.unroll, minimum=1)
    if unroll != 1 and loop.kind not in _UNROLLABLE:
        raise ValueError(
            f"loop unroll applies to {', '.join(map(repr, _UNROLLABLE))}, got unroll={unroll} "
            f"with kind {loop.kind!r}."
        )
    _checks.one_of("loop policy", loop.policy, POLICIES)
    chunk = _checks.static_length("loop chunk", loop.chunk, minimum=1)
    if loop.policy != "nothing_saveable" and loop.kind not in _REMAT:
        raise ValueError(
            f"loop policy applies to 'remat' and 'nnx_remat' only, got kind {loop.kind!r}."
        )
    if chunk != 1 and loop.kind != "remat":
        raise ValueError(f"loop chunk applies to 'remat' only, got kind {loop.kind!r}.")
    max_steps = loop.max_steps
    if max_steps is not None:
        max_steps = _checks.static_length("loop max_steps", max_steps)
        if loop.kind != "while":
            raise ValueError(f"loop max_steps applies to 'while' only, got kind {loop.kind!r}.")
    checkpoints = loop.checkpoints
    if checkpoints is not None:
        checkpoints = _checks.static_length("loop checkpoints", checkpoints, minimum=1)
        if loop.kind != "remat" and max_steps is None:
            raise ValueError(
                "loop checkpoints applies to 'remat' and to a bounded 'while:max_steps=N', "
                f"got {str(loop)!r}."
            )
        others = {
            "unroll": unroll != 1,
            "policy": loop.policy != "nothing_saveable",
            "chunk": chunk != 1,
        }
        for name in (name for name, changed in others.items() if changed):
            raise ValueError(
                f"loop checkpoints={checkpoints} places every checkpoint itself: it does not "
                f"combine with {name} (loop={str(loop)!r})."
            )
    iters = _checks.static_length("loop iters", loop.iters, minimum=1)
    tol = None if loop.tol is None else check_tol(loop.tol, "loop tol")
    _checks.one_of("loop jacobian", loop.jacobian, JACOBIANS)
    changed = {"iters": iters != ITERS, "tol": tol is not None, "jacobian": loop.jacobian != "full"}
    for name in (name for name, on in changed.items() if on and loop.kind != "parallel"):
        raise ValueError(f"loop {name} applies to 'parallel' only, got kind {loop.kind!r}.")
    return loop._replace(
        unroll=unroll,
        chunk=chunk,
        max_steps=max_steps,
        checkpoints=checkpoints,
        iters=iters,
        tol=tol,
    )


def _option_value(key: str, value: str) -> Any:
    """An option's text as ``check_loop`` takes it: ints and ``tol``'s float parsed."""
    if key in ("policy", "jacobian"):
        return value
    if key == "tol":
        try:
            return float(value)
        except ValueError:
            return value  # check_loop names it
    return int(value) if value.lstrip("-").isdigit() else value


def require_reverse(loop: object, needed_by: str) -> Loop:
    """Returns ``check_loop(loop)``; raises if ``needed_by`` would reverse-differentiate it."""
    spec = check_loop(loop)
    if not spec.reverse_mode:
        raise ValueError(_no_reverse_message(spec, needed_by))
    return spec


def _no_reverse_message(spec: Loop, needed_by: str) -> str:
    return (
        f"loop={str(spec)!r} cannot be used with {needed_by}, which needs reverse-mode "
        "differentiation through the loop: lax.while_loop has no static trip count, and XLA "
        "needs static memory bounds to store every iteration's residuals. Use one of "
        f"{', '.join(map(repr, REVERSE_LOOPS))} or a bounded 'while:max_steps=N' instead; "
        "forward mode (jax.jvp, jax.jacfwd, or train_rnn(mode='as_written')) works with "
        "'while'."
    )


def fused_message(spec: Loop, needed_by: str) -> str:
    """Why ``needed_by`` refuses a kind of :data:`FUSED_LOOPS`, and what to use instead."""
    return (
        f"loop={str(spec)!r} runs a whole nn.LSTM in cuDNN's fused kernel: lg.rnn, "
        "lg.rnn_loss and lg.train_rnn(mode='tbptt') take it for an LSTM's CellParams, but "
        f"{needed_by} runs a loop body step by step, which it cannot; use one of "
        f"{', '.join(map(repr, LOOPS))} instead."
    )


def check_length(name: str, value: object, spec: Loop) -> int | jax.Array:
    """A loop's trip count: a static Python int, or for ``while:max_steps=N`` also an
    integer array (traced or not); raises naming ``name`` otherwise."""
    if spec.max_steps is None or not isinstance(value, jax.Array):
        length = _checks.static_length(name, value)
        if spec.max_steps is not None and length > spec.max_steps:
            raise ValueError(
                f"{name}={length} exceeds the loop's max_steps={spec.max_steps} "
                f"(loop={str(spec)!r}); raise max_steps or run fewer steps."
            )
        return length
    return _checks.int_scalar(name, value)


def run_loop(
    body: Callable[[Carry, PyTree], tuple[Carry, PyTree]],
    init: Carry,
    xs: PyTree,
    *,
    length: int,
    loop: str | Loop,
    reverse: bool = False,
) -> tuple[Carry, PyTree]:
    """Runs ``body`` over the leading axis of ``xs`` with the chosen loop primitive.

    Whatever ``loop`` is, the result is that of this Python loop (``lax.scan``'s
    semantics)::

      def run_loop(body, init, xs, length, reverse=False):
        carry, ys = init, [None] * length
        for i in (reversed(range(length)) if reverse else range(length)):
          carry, ys[i] = body(carry, xs[i])  # xs[i] slices every leaf of xs
        return carry, stack(ys)              # every leaf of ys gains a leading axis

    Args:
      body: ``(carry, x) -> (carry, y)``, a pure function; the carry keeps its
        structure, shapes and dtypes from step to step.
      init: the initial carry.
      xs: a pytree whose leaves all have leading axis ``length`` (or ``None``); any
        other leading size raises a ``ValueError`` naming the leaf.
      length: the number of steps, a static Python int. With
        ``loop="while:max_steps=N"`` it may also be an integer scalar array, traced
        under ``jax.jit`` (``lax.while_loop``'s trip count): ``xs`` then lead with
        ``N`` rows, of which the first ``length`` are read, and ``ys`` come back with
        ``N`` rows, zero from row ``length`` on. A ``length`` outside ``[0, N]``
        cannot raise inside a compiled function, so every floating-point leaf of
        the result is NaN instead, and so are its derivatives (a static one raises
        a ``ValueError``).
      loop: one of :data:`LOOPS`, a :class:`Loop`, or its text form.
      reverse: run from the last step to the first.

    Returns:
      ``(final_carry, ys)``.

    Examples:
      >>> import jax.numpy as jnp, loopgrad_jax as lg
      >>> def body(total, x):
      ...   total = total + x
      ...   return total, total
      >>> xs = jnp.arange(4, dtype=jnp.float32)
      >>> lg.run_loop(body, jnp.float32(0), xs, length=4, loop="fori")
      (Array(6., dtype=float32), Array([0., 1., 3., 6.], dtype=float32))
    """
    spec = check_loop(loop)
    if spec.kind in FUSED_LOOPS:
        raise ValueError(fused_message(spec, "run_loop (the loop driver of every other scenario)"))
    length = check_length("length", length, spec)
    if spec.max_steps is not None:
        return _bounded_while(body, init, xs, length, reverse, spec)
    _checks.leading_axis(xs, length)
    if spec.kind in NNX_LOOPS:
        return _nnx_loop(body, init, xs, length, reverse, spec)
    if spec.kind == "scan":
        return lax.scan(body, init, xs, length=length, reverse=reverse, unroll=spec.unroll)
    if spec.kind == "parallel":
        options = {"iters": spec.iters, "tol": spec.tol, "jacobian": spec.jacobian}
        return parallel_scan(body, init, xs, length, reverse, **options)
    if spec.checkpoints is not None:
        return checkpointed_scan(body, init, xs, length, reverse, spec.checkpoints)
    if spec.kind == "remat":
        return _remat_scan(body, init, xs, length, reverse, spec)
    if length == 0:  # nothing to index: the body never runs
        return init, _empty_outputs(body, init, xs, 0)
    if spec.kind == "python":
        carry, ys = init, [None] * length
        for i in range(length - 1, -1, -1) if reverse else range(length):
            carry, ys[i] = body(carry, _index(xs, i))
        return carry, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)

    if spec.kind == "fori":
        # The body's closed-over tracers (the weights, an enclosing loop's index) become
        # explicit arguments, so that the rule below differentiates with respect to them.
        closed, consts = closure_convert(body, init, _index(xs, 0))
        return _fori(closed, length, reverse, spec.unroll, consts, init, xs)
    _, carry, ys = lax.while_loop(
        lambda s: s[0] < length,
        lambda s: (s[0] + 1, *_write_step(body, xs, length, reverse, s[0], s[1:])),
        (jnp.asarray(0, jnp.int32), init, _empty_outputs(body, init, xs, length)),
    )
    # jax.grad through lax.while_loop would fail with JAX's generic message; the marker's
    # transpose runs first and says why, in terms of this library's loop kinds.
    return forward_only((carry, ys), _no_reverse_message(spec, "jax.grad or jax.vjp"))


def _nnx_loop(body, init, xs, length: int, reverse: bool, spec: Loop):
    """The ``nnx_*`` kinds: Flax NNX's lifted transforms over ``body``."""
    try:
        from flax import nnx
    except ImportError as err:
        raise ImportError(
            f"loop={str(spec)!r} runs Flax NNX's loop transforms and needs Flax: "
            "pip install 'loopgrad_jax[flax]'."
        ) from err
    if spec.kind == "nnx_fori":
        if length == 0:
            return init, _empty_outputs(body, init, xs, 0)
        state = (init, _empty_outputs(body, init, xs, length))
        step = functools.partial(_write_step, body, xs, length, reverse)
        return nnx.fori_loop(0, length, step, state, unroll=spec.unroll)
    if spec.kind == "nnx_remat":
        body = nnx.remat(body, policy=getattr(jax.checkpoint_policies, spec.policy))
    scan = nnx.scan(
        body,
        length=length,
        reverse=reverse,
        unroll=spec.unroll,
        in_axes=(nnx.Carry, 0),
        out_axes=(nnx.Carry, 0),
    )
    return scan(init, xs)


def _write_step(body, xs, length: int, reverse: bool, step, state):
    """Step ``step`` of a loop that writes step i's output into preallocated arrays at i."""
    carry, ys = state
    i = length - 1 - step if reverse else step
    carry, y = body(carry, _index(xs, i))
    return carry, jax.tree.map(lambda buf, leaf: buf.at[i].set(leaf), ys, y)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _fori(body, length: int, reverse: bool, unroll: int, consts, init, xs):
    """``lax.fori_loop`` writing each step's output at its index; ``body(c, x, *consts)``.

    Each output slot is written once, so the loop is the ``lax.scan`` that emits
    step i's output as its i-th row (a ``fori_loop`` with static bounds is a scan
    already; only the output arrays differ). Differentiated, it is that scan
    (:func:`_fori_jvp`): reverse mode through the arrays carried here would carry
    their ``(length, ...)`` cotangent from step to step, and XLA copies it at every
    step, which made reverse mode quadratic in the length (``stack`` at T=10000:
    157 ms against scan's 0.32 ms).
    """
    bound = _with_consts(body, consts)
    state = (init, _empty_outputs(bound, init, xs, length))
    step = functools.partial(_write_step, bound, xs, length, reverse)
    return lax.fori_loop(0, length, step, state, unroll=unroll)


def _fori_jvp(body, length, reverse, unroll, primals, tangents):
    # Differentiated with respect to the inputs that have a tangent only, the others
    # closed over as constants. Given as arrays of zeros (custom_jvp's default), the scan
    # computed a zero tangent's contribution at every step and reverse mode stored it:
    # for PyTorch's cells, the projection of the inputs' zero tangent, one more
    # (T, B, G*H) array than scan keeps.
    leaves, tree = jax.tree.flatten(primals)
    tangent_leaves = tree.flatten_up_to(tangents)
    live = [not isinstance(t, SymbolicZero) for t in tangent_leaves]

    def as_scan(*live_leaves):
        given = iter(live_leaves)
        consts, init, xs = tree.unflatten(
            [next(given) if d else p for p, d in zip(leaves, live, strict=True)]
        )
        step = _with_consts(body, consts)
        return lax.scan(step, init, xs, length=length, reverse=reverse, unroll=unroll)

    return jax.jvp(
        as_scan,
        tuple(p for p, d in zip(leaves, live, strict=True) if d),
        tuple(t for t, d in zip(tangent_leaves, live, strict=True) if d),
    )


_fori.defjvp(_fori_jvp, symbolic_zeros=True)


def _with_consts(body, consts):
    """``(carry, x) -> body(carry, x, *consts)``: a closure-converted body, closed again."""
    return lambda carry, x: body(carry, x, *consts)


def _bounded_while(body, init, xs, length: int | jax.Array, reverse: bool, spec: Loop):
    """``while:max_steps=N``: a scan of at most N steps, reverse-differentiable.

    With a static ``length`` every step runs (a while loop whose trip count is known
    is a scan). With a traced one the scan has N steps and each step at or past the
    trip count is a ``lax.cond`` that skips the body: the carry passes through and
    the step's outputs are zeros. Run in reverse, the scan visits rows N-1 down to 0,
    skipping every row at or past the trip count, so rows length-1 down to 0 run.
    With ``spec.checkpoints`` the scan is the checkpointed one.
    """
    max_steps = spec.max_steps

    def scan(step, init, xs, steps):
        if spec.checkpoints is None:
            return lax.scan(step, init, xs, length=steps, reverse=reverse)
        return checkpointed_scan(step, init, xs, steps, reverse, spec.checkpoints)

    dynamic = isinstance(length, jax.Array)
    steps = max_steps if dynamic else length
    _checks.leading_axis(xs, steps)
    if not dynamic or steps == 0:
        carry, ys = scan(body, init, xs, steps)
        return _poison(carry, ys, length, max_steps) if dynamic else (carry, ys)

    zeros = _empty_outputs(body, init, xs, 1)

    def step(carry, live_and_x):
        live, x = live_and_x
        return lax.cond(
            live,
            lambda c: body(c, x),
            lambda c: (c, jax.tree.map(lambda z: z[0], zeros)),
            carry,
        )

    live = jnp.arange(steps, dtype=length.dtype) < length  # the rows the loop runs
    carry, ys = scan(step, init, (live, xs), steps)
    return _poison(carry, ys, length, max_steps)


def _poison(carry, ys, length: jax.Array, max_steps: int):
    """NaN in every floating-point leaf, and in every derivative of it, when the traced
    trip count is outside [0, N].

    The leaf is multiplied by NaN or 1: ``jnp.where(bad, nan, leaf)`` would give NaN
    values but zero derivatives, which an optimizer would take without a sign.
    """
    bad = (length < 0) | (length > max_steps)

    def poison(leaf):
        if not _checks.inexact(leaf):
            return leaf
        return leaf * jnp.where(bad, jnp.nan, 1).astype(jnp.result_type(leaf))

    return jax.tree.map(poison, (carry, ys))


def _remat_scan(body, init, xs, length: int, reverse: bool, spec: Loop):
    """``lax.scan`` checkpointing every step, or every chunk of ``spec.chunk`` steps."""
    checkpoint = functools.partial(
        jax.checkpoint, policy=getattr(jax.checkpoint_policies, spec.policy), prevent_cse=False
    )

    def scan(step, carry, xs, n):
        return lax.scan(step, carry, xs, length=n, reverse=reverse, unroll=spec.unroll)

    k = spec.chunk
    if k == 1 or length <= k:
        return scan(checkpoint(body), init, xs, length)
    full, rest = divmod(length, k)
    tail = jax.tree.map(lambda a: a[full * k :], xs)

    @checkpoint
    def chunk_body(carry, start):
        # Slicing inside the chunk, rather than reshaping xs into (full, k, ...) before
        # the loop, keeps the loop from holding a copy of every input.
        chunk_xs = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, k), xs)
        return scan(body, carry, chunk_xs, k)

    def run_head(carry):
        carry, ys = scan(chunk_body, carry, jnp.arange(full) * k, full)
        return carry, jax.tree.map(lambda a: a.reshape(full * k, *a.shape[2:]), ys)

    def run_tail(carry):
        return scan(checkpoint(body), carry, tail, rest)

    first, second = (run_tail, run_head) if reverse else (run_head, run_tail)
    carry, ys_first = first(init)
    carry, ys_second = second(carry)
    head_ys, tail_ys = (ys_second, ys_first) if reverse else (ys_first, ys_second)
    return carry, jax.tree.map(lambda h, t: jnp.concatenate([h, t]), head_ys, tail_ys)


def _index(xs: PyTree, i: int | jax.Array) -> PyTree:
    return jax.tree.map(lambda a: a[i], xs)


def _empty_outputs(body: Callable, init: PyTree, xs: PyTree, length: int) -> PyTree:
    """Zeros shaped like ``length`` stacked outputs of ``body``.

    Zeros of the outputs' abstract values, broadcast along the new leading axis, keep
    their type: what ``shard_map`` knows of them (per-device or replicated), and under
    an Explicit mesh their sharding (a batch split stays split), so the buffer's type
    matches what is written in.
    """
    x0 = jax.tree.map(
        lambda a: jnp.zeros_like(a[0]) if len(a) else jnp.zeros(a.shape[1:], a.dtype), xs
    )
    _, y = jax.eval_shape(body, init, x0)
    return jax.tree.map(lambda s: jnp.broadcast_to(jnp.zeros_like(s), (length, *s.shape)), y)
