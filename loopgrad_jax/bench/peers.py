"""The peers a user might pick instead of this library, as rows of ``loopgrad-bench``.

``--peers`` names them (``all``: every peer that runs the case, each with its default
options). Beside PyTorch's peers of :mod:`loopgrad_jax.bench.torch_peers` (``eager``,
``fused``: the module ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``rtrl``), the
full-sequence gradient (``rnn_loss``) of the same weights on the same inputs, by::

  torch.compile        torch.compile of the eager loop, then loss.backward(): dynamo
                       unrolls the Python loop, so it runs only up to --max-unroll steps
                       (the first call compiles: its time is the row's compile time)
  torch.scan           PyTorch's prototype functional scan, torch._higher_order_ops.scan,
                       over the step, eagerly
  nnx.RNN              Flax NNX: lg.to_flax(params, cells="flax"), one nnx.RNN per layer
                       over Flax's built-in cell, jax.value_and_grad of lg.flax_loss(model)
  nnx.RNN:unroll=K     the same with nnx.RNN(unroll=K)
  nnx.RNN:again        nnx.RNN compiled and timed a second time: the same program as a
                       row of its own, so a group shows how far two identical programs'
                       times land apart (the noise floor its ratios stand on)
  flax_loss:LOOP       lg.flax_loss(model, loop=LOOP): this library's loop kind LOOP
                       (scan, nnx_scan, python, ...) stepping the Flax model's cells
  equinox              equinox.internal.scan(kind="checkpointed", checkpoints=C), C =
  equinox:checkpoints=C  round(sqrt(T)) unless given: equinox's binomial checkpointing, the
                       peer of remat:checkpoints=C

The PyTorch loops and equinox run the article's cell (``--cell article``); the Flax
peers run the cells Flax has a built-in cell for (the article's, ``rnn_tanh``,
``lstm``, ``gru``). ``nnx.GRUCell`` has no ``b_hn`` (the bias inside ``r * (W_hn h +
b_hn)``), so where a Flax peer runs with the GRU every row of the run computes with
``b_hn = 0`` (:func:`zero_b_hn`; the JSON's meta records it). A built-in cell keeps one
bias per layer, ``b_ih + b_hh``, whose gradient is returned for both of PyTorch's. A
peer asked for by name that cannot run a case is a row with the reason in ``skipped``:
the scenario or cell it does not run, a length over its limit, its package not
installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

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
    options: str = ""  # what may follow the name, as --help shows it ("" none; _problem checks)


#: The cells Flax has a built-in cell for.
FLAX_CELLS = ("article", "rnn_tanh", "lstm", "gru")
_BENCH_EXTRA = "pip install 'loopgrad_jax[bench]'"


EXTRAS: dict[str, Extra] = {
    "torch.compile": Extra("torch", "torch", ("article",), "pip install 'loopgrad_jax[torch]'"),
    "torch.scan": Extra("torch", "torch", ("article",), "pip install 'loopgrad_jax[torch]'"),
    "nnx.RNN": Extra("flax", "flax", FLAX_CELLS, _BENCH_EXTRA, "[:unroll=K or again]"),
    "flax_loss": Extra("flax", "flax", FLAX_CELLS, _BENCH_EXTRA, ":LOOP"),
    "equinox": Extra("equinox", "equinox", ("article",), _BENCH_EXTRA, "[:checkpoints=C]"),
}

#: Scenarios the extra peers run.
EXTRA_SCENARIOS = ("rnn_loss",)


def names() -> tuple[str, ...]:
    """Every name ``--peers`` accepts, with the options a name may take after ``:``."""
    torch_names = {p for s in torch_peers.PEERS for p in torch_peers.PEERS[s]}
    torch_names |= {torch_peers.fused_name(c) for c in ("rnn_tanh", "lstm", "gru")}
    extras = [f"{n}{e.options}" for n, e in EXTRAS.items()]
    return (ALL, *sorted(torch_names | {"fused"}), *extras)


def parse(text: str) -> tuple[str, ...]:
    """``--peers``' value: comma-separated peers (see :func:`names`), in order, once each."""
    wanted = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not wanted:
        raise ValueError(f"expected comma-separated peers among {', '.join(names())}, got {text!r}")
    for name in wanted:
        problem = _problem(name)
        if problem:
            raise ValueError(
                f"expected comma-separated peers among {', '.join(names())}, got {text!r} "
                f"({name!r}{' ' if problem == 'unknown' else ': '}{problem})"
            )
    return wanted


