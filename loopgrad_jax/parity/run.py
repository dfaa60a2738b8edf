"""One check run: :func:`run_check` runs a :class:`~loopgrad_jax.parity.grid.Check`'s
scenario on its fixture case, compares the results, and returns a :class:`Record`."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax

from loopgrad_jax.parity.grid import Check, load
from loopgrad_jax.parity.scenarios import _RUNNERS
from loopgrad_jax.parity.tolerance import TOL, compare


@dataclasses.dataclass(frozen=True)
class Record:
    """The outcome of one :class:`Check`.

    ``error`` is the largest ``|actual - expected| / (1 + |expected|)`` over every
    compared element (relative for large values, absolute near zero; ``inf`` when a
    shape, dtype or structure differs or the run raised), found in ``field``.
    """

    scenario: str
    case: str
    cell: str
    method: str
    loop: str
    jit: bool
    dtype: str
    error: float
    tolerance: float
    passed: bool
    field: str = ""  # where the largest error is
    message: str = ""  # why it failed
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["error"] = self.error if math.isfinite(self.error) else None
        return out


def run_check(
    check: Check, directory: str | os.PathLike | None = None, *, catch: bool = True
) -> Record:
    """Runs ``check`` and compares every result field its fixture case records.

    Args:
      check: what to run, one entry of :func:`checks`.
      directory: the fixtures' folder; the shipped fixtures when ``None``.
      catch: record an exception raised by the run as a failure (the command goes on
        to the next check); ``False`` lets it propagate (the test suite shows its
        traceback).

    Returns:
      A :class:`Record`: the largest error, the tolerance and whether it passed.

    Examples:
      >>> from loopgrad_jax import parity
      >>> check = parity.checks(["accumulate"], ["float32"])[0]
      >>> check.name
      'accumulate/article/python/eager/float32'
      >>> record = parity.run_check(check)
      >>> record.passed, record.error <= record.tolerance == 1e-5
      (True, True)
    """
    if check.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64 checks need jax.config.update('jax_enable_x64', True) before they run."
        )
    start = time.perf_counter()
    tol = TOL[check.dtype]
    fields = dict(check._asdict())
    try:
        c = load(check.scenario, check.dtype, directory).case(check.case)
        actual = jax.device_get(_RUNNERS[check.scenario](check, c))
        error, field, message = compare(actual, c, check.dtype)
    except Exception as err:  # noqa: BLE001 - a failed run is a failed check
        if not catch:
            raise
        error, field, message = math.inf, "", f"{type(err).__name__}: {err}"
    passed = not message and error <= tol
    if not message and not passed:
        message = f"{field}: max |actual - expected| / (1 + |expected|) = {error:.3g} > {tol:g}"
    seconds = time.perf_counter() - start
    return Record(
        **fields,
        error=error,
        tolerance=tol,
        passed=passed,
        field=field,
        message=message,
        seconds=seconds,
    )
