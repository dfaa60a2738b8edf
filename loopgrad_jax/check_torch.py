"""Your own PyTorch module against :func:`loopgrad_jax.rnn`: :func:`check_against_torch`.

The module runs as PyTorch runs it (packed with ``pack_padded_sequence(...,
enforce_sorted=False)`` when ``lengths`` are given; a cell module looped over the steps
in Python) and as ``lg.rnn(lg.from_torch(module), ...)`` with each loop kind. Both
differentiate the same probe, ``sum(outputs * r_out) + sum(h_n * r_h)`` (``+ sum(c_n *
r_c)`` for an LSTM) with random ``r`` of a fixed seed, w.r.t. the weights, the inputs and
``hidden0``. Every result is compared as :mod:`loopgrad_jax.parity` compares fixtures:
the largest ``|jax - torch| / (1 + |torch|)`` over its elements, against
``loopgrad_jax.parity.TOL[dtype]``. ``loopgrad-parity --module FILE`` runs it on a
module saved with ``torch.save(module, FILE)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopgrad_jax._cells.module import rnn
from loopgrad_jax._cells.params import check_params
from loopgrad_jax._cells.torch_io import from_torch, to_torch
from loopgrad_jax._loops import REVERSE_LOOPS, Loop, require_reverse

#: Every loop kind that runs reverse mode; ``"while"`` runs bounded by the inputs' T.
DEFAULT_LOOPS: tuple[str, ...] = (*REVERSE_LOOPS, "while")
_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class TorchParity:
    """The outcome of :func:`check_against_torch`: one row per loop kind.

    ``errors[loop][column]`` is the largest ``|jax - torch| / (1 + |torch|)`` over the
    elements of ``column`` (``outputs``, ``h_n``, ``c_n``, and the probe's gradients
    ``d weights``, ``d inputs``, ``d hidden0``); ``inf`` where shapes differ or the run
    raised (``messages[loop]`` says why). ``print`` it for the table.
    """

    module: str
    dtype: str
    tolerance: float
    columns: tuple[str, ...]
    errors: dict[str, dict[str, float]]
    messages: dict[str, str]

    @property
    def worst(self) -> float:
        """The largest error in the table."""
        return max((e for row in self.errors.values() for e in row.values()), default=0.0)

    @property
    def passed(self) -> bool:
        """Every error within ``tolerance`` and no run raised."""
        return not self.messages and self.worst <= self.tolerance

    def as_json(self) -> dict[str, Any]:
        """The raw numbers, JSON-ready (``None`` for an infinite error)."""
        out = dataclasses.asdict(self) | {"passed": self.passed}
        out["errors"] = {
            loop: {c: e if math.isfinite(e) else None for c, e in row.items()}
            for loop, row in self.errors.items()
        }
        return out

    def failed_loops(self) -> list[str]:
        return [
            loop
            for loop, row in self.errors.items()
            if loop in self.messages or max(row.values(), default=0.0) > self.tolerance
        ]

    def __str__(self) -> str:
        failed = set(self.failed_loops())
        header = ("loop", *self.columns, "pass")
        rows = [
            (
                loop,
                *(_cell(row.get(c, math.inf)) for c in self.columns),
                "FAIL" if loop in failed else "pass",
            )
            for loop, row in self.errors.items()
        ]
        widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
        lines = [
            "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "passed" if self.passed else "FAILED"
        title = (
            f"{self.module} in {self.dtype}, max |jax - torch| / (1 + |torch|), "
            f"tolerance {self.tolerance:g}: {verdict}"
        )
        notes = [f"{loop}: {message}" for loop, message in self.messages.items()]
        return "\n".join([title, *lines, *notes])


def _cell(error: float) -> str:
    return f"{error:.2e}" if math.isfinite(error) else "error"


def check_against_torch(
    module: Any,
    inputs: Any,
    *,
    lengths: Any = None,
    hidden0: Any = None,
    loops: Sequence[str] = DEFAULT_LOOPS,
    dtype: str = "float64",
    seed: int = 0,
) -> TorchParity:
    """Runs ``module`` in PyTorch and through ``lg.rnn`` with each of ``loops``; compares.

    Args:
      module: an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` of any options, or an
        ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell``. A copy runs, in ``dtype``, on
        the CPU, in eval mode (no dropout); the module itself is left as it is.
      inputs: a tensor or array in the module's layout (its own ``batch_first``), or
        unbatched ``(T, I)``; a cell module's ``(T, B, I)`` or ``(T, I)``.
      lengths: ``(B,)`` integers in ``1..T``: PyTorch runs the packed batch
        (``enforce_sorted=False``) and pads it back to ``total_length=T``.
      hidden0: PyTorch's ``h_0`` (``(h_0, c_0)`` for an LSTM), as the module takes it
        (a cell module's ``(B, H)``); ``None``: zeros, and no ``d hidden0`` column.
      loops: loop kinds for ``lg.rnn`` (any reverse-capable kind or text form;
        ``"while"`` is bounded by T).
      dtype: ``"float32"`` or ``"float64"``; float64 needs
        ``jax.config.update("jax_enable_x64", True)`` first.
      seed: the seed of the probe's random weights ``r``.

    Returns:
      A :class:`TorchParity`: ``print`` it for the table; ``.passed``, ``.errors``.

    Needs PyTorch: ``pip install 'loopgrad_jax[torch]'``.
    """
    from loopgrad_jax.parity import TOL  # parity imports the package: not at import time

    torch = _import_torch()
    dtype = _check_dtype(dtype)
    if isinstance(loops, str):
        loops = (loops,)
    if not loops:
        raise ValueError("loops must name at least one loop kind, got none.")
    copied = copy.deepcopy(module)
    if not isinstance(copied, torch.nn.Module):
        raise TypeError(
            "module must be a torch.nn.RNN, LSTM or GRU, or an nn.RNNCell, LSTMCell or "
            f"GRUCell, got {type(module).__name__}."
        )
    copied = copied.to(device="cpu", dtype=getattr(torch, dtype)).eval()
    params = from_torch(copied)  # raises naming what it cannot take
    cell = params.cell_module
    if cell and lengths is not None:
        raise ValueError(
            "lengths pack a batch for nn.RNN / nn.LSTM / nn.GRU; a cell module "
            f"({type(module).__name__}) steps through every step: leave lengths out."
        )
    x = _numpy(inputs, dtype)
    h0 = _tree(lambda a: _numpy(a, dtype), hidden0)
    lens = None if lengths is None else np.asarray(_numpy(lengths, None), np.int64)
    t = x.shape[1 if params.batch_first and x.ndim == 3 and not cell else 0]
    for loop in loops:  # a misspelt or forward-only kind: before PyTorch runs
        require_reverse(_bounded(loop, t), "check_against_torch")

    expected, r = _torch_run(torch, copied, cell, x, h0, lens, seed)
    columns = ["outputs", "h_n", *(["c_n"] if params.kind == "lstm" else [])]
    columns += ["d weights", "d inputs", *(["d hidden0"] if h0 is not None else [])]
    errors, messages = {}, {}
    with jax.default_matmul_precision("highest"):  # PyTorch's float32 products on the CPU
        for loop in loops:
            name = str(loop)
            try:
                actual = _jax_run(params, cell, x, h0, lens, r, _bounded(loop, t))
                errors[name] = _compare(actual, expected, columns)
            except Exception as err:  # noqa: BLE001 - a failed run is a failed row
                errors[name] = dict.fromkeys(columns, math.inf)
                messages[name] = f"{type(err).__name__}: {err}"
    return TorchParity(_describe(module), dtype, TOL[dtype], tuple(columns), errors, messages)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"check_against_torch needs PyTorch: pip install 'loopgrad_jax[torch]' ({err})."
        ) from err
    return torch


def _check_dtype(dtype: Any) -> str:
    name = str(getattr(dtype, "__name__", dtype)).removeprefix("torch.")
    try:
        name = np.dtype(name).name
    except TypeError:
        pass
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype='float64' needs 64-bit arrays in JAX, which are off: call "
            "jax.config.update('jax_enable_x64', True) first (or pass dtype='float32')."
        )
    return name


def _numpy(value: Any, dtype: str | None) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype)


def _tree(fn, value):
    if value is None:
        return None
    return tuple(map(fn, value)) if isinstance(value, tuple | list) else fn(value)


def _bounded(loop: str | Loop, t: int) -> str | Loop:
    return f"while:max_steps={t}" if str(loop) == "while" else loop


def _describe(module: Any) -> str:
    return " ".join(repr(module).split())


def _torch_run(torch, module, cell, x, h0, lengths, seed):
    """PyTorch's results and the probe's gradients, as NumPy; and the probe's ``r``."""
    module.zero_grad()
    for p in module.parameters():
        p.requires_grad_(True)
    inputs = torch.tensor(x, requires_grad=True)
    hidden0 = _tree(lambda a: torch.tensor(a, requires_grad=True), h0)
    if cell:
        state, outs = hidden0, []
        for step in range(inputs.shape[0]):
            state = module(inputs[step], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        outputs, final = torch.stack(outs), state
    elif lengths is None:
        outputs, final = module(inputs, hidden0)
    else:
        rnn_utils = torch.nn.utils.rnn
        bf = module.batch_first
        packed = rnn_utils.pack_padded_sequence(
            inputs, torch.tensor(lengths), batch_first=bf, enforce_sorted=False
        )
        outputs, final = module(packed, hidden0)
        t = inputs.shape[1 if bf else 0]
        outputs, _ = rnn_utils.pad_packed_sequence(outputs, batch_first=bf, total_length=t)
    finals = final if isinstance(final, tuple) else (final,)
    rng = np.random.default_rng(seed)
    r = [rng.standard_normal(a.shape).astype(x.dtype) for a in (outputs, *finals)]
    total = sum((a * torch.tensor(w)).sum() for a, w in zip((outputs, *finals), r, strict=True))
    total.backward()
    out = {"outputs": outputs.detach().numpy()}
    out |= {n: f.detach().numpy() for n, f in zip(("h_n", "c_n"), finals, strict=False)}
    out["d weights"] = {k: p.grad.detach().numpy() for k, p in module.named_parameters()}
    out["d inputs"] = inputs.grad.detach().numpy()
    if hidden0 is not None:
        out["d hidden0"] = _tree(lambda a: a.grad.detach().numpy(), hidden0)
    return out, r


def _jax_run(params, cell, x, h0, lengths, r, loop):
    """``lg.rnn``'s results and the same probe's gradients, as NumPy."""
    if cell:  # lg.rnn takes a cell module's state as one layer's
        h0 = _tree(lambda a: a[None], h0)
    lens = None if lengths is None else jnp.asarray(lengths)

    def probe(params, inputs, hidden0):
        outputs, final = rnn(params, inputs, hidden0, lengths=lens, loop=loop)
        finals = final if isinstance(final, tuple) else (final,)
        finals = tuple(f[0] for f in finals) if cell else finals
        results = (outputs, *finals)
        total = sum(jnp.sum(a * w) for a, w in zip(results, r, strict=True))
        return total, results

    argnums = (0, 1) if h0 is None else (0, 1, 2)
    grad = jax.grad(probe, argnums=argnums, has_aux=True)
    grads, results = jax.jit(grad)(params, jnp.asarray(x), _tree(jnp.asarray, h0))
    out = dict(zip(("outputs", "h_n", "c_n"), map(np.asarray, results), strict=False))
    out["d weights"] = {k: np.asarray(v) for k, v in to_torch(grads[0])[0].items()}
    out["d inputs"] = np.asarray(grads[1])
    if h0 is not None:
        g = _tree(lambda a: a[0], grads[2]) if cell else grads[2]
        out["d hidden0"] = _tree(np.asarray, g)
    return out


def _compare(actual: dict, expected: dict, columns: list[str]) -> dict[str, float]:
    from loopgrad_jax.parity.tolerance import _max_error

    row = {}
    for column in columns:
        a, e = actual[column], expected[column]
        if isinstance(e, dict):
            pairs = [(a.get(k), v) for k, v in e.items()] if set(a) == set(e) else None
        elif isinstance(e, tuple):
            pairs = list(zip(a, e, strict=True))
        else:
            pairs = [(a, e)]
        if pairs is None or any(np.shape(x) != np.shape(y) for x, y in pairs):
            row[column] = math.inf
        else:
            row[column] = max((_max_error(np.asarray(x), y) for x, y in pairs), default=0.0)
    return row


# ------------------------------------------------------------------- loopgrad-parity --module


def load_module(path: str) -> Any:
    """The module ``torch.save(module, path)`` saved; raises ValueError naming what is wrong."""
    torch = _import_torch()
    try:
        module = torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same mistake
        raise ValueError(
            f"{path}: torch.load cannot read it ({type(err).__name__}: {err}); save the "
            "module with torch.save(module, path)."
        ) from err
    if not isinstance(module, torch.nn.Module):
        held = "a state dict" if isinstance(module, Mapping) else f"a {type(module).__name__}"
        raise ValueError(
            f"{path} holds {held}, not a torch.nn module: save the module "
            "itself with torch.save(module, path) (a state dict does not hold its kind and "
            "batch_first)."
        )
    try:
        from_torch(module)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{path} holds a {type(module).__name__}, not a module this checks: {err}"
        ) from err
    return module


def random_call(
    module: Any, steps: int, batch: int, *, lengths: bool, unbatched: bool, seed: int
) -> tuple[np.ndarray, Any, np.ndarray | None]:
    """Random float64 ``(inputs, hidden0, lengths)`` for ``module``, in its own layout:
    ``steps`` steps of ``batch`` examples (no batch axis when ``unbatched``), lengths
    uniform in ``1..steps`` when asked for."""
    params, sizes = check_params(from_torch(module))
    rng = np.random.default_rng(seed)
    size, hidden, h_out = sizes["input"], sizes["hidden"], sizes["state"]
    lead = () if params.cell_module else (len(params.layers),)
    lead += () if unbatched else (batch,)
    if unbatched:
        shape = (steps, size)
    elif params.batch_first and not params.cell_module:
        shape = (batch, steps, size)
    else:
        shape = (steps, batch, size)
    inputs = rng.standard_normal(shape)
    h0 = rng.standard_normal((*lead, h_out))
    if params.kind == "lstm":
        h0 = (h0, rng.standard_normal((*lead, hidden)))
    lens = rng.integers(1, steps + 1, size=batch) if lengths else None
    return inputs, h0, lens
