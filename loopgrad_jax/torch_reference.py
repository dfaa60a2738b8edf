"""PyTorch reference values for every scenario, written as fixtures.

Run it as one command (it needs ``pip install "loopgrad_jax[torch]"``)::

  python -m loopgrad_jax.torch_reference --out loopgrad_jax/fixture_data

That folder is the package's own (:data:`loopgrad_jax.fixtures.SHIPPED`): the fixtures
ship with it, so ``loopgrad-parity`` can check an installed copy against them.

Each scenario runs in plain PyTorch, the way the article writes it, on the
article's own sizes and on others (vector ``x``, ``n`` of 0, 1 and more, batch
and output above 1, windows of 1, 3 and ``T``, and a long sequence where
float32 rounding accumulates), in float32 and float64. One file per scenario
and dtype; :mod:`loopgrad_jax.fixtures` describes the format.

The article's training loop, run literally, raises; ``article_literal_*.json``
records the exception and the step where it was raised. The as-written
reference runs the same loop under
``torch.autograd.graph.allow_mutation_on_saved_tensors()``.

The ``cell_*`` scenarios run the same three computations (one ``backward()`` of
the summed loss, the article's loop as written, truncated BPTT) with PyTorch's
own recurrent modules instead of the article's ``SimpleRNN``: ``nn.RNN`` (tanh
and relu), ``nn.LSTM`` and ``nn.GRU``, time-major, one layer from a zero state
(``hx=None``) and two layers from a random one, each with an ``nn.Linear`` head
on the last layer's output. One optimizer updates the module and the head.
``cell_loss`` runs both again with modules built with ``bias=False`` (``*_nobias``).

The ``module`` scenario is the modules' own forward with every option, no head: for
each kind, bidirectional modules of 1 to 3 layers, packed batches of unsorted
lengths (1 and ``T`` among them), ``batch_first``, ``bias=False``, unbatched inputs
and an LSTM's ``proj_size``; and ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell``
looped over the steps in Python. Each case records the outputs, the final states and
the gradients (weights, inputs, ``hidden0``) of a probe of random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from loopgrad_jax.fixtures import fixture_path, write_fixture

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

SEED = 0
DTYPES = ("float32", "float64")
PARAM_NAMES = {
    "i2h.weight": "i2h_weight",
    "i2h.bias": "i2h_bias",
    "h2o.weight": "h2o_weight",
    "h2o.bias": "h2o_bias",
}

# name, x shape, n; "article" runs the article's literal code.
SCALAR_CASES = (
    ("article", (1,), 3),
    ("scalar_n5", (), 5),
    ("vector_n0", (4,), 0),
    ("vector_n1", (4,), 1),
    ("matrix_n100", (2, 3), 100),
)

# name: (input, hidden, output, batch, T, random hidden0)
RNN_SIZES = {
    "article": (10, 5, 1, 1, 10, False),
    "batch": (3, 4, 2, 3, 7, True),
    "long": (10, 5, 1, 1, 200, False),
}
# torch.optim optimizers beyond plain SGD: name -> (class name, keyword arguments).
OPTIMIZERS = {
    "momentum": ("sgd", {"lr": 0.01, "momentum": 0.9}),
    "nesterov": ("sgd", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    "adam": ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
    "adamw": ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
}


def _sgd(lr: float) -> dict[str, Any]:
    return {"name": "sgd", "lr": lr}


def _named(key: str) -> dict[str, Any]:
    name, kwargs = OPTIMIZERS[key]
    return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


# name, sizes, optimizer (and window for tbptt)
AS_WRITTEN_CASES = (
    ("article", "article", _sgd(0.01)),
    ("batch", "batch", _sgd(0.05)),
    ("long", "long", _sgd(0.01)),
    *((f"article_{k}", "article", _named(k)) for k in OPTIMIZERS),
)
# The as-written loop continued by a second run from step `resume_at`: a new graph starts
# there (hidden detached, weights and optimizer state kept), as a second call would.
RESUMED_CASES = (("article_momentum_resumed", "article", _named("momentum"), 6),)
TBPTT_CASES = (
    ("article_w1", "article", _sgd(0.01), 1),
    ("article_w3", "article", _sgd(0.01), 3),
    ("article_wT", "article", _sgd(0.01), 10),
    ("batch_w3", "batch", _sgd(0.05), 3),
    ("long_w10", "long", _sgd(0.01), 10),
    *((f"article_w3_{k}", "article", _named(k), 3) for k in OPTIMIZERS),
)


# torch.nn recurrent modules (time-major, unidirectional) with an nn.Linear head.
CELL_KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
# input, hidden, output, batch, T
CELL_SIZES = (3, 4, 2, 2, 5)
# name: (num_layers, random hidden0, bias); without hidden0 the module is called with
# hx=None; bias=False builds the module without its layers' biases (the head keeps its).
CELL_CONFIGS = {
    "l1": (1, False, True),
    "l2h": (2, True, True),
    "l1_nobias": (1, False, False),
    "l2h_nobias": (2, True, False),
}
# name, kind, configuration (and optimizer, and window for tbptt). The modules without
# biases come after the others, so that each case keeps its seed (the base seed plus its
# index).
CELL_LOSS_CASES = tuple(
    (f"{kind}_{c}", kind, c)
    for configs in (("l1", "l2h"), ("l1_nobias", "l2h_nobias"))
    for kind in CELL_KINDS
    for c in configs
)
CELL_AS_WRITTEN_CASES = tuple(
    case
    for kind in CELL_KINDS
    for case in (
        (f"{kind}_l1", kind, "l1", _sgd(0.05)),
        (f"{kind}_l2h_momentum", kind, "l2h", _named("momentum")),
    )
)
CELL_TBPTT_CASES = tuple(
    case
    for kind in CELL_KINDS
    for case in (
        (f"{kind}_l1_w2", kind, "l1", _sgd(0.05), 2),
        (f"{kind}_l2h_w3_adam", kind, "l2h", _named("adam"), 3),
    )
)


def torch_optim(spec: dict[str, Any], params: Any) -> Any:
    """``torch.optim.<spec["name"]>(params, **rest of spec)``."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "name"}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return cls[spec["name"]](params, **kwargs)


