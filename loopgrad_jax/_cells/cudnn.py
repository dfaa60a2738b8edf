"""``loop="cudnn"``: an ``nn.LSTM`` run by cuDNN's fused kernel through ``jax.experimental.rnn``.

:func:`module_forward` is :func:`loopgrad_jax._cells.module_forward` (the same
arguments, the same results) for an LSTM, run as one call of a *kernel*: by default
:data:`CUDNN`, ``jax.experimental.rnn.lstm`` (cuDNN's custom call with its own custom
VJP; CUDA GPUs, float32). :func:`check` refuses, before anything is traced, what the
kernel cannot do, each time naming the argument and what to use instead.

The wiring between the two layouts:

- weights: :func:`pack_weights` concatenates every layer's ``weight_ih`` and
  ``weight_hh`` (pseudo-layer ``l * D + d`` in turn, PyTorch's order of ``layers`` and
  of ``h_n``) and then every layer's ``bias_ih`` and ``bias_hh``: the flat vector
  ``jax.experimental.rnn.unpack_lstm_weights`` reads (cuDNN's layout). The gates keep
  PyTorch's order ``i, f, g, o``, which is cuDNN's. A module without biases packs
  zeros, which change nothing: its results and gradients are exact.
- inputs and outputs: the kernel is batch-major, ``(B, T, I)`` in and
  ``(B, T, D * H)`` out; the library's time-major ``(T, B, ...)`` is transposed around it.
- states: ``(h_0, c_0)`` as PyTorch's ``(L * D, B, H)``, as the kernel takes them.
- lengths: the kernel takes ``seq_lengths``, ``(B,)`` int32, with PyTorch's packed
  semantics already: outputs zero from step ``lengths[b]`` on, the forward direction's
  final state the one after step ``lengths[b] - 1``, the reverse direction starting
  there (``lstm_ref``, the reference ``jax.experimental.rnn`` ships, does exactly that,
  checked on the CPU; the kernel is checked on a GPU against PyTorch's fixtures). No
  conversion is needed beyond counting the mask into lengths (at least 1: cuDNN fails
  on a length 0) and zeroing the outputs at padded steps once more, whatever padding
  value the kernel writes; every example runs all ``T`` steps without ``lengths``.

The kernel is a seam: :data:`REFERENCE` runs the same wiring through
``jax.experimental.rnn.lstm_ref`` (pure JAX, any backend, float32 and float64), which
the CPU tests use (:func:`using`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from loopgrad_jax._cells.params import CellParams

#: The loop kind this module runs.
KIND = "cudnn"


class Kernel(NamedTuple):
    """A function that runs a whole LSTM on cuDNN's flat weights, and what it needs.

    ``call(x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size, num_layers,
    bidirectional) -> (y, h_n, c_n)``, with ``jax.experimental.rnn.lstm``'s layouts:
    ``x`` ``(B, T, I)``, ``h_0``/``c_0``/``h_n``/``c_n`` ``(L * D, B, H)``, ``y``
    ``(B, T, D * H)``, ``weights`` from :func:`pack_weights`, ``seq_lengths`` ``(B,)``
    int32.
    """

    name: str
    call: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    dtypes: tuple[str, ...]  # the dtypes it computes in
    needs_cuda: bool  # runs on a CUDA GPU only


def _rnn_module() -> Any:
    """``jax.experimental.rnn``, imported when first needed."""
    try:
        from jax.experimental import rnn
    except ImportError as err:  # pragma: no cover - part of every jax release we support
        raise NotImplementedError(
            f"loop='cudnn' runs jax.experimental.rnn, which this JAX ({jax.__version__}) "
            f"cannot import ({err}); use loop='scan'."
        ) from err
    return rnn


def _cudnn_call(x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size, num_layers,
                bidirectional):  # fmt: skip
    # precision=None: the kernel follows jax_default_matmul_precision as jnp.matmul does
    # (TF32 on NVIDIA GPUs unless it is "highest", as for every other loop kind).
    return _rnn_module().lstm(
        x,
        h_0,
        c_0,
        weights,
        seq_lengths,
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        dropout=0.0,
        bidirectional=bidirectional,
        precision=None,
    )


def _reference_call(x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size,
                    num_layers, bidirectional):  # fmt: skip
    rnn = _rnn_module()
    unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
    return rnn.lstm_ref(
        x, h_0, c_0, *unpacked, seq_lengths, input_size, hidden_size, num_layers, 0.0,
        bidirectional,
    )  # fmt: skip


#: cuDNN's fused LSTM, ``jax.experimental.rnn.lstm``: what ``loop="cudnn"`` runs.
CUDNN = Kernel("jax.experimental.rnn.lstm (cuDNN)", _cudnn_call, ("float32",), True)

#: ``jax.experimental.rnn.lstm_ref`` on the unpacked weights: the same wiring in pure
#: JAX, on any backend, for the tests.
REFERENCE = Kernel("jax.experimental.rnn.lstm_ref", _reference_call, ("float32", "float64"), False)

_kernel = CUDNN


def kernel() -> Kernel:
    """The kernel ``loop="cudnn"`` runs: :data:`CUDNN`, unless :func:`using` swapped it."""
    return _kernel


@contextlib.contextmanager
def using(new: Kernel) -> Iterator[Kernel]:
    """Runs ``loop="cudnn"`` with ``new`` inside the block (the tests' seam).

    JAX's compilation caches are cleared on the way in and out: the entry points'
    compiled functions are keyed on ``loop``, not on the kernel, so a program traced
    with one kernel must not serve a call meant for the other.
    """
    global _kernel
    old, _kernel = _kernel, new
    jax.clear_caches()
    try:
        yield new
    finally:
        _kernel = old
        jax.clear_caches()


# ------------------------------------------------------------------------- the checks


def _use_instead(what: str) -> str:
    return f"{what}; use loop='scan' (or any loop kind of lg.REVERSE_LOOPS) instead."


def check(
    params: object,
    inputs: jax.Array,
    *,
    needed_by: str,
    dropout_key: jax.Array | None = None,
    mesh: object = None,
    custom_cell: bool = False,
    as_written: bool = False,
) -> None:
    """Refuses what ``loop="cudnn"`` cannot run, naming the argument; ``None`` if it can.

    Called by the entry points after their own checks (``params`` and ``inputs`` are
    valid), before anything is traced. The options come first and the device last, so
    that every refusal reads the same on any machine.
    """
    where = f"loop='cudnn' in {needed_by}"
    if as_written:  # train_rnn(mode="as_written")
        raise ValueError(
            "loop='cudnn' runs a whole sequence in one fused kernel, but "
            "train_rnn(mode='as_written') updates the weights after every step, one "
            "cell at a time (forward or reverse mode through single steps): use "
            "mode='tbptt' with loop='cudnn', or mode='as_written' with loop='scan'."
        )
    if custom_cell:
        raise ValueError(
            _use_instead(
                f"{where} runs PyTorch's nn.LSTM only (a CellParams of kind 'lstm'), not a "
                "cell=lg.Cell(...) of your own"
            )
        )
    if not isinstance(params, CellParams):
        name = type(params).__name__
        what = "the article's SimpleRNN (RNNParams)" if name == "RNNParams" else f"a {name}"
        raise ValueError(
            _use_instead(
                f"{where} runs PyTorch's nn.LSTM only (a CellParams of kind 'lstm'), and "
                f"params is {what}"
            )
        )
    if params.kind != "lstm":
        raise ValueError(
            _use_instead(
                f"{where} runs LSTMs only (cuDNN's kernel in jax.experimental.rnn is an "
                f"LSTM), got params.kind={params.kind!r}"
            )
        )
    if any(layer.weight_hr is not None for layer in params.layers):
        raise ValueError(
            _use_instead(
                f"{where} cannot run an LSTM with proj_size (params.layers[k].weight_hr): "
                "jax.experimental.rnn has no projection"
            )
        )
    if params.precision is not None:
        raise ValueError(
            _use_instead(
                f"{where} computes in float32 only: precision={params.precision!r} (bf16 "
                "products) is not available in jax.experimental.rnn; pass precision=None"
            )
        )
    if dropout_key is not None and params.dropout:
        raise ValueError(
            _use_instead(
                f"{where} does not run dropout between layers (dropout_key given, "
                f"params.dropout={params.dropout}): cuDNN's dropout masks are its own, not "
                "the ones a JAX key draws; pass dropout_key=None for the module in eval mode"
            )
        )
    if mesh is not None:
        raise ValueError(
            _use_instead(f"{where} does not split the batch over a mesh (mesh= given)")
        )
    run = kernel()
    dtype = jnp.dtype(inputs.dtype).name
    if dtype not in run.dtypes:
        raise ValueError(
            _use_instead(
                f"{where} computes in {' and '.join(run.dtypes)} only ({run.name}), got "
                f"{dtype} inputs and weights"
            )
        )
    if run.needs_cuda:
        _require_cuda(inputs, where)


def _require_cuda(inputs: jax.Array, where: str) -> None:
    """Refuses unless ``inputs`` live on a CUDA GPU (traced: unless JAX's default backend
    is one)."""
    devices = jax.devices() if isinstance(inputs, jax.core.Tracer) else list(inputs.devices())
    found = sorted({_platform(d) for d in devices})
    if found != ["cuda"]:
        raise ValueError(
            f"{where} needs a CUDA GPU (cuDNN, through jax.experimental.rnn.lstm), but the "
            f"inputs are on {', '.join(found)} (jax.default_backend() is "
            f"{jax.default_backend()!r}); use loop='scan' instead, which runs everywhere."
        )


def _platform(device: Any) -> str:
    """``"cuda"`` for an NVIDIA GPU, else the device's platform (``"cpu"``, ``"rocm"``...)."""
    platform = device.platform
    if platform in ("gpu", "cuda"):
        version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return platform


# ------------------------------------------------------------------------ the wiring


def pack_weights(params: CellParams) -> jax.Array:
    """cuDNN's flat weight vector of an LSTM's :class:`CellParams` (no projection).

    Every pseudo-layer's ``weight_ih`` and ``weight_hh`` (row-major), pseudo-layer
    ``l * D + d`` in turn, then every pseudo-layer's ``bias_ih`` and ``bias_hh``:
    ``jax.experimental.rnn.unpack_lstm_weights`` gives back the four. Without biases
    (``bias=False``) the biases are zeros. Linear, so ``jax.grad`` maps the kernel's
    flat gradient back onto ``params``' leaves.
    """
    matrices, biases = [], []
    for layer in params.layers:
        matrices += [layer.weight_ih.reshape(-1), layer.weight_hh.reshape(-1)]
        zeros = jnp.zeros(layer.weight_hh.shape[0], layer.weight_hh.dtype)
        for bias in (layer.bias_ih, layer.bias_hh):
            biases.append(zeros if bias is None else bias)
    return jnp.concatenate(matrices + biases)


def module_forward(
    params: CellParams,
    inputs: jax.Array,
    carry0: tuple,
    *,
    live: jax.Array | None = None,
    kernel_: Kernel | None = None,
) -> tuple[tuple, jax.Array]:
    """:func:`loopgrad_jax._cells.module_forward` of an LSTM, as one kernel call.

    ``inputs`` ``(T, B, I)``; ``carry0`` one ``(h, c)`` per layer and direction (layer
    ``l``'s direction ``d`` at ``l * D + d``); ``live`` ``(T, B)``, ``live[t, b] = t <
    lengths[b]`` (``None``: every step real). Returns ``(finals, outputs)``: one ``(h,
    c)`` per layer and direction, and ``(T, B, D * H)``. No dropout (eval mode).
    ``kernel_``: :func:`kernel` when ``None``.
    """
    run = kernel() if kernel_ is None else kernel_
    steps, batch, width = inputs.shape
    if live is None:
        seq_lengths = jnp.full((batch,), steps, jnp.int32)
    else:
        # Each example's number of real steps; at least one, so that a traced length
        # outside 1..T (whose results the callers poison) cannot reach the kernel as 0,
        # which cuDNN fails on (jax-ml/jax#17966).
        seq_lengths = jnp.maximum(jnp.sum(live, axis=0, dtype=jnp.int32), 1)
    h_0 = jnp.stack([h for h, _ in carry0])
    c_0 = jnp.stack([c for _, c in carry0])
    y, h_n, c_n = run.call(
        jnp.swapaxes(inputs, 0, 1),
        h_0,
        c_0,
        pack_weights(params),
        seq_lengths,
        input_size=width,
        hidden_size=params.layers[0].weight_hh.shape[1],
        num_layers=params.num_layers,
        bidirectional=params.bidirectional,
    )
    finals = tuple((h_n[k], c_n[k]) for k in range(h_n.shape[0]))
    outputs = jnp.swapaxes(y, 0, 1)
    if live is not None:
        # Zero already at padded steps from both kernels; one select makes PyTorch's
        # zeros there independent of the padding value cuDNN is configured with.
        outputs = jnp.where(live[..., None], outputs, jnp.zeros_like(outputs))
    return finals, outputs
