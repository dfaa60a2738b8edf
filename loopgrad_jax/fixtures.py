"""Reference-value fixtures: versioned, self-describing, checksummed JSON.

A fixture file holds the PyTorch results of one scenario in one dtype::

  {
    "format": "loopgrad-fixture", "format_version": 1,
    "scenario": "rnn_loss", "dtype": "float32",
    "torch_version": "2.13.0", "seed": 0,
    "command": "python -m loopgrad_jax.torch_reference --out loopgrad_jax/fixture_data",
    "sha256": "<sha256 of the canonical JSON of cases>",
    "cases": [{"name": ..., <field>: <value>, ...}, ...]
  }

An array is stored as ``{"dtype": "float32", "shape": [2, 3], "data": [...]}``
(row-major); each float is written by Python's shortest round-trip ``repr``, so
float32 and float64 values load back bit for bit. Loading checks the format,
the version and the checksum, so a hand-edited or truncated file is an error
that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

#: The fixtures this package ships (package data): PyTorch's results for every scenario.
SHIPPED = Path(__file__).with_name("fixture_data")

FORMAT = "loopgrad-fixture"
FORMAT_VERSION = 1
_HEADER = ("format", "format_version", "scenario", "dtype", "torch_version", "seed", "command")


class FixtureError(ValueError):
    """A fixture file is missing, unreadable, corrupt or was edited by hand."""


class Fixture(NamedTuple):
    """A loaded fixture: the header and the cases, with arrays as NumPy arrays."""

    path: Path
    header: dict[str, Any]
    cases: list[dict[str, Any]]

    def case(self, name: str) -> dict[str, Any]:
        """The case called ``name``."""
        for case in self.cases:
            if case["name"] == name:
                return case
        names = ", ".join(c["name"] for c in self.cases)
        raise KeyError(f"{self.path.name} has no case {name!r}; it has: {names}.")


def fixture_path(directory: str | os.PathLike, scenario: str, dtype: str) -> Path:
    """Where the fixture of ``scenario`` in ``dtype`` lives in ``directory``."""
    return Path(directory) / f"{scenario}_{dtype}.json"


def encode(value: Any) -> Any:
    """Turns arrays (NumPy, JAX, PyTorch) into the JSON array record, recursively."""
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, str | int | float | bool):
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            raise TypeError(f"only floating-point arrays are stored, got dtype {arr.dtype}.")
        return {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": arr.ravel().tolist()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"fixtures hold finite numbers only, got {value!r}.")
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"}:
            return np.asarray(value["data"], dtype=value["dtype"]).reshape(value["shape"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def checksum(cases: Any) -> str:
    """The sha256 of the canonical JSON text of ``cases`` (already encoded)."""
    text = json.dumps(cases, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_fixture(path: str | os.PathLike, header: Mapping[str, Any], cases: list[Any]) -> Path:
    """Writes a fixture atomically: a crash never leaves a half-written file."""
    missing = [k for k in _HEADER[2:] if k not in header]
    if missing:
        raise ValueError(f"header must hold {', '.join(_HEADER[2:])}; missing: {missing}.")
    encoded = encode(cases)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION}
    doc.update({k: header[k] for k in _HEADER[2:]})
    doc["sha256"] = checksum(encoded)
    doc["cases"] = encoded
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a fixture is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_fixture(path: str | os.PathLike) -> Fixture:
    """Loads and verifies a fixture file.

    Raises:
      FixtureError: the file is missing or unreadable, is not JSON, is not a
        fixture of this format version, or its data do not match its sha256.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FixtureError(f"{path}: cannot read fixture ({e.strerror}).") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FixtureError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FixtureError(f"{path}: not a {FORMAT} file (no 'format': '{FORMAT}').")
    if doc.get("format_version") != FORMAT_VERSION:
        raise FixtureError(
            f"{path}: format_version must be {FORMAT_VERSION}, got {doc.get('format_version')!r}."
        )
    missing = [k for k in (*_HEADER, "sha256", "cases") if k not in doc]
    if missing:
        raise FixtureError(f"{path}: missing fields {missing}.")
    actual = checksum(doc["cases"])
    if actual != doc["sha256"]:
        raise FixtureError(
            f"{path}: sha256 mismatch (recorded {doc['sha256'][:12]}..., data hash "
            f"{actual[:12]}...): the data changed after generation; regenerate it with "
            f"`{doc['command']}`."
        )
    header = {k: doc[k] for k in (*_HEADER, "sha256")}
    return Fixture(path=path, header=header, cases=decode(doc["cases"]))
