"""The article's scenarios 1 and 2: a scalar function of ``x`` built in a loop.

The article claims that in scenario 1 "the gradient will only reflect the
final execution of the loop". It does not: every iteration uses ``x``, and
every use contributes. With ``x = 2`` and ``n = 3`` both scenarios give
``d/dx sum_i (x*x + i) = 2 * n * x = 12``, in PyTorch and here.

Each runs as one ``jax.jit``-compiled function per shape, ``n`` and loop, so
repeated calls, eager ones included, compile once (``loop="python"`` runs as a
Python loop: compiling it would unroll it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loopgrad_jax import _checks
from loopgrad_jax._loops import Loop, check_loop, compiled, run_loop


def accumulate_loss(x: jax.typing.ArrayLike, n: int, *, loop: str | Loop = "scan") -> jax.Array:
    """Scenario 1: a running total, summed to a scalar.

    Plain-Python semantics (the article's first loop)::

      total = zeros_like(x)
      for i in range(n):
        total = total + (x * x + i)
      return total.sum()

    Args:
      x: a floating-point array of any shape.
      n: the number of iterations, a static Python int ``>= 0``.
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its text form.

    Returns:
      A scalar of ``x``'s dtype. Its gradient is ``2 * n * x``.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> jax.grad(lg.accumulate_loss)(jnp.float32(2.0), 3)
      Array(12., dtype=float32)
    """
    x = _checks.float_array("x", x)
    return _accumulate(x, n=_checks.static_length("n", n), loop=check_loop(loop))


@compiled("n", "loop")
def _accumulate(x: jax.Array, *, n: int, loop: Loop) -> jax.Array:
    def body(total, i):
        return total + _term(x, i), None

    total, _ = run_loop(body, jnp.zeros_like(x), _steps(n, x.dtype), length=n, loop=loop)
    return total.sum()


def stack_loss(x: jax.typing.ArrayLike, n: int, *, loop: str | Loop = "scan") -> jax.Array:
    """Scenario 2: collect every iterate, stack, sum.

    Plain-Python semantics (the article's second loop)::

      ys = [x * x + i for i in range(n)]
      return stack(ys).sum()        # 0 when n == 0

    Args:
      x: a floating-point array of any shape.
      n: the number of iterations, a static Python int ``>= 0``.
      loop: one of :data:`loopgrad_jax.LOOPS`, a :class:`loopgrad_jax.Loop` or its text form.

    Returns:
      A scalar of ``x``'s dtype. Its gradient is ``2 * n * x``.

    Examples:
      >>> import jax, jax.numpy as jnp, loopgrad_jax as lg
      >>> jax.grad(lg.stack_loss)(jnp.float32(2.0), 3, loop="fori")
      Array(12., dtype=float32)
    """
    x = _checks.float_array("x", x)
    return _stack(x, n=_checks.static_length("n", n), loop=check_loop(loop))


@compiled("n", "loop")
def _stack(x: jax.Array, *, n: int, loop: Loop) -> jax.Array:
    def body(carry, i):
        return carry, _term(x, i)

    _, ys = run_loop(body, None, _steps(n, x.dtype), length=n, loop=loop)
    return ys.sum()


def _term(x: jax.Array, i: jax.Array) -> jax.Array:
    """The article's ``y = x * x + i``."""
    return x * x + i


def _steps(n: int, dtype: jnp.dtype) -> jax.Array:
    """``0, 1, ..., n-1`` in ``x``'s dtype, as PyTorch promotes ``x * x + i``."""
    return jnp.arange(n, dtype=dtype)