def _require_torch() -> None:
    if torch is None:
        raise SystemExit(
            "loopgrad_jax.torch_reference needs PyTorch: pip install 'loopgrad_jax[torch]'."
        )


def simple_rnn(input_size: int, hidden_size: int, output_size: int) -> Any:
    """The article's ``SimpleRNN``, with ``h2o``'s width as a parameter."""

    class SimpleRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden_size = hidden_size
            self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
            self.h2o = nn.Linear(hidden_size, output_size)

        def forward(self, input, hidden):
            combined = torch.cat((input, hidden), 1)
            hidden = torch.tanh(self.i2h(combined))
            output = self.h2o(hidden)
            return output, hidden

    return SimpleRNN()


@contextlib.contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    """Makes every tensor and module created inside have ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------- scenarios 1, 2


def article_accumulate() -> tuple[Any, Any, float]:
    """The article's first example, verbatim but for returning instead of printing."""
    x = torch.tensor([2.0], requires_grad=True)
    total_loss = 0
    for i in range(3):
        y = x * x + i
        total_loss += y
    total_loss.backward()
    return x.detach(), x.grad, total_loss.item()


def article_stack() -> tuple[Any, Any, float]:
    """The article's second example, verbatim but for returning instead of printing."""
    x = torch.tensor([2.0], requires_grad=True)
    all_y = []
    for i in range(3):
        y = x * x + torch.tensor(float(i))
        all_y.append(y)
    total_loss = torch.stack(all_y).sum()
    total_loss.backward()
    return x.detach(), x.grad, total_loss.item()


def accumulate(x: Any, n: int) -> Any:
    """Scenario 1 for any ``x`` and ``n``: a running total, then ``sum()``."""
    total = torch.zeros_like(x)
    for i in range(n):
        total = total + (x * x + i)
    return total.sum()