def _problem(name: str) -> str | None:
    """What is wrong with the peer ``name``, or ``None``."""
    base, colon, rest = name.partition(":")
    if base not in EXTRAS:
        return None if not colon and name in names() else "unknown"
    if not colon:
        return "a loop kind must follow 'flax_loss:'" if base == "flax_loss" else None
    if base == "nnx.RNN":
        if rest == "again" or re.fullmatch(r"unroll=[1-9][0-9]*", rest):
            return None
        return f"nnx.RNN takes ':unroll=K' (K >= 1) or ':again', not {rest!r}"
    if base == "equinox":
        if re.fullmatch(r"checkpoints=[1-9][0-9]*", rest):
            return None
        return f"equinox takes ':checkpoints=C' (C >= 1), not {rest!r}"
    try:  # flax_loss:LOOP
        loop = lg.Loop.parse(rest)
    except (TypeError, ValueError) as error:
        return f"flax_loss takes a loop kind: {error}"
    if not loop.reverse_mode:
        return f"flax_loss:{rest} has no reverse mode, so it cannot give a gradient"
    return None


def base(name: str) -> str:
    """The peer ``name`` without its options: ``nnx.RNN:unroll=8`` -> ``nnx.RNN``."""
    return name.partition(":")[0] if name.partition(":")[0] in EXTRAS else name


def framework(name: str) -> str | None:
    """The framework of the peer ``name`` (``None`` for ``all``)."""
    if name == ALL:
        return None
    return EXTRAS[base(name)].framework if base(name) in EXTRAS else "torch"


def zero_b_hn(cell: str, wanted: Sequence[str] | None) -> bool:
    """Whether a run of ``cell`` with ``--peers wanted`` computes with the GRU's ``b_hn``
    zero: Flax's ``nnx.GRUCell``, which a Flax peer runs, has none. Not where Flax is
    missing: its peers are skipped, so every row keeps ``b_hn``."""
    if cell != "gru" or not wanted:
        return False
    flax_peer = ALL in wanted or any(framework(w) == "flax" for w in wanted)
    return flax_peer and installed("flax")


def adapt(data: cases.Data, wanted: Sequence[str] | None) -> cases.Data:
    """``data`` with the GRU's ``b_hn`` zeroed where :func:`zero_b_hn` says so."""
    params = data.params
    if not isinstance(params, lg.CellParams) or not zero_b_hn(params.kind, wanted):
        return data
    return data._replace(params=_b_hn_zeroed(params))


def _b_hn_zeroed(params: lg.CellParams) -> lg.CellParams:
    """A GRU's ``params`` (or gradient) with each layer's ``b_hn``, the last third of
    ``bias_hh``, zero."""

    def zeroed(bias):
        if bias is None:
            return None
        third = bias.shape[-1] // 3
        return np.where(np.arange(bias.shape[-1]) < 2 * third, bias, 0).astype(bias.dtype)

    layers = tuple(
        dataclasses.replace(layer, bias_hh=zeroed(layer.bias_hh)) for layer in params.layers
    )
    return dataclasses.replace(params, layers=layers)


def rows(scenario: str, cell: str, wanted: Sequence[str], torch: bool) -> list[tuple[str, str]]:
    """``(framework, peer)`` of each row of ``scenario`` that ``wanted`` asks for.

    ``torch``: whether PyTorch's peers run at all (``--no-torch`` drops them, and
    ``all`` then names the others only).
    """
    own = torch_peers.peers(scenario, cell)
    if ALL in wanted:
        extras = [n for n in EXTRAS if n != "flax_loss" and applies(n, scenario, cell)]
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
    return scenario in EXTRA_SCENARIOS and cell in EXTRAS[base(name)].cells


