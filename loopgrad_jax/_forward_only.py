"""An identity whose reverse-mode derivative is an error we write.

Reverse mode in JAX is forward mode followed by a transpose of the linear
tangent computation. ``lax.while_loop`` has a forward-mode rule but no
transpose, so ``jax.grad`` through it fails with JAX's generic message, naming
JAX's primitives rather than this library's loop kinds. :func:`forward_only`
marks a loop's outputs: it is the identity for evaluation, ``jax.jit``,
``jax.vmap`` and forward mode, and its transpose raises ``ValueError(message)``.
Transposition runs from the outputs back, so the marker on a loop's outputs is
reached before the loop itself, and the user reads our message.

The primitive is built with JAX's documented extension points
(``jax.extend.core.Primitive`` and the ``ad``, ``batching`` and ``mlir`` rule
registries).
"""

from __future__ import annotations

from typing import Any

import jax

from loopgrad_jax import _checks

PyTree = Any


def _identity(x, *, message: str):
    del message
    return x


def _abstract_eval(aval, *, message: str):
    del message
    return aval


def _transpose(cotangent, x, *, message: str):
    del cotangent, x
    raise ValueError(message)


def _make_primitive():
    """The marker primitive, or ``None`` where this JAX lacks the extension points.

    Without them the library still imports and runs; reverse mode through a ``while``
    loop then fails with JAX's own message. The test suite checks that this JAX has them.
    """
    try:
        from jax.extend import core as jex_core
        from jax.interpreters import ad, batching, mlir

        primitive = jex_core.Primitive("loopgrad_forward_only")
        primitive.def_impl(_identity)
        primitive.def_abstract_eval(_abstract_eval)
        ad.deflinear2(primitive, _transpose)
        batching.defvectorized(primitive)
        mlir.register_lowering(primitive, mlir.lower_fun(_identity, multiple_results=False))
    except (ImportError, AttributeError):  # pragma: no cover - only on a JAX without them
        return None
    return primitive


forward_only_p = _make_primitive()


def forward_only(tree: PyTree, message: str) -> PyTree:
    """Returns ``tree`` unchanged; reverse-mode differentiation through it raises.

    Plain-Python semantics: ``return tree``. Forward mode (``jax.jvp``,
    ``jax.jacfwd``) passes tangents through unchanged; transposing it, which
    ``jax.grad``, ``jax.vjp`` and ``jax.linear_transpose`` do, raises
    ``ValueError(message)``. Leaves that are not floating point carry no
    tangent and are returned as they are.
    """

    def mark(leaf):
        if forward_only_p is not None and _checks.inexact(leaf):
            return forward_only_p.bind(leaf, message=message)
        return leaf

    return jax.tree.map(mark, tree)