def stack(x: Any, n: int) -> Any:
    """Scenario 2 for any ``x`` and ``n``; the empty sum is 0."""
    ys = [x * x + i for i in range(n)]
    return torch.stack(ys).sum() if ys else torch.zeros((), dtype=x.dtype)


def _gradient_of(fn: Callable[[Any, int], Any], x: Any, n: int) -> tuple[Any, float]:
    x = x.clone().requires_grad_(True)
    loss = fn(x, n)
    if loss.requires_grad:
        loss.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)  # n == 0: no use of x
    return grad, loss.item()


def scalar_cases(scenario: str, seed: int) -> list[dict[str, Any]]:
    """Every case of ``accumulate`` or ``stack`` in the current default dtype."""
    general = {"accumulate": accumulate, "stack": stack}[scenario]
    article = {"accumulate": article_accumulate, "stack": article_stack}[scenario]
    cases = []
    for k, (name, shape, n) in enumerate(SCALAR_CASES):
        if name == "article":
            x, grad, loss = article()
            code = "article"
        else:
            torch.manual_seed(seed + k)
            x = torch.randn(shape)
            grad, loss = _gradient_of(general, x, n)
            code = "general"
        cases.append(
            {
                "name": name,
                "code": code,
                "seed": seed + k,
                "n": n,
                "x": x,
                "loss": loss,
                "grad": grad,
            }
        )
    return cases


# ---------------------------------------------------------------- scenario 3


def _rnn_problem(sizes: str, seed: int) -> dict[str, Any]:
    i, h, o, b, t, random_hidden = RNN_SIZES[sizes]
    torch.manual_seed(seed)
    model = simple_rnn(i, h, o)
    inputs = torch.randn(t, b, i)
    targets = torch.randn(t, b, o)
    hidden0 = torch.randn(b, h) if random_hidden else torch.zeros(b, h)
    return {"model": model, "inputs": inputs, "targets": targets, "hidden0": hidden0}


def _params(model: Any) -> dict[str, Any]:
    return {PARAM_NAMES[k]: v.detach().clone() for k, v in model.named_parameters()}


def _grads(model: Any) -> dict[str, Any]:
    return {PARAM_NAMES[k]: v.grad.detach().clone() for k, v in model.named_parameters()}


def _step_loss(output: Any, target: Any) -> Any:
    return torch.mean((output - target) ** 2)


def _stacked(per_update: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([g[k] for g in per_update]) for k in per_update[0]}


def rnn_loss_cases(seed: int) -> list[dict[str, Any]]:
    """One ``backward()`` of the summed loss over the whole sequence."""
    cases = []
    for k, sizes in enumerate(RNN_SIZES):
        problem = _rnn_problem(sizes, seed + k)
        model, inputs, targets = problem["model"], problem["inputs"], problem["targets"]
        initial = _params(model)
        hidden, total = problem["hidden0"], 0
        for t in range(inputs.shape[0]):
            output, hidden = model(inputs[t], hidden)
            total = total + _step_loss(output, targets[t])
        total.backward()
        cases.append(
            {
                "name": sizes,
                "seed": seed + k,
                "params": initial,
                "inputs": inputs,
                "targets": targets,
                "hidden0": problem["hidden0"],
                "loss": total.item(),
                "grads": _grads(model),
                "hidden": hidden.detach(),
            }
        )
    return cases


def _training_record(
    name, seed, spec, problem, initial, losses, grads, hidden, **options
) -> dict[str, Any]:
    """What a training fixture case holds: the problem, and every update's results.

    ``options`` (a tbptt ``window``) follow the optimizer, where the fixtures hold them.
    """
    return {
        "name": name,
        "seed": seed,
        "optimizer": spec,
        **options,
        "params": initial,
        "inputs": problem["inputs"],
        "targets": problem["targets"],
        "hidden0": problem["hidden0"],
        "losses": torch.tensor(losses),
        "grads": _stacked(grads),
        "final_params": _params(problem["model"]),
        "hidden": hidden.detach(),
    }


