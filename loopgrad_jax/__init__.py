"""loopgrad_jax: how gradients flow through loops, in JAX, proven against PyTorch.

The article's three scenarios, each written once and run by any loop primitive
in :data:`LOOPS` (a Python ``for`` under ``jax.jit``, ``lax.scan``,
``lax.fori_loop``).
"""

from loopgrad_jax._as_written import METHODS as AS_WRITTEN_METHODS
from loopgrad_jax._as_written import Cost, as_written_cost
from loopgrad_jax._cell import Cell
from loopgrad_jax._cells import (
    CELLS,
    CellParams,
    LayerParams,
    from_torch,
    init_cell,
    rnn,
    to_torch,
)
from loopgrad_jax._deer import ParallelScanInfo, parallel_scan_info
from loopgrad_jax._loops import (
    FUSED_LOOPS,
    LOOPS,
    NNX_LOOPS,
    POLICIES,
    REVERSE_LOOPS,
    Loop,
    run_loop,
)
from loopgrad_jax._optimizers import TORCH_OPTIMIZERS, torch_optimizer
from loopgrad_jax._precision import PRECISIONS, Precision
from loopgrad_jax._result import KEEP_GRADS, TrainResult
from loopgrad_jax._revolve import checkpointed_evaluations
from loopgrad_jax._rnn import RNNParams, RNNSizes, init_rnn, rnn_cell, step_loss
from loopgrad_jax._scalar import accumulate_loss, stack_loss
from loopgrad_jax._sequence import rnn_loss
from loopgrad_jax._train import MODES, train_rnn
from loopgrad_jax.check_torch import TorchParity, check_against_torch

__version__ = "0.1.0"

#: What needs Flax (``pip install loopgrad_jax[flax]``): imported on first use, so that
#: the rest of the library runs without it (and left out of ``__all__``, so that
#: ``from loopgrad_jax import *`` does too).
_FLAX_NAMES = ("FlaxRNN", "TorchCell", "flax_loss", "flax_train", "from_flax", "to_flax")


def __getattr__(name: str):
    if name in _FLAX_NAMES:
        try:
            from loopgrad_jax import _flax
        except ImportError as err:
            raise ImportError(
                f"loopgrad_jax.{name} needs Flax: pip install 'loopgrad_jax[flax]' ({err})."
            ) from err
        return getattr(_flax, name)
    raise AttributeError(f"module 'loopgrad_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FLAX_NAMES])


__all__ = [
    "AS_WRITTEN_METHODS",
    "CELLS",
    "Cell",
    "CellParams",
    "LayerParams",
    "FUSED_LOOPS",
    "LOOPS",
    "NNX_LOOPS",
    "POLICIES",
    "PRECISIONS",
    "Precision",
    "REVERSE_LOOPS",
    "Loop",
    "ParallelScanInfo",
    "MODES",
    "Cost",
    "KEEP_GRADS",
    "RNNParams",
    "RNNSizes",
    "TORCH_OPTIMIZERS",
    "TorchParity",
    "TrainResult",
    "accumulate_loss",
    "as_written_cost",
    "check_against_torch",
    "checkpointed_evaluations",
    "from_torch",
    "init_cell",
    "init_rnn",
    "parallel_scan_info",
    "rnn",
    "rnn_cell",
    "rnn_loss",
    "run_loop",
    "stack_loss",
    "step_loss",
    "to_torch",
    "torch_optimizer",
    "train_rnn",
]
