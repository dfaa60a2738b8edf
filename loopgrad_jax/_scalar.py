"""The article's scenarios 1 and 2: a scalar function of ``x`` built in a loop.

The article claims that in scenario 1 "the gradient will only reflect the
final execution of the loop". It does not: every iteration uses ``x``, and
every use contributes. With ``x = 2`` and ``n = 3`` both scenarios give
``d/dx sum_i (x*x + i) = 2 * n * x = 12``, in PyTorch and here.

Each runs as one ``jax.jit``-compiled function per shape, ``n`` and loop, so
repeated calls, eager ones included, compile once (``loop="python"`` runs as a
Python loop: compiling it would unroll it). With ``loop="while:max_steps=N"``, ``n``
may be traced: one compiled function serves every ``n`` up to ``N``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from loopgrad_jax import _checks
from loopgrad_jax._loops import Loop, check_length, check_loop, compiled, run_loop


def _compiled_both(body: Callable) -> tuple[Callable, Callable]:
    """``body`` compiled with ``n`` static (an int) and with ``n`` traced (an array)."""
    return compiled("n", "loop")(body), compiled("loop")(body)


def _dispatch(
    compiled_pair: tuple[Callable, Callable], x: jax.typing.ArrayLike, n: object, loop: object
) -> jax.Array:
    """Checks the arguments and runs the compiled function for a static or traced ``n``."""
    x = _checks.float_array("x", x)
    spec = check_loop(loop)
    n = check_length("n", n, spec)
    static, traced = compiled_pair
    return (static if isinstance(n, int) else traced)(x, n=n, loop=spec)


def accumulate_loss(x: jax.typing.ArrayLike, n: int, *, loop: str | Loop = "scan") -> jax.Array:
    """Scenario 1: a running total, summed to a scalar.

    Plain-Python semantics (the article's first loop)::

      total = zeros_like(x)
      for i in range(n):
        total = total + (x * x + i)
      return total.sum()

    Args:
      x: a floating-point array of any shape.
      n: the number of iterations, a static Python int ``>= 0``. With
        ``loop="while:max_steps=N"`` also an integer scalar array, traced under
        ``jax.jit``; outside ``[0, N]`` the result is NaN (see :func:`run_loop`).
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its text form.

    Returns:
      A scalar of ``x``'s dtype. Its gradient is ``2 * n * x``.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> jax.grad(lg.accumulate_loss)(jnp.float32(2.0), 3)
      Array(12., dtype=float32)
    """
    return _dispatch(_accumulate, x, n, loop)


def _accumulate_body(x: jax.Array, *, n: int | jax.Array, loop: Loop) -> jax.Array:
    def body(total, i):
        return total + _term(x, i), None

    total, _ = run_loop(body, jnp.zeros_like(x), _steps(n, loop, x.dtype), length=n, loop=loop)
    return total.sum()


_accumulate = _compiled_both(_accumulate_body)


def stack_loss(x: jax.typing.ArrayLike, n: int, *, loop: str | Loop = "scan") -> jax.Array:
    """Scenario 2: collect every iterate, stack, sum.

    Plain-Python semantics (the article's second loop)::

      ys = [x * x + i for i in range(n)]
      return stack(ys).sum()        # 0 when n == 0

    Args:
      x, n, loop: as in :func:`accumulate_loss`.

    Returns:
      A scalar of ``x``'s dtype. Its gradient is ``2 * n * x``.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> jax.grad(lg.stack_loss)(jnp.float32(2.0), 3, loop="fori")
      Array(12., dtype=float32)
      >>> loop = "while:max_steps=8"  # n traced: one program for every n <= 8
      >>> grad = jax.jit(jax.grad(lambda x, n: lg.stack_loss(x, n, loop=loop)))
      >>> grad(jnp.float32(2.0), 3), grad(jnp.float32(2.0), 5)
      (Array(12., dtype=float32), Array(20., dtype=float32))
    """
    return _dispatch(_stack, x, n, loop)


def _stack_body(x: jax.Array, *, n: int | jax.Array, loop: Loop) -> jax.Array:
    def body(carry, i):
        return carry, _term(x, i)

    _, ys = run_loop(body, None, _steps(n, loop, x.dtype), length=n, loop=loop)
    return ys.sum()


_stack = _compiled_both(_stack_body)


def _term(x: jax.Array, i: jax.Array) -> jax.Array:
    """The article's ``y = x * x + i``."""
    return x * x + i


def _steps(n: int | jax.Array, loop: Loop, dtype: jnp.dtype) -> jax.Array:
    """``0, 1, ..., n-1`` in ``x``'s dtype, as PyTorch promotes ``x * x + i``; for a
    traced ``n``, ``0, 1, ..., max_steps-1``, of which the loop reads the first ``n``."""
    return jnp.arange(n if isinstance(n, int) else loop.max_steps, dtype=dtype)