def as_written_cases(seed: int, skip: Collection[str] = ()) -> list[dict[str, Any]]:
    """The article's loop, run under ``allow_mutation_on_saved_tensors``.

    Cases named in ``skip`` are left out (the others keep their seeds).
    """
    cases = []
    resumed = [(*case, None) for case in AS_WRITTEN_CASES] + list(RESUMED_CASES)
    for k, (name, sizes, spec, resume_at) in enumerate(resumed):
        if name in skip:
            continue
        problem = _rnn_problem(sizes, seed + k)
        model, inputs, targets = problem["model"], problem["inputs"], problem["targets"]
        initial = _params(model)
        optimizer = torch_optim(spec, model.parameters())
        hidden, losses, grads = problem["hidden0"], [], []
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            for t in range(inputs.shape[0]):
                if t == resume_at:  # a second run: its graph starts here
                    hidden = hidden.detach()
                optimizer.zero_grad()
                output, hidden = model(inputs[t], hidden)
                loss = _step_loss(output, targets[t])
                loss.backward(retain_graph=True)
                grads.append(_grads(model))
                optimizer.step()
                losses.append(loss.item())
        record = _training_record(name, seed + k, spec, problem, initial, losses, grads, hidden)
        cases.append(record if resume_at is None else {**record, "resume_at": resume_at})
    return cases


def tbptt_cases(seed: int) -> list[dict[str, Any]]:
    """Truncated BPTT: one ``backward()`` and one step per window, hidden detached."""
    cases = []
    for k, (name, sizes, spec, window) in enumerate(TBPTT_CASES):
        problem = _rnn_problem(sizes, seed + k)
        model, inputs, targets = problem["model"], problem["inputs"], problem["targets"]
        initial = _params(model)
        optimizer = torch_optim(spec, model.parameters())
        hidden, losses, grads = problem["hidden0"], [], []
        steps = inputs.shape[0]
        for start in range(0, steps, window):
            optimizer.zero_grad()
            hidden = hidden.detach()
            window_losses = []
            for t in range(start, min(start + window, steps)):
                output, hidden = model(inputs[t], hidden)
                window_losses.append(_step_loss(output, targets[t]))
            torch.stack(window_losses).sum().backward()
            grads.append(_grads(model))
            optimizer.step()
            losses.extend(loss.item() for loss in window_losses)
        cases.append(
            _training_record(
                name, seed + k, spec, problem, initial, losses, grads, hidden, window=window
            )
        )
    return cases


def article_literal_cases(seed: int) -> list[dict[str, Any]]:
    """The article's ``rnn_gradient_handling`` in plain PyTorch: where and how it raises."""
    torch.manual_seed(seed)
    input_size, hidden_size, sequence_length = 10, 5, 10
    model = simple_rnn(input_size, hidden_size, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(sequence_length, 1, input_size)
    target = torch.randn(sequence_length, 1, 1)
    hidden = torch.zeros(1, hidden_size)
    loss_values = []
    record = {"name": "article", "seed": seed, "raised": False}
    for i in range(sequence_length):
        optimizer.zero_grad()
        output, hidden = model(inputs[i], hidden)
        loss = torch.mean((output - target[i]) ** 2)
        try:
            loss.backward(retain_graph=True)
        except RuntimeError as e:
            record.update(raised=True, exception_type=type(e).__name__, message=str(e), step=i)
            break
        optimizer.step()
        loss_values.append(loss.item())
    record["losses_before"] = torch.tensor(loss_values)
    return [record]


# ---------------------------------------------------------------- torch.nn cells


def cell_module(
    kind: str, input_size: int, hidden_size: int, num_layers: int, bias: bool = True
) -> Any:
    """``nn.RNN`` (tanh or relu), ``nn.LSTM`` or ``nn.GRU``: time-major, ``bias`` as given."""
    options = {"num_layers": num_layers, "bias": bias, "batch_first": False}
    if kind in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden_size, nonlinearity=kind[4:], **options)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
    return cls(input_size, hidden_size, **options)


