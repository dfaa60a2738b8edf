"""What ``loopgrad-parity`` reports: the table of records and the JSON file (the
records, with the versions, platform and fixtures they were checked with)."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.parity.grid import load
from loopgrad_jax.parity.run import Record
from loopgrad_jax.parity.tolerance import TOL

_COLUMNS = ("case", "scenario", "method", "loop", "jit", "dtype", "max rel error", "pass")


def format_table(records: Sequence[Record]) -> str:
    """One row per record: case, scenario, method, loop, jit, dtype, max relative error, pass."""
    rows = [
        (
            r.case,
            r.scenario,
            r.method or "-",
            r.loop,
            "jit" if r.jit else "eager",
            r.dtype,
            f"{r.error:.2e}" if math.isfinite(r.error) else "error",
            "pass" if r.passed else "FAIL",
        )
        for r in records
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(_COLUMNS, *rows, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in (_COLUMNS, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _meta(directory: Path, source: str, scenarios: Sequence[str], dtype: str) -> dict[str, Any]:
    versions = {"loopgrad_jax": lg.__version__, "jax": jax.__version__, "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import jaxlib

        versions["jaxlib"] = jaxlib.__version__
    with contextlib.suppress(ImportError):
        import optax

        versions["optax"] = optax.__version__
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    header = load(scenarios[0], dtype, directory).header
    return {
        "fixtures": source,
        "fixtures_torch_version": header["torch_version"],
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "tolerance": TOL,
        "error": "max over elements of |actual - expected| / (1 + |expected|)",
    }


def _write_json(path: str, meta: dict[str, Any], records: Sequence[Record]) -> None:
    failed = sum(not r.passed for r in records)
    doc = {
        **meta,
        "passed": failed == 0,
        "checks": len(records),
        "failed": failed,
        "records": [r.as_json() for r in records],
    }
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
