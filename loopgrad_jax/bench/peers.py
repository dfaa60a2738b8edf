"""The peers a user might pick instead of this library, as rows of ``loopgrad-bench``.

``--peers`` names them (``all``: every peer that runs the case). Beside PyTorch's
peers of :mod:`loopgrad_jax.bench.torch_peers` (``eager``, ``fused``: the module
``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``rtrl``), the full-sequence gradient
(``rnn_loss``) of the same weights on the same inputs, by::

  torch.compile   torch.compile of the eager loop, then loss.backward(): dynamo unrolls
                  the Python loop, so it runs only up to --max-unroll steps (the first
                  call compiles: its time is the row's compile time)
  torch.scan      PyTorch's prototype functional scan, torch._higher_order_ops.scan,
                  over the step, eagerly
  nnx.RNN         Flax NNX: lg.to_flax(params, cells="flax"), one nnx.RNN per layer over
                  Flax's built-in cell, jax.value_and_grad of lg.flax_loss(model)
  equinox         equinox.internal.scan(kind="checkpointed", checkpoints=round(sqrt(T))):
                  equinox's binomial checkpointing, the peer of remat:checkpoints=C

The PyTorch loops and equinox run the article's cell (``--cell article``); ``nnx.RNN``
runs the cells Flax has (the article's, ``rnn_tanh``, ``lstm``; not ``nn.GRU``'s
``b_hn``, which ``nnx.GRUCell`` lacks). A peer asked for by name that cannot run a case
is a row with the reason in ``skipped``: the scenario or cell it does not run, a length
over its limit, its package not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, timing, torch_peers

#: ``--peers all``.
ALL = "all"


class Extra(NamedTuple):
    """A peer beyond :mod:`torch_peers`' own."""

    framework: str  # its record's framework: "torch", "flax", "equinox"
    package: str  # the module it imports
    cells: tuple[str, ...]  # the cells it runs
    install: str  # how to get its package


EXTRAS: dict[str, Extra] = {
    "torch.compile": Extra("torch", "torch", ("article",), "pip install 'loopgrad_jax[torch]'"),
    "torch.scan": Extra("torch", "torch", ("article",), "pip install 'loopgrad_jax[torch]'"),
    "nnx.RNN": Extra(
        "flax", "flax", ("article", "rnn_tanh", "lstm"), "pip install 'loopgrad_jax[bench]'"
    ),
    "equinox": Extra("equinox", "equinox", ("article",), "pip install 'loopgrad_jax[bench]'"),
}

#: Scenarios the extra peers run.
EXTRA_SCENARIOS = ("rnn_loss",)


def names() -> tuple[str, ...]:
    """Every name ``--peers`` accepts."""
    torch_names = {p for s in torch_peers.PEERS for p in torch_peers.PEERS[s]}
    torch_names |= {torch_peers.fused_name(c) for c in ("rnn_tanh", "lstm", "gru")}
    return (ALL, *sorted(torch_names | {"fused"}), *EXTRAS)


def parse(text: str) -> tuple[str, ...]:
    """``--peers``' value: comma-separated names of :func:`names`, in order, once each."""
    wanted = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in wanted if p not in names()]
    if not wanted or unknown:
        raise ValueError(
            f"expected comma-separated peers among {', '.join(names())}, got {text!r}"
            + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
        )
    return wanted


def framework(name: str) -> str | None:
    """The framework of the peer ``name`` (``None`` for ``all``)."""
    if name == ALL:
        return None
    return EXTRAS[name].framework if name in EXTRAS else "torch"


def rows(scenario: str, cell: str, wanted: Sequence[str], torch: bool) -> list[tuple[str, str]]:
    """``(framework, peer)`` of each row of ``scenario`` that ``wanted`` asks for.

    ``torch``: whether PyTorch's peers run at all (``--no-torch`` drops them, and
    ``all`` then names the others only).
    """
    own = torch_peers.peers(scenario, cell)
    if ALL in wanted:
        extras = [n for n, e in EXTRAS.items() if applies(n, scenario, cell)]
        chosen = [
            *(own if torch else ()),
            *(n for n in extras if torch or EXTRAS[n].framework != "torch"),
        ]
        wanted = [*chosen, *(w for w in wanted if w != ALL and w not in chosen)]
    out = []
    for name in wanted:
        if name == "fused":
            name = torch_peers.fused_name(cell)
        out.append((framework(name), name))
    return list(dict.fromkeys(out))


def applies(name: str, scenario: str, cell: str) -> bool:
    """Whether the extra peer ``name`` runs ``scenario`` for ``cell``."""
    return scenario in EXTRA_SCENARIOS and cell in EXTRAS[name].cells


