"""Parity with PyTorch: the library's results against PyTorch's, recorded as fixtures.

One code path serves the test suite and the ``loopgrad-parity`` command: :func:`checks`
lists what to check (scenario, case, method, loop kind, jit on or off, dtype), and
:func:`run_check` runs one check and compares every result field its fixture case
records, returning a :class:`Record`. In plain Python, one check is::

  case = load(scenario, dtype).case(name)
  actual = scenario's entry point on the case's inputs, with `loop` (and `method`),
                 under an outer jax.jit when `jit`
  error = max over every recorded field f and every element of
          |actual[f] - case[f]| / (1 + |case[f]|)
  passed = error <= TOL[dtype]            # shapes and dtypes equal too

The fixtures ship with the package (:data:`loopgrad_jax.fixtures.SHIPPED`), so an
installed copy can re-check parity after an upgrade of JAX or PyTorch:
``loopgrad-parity`` against them, ``loopgrad-parity --live`` against fixtures the
installed PyTorch writes into a temporary folder first.

One module per concern:

- :mod:`.tolerance`: :data:`TOL` by dtype, and :func:`compare`, which finds the largest
  error of a check's results against its fixture case.
- :mod:`.grid`: which checks there are: the scenarios, loop kinds and grids,
  :class:`Check`, the fixtures they read (:func:`load`), :func:`checks` and :func:`select`.
- :mod:`.scenarios`: what each scenario runs (the scalar losses, ``rnn_loss``,
  ``train_rnn`` as written and by tbptt, ``lg.rnn`` on PyTorch's modules), and
  :func:`value_and_grad`.
- :mod:`.run`: :func:`run_check`, one check run and compared, and its :class:`Record`.
- :mod:`.report`: the command's table (:func:`format_table`) and JSON.
- :mod:`.cli`: ``loopgrad-parity`` (:func:`main`): its arguments, and running every
  chosen check with a progress bar.
- :mod:`.own_module`: ``loopgrad-parity --module FILE``, your own saved module checked
  by :mod:`loopgrad_jax.check_torch` instead of the fixtures.
"""

from loopgrad_jax.parity.cli import build_parser, main
from loopgrad_jax.parity.grid import (
    BASE_LOOPS,
    GRIDS,
    LOOP_VARIANTS,
    NEW_LOOPS,
    OPTIONS,
    REVERSE_VARIANTS,
    SCENARIOS,
    Check,
    case_names,
    checks,
    has_forward_mode,
    has_reverse_mode,
    load,
    select,
)
from loopgrad_jax.parity.report import format_table
from loopgrad_jax.parity.run import Record, run_check
from loopgrad_jax.parity.scenarios import value_and_grad
from loopgrad_jax.parity.tolerance import DTYPES, TOL, compare

__all__ = [
    "BASE_LOOPS",
    "DTYPES",
    "GRIDS",
    "LOOP_VARIANTS",
    "NEW_LOOPS",
    "OPTIONS",
    "REVERSE_VARIANTS",
    "SCENARIOS",
    "TOL",
    "Check",
    "Record",
    "build_parser",
    "case_names",
    "checks",
    "compare",
    "format_table",
    "has_forward_mode",
    "has_reverse_mode",
    "load",
    "main",
    "run_check",
    "select",
    "value_and_grad",
]
