"""``parallel_scan``: ``lax.scan`` solved in parallel over time, by DEER.

DEER (Lim et al., ICLR 2024, "Parallelizing non-linear sequential models over the
sequence length") treats the whole trajectory ``s_1..s_T`` of ``s_t = f(s_{t-1}, x_t)``
as the unknown of one system of equations and solves it by Newton's method. Each
iteration linearises every step at the current guess, ``s_t ~ J_t s_{t-1} + b_t``, and
solves the linear recurrence for all ``t`` at once with one ``lax.associative_scan``
over affine maps: ``O(log T)`` sequential depth instead of ``T``. Quasi-DEER (Gonzalez
et al., NeurIPS 2024) keeps only the diagonal of each ``J_t``: cheaper iterations, more
of them.

Either way iteration ``k`` leaves steps ``1..k`` exact (step 1's linearisation starts
from the exact ``init``, and an exact step makes the next one's linear term vanish), so
``T`` iterations give the sequential result whatever the Jacobian; Newton's method
usually needs far fewer.

Derivatives never run through the Newton iterations. The trajectory is a fixed point,
so its tangent solves the linear recurrence ``ds_t = J_t ds_{t-1} + df_t`` (``df_t``: the
step's tangent from the parameters and ``x_t``), with full Jacobians taken at the
solution: one more associative scan (:func:`_trajectory_jvp`). Reverse mode is JAX's
transpose of that linear map: the adjoint recurrence ``l_t = g_t + J_{t+1}^T l_{t+1}``
as the transposed (reversed) associative scan, then one vmapped vector-Jacobian
product of the body over all steps. A custom JVP, rather than a custom VJP, is what
lets ``jax.jvp`` and ``jax.grad`` both run through it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from loopgrad_jax import _checks

PyTree = Any

#: The Jacobians ``parallel_scan`` linearises each step with.
JACOBIANS: tuple[str, ...] = ("full", "diag")

#: The default ``iters``: the most Newton iterations.
ITERS = 50

#: The default ``tol`` in units of the carry dtype's machine epsilon (see :func:`parallel_scan`).
TOL_EPS = 1000


class ParallelScanInfo(NamedTuple):
    """How :func:`parallel_scan_info`'s Newton iterations went.

    Attributes:
      iterations: the Newton iterations run, an int32 scalar array.
      converged: a bool scalar array; ``False`` means every floating-point leaf of
        the result (and of its derivatives) is NaN.
    """

    iterations: jax.Array
    converged: jax.Array


def parallel_scan(
    body: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
    init: PyTree,
    xs: PyTree,
    length: int,
    reverse: bool = False,
    *,
    iters: int = ITERS,
    tol: float | None = None,
    jacobian: str = "full",
) -> tuple[PyTree, PyTree]:
    """``lax.scan(body, init, xs, length=length, reverse=reverse)``, parallel in time.

    Converged, the result is that of this Python loop (``lax.scan``'s semantics)::

      def parallel_scan(body, init, xs, length, reverse=False):
        carry, ys = init, [None] * length
        for i in (reversed(range(length)) if reverse else range(length)):
          carry, ys[i] = body(carry, xs[i])  # xs[i] slices every leaf of xs
        return carry, stack(ys)              # every leaf of ys gains a leading axis

    computed by DEER: Newton's method on the whole trajectory of carries, each
    iteration one parallel (associative) scan over the steps' linearisations, then
    every step's ``y`` from the solved trajectory, all steps at once.

    Args:
      body: ``(carry, x) -> (carry, y)``, a pure function; every leaf of the carry
        is a real floating-point array that keeps its shape and dtype from step to
        step. It may close over arrays, traced ones included (the weights under
        ``jax.grad``, an enclosing loop's index).
      init: the initial carry.
      xs: a pytree whose leaves all have leading axis ``length`` (or ``None``).
      length: the number of steps ``T``, a static Python int.
      reverse: run from the last step to the first.
      iters: the most Newton iterations, an int ``>= 1``. Iteration ``k`` makes steps
        ``1..k`` exact, so ``iters >= length`` always converges (no more than
        ``length`` iterations ever run).
      tol: the iterations stop once the largest change of any carry element in an
        iteration is at most ``tol * max(1, largest |carry element|)``. ``None``:
        ``1000 * eps`` of the carry's dtype (2.2e-13 for float64, 1.2e-4 for
        float32), which is above the rounding noise that one iteration adds to a
        converged trajectory and, Newton's method converging quadratically, below
        the error it leaves. ``jacobian="diag"`` converges linearly: its result is
        off by up to ``rho / (1 - rho)`` times ``tol`` (``rho``: how much of each
        step's Jacobian the diagonal misses).
      jacobian: ``"full"``, Newton's method with each step's Jacobian (``n**2``
        entries per step for a carry of ``n`` elements: DEER), or ``"diag"``, its
        diagonal only (``n`` entries per step, more iterations: quasi-DEER).
        Derivatives use full Jacobians either way, so they are exact.

    Returns:
      ``(final_carry, ys)``. Not converged within ``iters`` iterations, every
      floating-point leaf of both, and their derivatives, is NaN
      (:func:`parallel_scan_info` also returns the iteration count).

    Derivatives: ``jax.grad``, ``jax.vjp``, ``jax.jvp`` and ``jax.jacfwd`` are exact,
    by implicit differentiation at the solved trajectory, not through the
    iterations. They cost ``T * n**2`` memory for the Jacobians.

    Examples:
      >>> import jax.numpy as jnp
      >>> from loopgrad_jax._deer import parallel_scan
      >>> def body(total, x):
      ...   total = total + x * x
      ...   return total, total
      >>> parallel_scan(body, jnp.float32(0), jnp.arange(4.0, dtype=jnp.float32), 4)
      (Array(14., dtype=float32), Array([ 0.,  1.,  5., 14.], dtype=float32))
    """
    carry, ys, _ = parallel_scan_info(
        body, init, xs, length, reverse, iters=iters, tol=tol, jacobian=jacobian
    )
    return carry, ys


def parallel_scan_info(
    body: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
    init: PyTree,
    xs: PyTree,
    length: int,
    reverse: bool = False,
    *,
    iters: int = ITERS,
    tol: float | None = None,
    jacobian: str = "full",
) -> tuple[PyTree, PyTree, ParallelScanInfo]:
    """:func:`parallel_scan`, and how its Newton iterations went.

    Returns:
      ``(final_carry, ys, info)``: :func:`parallel_scan`'s result, and a
      :class:`ParallelScanInfo` (iterations run, whether they converged).
    """
    length = _checks.static_length("length", length)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__} {reverse!r}.")
    iters = _checks.static_length("iters", iters, minimum=1)
    _checks.one_of("jacobian", jacobian, JACOBIANS)
    _checks.leading_axis(xs, length)
    init = jax.tree.map(jnp.asarray, init)
    s0, unravel = _flat_carry(init)
    tol = _tolerance(tol, s0.dtype)
    none = ParallelScanInfo(jnp.asarray(0, jnp.int32), jnp.asarray(True))
    if length == 0:
        carry, ys = lax.scan(body, init, xs, length=0, reverse=reverse)
        return carry, ys, none
    if s0.size == 0:  # no carry to solve for: every step at once
        return init, jax.vmap(body, (None, 0))(init, xs)[1], none
    if reverse:
        xs = jax.tree.map(lambda a: jnp.flip(a, 0), xs)
    x0 = jax.tree.map(lambda a: a[0], xs)
    _check_body_carry(body, init, x0)

    def flat_step(s, x):
        carry, _ = body(unravel(s), x)
        return ravel_pytree(carry)[0]

    # Every value the body reads besides its arguments (closed-over weights, an
    # enclosing loop's integer index, constants) becomes an explicit argument: the
    # custom derivative rule below sees, and differentiates with respect to, them all.
    closed = jax.make_jaxpr(flat_step)(s0, x0)
    static = _Static(closed.jaxpr, length, min(iters, length), tol, jacobian == "diag")
    trajectory, iterations, converged = _trajectory(static, list(closed.consts), s0, xs)

    s_prev = jnp.concatenate([s0[None], trajectory[:-1]])
    carries, ys = jax.vmap(body)(jax.vmap(unravel)(s_prev), xs)
    carry = jax.tree.map(lambda a: a[-1], carries)
    if reverse:
        ys = jax.tree.map(lambda a: jnp.flip(a, 0), ys)
    carry, ys = _poison((carry, ys), converged)
    return carry, ys, ParallelScanInfo(iterations, converged)


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
    """What the custom JVP holds fixed (hashed by identity): the step and the options."""

    jaxpr: Any  # the flat step, (consts, s, x) -> s'
    length: int
    iters: int
    tol: float
    diag: bool

    def step(self, consts: list, s: jax.Array, x: PyTree) -> jax.Array:
        return jax.core.eval_jaxpr(self.jaxpr, consts, s, *jax.tree.leaves(x))[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _trajectory(static: _Static, consts: list, s0: jax.Array, xs: PyTree):
    """``(s_1..s_T as rows, Newton iterations run, converged)`` for ``s_t = f(s_{t-1}, x_t)``."""
    step = functools.partial(static.step, consts)

    def linearise(s_prev, x):
        """``(f(s_prev, x), df/ds)``, the Jacobian's diagonal only for quasi-DEER."""
        jac, value = jax.jacfwd(lambda s: (step(s, x),) * 2, has_aux=True)(s_prev)
        return value, jnp.diagonal(jac) if static.diag else jac

    def scale(s):
        return jnp.maximum(1, jnp.max(jnp.abs(s)))

    def not_done(state):
        k, s, change = state
        return (k < static.iters) & ~(change <= static.tol * scale(s))

    def newton(state):
        # Newton's update of the whole trajectory, in residual form: the change d_t of
        # step t solves d_t = J_t d_{t-1} + (f(s_{t-1}, x_t) - s_t), d_0 = 0.
        k, s, _ = state
        f, jac = jax.vmap(linearise)(jnp.concatenate([s0[None], s[:-1]]), xs)
        change = _linear_recurrence(jac, f - s, static.diag)
        return k + 1, s + change, jnp.max(jnp.abs(change))

    guess = jnp.broadcast_to(s0, (static.length, *s0.shape))
    start = (jnp.asarray(0, jnp.int32), guess, jnp.asarray(jnp.inf, s0.dtype))
    k, s, change = lax.while_loop(not_done, newton, start)
    # T iterations make every step exact, unless the iterations overflowed on the way.
    converged = (change <= static.tol * scale(s)) | ((k >= static.length) & jnp.isfinite(change))
    return s, k, converged


@_trajectory.defjvp
def _trajectory_jvp(static: _Static, primals, tangents):
    """The tangent of the solved trajectory: ``ds_t = J_t ds_{t-1} + df_t``, ``ds_0 = ds0``.

    Linear in the tangents, with the full Jacobians at the solution, so its transpose
    (reverse mode) is the adjoint recurrence, a reversed associative scan.
    """
    consts, s0, xs = primals
    d_consts, d_s0, d_xs = tangents
    s, k, converged = _trajectory(static, consts, s0, xs)
    s_prev = jnp.concatenate([s0[None], s[:-1]])
    jac = jax.vmap(jax.jacfwd(static.step, argnums=1), (None, 0, 0))(consts, s_prev, xs)
    # df_t: the step's tangent through the constants and x_t; step 1's also through s_0.
    d_prev = jnp.concatenate([d_s0[None], jnp.zeros_like(s_prev[1:])])
    _, forcing = jax.jvp(
        jax.vmap(static.step, (None, 0, 0)), (consts, s_prev, xs), (d_consts, d_prev, d_xs)
    )
    d_s = _linear_recurrence(jac, forcing, diag=False)
    no_tangent = np.zeros((), jax.dtypes.float0)
    return (s, k, converged), (d_s, no_tangent, no_tangent)


def _linear_recurrence(a: jax.Array, b: jax.Array, diag: bool) -> jax.Array:
    """All ``d_t = a_t d_{t-1} + b_t`` (``d_0 = 0``) at once, by one associative scan.

    ``a_t`` is a matrix, ``(T, n, n)``, or with ``diag`` a diagonal, ``(T, n)``. The
    scan composes the affine maps ``d -> a_t d + b_t``: applying ``(a1, b1)`` then
    ``(a2, b2)`` is ``(a2 a1, a2 b1 + b2)``.
    """

    def then(first, second):
        (a1, b1), (a2, b2) = first, second
        if diag:
            return a2 * a1, a2 * b1 + b2
        return a2 @ a1, (a2 @ b1[..., None])[..., 0] + b2

    return lax.associative_scan(then, (a, b))[1]


def _poison(tree: PyTree, converged: jax.Array) -> PyTree:
    """Every floating-point leaf of ``tree`` times 1, or NaN where not ``converged``.

    A product rather than ``jnp.where(converged, leaf, nan)``, so derivatives are NaN too.
    """

    def poison(leaf):
        if not _checks.inexact(leaf):
            return leaf
        return leaf * jnp.where(converged, 1, jnp.nan).astype(leaf.dtype)

    return jax.tree.map(poison, tree)


def _tolerance(tol: object, dtype: Any) -> float:
    """``tol`` checked, or the default ``TOL_EPS * eps`` of ``dtype``."""
    if tol is None:
        return TOL_EPS * float(jnp.finfo(dtype).eps)
    return check_tol(tol)


def check_tol(tol: object, name: str = "tol") -> float:
    """``tol`` as a finite float ``>= 0``; raises naming ``name`` otherwise."""
    if isinstance(tol, bool) or not isinstance(tol, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a Python float or None, got {type(tol).__name__} {tol!r}.")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{name} must be a finite float >= 0 or None, got {tol!r}.")
    return float(tol)


def _flat_carry(init: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """``init`` as one vector and the function back; raises on a non-float leaf."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"parallel_scan's carry must have real floating-point leaves only (Newton's "
                f"method solves for them), got init{jax.tree_util.keystr(path)} of dtype "
                f"{leaf.dtype}; carry integers in xs instead, or use lax.scan."
            )
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(init)}
    if len(dtypes) > 1:
        raise TypeError(
            "parallel_scan's carry leaves must share one floating-point dtype (they are "
            f"solved for as one vector), got {sorted(map(str, dtypes))}."
        )
    return ravel_pytree(init)


def _check_body_carry(body: Callable, init: PyTree, x0: PyTree) -> None:
    """Raises unless ``body`` returns a carry of ``init``'s structure, shapes and dtypes."""
    given = jax.eval_shape(body, init, x0)[0]
    # Leaves compared as lists: a pytree node class may not compare by value (CellParams).
    want = [(a.shape, a.dtype) for a in jax.tree.leaves(init)]
    got = [(a.shape, a.dtype) for a in jax.tree.leaves(given)]
    if jax.tree.structure(init) != jax.tree.structure(given) or want != got:
        raise TypeError(
            "body must return a carry of init's structure, shapes and dtypes, got "
            f"{got} for init {want}."
        )
