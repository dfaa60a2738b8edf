"""The documentation runs: docstring examples and the README's Python blocks."""

import doctest
import re
from pathlib import Path

import jax
import pytest

from loopgrad_jax import (
    _as_written,
    _cell,
    _cells,
    _flax,
    _loops,
    _rnn,
    _scalar,
    _sequence,
    _train,
    parity,
)

README = Path(__file__).parent.parent / "README.md"


MODULES = [
    _as_written,
    _cell,
    _cells.params,
    _cells.torch_io,
    _flax,
    _loops,
    _rnn,
    _scalar,
    _sequence,
    _train,
    parity.run,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if module is not _loops:
        assert result.attempted > 0


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no ```python example"
    for block in blocks:
        namespace: dict = {}
        # JAX's default promotion, as a reader runs it: optax's Adam mixes its int32 step
        # count with floats, which this suite's strict mode (conftest.py) refuses.
        with jax.numpy_dtype_promotion("standard"):
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own docs
