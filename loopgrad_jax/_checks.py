"""Argument checks shared by every public function.

Each check raises a one-sentence ``TypeError``/``ValueError`` that names the
argument, what was expected and what was given.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inexact(leaf: object) -> bool:
    """Whether ``leaf`` is floating point or complex: what differentiation reaches."""
    return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))


def static_length(name: str, value: object, *, minimum: int = 0) -> int:
    """Returns ``value`` as a Python int, or raises naming ``name``.

    Loop lengths must be static: they fix array shapes, and reverse-mode
    differentiation of ``lax.fori_loop`` needs static bounds.
    """
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be a static Python int, got a JAX array {_describe(value)}. Loop lengths "
            "fix array shapes and reverse-mode differentiation needs static loop bounds; under "
            f"jax.jit pass it as a static argument, e.g. jax.jit(f, static_argnames='{name}')."
        )
    if isinstance(value, bool | np.bool_) or isinstance(value, float | np.floating):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}.")
    try:
        length = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a Python int, got {type(value).__name__} {value!r}."
        ) from None
    if length < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {length}.")
    return length


def int_scalar(name: str, value: jax.Array) -> jax.Array:
    """Returns ``value`` if it is an integer scalar array, or raises naming ``name``."""
    if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be a Python int or an integer scalar array, got an array "
            f"{_describe(value)}."
        )
    return value


def float_array(name: str, value: object) -> jax.Array:
    """Returns ``value`` as a floating-point JAX array, or raises naming ``name``.

    Any floating dtype passes: the entry points then require one dtype for every array
    (:func:`same_dtype`) and compute in it, without casting.
    """
    if value is None:
        raise TypeError(f"{name} must be a floating-point array, got None.")
    arr = value if isinstance(value, jax.Array) else jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating-point dtype, got {arr.dtype}: any JAX float type "
            "(bfloat16, float16, float32, float64, ...), the same for every array, which the "
            f"model then computes in, nothing cast; cast it first, e.g. {name}.astype(jnp.float32)."
        )
    return arr


def batch_split(inputs: jax.Array) -> bool:
    """Whether an Explicit mesh splits the batch axis of ``inputs`` ``(T, B, I)``."""
    spec = jax.typeof(inputs).sharding.spec
    return len(spec) >= 2 and spec[1] is not None


def batch_zeros(shape: tuple[int, ...], dtype: jnp.dtype, inputs: jax.Array | None) -> jax.Array:
    """``jnp.zeros(shape, dtype)`` with its batch axis, ``shape[-2]``, split as ``inputs``' is.

    ``inputs`` is ``(T, B, I)``. Under an Explicit mesh an array's sharding is part
    of its type, so zeros made without it are replicated, and a step that joins them
    with batch-split inputs (a concatenation, a loop's carry) refuses the mix. Zeros
    broadcast from ``inputs[0, :, :1]`` take its sharding; elsewhere (no ``inputs``, or
    a batch axis that no Explicit mesh splits) they are plain zeros, one operation.
    """
    if inputs is None or not batch_split(inputs):
        return jnp.zeros(shape, dtype)
    return jnp.broadcast_to(jnp.zeros_like(inputs[0, :, :1], dtype=dtype), shape)


def shape(name: str, arr: jax.Array, expected: Sequence[int | None], meaning: str) -> None:
    """Raises unless ``arr.shape`` matches ``expected`` (``None`` matches any size)."""
    ok = arr.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, arr.shape, strict=True)
    )
    if not ok:
        sizes = ["?" if e is None else str(e) for e in expected]
        want = f"({sizes[0]},)" if len(sizes) == 1 else "(" + ", ".join(sizes) + ")"
        raise ValueError(
            f"{name} must have shape {want} = {meaning}, got shape {tuple(arr.shape)}."
        )


def same_dtype(names_and_arrays: Sequence[tuple[str, jax.Array]]) -> None:
    """Raises unless all arrays share one dtype."""
    dtypes = {a.dtype for _, a in names_and_arrays}
    if len(dtypes) > 1:
        given = ", ".join(f"{n}: {a.dtype}" for n, a in names_and_arrays)
        raise TypeError(f"all arrays must share one floating-point dtype, got {given}.")


def one_of(name: str, value: object, choices: Sequence[str]) -> str:
    """Returns ``value`` if it is one of ``choices``, else raises listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def _describe(arr: jax.Array) -> str:
    return f"of shape {tuple(arr.shape)} and dtype {arr.dtype}"


def check_lengths(lengths: object, length: int, batch: int) -> jax.Array | None:
    """``lengths`` as a ``(B,)`` integer array; refuses a concrete one outside ``1..T``.

    A traced one cannot be checked: ``loopgrad_jax._sequence.step_weights`` and
    :func:`loopgrad_jax.rnn` poison their results instead.
    """
    if lengths is None:
        return None
    arr = lengths if isinstance(lengths, jax.Array) else jnp.asarray(lengths)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"lengths must be integers (each example's number of real steps), got dtype "
            f"{arr.dtype}."
        )
    shape("lengths", arr, (batch,), f"(B,) with B={batch} from inputs")
    if not isinstance(arr, jax.core.Tracer):
        values = np.asarray(arr)
        bad = (values < 1) | (values > length)
        if bad.any():
            raise ValueError(
                f"lengths must be between 1 and T={length} (the number of time steps), got "
                f"{values[bad].tolist()} at examples {np.flatnonzero(bad).tolist()}."
            )
    return arr


def leading_axis(xs: object, length: int) -> None:
    """Raises unless every leaf of ``xs`` has leading axis ``length``.

    Without this check the loop kinds would disagree on a mismatch: ``scan`` raises,
    while indexing ``xs[i]`` past the end clamps (``fori``, ``while``) and a Python
    loop reads only the first ``length`` rows.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(xs)[0]:
        leaf_shape = jnp.shape(leaf)
        if not leaf_shape or leaf_shape[0] != length:
            where = f"xs{jax.tree_util.keystr(path)}" if path else "xs"
            raise ValueError(
                f"{where} must have leading axis length={length} (one row per step), "
                f"got shape {tuple(leaf_shape)}."
            )
