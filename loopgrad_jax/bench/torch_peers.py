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
  raises at step 2.
- ``train_tbptt``/``eager``: per window, ``h = h.detach()``, the window's summed
  loss, ``backward()``, ``SGD.step()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from loopgrad_jax.bench.cases import LR, Data, Sizes

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
    return TorchSetup(torch.__version__, torch.get_num_threads(), device)


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


def build_peer(scenario: str, peer: str, data: Data, sizes: Sizes, device: str) -> Call:
    """The zero-argument callable that runs ``peer`` of ``scenario`` once."""
    import torch

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True)).to(device)

    tensors = Data(
        x=tensor(data.x),
        params=type(data.params)(*(tensor(p) for p in data.params)),
        inputs=tensor(data.inputs),
        targets=tensor(data.targets),
    )
    return _PEERS[scenario][peer](tensors, sizes)


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


def _scalar_eager(stacked: bool) -> Callable[[Data, Sizes], Call]:
    def build(d: Data, sizes: Sizes) -> Call:
        import torch

        def call():
            x = d.x.detach().clone().requires_grad_()
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


def _rnn_eager(d: Data, sizes: Sizes) -> Call:
    cell, step_loss = _rnn_ops()

    def call():
        w = _leaves(d.params)
        hidden, total = _zeros_hidden(d, sizes), 0.0
        for t in range(sizes.length):
            hidden = cell(w, d.inputs[t], hidden)
            total = total + step_loss(w, hidden, d.targets[t])
        total.backward()
        return (total.detach(), *(p.grad for p in w))

    return call


def _rnn_fused(d: Data, sizes: Sizes) -> Call:
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
        outputs, _ = rnn(d.inputs)  # (T, B, H), hidden0 = zeros
        loss = ((head(outputs) - d.targets) ** 2).mean(dim=(1, 2)).sum()
        loss.backward()
        grad_i2h = torch.cat([rnn.weight_ih_l0.grad, rnn.weight_hh_l0.grad], 1)
        return loss.detach(), grad_i2h, rnn.bias_ih_l0.grad, head.weight.grad, head.bias.grad

    return call


def _train_as_written(d: Data, sizes: Sizes) -> Call:
    import torch

    cell, step_loss = _rnn_ops()

    def call():
        w = _leaves(d.params)
        optimizer = torch.optim.SGD(w, lr=LR)
        hidden, losses = _zeros_hidden(d, sizes), []
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            for t in range(sizes.length):
                optimizer.zero_grad()
                hidden = cell(w, d.inputs[t], hidden)
                loss = step_loss(w, hidden, d.targets[t])
                loss.backward(retain_graph=True)
                optimizer.step()
                losses.append(loss.detach())
        return (torch.stack(losses), *(p.detach() for p in w))

    return call


def _train_tbptt(d: Data, sizes: Sizes) -> Call:
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
            for t in range(start, min(start + sizes.window, sizes.length)):
                hidden = cell(w, d.inputs[t], hidden)
                loss = step_loss(w, hidden, d.targets[t])
                losses.append(loss.detach())
                total = total + loss
            total.backward()
            optimizer.step()
        return (torch.stack(losses), *(p.detach() for p in w))

    return call


_PEERS: dict[str, dict[str, Callable[[Data, Sizes], Call]]] = {
    "accumulate": {"eager": _scalar_eager(stacked=False)},
    "stack": {"eager": _scalar_eager(stacked=True)},
    "rnn_loss": {"eager": _rnn_eager, "nn.RNN": _rnn_fused},
    "rnn_loss_hoisted": {},  # the same computation as rnn_loss: its peers are there
    "train_as_written": {"eager": _train_as_written},
    "train_tbptt": {"eager": _train_tbptt},
}

#: Scenario -> the names of its PyTorch peers.
PEERS: dict[str, tuple[str, ...]] = {s: tuple(p) for s, p in _PEERS.items()}