def _cell_problem(kind: str, config: str, seed: int) -> dict[str, Any]:
    i, h, o, b, t = CELL_SIZES
    num_layers, random_hidden, bias = CELL_CONFIGS[config]
    torch.manual_seed(seed)
    rnn = cell_module(kind, i, h, num_layers, bias)
    head = nn.Linear(h, o)
    inputs = torch.randn(t, b, i)
    targets = torch.randn(t, b, o)
    hidden0 = None
    if random_hidden:
        hidden0 = torch.randn(num_layers, b, h)
        if kind == "lstm":
            hidden0 = (hidden0, torch.randn(num_layers, b, h))
    return {
        "rnn": rnn,
        "head": head,
        "inputs": inputs,
        "targets": targets,
        "hidden0": hidden0,
        "header": {
            "seed": seed,
            "kind": kind,
            "num_layers": num_layers,
            "input_size": i,
            "hidden_size": h,
            "output_size": o,
        },
    }


def _state(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _module_grads(module: Any) -> dict[str, Any]:
    return {k: v.grad.detach().clone() for k, v in module.named_parameters()}


def _cut(state: Any) -> Any:
    """A carried state cut from its graph: ``None``, ``h``, or an LSTM's ``(h, c)``."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def _stored(state: Any) -> Any:
    """A state as a fixture holds it: ``None``, an array, or ``[h, c]``."""
    state = _cut(state)
    return list(state) if isinstance(state, tuple) else state


def _cell_record(
    name: str, problem: dict[str, Any], initial: dict[str, Any], options: dict, results: dict
) -> dict[str, Any]:
    """A cell case: name and sizes, ``options`` (optimizer, window), the problem before
    any update (``initial`` holds ``rnn_state`` and ``head_state``), then ``results``."""
    return {
        "name": name,
        **problem["header"],
        **options,
        **initial,
        "inputs": problem["inputs"],
        "targets": problem["targets"],
        "hidden0": _stored(problem["hidden0"]),
        **results,
    }


def _cell_initial(problem: dict[str, Any]) -> dict[str, Any]:
    return {"rnn_state": _state(problem["rnn"]), "head_state": _state(problem["head"])}


def cell_loss_cases(seed: int) -> list[dict[str, Any]]:
    """One forward over the whole sequence, one ``backward()`` of the summed loss."""
    cases = []
    for k, (name, kind, config) in enumerate(CELL_LOSS_CASES):
        problem = _cell_problem(kind, config, seed + k)
        rnn, head, targets = problem["rnn"], problem["head"], problem["targets"]
        initial = _cell_initial(problem)
        out, hidden = rnn(problem["inputs"], problem["hidden0"])
        total = 0
        for t in range(out.shape[0]):
            total = total + _step_loss(head(out[t]), targets[t])
        total.backward()
        results = {
            "loss": total.item(),
            "grads_rnn": _module_grads(rnn),
            "grads_head": _module_grads(head),
            "hidden": _stored(hidden),
        }
        cases.append(_cell_record(name, problem, initial, {}, results))
    return cases


def _cell_train(
    name: str, problem: dict[str, Any], spec: dict[str, Any], window: int | None
) -> dict[str, Any]:
    """Trains a cell case step by step; ``window=None`` is the article's loop as written.

    As written: per step, ``backward(retain_graph=True)`` of that step's loss through the
    whole graph so far, under ``allow_mutation_on_saved_tensors``, then one step. With a
    ``window``: truncated BPTT, the carried state detached at each window's start, one
    ``backward()`` of the window's summed loss and one step per window. One optimizer
    updates the module's and the head's parameters.
    """
    rnn, head, inputs, targets = (problem[k] for k in ("rnn", "head", "inputs", "targets"))
    initial = _cell_initial(problem)
    optimizer = torch_optim(spec, list(rnn.parameters()) + list(head.parameters()))
    as_written = window is None
    size, steps = window or 1, inputs.shape[0]
    carry, losses, grads_rnn, grads_head = problem["hidden0"], [], [], []
    with (
        torch.autograd.graph.allow_mutation_on_saved_tensors()
        if as_written
        else contextlib.nullcontext()
    ):
        for start in range(0, steps, size):
            optimizer.zero_grad()
            if not as_written:
                carry = _cut(carry)
            window_losses = []
            for t in range(start, min(start + size, steps)):
                out, carry = rnn(inputs[t : t + 1], carry)
                window_losses.append(_step_loss(head(out[0]), targets[t]))
            if as_written:
                window_losses[0].backward(retain_graph=True)
            else:
                torch.stack(window_losses).sum().backward()
            grads_rnn.append(_module_grads(rnn))
            grads_head.append(_module_grads(head))
            optimizer.step()
            losses.extend(loss.item() for loss in window_losses)
    options = {"optimizer": spec, **({} if as_written else {"window": window})}
    results = {
        "losses": torch.tensor(losses),
        "grads_rnn": _stacked(grads_rnn),
        "grads_head": _stacked(grads_head),
        "final_rnn_state": _state(rnn),
        "final_head_state": _state(head),
        "hidden": _stored(carry),
    }
    return _cell_record(name, problem, initial, options, results)


def cell_as_written_cases(seed: int) -> list[dict[str, Any]]:
    """The article's per-step loop with a torch.nn cell and a head, as written."""
    return [
        _cell_train(name, _cell_problem(kind, config, seed + k), spec, None)
        for k, (name, kind, config, spec) in enumerate(CELL_AS_WRITTEN_CASES)
    ]


def cell_tbptt_cases(seed: int) -> list[dict[str, Any]]:
    """Truncated BPTT with a torch.nn cell and a head."""
    return [
        _cell_train(name, _cell_problem(kind, config, seed + k), spec, window)
        for k, (name, kind, config, spec, window) in enumerate(CELL_TBPTT_CASES)
    ]


# ---------------------------------------------------------------- whole modules, as they are

#: Sizes of the module cases: input, hidden, projection (LSTM proj_size), batch, steps.
MODULE_SIZES = (3, 4, 2, 3, 5)
_T = MODULE_SIZES[4]
#: name suffix -> module options and the call's: layers, bidirectional, proj (LSTM only),
#: bias, batch_first, lengths (packed, unsorted; None: a plain batch), unbatched input,
#: a random hidden0 (else None, zeros).
MODULE_CONFIGS = {
    "bi1": dict(layers=1, bidirectional=True, lengths=None, hidden0=True),
    "bi2_packed": dict(layers=2, bidirectional=True, lengths=[_T, 1, 3], hidden0=False),
    "bi3_batch_first_packed": dict(
        layers=3, bidirectional=True, batch_first=True, lengths=[2, _T, 4], hidden0=True
    ),
    "l2_packed": dict(layers=2, lengths=[3, _T, 1], hidden0=True),
    "bi2_no_bias": dict(layers=2, bidirectional=True, bias=False, lengths=[4, 2, _T], hidden0=True),
    "bi2_unbatched": dict(layers=2, bidirectional=True, unbatched=True, hidden0=True),
    "proj_bi2_packed": dict(
        layers=2, bidirectional=True, proj=True, lengths=[_T, 2, 1], hidden0=True
    ),
}
MODULE_CASES = tuple(
    (f"{kind}_{suffix}", kind, suffix)
    for kind in CELL_KINDS
    for suffix in MODULE_CONFIGS
    if kind == "lstm" or not MODULE_CONFIGS[suffix].get("proj")
)
#: The cell modules, looped over the sequence in Python: nn.RNNCell, nn.LSTMCell, nn.GRUCell.
CELL_MODULE_CASES = tuple((f"{kind}_cell", kind) for kind in CELL_KINDS)


def torch_module(kind: str, config: dict[str, Any]) -> Any:
    """The ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` of a module case, with its options."""
    i, h, p, _, _ = MODULE_SIZES
    options = {
        "num_layers": config["layers"],
        "bias": config.get("bias", True),
        "batch_first": config.get("batch_first", False),
        "bidirectional": config.get("bidirectional", False),
    }
    if kind in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(i, h, nonlinearity=kind[4:], **options)
    if kind == "lstm":
        return nn.LSTM(i, h, proj_size=p if config.get("proj") else 0, **options)
    return nn.GRU(i, h, **options)


def torch_cell_module(kind: str) -> Any:
    """``nn.RNNCell`` (tanh or relu), ``nn.LSTMCell`` or ``nn.GRUCell``."""
    i, h, _, _, _ = MODULE_SIZES
    if kind in ("rnn_tanh", "rnn_relu"):
        return nn.RNNCell(i, h, nonlinearity=kind[4:])
    return {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind](i, h)


def _probe(outputs: Any, final: Any) -> tuple[Any, dict[str, Any]]:
    """A fixed scalar of a module's results, ``sum(outputs * r_out) + sum(h_n * r_h)``
    (``+ sum(c_n * r_c)`` for an LSTM), its random ``r`` drawn here and recorded: its
    gradient is the module's VJP of those random cotangents."""
    finals = final if isinstance(final, tuple) else (final,)
    weights = {"r_out": torch.randn(outputs.shape)}
    total = (outputs * weights["r_out"]).sum()
    for name, state in zip(("r_h", "r_c"), finals, strict=False):
        weights[name] = torch.randn(state.shape)
        total = total + (state * weights[name]).sum()
    return total, weights


def _leaf_grad(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return [v.grad.detach().clone() for v in value]
    return value.grad.detach().clone()


def _requiring_grad(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(v.clone().requires_grad_(True) for v in value)
    return value.clone().requires_grad_(True)


def _module_results(module, inputs, hidden0, outputs, final, total, probe) -> dict[str, Any]:
    """What a module case records after ``total.backward()``: the weights and the
    inputs it ran on, the probe's weights, and the results with their gradients."""
    return {
        "rnn_state": _state(module),
        "inputs": inputs.detach().clone(),
        "hidden0": _stored(hidden0),
        **probe,
        "outputs": outputs.detach().clone(),
        "hidden": _stored(final),
        "value": total.item(),
        "grads_rnn": _module_grads(module),
        "grad_inputs": inputs.grad.detach().clone(),
        "grad_hidden0": _leaf_grad(hidden0),
    }


def module_cases(seed: int) -> list[dict[str, Any]]:
    """Each module's forward as PyTorch runs it, and the gradient of :func:`_probe`.

    A packed case is ``pack_padded_sequence(inputs, lengths, batch_first=...,
    enforce_sorted=False)``, the module, then ``pad_packed_sequence(...,
    total_length=T)``. Cell-module cases loop the cell over the steps in Python.
    """
    i, h, p, b, t = MODULE_SIZES
    cases = []
    for k, (name, kind, suffix) in enumerate(MODULE_CASES):
        config = MODULE_CONFIGS[suffix]
        torch.manual_seed(seed + k)
        module = torch_module(kind, config)
        batch_first, unbatched = config.get("batch_first", False), config.get("unbatched", False)
        directions = 2 if config.get("bidirectional") else 1
        shape = (t, i) if unbatched else ((b, t, i) if batch_first else (t, b, i))
        inputs = torch.randn(shape, requires_grad=True)
        states = directions * config["layers"]
        lead = (states,) if unbatched else (states, b)
        hidden0 = None
        if config["hidden0"]:
            h_out = p if config.get("proj") else h
            hidden0 = torch.randn(*lead, h_out)
            if kind == "lstm":
                hidden0 = (hidden0, torch.randn(*lead, h))
        hidden0 = _requiring_grad(hidden0)
        lengths = config.get("lengths")
        x = inputs
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(
                inputs, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
            )
        outputs, final = module(x, hidden0)
        if lengths is not None:
            outputs, _ = nn.utils.rnn.pad_packed_sequence(
                outputs, batch_first=batch_first, total_length=t
            )
        total, probe = _probe(outputs, final)
        total.backward()
        cases.append(
            {
                "name": name,
                "kind": kind,
                "seed": seed + k,
                "num_layers": config["layers"],
                "bidirectional": directions == 2,
                "proj_size": p if config.get("proj") else 0,
                "bias": config.get("bias", True),
                "batch_first": batch_first,
                "unbatched": unbatched,
                "lengths": lengths,
                **_module_results(module, inputs, hidden0, outputs, final, total, probe),
            }
        )
    for k, (name, kind) in enumerate(CELL_MODULE_CASES, start=len(MODULE_CASES)):
        torch.manual_seed(seed + k)
        cell = torch_cell_module(kind)
        inputs = torch.randn(t, b, i, requires_grad=True)
        hidden0 = torch.randn(b, h)
        if kind == "lstm":
            hidden0 = (hidden0, torch.randn(b, h))
        hidden0 = _requiring_grad(hidden0)
        state, outs = hidden0, []
        for step in range(t):
            state = cell(inputs[step], state)
            outs.append(state[0] if kind == "lstm" else state)
        outputs = torch.stack(outs)
        total, probe = _probe(outputs, state)
        total.backward()
        cases.append(
            {
                "name": name,
                "kind": kind,
                "seed": seed + k,
                "cell_module": True,
                **_module_results(cell, inputs, hidden0, outputs, state, total, probe),
            }
        )
    return cases


SCENARIOS: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "accumulate": lambda seed: scalar_cases("accumulate", seed),
    "stack": lambda seed: scalar_cases("stack", seed),
    "rnn_loss": rnn_loss_cases,
    "train_as_written": as_written_cases,
    "train_tbptt": tbptt_cases,
    "article_literal": article_literal_cases,
    "cell_loss": cell_loss_cases,
    "cell_as_written": cell_as_written_cases,
    "cell_tbptt": cell_tbptt_cases,
    "module": module_cases,
}


def generate(
    out: str | Path,
    *,
    seed: int = SEED,
    command: str | None = None,
    scenarios: Iterable[str] | None = None,
    skip_cases: Mapping[str, Collection[str]] | None = None,
) -> list[Path]:
    """Writes the fixtures of ``scenarios`` (every one by default) into ``out``.

    ``skip_cases`` maps a scenario to case names left out of its files (only
    ``"train_as_written"`` takes it: the test suite skips its slow ``"long"`` case).
    Returns the paths written.
    """
    _require_torch()
    chosen = list(SCENARIOS) if scenarios is None else list(scenarios)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ValueError(
            f"scenarios must be among {', '.join(map(repr, SCENARIOS))}, got {unknown}."
        )
    skip_cases = dict(skip_cases or {})
    if set(skip_cases) - {"train_as_written"}:
        raise ValueError(
            "skip_cases takes only 'train_as_written' as a key, got "
            f"{sorted(set(skip_cases) - {'train_as_written'})}."
        )
    names = {case[0] for case in (*AS_WRITTEN_CASES, *RESUMED_CASES)}
    if set(skip_cases.get("train_as_written", ())) - names:
        raise ValueError(
            f"skip_cases['train_as_written'] must name cases among {sorted(names)}, got "
            f"{sorted(skip_cases['train_as_written'])}."
        )
    torch.set_num_threads(1)  # one thread: the same reductions in the same order every run
    command = command or f"python -m loopgrad_jax.torch_reference --out {out}"
    written = []
    for dtype in DTYPES:
        with default_dtype(dtype):
            for scenario in chosen:
                make = SCENARIOS[scenario]
                header = {
                    "scenario": scenario,
                    "dtype": dtype,
                    "seed": seed,
                    "torch_version": torch.__version__,
                    "command": command,
                }
                path = fixture_path(out, scenario, dtype)
                skip = skip_cases.get(scenario, ())
                cases = make(seed, skip) if skip else make(seed)
                written.append(write_fixture(path, header, cases))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loopgrad_jax.torch_reference",
        description="Run the article's scenarios in PyTorch and write reference fixtures.",
    )
    parser.add_argument("--out", required=True, help="folder to write the fixture files into")
    parser.add_argument("--seed", type=int, default=SEED, help="base random seed (default 0)")
    args = parser.parse_args(argv)
    command = "python -m loopgrad_jax.torch_reference --out " + str(args.out)
    if args.seed != SEED:
        command += f" --seed {args.seed}"
    for path in generate(args.out, seed=args.seed, command=command):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
