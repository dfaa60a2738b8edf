"""``loopgrad-bench``: compile time, run time and memory of every loop kind, with PyTorch.

Modules: :mod:`~loopgrad_jax.bench.cases` (each scenario as a JAX function),
:mod:`~loopgrad_jax.bench.flops` (the FLOP count), :mod:`~loopgrad_jax.bench.timing`,
:mod:`~loopgrad_jax.bench.torch_peers` (PyTorch, imported only when installed),
:mod:`~loopgrad_jax.bench.run` (the sweep), :mod:`~loopgrad_jax.bench.report` (JSON and
table), :mod:`~loopgrad_jax.bench.plot` and :mod:`~loopgrad_jax.bench.cli`.
"""

from loopgrad_jax.bench.cases import SCENARIOS
from loopgrad_jax.bench.cli import main
from loopgrad_jax.bench.flops import rnn_flops

__all__ = ["SCENARIOS", "main", "rnn_flops"]
