"""One loop driver, three loop primitives.

Every scenario is written once, as a ``body(carry, x) -> (carry, y)`` function,
and run by :func:`run_loop` with the loop primitive the user picks. The names of
the loop kinds live here only (:data:`LOOPS`); the API, the tests and the
benchmark CLI all read them from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

from loopgrad_jax import _checks

Carry = TypeVar("Carry")
PyTree = Any

#: The loop kinds every scenario accepts as ``loop=``.
#:
#: - ``"python"``: a Python ``for`` over ``range(length)``; unrolled when traced by ``jax.jit``.
#: - ``"scan"``: ``jax.lax.scan``.
#: - ``"fori"``: ``jax.lax.fori_loop`` with static bounds, writing each step's output into
#:   preallocated arrays. Static bounds make it lower to a scan, so reverse mode works.
LOOPS: tuple[str, ...] = ("python", "scan", "fori")


def check_loop(loop: object) -> str:
    """Returns ``loop`` if it names a loop kind, else raises listing the valid ones."""
    return _checks.one_of("loop", loop, LOOPS)


def run_loop(
    body: Callable[[Carry, PyTree], tuple[Carry, PyTree]],
    init: Carry,
    xs: PyTree,
    *,
    length: int,
    loop: str,
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
      xs: a pytree whose leaves have leading axis ``length`` (or ``None``).
      length: the number of steps, a static Python int.
      loop: one of :data:`LOOPS`.
      reverse: run from the last step to the first.

    Returns:
      ``(final_carry, ys)``.
    """
    loop = check_loop(loop)
    length = _checks.static_length("length", length)
    if loop == "scan":
        return lax.scan(body, init, xs, length=length, reverse=reverse)
    if length == 0:  # nothing to index: the body never runs
        return init, _empty_outputs(body, init, xs, 0)
    if loop == "python":
        carry, ys = init, [None] * length
        for i in range(length - 1, -1, -1) if reverse else range(length):
            carry, ys[i] = body(carry, _index(xs, i))
        return carry, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)

    # fori: preallocate the stacked outputs and write step i's output at index i.
    def fori_body(step, state):
        carry, ys = state
        i = length - 1 - step if reverse else step
        carry, y = body(carry, _index(xs, i))
        ys = jax.tree.map(lambda buf, leaf: buf.at[i].set(leaf), ys, y)
        return carry, ys

    return lax.fori_loop(0, length, fori_body, (init, _empty_outputs(body, init, xs, length)))


def _index(xs: PyTree, i: int | jax.Array) -> PyTree:
    return jax.tree.map(lambda a: a[i], xs)


def _empty_outputs(body: Callable, init: PyTree, xs: PyTree, length: int) -> PyTree:
    """Zeros shaped like ``length`` stacked outputs of ``body``."""
    x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    _, y = jax.eval_shape(body, init, x0)
    return jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), y)
