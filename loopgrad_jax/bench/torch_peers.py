"""PyTorch peers: the same computations, eager, on the same inputs and weights.

``torch`` is imported only inside these functions, and only when installed
(``pip install 'loopgrad_jax[torch]'``). Each peer returns the same outputs as
its JAX case (:mod:`loopgrad_jax.bench.cases`), so the benchmark checks that
both computed the same numbers before it compares their speed.

The peers, as plain PyTorch (``cell(x, h) = tanh(F.linear(cat([x, h], 1), W, b))``,
``step_loss(h, y) = mean((F.linear(h, V, c) - y) ** 2)``):

- ``accumulate``/``eager``: ``total = 0; for i in range(T): total = total + (x*x + i)``,
  then ``total.sum().backward()``.
- ``stack``/``eager``: ``stack([x*x + i for i in range(T)]).sum().backward()``.
- ``rnn_loss``/``eager``: ``for t: h = cell(x[t], h); loss += step_loss(h, y[t])``,
  one ``loss.backward()``.
- ``rnn_loss``/``nn.RNN``: ``torch.nn.RNN(I, H, nonlinearity='tanh')`` (fused
  kernels) over the whole sequence, then a ``Linear`` head; ``weight_ih``,
  ``weight_hh``, ``bias_ih``, ``bias_hh`` are ``W[:, :I]``, ``W[:, I:]``, ``b``
  and zeros.
- ``train_as_written``/``eager``: the article's loop (``zero_grad``, one step,
  ``backward(retain_graph=True)``, ``SGD.step()``) under
  ``torch.autograd.graph.allow_mutation_on_saved_tensors()``, without which it
  raises at step 2. Each step's backward walks the retained graph of every step
  so far: the algorithm of JAX's ``reverse`` method.
- ``train_as_written``/``rtrl``: the algorithm of JAX's ``forward`` method
  (real-time recurrent learning) with ``torch.func``, on the flat weights ``p``::

    S = zeros(B, H, P)                       # dh/dp, every use so far
    for t:
      J_p, J_h = vmap(jacrev(cell_1, argnums=(0, 1)), in_dims=(None, 0, 0))(p, h, x[t])
      S = J_h @ S + J_p                      # batched: (B,H,H) @ (B,H,P) + (B,H,P)
      h = cell(p, h, x[t])
      loss, (g_now, a) = value and grad of step_loss(p, h, y[t]) w.r.t. (p, h)
      p = p - LR * (g_now + einsum("bh,bhp->p", a, S))

  where ``cell_1`` is the cell on one example, ``J_p`` is ``(B, H, P)`` and ``J_h``
  ``(B, H, H)``.
- ``train_tbptt``/``eager``: per window, ``h = h.detach()``, the window's summed
  loss, ``backward()``, ``SGD.step()``.
- ``rnn_loss_hoisted``/``nn.RNN``: the ``rnn_loss`` peer again, timed beside the
  hoisted JAX body (a fused module hoists the input projection too).

With ``--cell`` (``rnn_tanh``, ``rnn_relu``, ``lstm``, ``gru``) and ``--layers L``
the weights are :func:`loopgrad_jax.to_torch` of the JAX case's ``CellParams``,
loaded into the modules by ``load_state_dict``; ``fused`` below is ``nn.RNN``,
``nn.LSTM`` or ``nn.GRU`` (named so in the records), ``stack`` is ``L`` cells
``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell``, layer ``k`` reading layer
``k - 1``'s new ``h``, and ``head`` an ``nn.Linear(H, O)``:

- ``rnn_loss``/``eager``: ``for t: h = stack(x[t], h); loss += step_loss(head(h), y[t])``,
  one ``loss.backward()``: the per-step loop, each step one call of the same
  per-step cell kernel PyTorch's cells run, like-for-like with a JAX loop whose
  body is one step. (Calling the fused module on one step,
  ``fused(x[t:t+1], h)``, computes the same, through the fused module's per-call
  overhead.)
- ``rnn_loss``/``fused`` and ``rnn_loss_hoisted``/``fused``: ``out, _ = fused(x)``
  over the whole sequence (on CPU PyTorch may run oneDNN's RNN kernels), then
  ``((head(out) - y) ** 2).mean(dim=(1, 2)).sum()``.
- ``rnn_module``/``fused``: the fused module alone (``bidirectional=`` as the case's),
  its weights loaded by ``load_state_dict``; with lengths, PyTorch's packed path::

    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    outputs, _ = pad_packed_sequence(fused(packed)[0], total_length=T)
    loss = (outputs ** 2).sum()       # without lengths: outputs, _ = fused(x)

  then ``loss.backward()``; it returns the loss and the module's gradients.
- ``train_as_written``/``eager`` and ``train_tbptt``/``eager``: the article's loops
  above with ``stack`` for ``cell`` and one ``SGD`` over the cells' and the head's
  parameters.
- ``train_as_written``/``rtrl``: the ``rtrl`` loop above on the cell's state as one
  vector per example (``[h_0, c_0, h_1, c_1, ...]`` for an LSTM, the ``h`` of each
  layer otherwise), the cell written out with ``torch.nn.functional`` as PyTorch
  documents its equations.

:func:`saved_bytes` runs a peer once more, counting the bytes autograd keeps for
backward (:class:`SavedBytes`): the PyTorch side of the JAX cases'
``saved_bytes``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.bench.cases import LR, Data, Sizes
from loopgrad_jax.bench.flops import PEER_METHODS

Call = Callable[[], tuple[Any, ...]]


class TorchSetup(NamedTuple):
    """The PyTorch a run uses."""

    version: str
    threads: int  # torch.get_num_threads() after setup
    device: str  # "cpu" or "cuda"


def available() -> bool:
    """Whether PyTorch is installed (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def setup(backend: str, threads: int) -> TorchSetup:
    """Sets PyTorch's intra-op threads; uses CUDA when ``backend`` is ``"gpu"`` and it has it."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # Like for like with JAX's float32 products: PyTorch's cuDNN RNNs (nn.RNN, nn.LSTM,
        # nn.GRU) round to TF32 by default where its plain matmuls do not; follow JAX's
        # jax_default_matmul_precision for both instead.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32_allowed()
    return TorchSetup(torch.__version__, torch.get_num_threads(), device)


def tf32_allowed() -> bool:
    """Whether JAX's float32 matmuls may round to TF32 on a GPU (its default precision)."""
    return jax.config.jax_default_matmul_precision not in ("highest", "float32")


def sync(device: str) -> Callable[[Any], Any]:
    """What ends a timed call: waits for the device's queued work."""
    import torch

    def wait(output: Any) -> Any:
        if device == "cuda":
            torch.cuda.synchronize()
        return output

    return wait


def to_numpy(output: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    """A peer's output as NumPy arrays, for comparison with JAX's."""
    return tuple(np.asarray(t.detach().cpu().numpy()) for t in output)


def build_peer(
    scenario: str,
    peer: str,
    data: Data,
    sizes: Sizes,
    device: str,
    counter: SavedBytes | None = None,
) -> Call:
    """The zero-argument callable that runs ``peer`` of ``scenario`` once.

    With a ``counter``, every call also counts what autograd keeps for backward.
    """
    tensors = _tensors(data, sizes, device)
    if sizes.cell == "article":
        return _PEERS[scenario][peer](tensors, sizes, counter)
    return _CELL_PEERS[scenario][_role(peer, sizes.cell)](tensors, sizes, counter)


def fused_loss(data: Data, sizes: Sizes, device: str) -> Call:
    """The fused module's summed loss alone, under ``torch.no_grad()`` (a cell's, not
    the article's): the forward part of the ``rnn_loss`` peer, for a profile."""
    import torch

    tensors = _tensors(data, sizes, device)
    model = _cell_model(tensors, sizes, fused=True)

    def call():
        with torch.no_grad():
            outputs, _ = model.fused(tensors.inputs)
            return (((model.head(outputs) - tensors.targets) ** 2).mean(dim=(1, 2)).sum(),)

    return call


def _tensors(data: Data, sizes: Sizes, device: str) -> Data:
    """``data`` as tensors on ``device``; a cell's weights as its two state dicts."""
    import torch

    def tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(a, torch.Tensor):  # lg.to_torch's values, with torch installed
            return a.detach().clone().to(device)
        return torch.from_numpy(np.array(a, copy=True)).to(device)

    if sizes.cell == "article":
        params = type(data.params)(*(tensor(p) for p in data.params))
    else:  # the module's and the head's state dicts, PyTorch's key names
        params = tuple(
            {name: tensor(value) for name, value in state.items()}
            for state in lg.to_torch(data.params)
        )
    return Data(
        x=tensor(data.x),
        params=params,
        inputs=tensor(data.inputs),
        targets=tensor(data.targets),
        lengths=None if data.lengths is None else torch.from_numpy(data.lengths),  # CPU, int64
    )


class SavedBytes:
    """The peak bytes of tensors autograd keeps for backward, while :meth:`hooks` is active.

    ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a backward
    formula saves; each is counted by its storage, once however often it is saved
    (a weight saved by every step counts once), from when it is saved until the
    graph that saved it is freed. Inputs and weights saved whole count too.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._bytes = 0
        self._live: dict[tuple, list[int]] = {}  # storage -> [bytes, saved copies alive]

    def hooks(self):
        """The context under which saved tensors are counted."""
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def note(self, nbytes: int) -> None:
        """Counts ``nbytes`` kept by a peer that keeps them itself (no autograd graph)."""
        self.peak = max(self.peak, int(nbytes))

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = (tensor.device.type, storage.data_ptr(), storage.nbytes())
        if key in self._live:
            self._live[key][1] += 1
        else:
            self._live[key] = [storage.nbytes(), 1]
            self._bytes += storage.nbytes()
            self.peak = max(self.peak, self._bytes)
        box = _Saved(tensor)
        weakref.finalize(box, self._release, key)
        return box

    @staticmethod
    def _unpack(box):
        return box.tensor

    def _release(self, key: tuple) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self._bytes -= entry[0]
            del self._live[key]


class _Saved:
    """A saved tensor as autograd holds it; freed with the graph that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor) -> None:
        self.tensor = tensor


def _counting(counter: SavedBytes | None):
    return counter.hooks() if counter is not None else contextlib.nullcontext()


def saved_bytes(
    scenario: str, peer: str, data: Data, sizes: Sizes, device: str
) -> tuple[Call, SavedBytes]:
    """A call of ``peer`` that counts what it keeps for backward, and its counter."""
    counter = SavedBytes()
    return build_peer(scenario, peer, data, sizes, device, counter), counter


def _leaves(params: tuple) -> list:
    """Fresh leaf tensors holding the initial weights (training mutates them)."""
    return [p.detach().clone().requires_grad_() for p in params]


def _rnn_ops() -> tuple[Callable, Callable]:
    """``(cell, step_loss)`` on a list of leaf weights ``[W, b, V, c]``."""
    import torch
    import torch.nn.functional as F

    def cell(w: list, x, hidden):
        return torch.tanh(F.linear(torch.cat([x, hidden], 1), w[0], w[1]))

    def step_loss(w: list, hidden, target):
        return torch.mean((F.linear(hidden, w[2], w[3]) - target) ** 2)

    return cell, step_loss


def _zeros_hidden(d: Data, sizes: Sizes):
    return d.inputs.new_zeros((sizes.batch, sizes.hidden))


def _scalar_eager(stacked: bool) -> Callable[[Data, Sizes, Any], Call]:
    def build(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
        import torch

        def call():
            x = d.x.detach().clone().requires_grad_()
            with _counting(counter):
                if stacked:
                    loss = torch.stack([x * x + i for i in range(sizes.length)]).sum()
                else:
                    total = torch.zeros_like(x)
                    for i in range(sizes.length):
                        total = total + (x * x + i)
                    loss = total.sum()
            loss.backward()
            return loss.detach(), x.grad

        return call

    return build


def _rnn_eager(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    cell, step_loss = _rnn_ops()

    def call():
        w = _leaves(d.params)
        hidden, total = _zeros_hidden(d, sizes), 0.0
        with _counting(counter):
            for t in range(sizes.length):
                hidden = cell(w, d.inputs[t], hidden)
                total = total + step_loss(w, hidden, d.targets[t])
        total.backward()
        return (total.detach(), *(p.grad for p in w))

    return call


def _rnn_fused(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch

    i, h, o = sizes.input, sizes.hidden, sizes.output
    w_i2h, b_i2h, w_h2o, b_h2o = d.params
    device = d.inputs.device
    rnn = torch.nn.RNN(i, h, nonlinearity="tanh").to(device)
    head = torch.nn.Linear(h, o).to(device)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(w_i2h[:, :i])
        rnn.weight_hh_l0.copy_(w_i2h[:, i:])
        rnn.bias_ih_l0.copy_(b_i2h)
        rnn.bias_hh_l0.zero_()
        head.weight.copy_(w_h2o)
        head.bias.copy_(b_h2o)

    def call():
        rnn.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        with _counting(counter):
            outputs, _ = rnn(d.inputs)  # (T, B, H), hidden0 = zeros
            loss = ((head(outputs) - d.targets) ** 2).mean(dim=(1, 2)).sum()
        loss.backward()
        grad_i2h = torch.cat([rnn.weight_ih_l0.grad, rnn.weight_hh_l0.grad], 1)
        return loss.detach(), grad_i2h, rnn.bias_ih_l0.grad, head.weight.grad, head.bias.grad

    return call


def _train_as_written(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch

    cell, step_loss = _rnn_ops()

    def call():
        w = _leaves(d.params)
        optimizer = torch.optim.SGD(w, lr=LR)
        hidden, losses = _zeros_hidden(d, sizes), []
        with torch.autograd.graph.allow_mutation_on_saved_tensors() as context:
            for t in range(sizes.length):
                optimizer.zero_grad()
                hidden = cell(w, d.inputs[t], hidden)
                loss = step_loss(w, hidden, d.targets[t])
                loss.backward(retain_graph=True)
                optimizer.step()
                losses.append(loss.detach())
            if counter is not None:  # the retained graph only grows: its end is its peak
                counter.note(_retained_bytes(context))
        return (torch.stack(losses), *(p.detach() for p in w))

    return call


def _retained_bytes(context) -> int:
    """Bytes the retained graph keeps under ``allow_mutation_on_saved_tensors``.

    That context saves tensors through its own ``saved_tensors_hooks`` (which take
    the place of :class:`SavedBytes`'s) and holds them in the object it returns: the
    saved originals and the copies it made of those the optimizer then updated in
    place. Counted by storage, once each. 0 if this PyTorch keeps them elsewhere.
    """
    tensors = [
        *getattr(context, "original", {}).values(),
        *getattr(context, "cloned", {}).values(),
    ]
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _train_rtrl(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch
    import torch.nn.functional as F
    from torch.func import jacrev, vmap

    cell, step_loss = _rnn_ops()
    shapes = [p.shape for p in d.params]
    counts = [p.numel() for p in d.params]

    def unflatten(flat) -> list:
        return [part.view(shape) for part, shape in zip(flat.split(counts), shapes, strict=True)]

    def cell_1(flat, hidden, x):  # one example: hidden (H,), x (I,)
        w = unflatten(flat)
        return torch.tanh(F.linear(torch.cat([x, hidden]), w[0], w[1]))

    jacobians = vmap(jacrev(cell_1, argnums=(0, 1)), in_dims=(None, 0, 0))

    def call():
        flat = torch.cat([p.reshape(-1) for p in d.params])
        hidden = _zeros_hidden(d, sizes)
        sens = hidden.new_zeros((*hidden.shape, flat.numel()))  # S = dh/dp: (B, H, P)
        losses = []
        for t in range(sizes.length):
            j_p, j_h = jacobians(flat, hidden, d.inputs[t])  # (B, H, P), (B, H, H)
            sens = torch.baddbmm(j_p, j_h, sens)
            hidden = cell(unflatten(flat), d.inputs[t], hidden)
            p = flat.detach().requires_grad_()
            h = hidden.detach().requires_grad_()
            loss = step_loss(unflatten(p), h, d.targets[t])
            grad_now, adjoint = torch.autograd.grad(loss, (p, h))
            flat = flat - LR * (grad_now + torch.einsum("bh,bhp->p", adjoint, sens))
            losses.append(loss.detach())
            if counter is not None:  # no graph outlives a step; S is what it keeps
                counter.note(sens.nbytes)
        return (torch.stack(losses), *unflatten(flat))

    return call


def _train_tbptt(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch

    cell, step_loss = _rnn_ops()

    def call():
        w = _leaves(d.params)
        optimizer = torch.optim.SGD(w, lr=LR)
        hidden, losses = _zeros_hidden(d, sizes), []
        for start in range(0, sizes.length, sizes.window):
            hidden = hidden.detach()
            optimizer.zero_grad()
            total = 0.0
            with _counting(counter):
                for t in range(start, min(start + sizes.window, sizes.length)):
                    hidden = cell(w, d.inputs[t], hidden)
                    loss = step_loss(w, hidden, d.targets[t])
                    losses.append(loss.detach())
                    total = total + loss
            total.backward()
            optimizer.step()
        return (torch.stack(losses), *(p.detach() for p in w))

    return call


# ------------------------------------------------------------------- torch.nn cells


_LAYER_FIELDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def fused_name(cell: str) -> str:
    """The fused module a cell's records name: ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``."""
    return {"lstm": "nn.LSTM", "gru": "nn.GRU"}.get(cell, "nn.RNN")


def _role(peer: str, cell: str) -> str:
    """``"fused"`` for the cell's fused module, else the peer's name."""
    return "fused" if peer == fused_name(cell) else peer


def _cell_class(cell: str):
    import torch

    if cell in ("rnn_tanh", "rnn_relu"):
        return lambda i, h: torch.nn.RNNCell(i, h, nonlinearity=cell[4:])
    return {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[cell]


def _fused_module(sizes: Sizes):
    import torch

    options = {
        "num_layers": sizes.layers,
        "bias": True,
        "batch_first": False,
        "bidirectional": sizes.bidirectional,
    }
    if sizes.cell in ("rnn_tanh", "rnn_relu"):
        return torch.nn.RNN(sizes.input, sizes.hidden, nonlinearity=sizes.cell[4:], **options)
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[sizes.cell]
    return module(sizes.input, sizes.hidden, **options)


class _CellModel(NamedTuple):
    """A peer's modules, loaded with the case's weights; ``params`` in PyTorch's order."""

    cells: list  # the per-step stack (eager peers), or [] for the fused module
    fused: Any  # nn.RNN / nn.LSTM / nn.GRU, or None
    head: Any  # nn.Linear(H, O)
    params: list  # every layer's weight_ih, weight_hh, bias_ih, bias_hh; the head's
    initial: list  # their initial values (training peers start each call from them)


def _cell_model(d: Data, sizes: Sizes, fused: bool) -> _CellModel:
    import torch

    rnn_state, head_state = d.params
    device = d.inputs.device
    head = torch.nn.Linear(sizes.hidden, sizes.output).to(device)
    head.load_state_dict(head_state)
    if fused:
        module = _fused_module(sizes).to(device)
        module.load_state_dict(rnn_state)
        cells, rnn_params = [], list(module.parameters())
    else:
        module, make = None, _cell_class(sizes.cell)
        cells = []
        for k in range(sizes.layers):
            cell = make(sizes.input if k == 0 else sizes.hidden, sizes.hidden).to(device)
            cell.load_state_dict(
                {
                    f: rnn_state[f"{f}_l{k}"]
                    for f in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                }
            )
            cells.append(cell)
        rnn_params = [p for cell in cells for p in cell.parameters()]
    params = rnn_params + list(head.parameters())
    return _CellModel(cells, module, head, params, [p.detach().clone() for p in params])


def _reset(model: _CellModel) -> None:
    """Puts the initial weights back and drops the gradients."""
    import torch

    with torch.no_grad():
        for p, value in zip(model.params, model.initial, strict=True):
            p.copy_(value)
            p.grad = None


def _zero_state(d: Data, sizes: Sizes) -> list:
    """Every layer's initial state: ``h``, or ``(h, c)`` for an LSTM."""
    zeros = _zeros_hidden(d, sizes)
    return [(zeros, zeros) if sizes.cell == "lstm" else zeros for _ in range(sizes.layers)]


def _stack_step(model: _CellModel, state: list, x) -> tuple[list, Any]:
    """One step of every layer: the new states and the last layer's ``h``."""
    new = []
    for cell, layer_state in zip(model.cells, state, strict=True):
        layer_state = cell(x, layer_state)
        x = layer_state[0] if isinstance(layer_state, tuple) else layer_state
        new.append(layer_state)
    return new, x


def _head_loss(model: _CellModel, h, target):
    import torch

    return torch.mean((model.head(h) - target) ** 2)


def _detached(state: list) -> list:
    return [
        tuple(s.detach() for s in layer) if isinstance(layer, tuple) else layer.detach()
        for layer in state
    ]


def _cell_eager(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    model = _cell_model(d, sizes, fused=False)

    def call():
        for p in model.params:
            p.grad = None
        state, total = _zero_state(d, sizes), 0.0
        with _counting(counter):
            for t in range(sizes.length):
                state, h = _stack_step(model, state, d.inputs[t])
                total = total + _head_loss(model, h, d.targets[t])
        total.backward()
        return (total.detach(), *(p.grad for p in model.params))

    return call


def _cell_fused(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    model = _cell_model(d, sizes, fused=True)

    def call():
        for p in model.params:
            p.grad = None
        with _counting(counter):
            outputs, _ = model.fused(d.inputs)  # (T, B, H), zero initial state
            loss = ((model.head(outputs) - d.targets) ** 2).mean(dim=(1, 2)).sum()
        loss.backward()
        return (loss.detach(), *(p.grad for p in model.params))

    return call


def _cell_module(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    module = _fused_module(sizes).to(d.inputs.device)
    module.load_state_dict(d.params[0])
    params = list(module.parameters())

    def call():
        for p in params:
            p.grad = None
        with _counting(counter):
            if d.lengths is None:
                outputs, _ = module(d.inputs)
            else:
                packed = pack_padded_sequence(d.inputs, d.lengths, enforce_sorted=False)
                outputs, _ = pad_packed_sequence(module(packed)[0], total_length=sizes.length)
            loss = (outputs**2).sum()
        loss.backward()
        return (loss.detach(), *(p.grad for p in params))

    return call


def _cell_as_written(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch

    model = _cell_model(d, sizes, fused=False)

    def call():
        _reset(model)
        optimizer = torch.optim.SGD(model.params, lr=LR)
        state, losses = _zero_state(d, sizes), []
        with torch.autograd.graph.allow_mutation_on_saved_tensors() as context:
            for t in range(sizes.length):
                optimizer.zero_grad()
                state, h = _stack_step(model, state, d.inputs[t])
                loss = _head_loss(model, h, d.targets[t])
                loss.backward(retain_graph=True)
                optimizer.step()
                losses.append(loss.detach())
            if counter is not None:  # the retained graph only grows: its end is its peak
                counter.note(_retained_bytes(context))
        return (torch.stack(losses), *(p.detach().clone() for p in model.params))

    return call


def _cell_tbptt(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch

    model = _cell_model(d, sizes, fused=False)

    def call():
        _reset(model)
        optimizer = torch.optim.SGD(model.params, lr=LR)
        state, losses = _zero_state(d, sizes), []
        for start in range(0, sizes.length, sizes.window):
            state = _detached(state)
            optimizer.zero_grad()
            total = 0.0
            with _counting(counter):
                for t in range(start, min(start + sizes.window, sizes.length)):
                    state, h = _stack_step(model, state, d.inputs[t])
                    loss = _head_loss(model, h, d.targets[t])
                    losses.append(loss.detach())
                    total = total + loss
            total.backward()
            optimizer.step()
        return (torch.stack(losses), *(p.detach().clone() for p in model.params))

    return call


def _cell_math(kind: str, weights: list, state: Any, x) -> tuple[Any, Any]:
    """One layer's step as PyTorch documents it: ``(new state, new h)``; any leading axes."""
    import torch
    import torch.nn.functional as F

    w_ih, w_hh, b_ih, b_hh = weights
    h = state[0] if kind == "lstm" else state
    gi, gh = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    if kind == "lstm":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h, c), h
    if kind == "gru":
        xr, xz, xn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        h = (1 - z) * torch.tanh(xn + r * hn) + z * h
        return h, h
    h = (torch.tanh if kind == "rnn_tanh" else torch.relu)(gi + gh)
    return h, h


def _cell_rtrl(d: Data, sizes: Sizes, counter: SavedBytes | None = None) -> Call:
    import torch
    import torch.nn.functional as F
    from torch.func import jacrev, vmap

    kind, layers, hidden = sizes.cell, sizes.layers, sizes.hidden
    rnn_state, head_state = d.params
    initial = [*rnn_state.values(), *head_state.values()]  # PyTorch's order
    shapes, counts = [p.shape for p in initial], [p.numel() for p in initial]
    width = 2 * hidden if kind == "lstm" else hidden  # one layer's share of the state

    def unflatten(flat) -> list:
        return [part.view(shape) for part, shape in zip(flat.split(counts), shapes, strict=True)]

    def layer_state(s, k: int):
        part = s[..., k * width : (k + 1) * width]
        return (part[..., :hidden], part[..., hidden:]) if kind == "lstm" else part

    def step(flat, s, x):  # the whole stack on the state vector s (..., L * width)
        weights, new = unflatten(flat), []
        for k in range(layers):
            state, x = _cell_math(kind, weights[4 * k : 4 * k + 4], layer_state(s, k), x)
            new.extend(state if kind == "lstm" else (state,))
        return torch.cat(new, dim=-1)

    def step_loss(flat, s, target):
        weights = unflatten(flat)
        last = s[..., (layers - 1) * width : (layers - 1) * width + hidden]
        return torch.mean((F.linear(last, weights[-2], weights[-1]) - target) ** 2)

    jacobians = vmap(jacrev(step, argnums=(0, 1)), in_dims=(None, 0, 0))

    def call():
        flat = torch.cat([p.reshape(-1) for p in initial])
        s = d.inputs.new_zeros((sizes.batch, layers * width))
        sens = s.new_zeros((*s.shape, flat.numel()))  # S = ds/dp: (B, N, P)
        losses = []
        for t in range(sizes.length):
            j_p, j_s = jacobians(flat, s, d.inputs[t])  # (B, N, P), (B, N, N)
            sens = torch.baddbmm(j_p, j_s, sens)
            s = step(flat, s, d.inputs[t])
            p = flat.detach().requires_grad_()
            s_leaf = s.detach().requires_grad_()
            loss = step_loss(p, s_leaf, d.targets[t])
            grad_now, adjoint = torch.autograd.grad(loss, (p, s_leaf))
            flat = flat - LR * (grad_now + torch.einsum("bn,bnp->p", adjoint, sens))
            losses.append(loss.detach())
            if counter is not None:  # no graph outlives a step; S is what it keeps
                counter.note(sens.nbytes)
        return (torch.stack(losses), *unflatten(flat))

    return call


_PEERS: dict[str, dict[str, Callable[[Data, Sizes, Any], Call]]] = {
    "accumulate": {"eager": _scalar_eager(stacked=False)},
    "stack": {"eager": _scalar_eager(stacked=True)},
    "rnn_loss": {"eager": _rnn_eager, "nn.RNN": _rnn_fused},
    # The fused module hoists the input projection too: timed beside the hoisted body.
    "rnn_loss_hoisted": {"nn.RNN": _rnn_fused},
    "train_as_written": {"eager": _train_as_written, "rtrl": _train_rtrl},
    "train_tbptt": {"eager": _train_tbptt},
    "rnn_module": {},  # lg.rnn has no article cell
}

#: The RNN scenarios' peers for a cell of ``--cell`` (``"fused"``: :func:`fused_name`).
_CELL_PEERS: dict[str, dict[str, Callable[[Data, Sizes, Any], Call]]] = {
    "rnn_loss": {"eager": _cell_eager, "fused": _cell_fused},
    "rnn_loss_hoisted": {"fused": _cell_fused},
    "train_as_written": {"eager": _cell_as_written, "rtrl": _cell_rtrl},
    "train_tbptt": {"eager": _cell_tbptt},
    "rnn_module": {"fused": _cell_module},
}

#: Scenario -> the names of its PyTorch peers, for the article's cell.
PEERS: dict[str, tuple[str, ...]] = {s: tuple(p) for s, p in _PEERS.items()}


def peers(scenario: str, cell: str = "article") -> tuple[str, ...]:
    """The names of ``scenario``'s PyTorch peers for ``cell`` (one of ``lg.CELLS``).

    Examples:
      >>> peers("rnn_loss"), peers("rnn_loss", "lstm"), peers("rnn_loss_hoisted", "gru")
      (('eager', 'nn.RNN'), ('eager', 'nn.LSTM'), ('nn.GRU',))
    """
    if cell == "article" or scenario not in _CELL_PEERS:
        return PEERS[scenario]
    return tuple(fused_name(cell) if p == "fused" else p for p in _CELL_PEERS[scenario])


def peer_method(scenario: str, peer: str) -> str | None:
    """The JAX as-written method whose algorithm ``peer`` runs (``None`` elsewhere, and
    for a peer that runs neither)."""
    return PEER_METHODS.get(peer) if scenario == "train_as_written" else None