def skip_reason(
    name: str, scenario: str, sizes: cases.Sizes, max_unroll: int, torch_device: str | None
) -> str | None:
    """Why peer ``name`` cannot run this case, or ``None``."""
    if name not in EXTRAS:
        if torch_device is None:
            return "torch is not installed (pip install 'loopgrad_jax[torch]')"
        if name not in torch_peers.peers(scenario, sizes.cell):
            return f"PyTorch has no {name} peer of {scenario} for the {sizes.cell} cell"
        return None
    extra = EXTRAS[name]
    if not applies(name, scenario, sizes.cell):
        return (
            f"runs {', '.join(EXTRA_SCENARIOS)} with the {' or '.join(extra.cells)} cell, "
            f"not {scenario} with {sizes.cell}"
        )
    if sizes.layers > 1 or sizes.precision or sizes.bidirectional:
        return "runs one layer, one direction, in float32"
    if extra.framework == "torch" and torch_device != "cpu":
        return "runs on the CPU: its loop makes its state there"
    if not installed(extra.package):
        return f"{extra.package} is not installed ({extra.install})"
    if name == "torch.compile" and sizes.length > max_unroll:
        return (
            "torch.compile unrolls the Python loop into its graph, so its compile time grows "
            f"with T; T={sizes.length} > --max-unroll={max_unroll}"
        )
    return None


def installed(package: str) -> bool:
    """Whether ``package`` is installed (found, not imported)."""
    return importlib.util.find_spec(package) is not None


class Built(NamedTuple):
    """A peer ready to time."""

    call: Callable[[], Any]  # one forward and backward
    compile_s: float  # its first call (torch.compile: the compile) or JAX's trace+compile
    sync: Callable[[Any], Any] | None  # PyTorch's: waits for the device


def build(name: str, data: cases.Data, sizes: cases.Sizes, device: jax.Device) -> Built:
    """Peer ``name`` of ``rnn_loss`` on ``data``; its output is ``(loss, *gradient leaves)``
    in the order of ``jax.tree.leaves`` of the library's own gradient."""
    if EXTRAS[name].framework == "torch":
        call = _torch_loop(name, torch_peers._tensors(data, sizes, "cpu"), sizes)
        start = time.perf_counter()
        call()  # torch.compile compiles here
        return Built(call, time.perf_counter() - start, torch_peers.sync("cpu"))
    if name == "nnx.RNN":
        gradient, first = _nnx(data)
    else:
        gradient, first = _equinox(sizes), data.params
    args = jax.device_put((first, data.inputs, data.targets), device)
    compiled = timing.compile_jax(lambda: gradient, args)
    return Built(lambda: compiled.compiled(*args), compiled.lower_s + compiled.compile_s, None)


def _torch_loop(name: str, d: cases.Data, sizes: cases.Sizes) -> Callable[[], tuple]:
    """PyTorch's ``torch.compile`` of the eager loop, or its functional scan: a
    zero-argument callable running the forward and backward once."""
    import torch

    cell, step_loss = torch_peers._rnn_ops()

    def loop_loss(w, inputs, targets):
        hidden, total = torch.zeros(sizes.batch, sizes.hidden), 0.0
        for t in range(sizes.length):
            hidden = cell(w, inputs[t], hidden)
            total = total + step_loss(w, hidden, targets[t])
        return total

    def scan_loss(w, inputs, targets):
        from torch._higher_order_ops import scan

        def step(hidden, xy):
            hidden = cell(w, xy[0], hidden)
            # A fresh carry: scan refuses a carry that aliases another output.
            return hidden.clone(), step_loss(w, hidden, xy[1])

        _, losses = scan(step, torch.zeros(sizes.batch, sizes.hidden), (inputs, targets))
        return losses.sum()

    loss_fn = scan_loss if name == "torch.scan" else torch.compile(loop_loss)

    def call():
        w = torch_peers._leaves(d.params)
        loss = loss_fn(w, d.inputs, d.targets)
        loss.backward()
        return (loss.detach(), *(p.grad for p in w))

    return call


def _nnx(data: cases.Data) -> tuple[Callable, Any]:
    from loopgrad_jax.bench import flax_peers

    gradient, state = flax_peers._gradient(flax_peers.REFERENCE, data.params)

    def f(state, inputs, targets):
        loss, grads = gradient(state, inputs, targets)
        return (loss, *jax.tree.leaves(_both_biases(grads)))

    return f, state


def _both_biases(grads: Any) -> Any:
    """A built-in Flax cell's one bias gradient in both of PyTorch's places: with one
    bias ``b = b_ih + b_hh``, ``dL/db_ih = dL/db_hh = dL/db``, which
    :func:`loopgrad_jax.from_flax` returns as one of the two (the other zeros)."""
    if not isinstance(grads, lg.CellParams):
        return grads
    layers = tuple(
        dataclasses.replace(layer, bias_ih=one, bias_hh=one)
        for layer in grads.layers
        for one in [layer.bias_ih + layer.bias_hh]
    )
    return dataclasses.replace(grads, layers=layers)


def _equinox(sizes: cases.Sizes) -> Callable:
    from loopgrad_jax.bench import checkpoints

    count = max(1, round(math.sqrt(sizes.length)))
    loss = checkpoints._loss(f"equinox:checkpoints={count}")

    def f(params, inputs, targets):
        value, grads = jax.value_and_grad(loss)(params, inputs, targets)
        return (value, *jax.tree.leaves(grads))

    return f
