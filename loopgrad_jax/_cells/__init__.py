"""PyTorch's recurrent modules as cells: ``nn.RNN`` (tanh, relu), ``nn.LSTM``, ``nn.GRU``.

One module per concern:

- :mod:`.kinds`: the registry of kinds (names, gates, PyTorch modules).
- :mod:`.params`: :class:`CellParams` and :class:`LayerParams`, their checks, the
  hidden state's layouts, :func:`init_cell`.
- :mod:`.equations`: one step of each kind, the only copy of the cell equations,
  shared by every loop kind, direction and mode.
- :mod:`.layers`: every layer over the whole sequence in turn (``hoist_input``), and
  the module's forward: both directions, packed lengths, dropout between layers.
- :mod:`.cudnn`: ``loop="cudnn"``, an LSTM module through ``jax.experimental.rnn``'s
  cuDNN kernel (the weights packed into its flat layout).
- :mod:`.module`: the module's call, :func:`rnn`: layouts, lengths, directions.
- :mod:`.torch_io`: :func:`from_torch` and :func:`to_torch`.
"""

from loopgrad_jax._cells.equations import (
    TORCH_CELL,
    JoinedLayer,
    article_layer_form,
    article_loop_form,
    layer_step,
    loop_form,
    rows_product,
    torch_project,
    torch_readout,
    torch_step,
    torch_step_projected,
)
from loopgrad_jax._cells.kinds import CELLS, GATES, TORCH_CELLS
from loopgrad_jax._cells.layers import hoisted_forward, module_forward
from loopgrad_jax._cells.module import bind_module, rnn
from loopgrad_jax._cells.params import (
    CellParams,
    LayerParams,
    bind_precision,
    carry_per_example,
    check_hidden0,
    check_params,
    init_cell,
    set_precision,
    to_carry,
    to_public,
)
from loopgrad_jax._cells.torch_io import from_torch, to_torch

__all__ = [
    "CELLS",
    "GATES",
    "TORCH_CELL",
    "TORCH_CELLS",
    "CellParams",
    "JoinedLayer",
    "LayerParams",
    "article_layer_form",
    "article_loop_form",
    "bind_module",
    "bind_precision",
    "carry_per_example",
    "check_hidden0",
    "check_params",
    "from_torch",
    "hoisted_forward",
    "init_cell",
    "layer_step",
    "loop_form",
    "rows_product",
    "module_forward",
    "rnn",
    "set_precision",
    "to_carry",
    "to_public",
    "to_torch",
    "torch_project",
    "torch_readout",
    "torch_step",
    "torch_step_projected",
]
