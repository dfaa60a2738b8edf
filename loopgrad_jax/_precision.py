"""Mixed precision: which dtype the parameters, the matrix products and the state use.

``precision="bf16"`` is :data:`BF16`: parameters (and so the optimizer's state)
float32, every matrix product's operands rounded to bfloat16 and accumulated in
float32 (``preferred_element_type=jnp.float32``), everything else (biases, gates,
the hidden and cell state, the loss) float32. The policy is static: it is a field of
:class:`loopgrad_jax.CellParams` inside the entry points, read by the cell equations'
few products (:func:`matmul`, :func:`einsum`), so every loop kind and mode runs it
from the one body.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


@dataclasses.dataclass(frozen=True)
class Precision:
    """A precision policy: dtype names for the parameters, the products and the state.

    ``state_dtype="bfloat16"`` rounds every layer's new state (``h`` and an LSTM's
    ``c``) to bfloat16 each step, carried in float32 arrays: what a bfloat16 state
    would cost in accuracy, for measuring it (``tests/test_precision.py``).
    """

    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    state_dtype: str = "float32"

    def round_state(self, state):
        """``state`` rounded to ``state_dtype`` and back (nothing for float32)."""
        if self.state_dtype == self.param_dtype:
            return state
        return jax.tree.map(lambda a: a.astype(self.state_dtype).astype(a.dtype), state)


#: ``precision="bf16"``: float32 parameters and state, bfloat16 products accumulated in float32.
BF16 = Precision()

#: The names ``precision=`` takes, and the policies they stand for.
PRECISIONS: dict[str, Precision] = {"bf16": BF16, "bfloat16": BF16}

_COMPUTE = ("bfloat16", "float16", "float32")
_STATE = ("bfloat16", "float32")


def check_precision(precision: object) -> Precision | None:
    """``precision`` as a :class:`Precision`, ``None`` for none; raises naming what is wrong."""
    if precision is None:
        return None
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision must be None, one of {', '.join(map(repr, PRECISIONS))} or a "
                f"lg.Precision, got {precision!r}."
            )
        return PRECISIONS[precision]
    if not isinstance(precision, Precision):
        raise TypeError(
            f"precision must be None, a string or a lg.Precision, got {type(precision).__name__}."
        )
    for field, allowed in (
        ("param_dtype", ("float32",)),
        ("compute_dtype", _COMPUTE),
        ("state_dtype", _STATE),
    ):
        value = getattr(precision, field)
        if value not in allowed:
            raise ValueError(
                f"precision.{field} must be one of {', '.join(map(repr, allowed))}, got {value!r}."
            )
    return precision


def check_param_dtypes(named_leaves, policy: Precision | None) -> None:
    """Refuses parameters that are not in ``policy.param_dtype`` (half-precision ones)."""
    if policy is None:
        return
    for name, leaf in named_leaves:
        dtype = jnp.result_type(leaf)
        if dtype != jnp.dtype(policy.param_dtype):
            raise TypeError(
                f"{name} must be {policy.param_dtype} under precision={policy}: the policy "
                f"keeps the parameters (and the optimizer's state) in {policy.param_dtype} and "
                f"rounds only the products' operands, got {dtype}; pass float32 "
                f"parameters and inputs, e.g. jax.tree.map(lambda a: a.astype(jnp.float32), "
                f"params)."
            )


def matmul(a: jax.Array, b: jax.Array, policy: Precision | None) -> jax.Array:
    """``a @ b``; under ``policy`` its operands in the compute dtype, accumulated in float32."""
    if policy is None:
        return a @ b
    c = policy.compute_dtype
    return jnp.matmul(a.astype(c), b.astype(c), preferred_element_type=policy.param_dtype)


def product_t(a: jax.Array, weight: jax.Array, policy: Precision | None) -> jax.Array:
    """``a @ weight.T`` for a weight stored ``(N, K)``, as one contraction of ``a``'s last
    axis with ``weight``'s second, with no transpose of ``weight`` in between.

    Reverse mode multiplies the cotangent by ``weight`` as stored, ``(N, K)`` row-major:
    inside a loop whose backward pass makes that product every step, XLA's CPU backend
    then runs it as a plain row-major product. Written ``a @ weight.T``, the backward
    pass multiplied by the transposed copy along its rows: the hoisted GRU gradient at
    I=64, H=256, B=32, T=1000 on 2 devices took 455 against 378 ms.

    One row (``a`` of a single example) is a vector-matrix product, which XLA fuses
    into the step's elementwise code when it reads the transposed copy and runs as a
    product of its own when it reads ``weight``: that one is ``a @ weight.T``, the
    same numbers (the article's model, B=1, a Python loop of 100 steps: 0.16 against
    0.24 ms).
    """
    if math.prod(a.shape[:-1]) == 1:
        return matmul(a, weight.T, policy)
    return einsum("...k,nk->...n", a, weight, policy)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def matmul_t(a: jax.Array, weight: jax.Array, policy: Precision | None) -> jax.Array:
    """``a @ weight.T`` (:func:`matmul`), whose derivative is :func:`product_t`'s.

    The value is ``matmul(a, weight.T)``: XLA copies the transpose once, outside a loop,
    and every step runs a row-major product. The tangent, ``da @ weight.T + a @ dweight.T``,
    is made of :func:`product_t`, so that reverse mode's product with the cotangent reads
    ``weight`` as stored (see there).
    """
    return matmul(a, weight.T, policy)


@functools.partial(matmul_t.defjvp, symbolic_zeros=True)
def _matmul_t_jvp(policy, primals, tangents):
    # Symbolic zeros: an operand that is not differentiated (a loop's inputs) adds no
    # product, not one of zeros.
    (a, weight), (da, dweight) = primals, tangents
    out = matmul(a, weight.T, policy)
    return out, _tangent(
        out,
        (da, lambda t: product_t(t, weight, policy)),
        (dweight, lambda t: product_t(a, t, policy)),
    )


def _tangent(out: jax.Array, *terms: tuple[Any, Callable[[jax.Array], jax.Array]]) -> jax.Array:
    """The sum of ``product(tangent)`` over ``terms`` whose tangent is not a symbolic zero;
    zeros like ``out`` if every one is."""
    live = [product(t) for t, product in terms if not isinstance(t, SymbolicZero)]
    return sum(live[1:], live[0]) if live else jnp.zeros_like(out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def matmul_pair(
    a: jax.Array, weight: jax.Array, kernel: jax.Array, policy: Precision | None
) -> jax.Array:
    """``a @ kernel`` (:func:`matmul`), for ``kernel`` equal to ``weight.T``, both given.

    The value and its tangent's ``a @ dkernel`` read ``kernel``, ``(K, N)``, so that
    reverse mode accumulates the weight's cotangent inside a loop in that layout; the
    tangent's ``da @ kernel`` is ``product_t(da, weight)``, so that the product with
    the cotangent reads ``weight`` as stored (see :func:`product_t`). ``weight``
    itself is a constant of the rule: its gradient reaches it through ``kernel``, so
    the caller must build ``kernel`` as ``weight.T`` (the joined ``nn.RNN`` step at
    I=64, H=256, B=32, T=1000 on one device: 199-210 against 227-231 ms with
    ``matmul_t``).
    """
    return matmul(a, kernel, policy)


@functools.partial(matmul_pair.defjvp, symbolic_zeros=True)
def _matmul_pair_jvp(policy, primals, tangents):
    (a, weight, kernel), (da, _, dkernel) = primals, tangents
    out = matmul(a, kernel, policy)
    return out, _tangent(
        out,
        (da, lambda t: product_t(t, weight, policy)),
        (dkernel, lambda t: matmul(a, t, policy)),
    )


def einsum(spec: str, a: jax.Array, b: jax.Array, policy: Precision | None) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` as :func:`matmul` computes a product under ``policy``."""
    if policy is None:
        return jnp.einsum(spec, a, b)
    c = policy.compute_dtype
    return jnp.einsum(spec, a.astype(c), b.astype(c), preferred_element_type=policy.param_dtype)
