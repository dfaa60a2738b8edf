"""The tolerances against PyTorch, by dtype, and the comparison of a check's results
with its fixture case: every recorded field that is not part of the problem, element by
element, as ``|actual - expected| / (1 + |expected|)``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

#: Relative and absolute tolerance against PyTorch, by dtype: an element passes when
#: ``|actual - expected| <= TOL * (1 + |expected|)``. float64: both libraries are exact up
#: to a few roundings; float32: at the fixtures' sizes the two differ by a few ulps (~1e-7).
TOL: dict[str, float] = {"float32": 1e-5, "float64": 1e-10}
DTYPES: tuple[str, ...] = ("float32", "float64")


# Case fields that are the problem, not a result: everything else in a case is compared.
_INPUT_FIELDS = frozenset(
    {
        "name",
        "seed",
        "code",
        "n",
        "x",
        "params",
        "inputs",
        "targets",
        "hidden0",
        "optimizer",
        "window",
        "resume_at",
        "kind",
        "num_layers",
        "input_size",
        "hidden_size",
        "output_size",
        "rnn_state",
        "head_state",
        # module: the call's options and the probe's weights
        "lengths",
        "batch_first",
        "bias",
        "bidirectional",
        "proj_size",
        "unbatched",
        "cell_module",
        "r_out",
        "r_h",
        "r_c",
    }
)


def compare(
    actual: Mapping[str, Any], case: Mapping[str, Any], dtype: str
) -> tuple[float, str, str]:
    """``(error, field, message)``: the largest error over every result field of ``case``.

    Every field of the case that is not part of the problem must be in ``actual``;
    ``message`` is empty unless a field is missing or a structure, shape or dtype differs.
    """
    recorded = sorted(k for k in case if k not in _INPUT_FIELDS)
    missing = [k for k in recorded if k not in actual]
    if missing:
        return math.inf, missing[0], f"recorded fields not compared: {missing}"
    worst, where = 0.0, recorded[0] if recorded else ""
    for key in recorded:
        expected = case[key]
        if isinstance(expected, float):
            expected = np.asarray(expected, dtype)
        for path, a, e in _pairs(actual[key], expected, key):
            if isinstance(a, str):  # a structure mismatch, described
                return math.inf, path, a
            a, e = np.asarray(a), np.asarray(e)
            if a.shape != e.shape:
                return math.inf, path, f"{path}: shape {a.shape} != {e.shape}"
            if e.dtype.kind == "f" and a.dtype != e.dtype:
                return math.inf, path, f"{path}: dtype {a.dtype} != {e.dtype}"
            error = _max_error(a, e)
            if error > worst:
                worst, where = error, path
    return worst, where, ""


def _pairs(actual: Any, expected: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """``(path, actual leaf, expected leaf)``, or ``(path, description, None)`` on a mismatch."""
    if expected is None:  # recorded as absent (a module's d hidden0 without hidden0)
        if actual is not None:
            yield path, f"{path}: {type(actual).__name__} != None", None
        return
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping) or set(actual) != set(expected):
            keys = sorted(actual) if isinstance(actual, Mapping) else type(actual).__name__
            yield path, f"{path}: keys {keys} != {sorted(expected)}", None
            return
        for k in expected:
            yield from _pairs(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        if not isinstance(actual, list | tuple) or len(actual) != len(expected):
            yield path, f"{path}: {type(actual).__name__} != a list of {len(expected)}", None
            return
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            yield from _pairs(a, e, f"{path}[{i}]")
    else:
        yield path, actual, expected


def _max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.size == 0:
        return 0.0
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    with np.errstate(invalid="ignore"):
        error = np.abs(a - e) / (1 + np.abs(e))
    return float(np.max(np.where(np.isnan(error), np.inf, error)))