def skip_reason(
    name: str, scenario: str, sizes: cases.Sizes, max_unroll: int, torch_device: str | None
) -> str | None:
    """Why peer ``name`` cannot run this case, or ``None``."""
    if base(name) not in EXTRAS:
        if torch_device is None:
            return "torch is not installed (pip install 'loopgrad_jax[torch]')"
        if name not in torch_peers.peers(scenario, sizes.cell):
            return f"PyTorch has no {name} peer of {scenario} for the {sizes.cell} cell"
        return None
    extra = EXTRAS[base(name)]
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
    if name == "flax_loss:python" and sizes.length > max_unroll:
        return (
            "a Python loop is unrolled into the compiled program, so its compile time grows "
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
    compiled: timing.JaxCompiled | None = None  # a JAX peer's executable and its figures
    saved_bytes: int | None = None  # a JAX peer's jax.vjp residuals
    # What of an output the check compares, applied to the peer's and JAX's alike (None:
    # all of it): a Flax GRU has no b_hn, so its gradient is left out of the check.
    comparable: Callable[[Sequence], Sequence] | None = None


def build(name: str, data: cases.Data, sizes: cases.Sizes, device: jax.Device) -> Built:
    """Peer ``name`` of ``rnn_loss`` on ``data``; its output is ``(loss, *gradient leaves)``
    in the order of ``jax.tree.leaves`` of the library's own gradient."""
    if framework(name) == "torch":
        call = _torch_loop(name, torch_peers._tensors(data, sizes, "cpu"), sizes)
        start = time.perf_counter()
        call()  # torch.compile compiles here
        return Built(call, time.perf_counter() - start, torch_peers.sync("cpu"))
    loss, weights, leaves = _flax(name, data) if framework(name) == "flax" else _equinox(name, data)

    def gradient(weights, inputs, targets):
        value, grads = jax.value_and_grad(loss)(weights, inputs, targets)
        return (value, *leaves(grads))

    args = jax.device_put((weights, data.inputs, data.targets), device)
    compiled = timing.compile_jax(lambda: gradient, args)
    saved = cases.residual_bytes(lambda w: loss(w, *args[1:]), args[0])
    gru = framework(name) == "flax" and getattr(data.params, "kind", None) == "gru"
    return Built(
        lambda: compiled.compiled(*args),
        compiled.lower_s + compiled.compile_s,
        None,
        compiled,
        saved,
        _without_b_hn(data.params) if gru else None,
    )


def _without_b_hn(params: lg.CellParams) -> Callable[[Sequence], Sequence]:
    """``(loss, *gradient leaves)`` -> the same with each layer's ``b_hn`` gradient zero."""
    treedef = jax.tree.structure(params)

    def comparable(output: Sequence) -> Sequence:
        loss, *leaves = output
        grads = _b_hn_zeroed(jax.tree.unflatten(treedef, leaves))
        return (loss, *jax.tree.leaves(grads))

    return comparable


def _flax(name: str, data: cases.Data) -> tuple[Callable, Any, Callable]:
    """``(loss, weights, leaves)`` of a Flax peer: ``loss(weights, inputs, targets)``,
    ``leaves(grads)`` the gradient as the library's own gradient's leaves."""
    from flax import nnx

    options = name.partition(":")[2]
    unroll = int(options.partition("=")[2]) if options.startswith("unroll=") else 1
    model = lg.to_flax(data.params, cells="flax", unroll=unroll)
    graphdef, state = nnx.split(model)
    loop = options if name.startswith("flax_loss:") else None

    def loss(state, inputs, targets):
        return lg.flax_loss(nnx.merge(graphdef, state), inputs, targets, loop=loop)

    def leaves(grads):
        return jax.tree.leaves(_both_biases(lg.from_flax(nnx.merge(graphdef, grads))))

    return loss, state, leaves


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


def _equinox(name: str, data: cases.Data) -> tuple[Callable, Any, Callable]:
    """``(loss, weights, leaves)`` of equinox's checkpointed scan (``equinox:checkpoints=C``;
    ``C = round(sqrt(T))`` for ``equinox``)."""
    from loopgrad_jax.bench import checkpoints

    count = equinox_checkpoints(name, data.inputs.shape[0])
    return checkpoints.loss(f"equinox:checkpoints={count}"), data.params, jax.tree.leaves


def equinox_checkpoints(name: str, length: int) -> int:
    """The checkpoints of the peer ``name`` (``equinox:checkpoints=C``; ``equinox``:
    ``round(sqrt(length))``)."""
    given = name.partition("checkpoints=")[2]
    return int(given) if given else max(1, round(math.sqrt(length)))
