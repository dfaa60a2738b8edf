"""PyTorch's whole module in the losses and training: both directions, packed lengths,
projections, dropout between layers, and what is refused.

References are PyTorch's own modules on the same weights, run here in float64
(``pack_padded_sequence`` for lengths), or mathematics stated beside each check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, assert_close

import loopgrad_jax as lg
from loopgrad_jax._cells import CellParams, LayerParams

F64 = TOL["float64"]
T, B, N_IN, H, N_OUT = 6, 3, 4, 5, 2
LENGTHS = [T, 2, 4]  # unsorted, with T


def _torch_model(torch, kind: str, **options):
    """A 2-layer module of ``kind`` with ``options`` and a head over its outputs, float64."""
    torch.manual_seed(0)
    cls = {"rnn_tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    module = cls(N_IN, H, num_layers=2, **options).double()
    d = 2 if options.get("bidirectional") else 1
    head = torch.nn.Linear(d * (options.get("proj_size") or H), N_OUT).double()
    return module, head


def _params(module, head, kind: str, grad: bool = False) -> CellParams:
    """The module's weights (or, with ``grad``, their gradients) as CellParams, read key by
    key (independent of from_torch)."""
    named = {
        **dict(module.named_parameters()),
        **{f"head_{k}": v for k, v in head.named_parameters()},
    }
    state = {k: jnp.asarray((v.grad if grad else v).detach().numpy()) for k, v in named.items()}
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    layers = tuple(
        LayerParams(
            *(state[f"{f}_l{k}{s}"] for f in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
            state.get(f"weight_hr_l{k}{s}"),
        )
        for k in range(module.num_layers)
        for s in suffixes
    )
    return CellParams(
        layers, state["head_weight"], state["head_bias"], kind, bidirectional=module.bidirectional
    )


def _torch_loss(torch, module, head, x, y, lengths):
    """The library's loss in PyTorch: per step, the mean over the head's outputs of the
    squared error, averaged over the batch with padded steps counting 0; summed over T."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, _ = module(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    real = (torch.arange(T)[:, None] < lengths[None, :]).double()
    per_step = ((head(out) - y) ** 2).mean(-1) * real
    return (per_step.sum(1) / B).sum()


CASES = [
    ("gru", {"bidirectional": True}),
    ("rnn_tanh", {"bidirectional": True}),
    ("lstm", {"proj_size": 3}),
    ("lstm", {"bidirectional": True, "proj_size": 2}),
    ("lstm", {}),
]


@pytest.mark.torch
# The quick tier runs scan on every case; fori and remat, the same body, in the full tier.
@pytest.mark.parametrize(
    "loop", ["scan", *(pytest.param(k, marks=pytest.mark.slow) for k in ("fori", "remat"))]
)
@pytest.mark.parametrize(("kind", "options"), CASES, ids=str)
def test_rnn_loss_of_the_whole_module_with_lengths_is_pytorchs(kind, options, loop):
    torch = pytest.importorskip("torch")
    module, head = _torch_model(torch, kind, **options)
    torch.manual_seed(1)
    x, y = (
        torch.randn(T, B, N_IN, dtype=torch.float64),
        torch.randn(T, B, N_OUT, dtype=torch.float64),
    )
    lengths = torch.tensor(LENGTHS)
    expected = _torch_loss(torch, module, head, x, y, lengths)
    expected.backward()
    params = _params(module, head, kind)
    value, grads = jax.value_and_grad(lg.rnn_loss)(
        params, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), lengths=jnp.asarray(LENGTHS),
        loop=loop,
    )  # fmt: skip
    assert_close(value, expected.item(), F64, "loss")
    want = _params(module, head, kind, grad=True)
    assert_close(grads, want, F64, "gradient")


@pytest.mark.torch
def test_default_training_step_of_a_bidirectional_module_is_one_pytorch_sgd_step():
    torch = pytest.importorskip("torch")
    module, head = _torch_model(torch, "gru", bidirectional=True)
    torch.manual_seed(1)
    x, y = (
        torch.randn(T, B, N_IN, dtype=torch.float64),
        torch.randn(T, B, N_OUT, dtype=torch.float64),
    )
    lengths = torch.tensor(LENGTHS)
    params = _params(module, head, "gru")
    loss = _torch_loss(torch, module, head, x, y, lengths)
    loss.backward()
    with torch.no_grad():
        for p in [*module.parameters(), *head.parameters()]:
            p -= 0.01 * p.grad
    run = lg.train_rnn(
        params, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), lr=0.01,
        lengths=jnp.asarray(LENGTHS),
    )  # fmt: skip
    assert run.losses.shape == (T,)
    assert_close(run.losses.sum(), loss.item(), F64, "loss")
    assert_close(run.params, _params(module, head, "gru"), F64, "updated weights")


def _bidirectional(kind: str = "gru") -> CellParams:
    layers = tuple(
        lg.init_cell(jax.random.key(k), kind, N_IN, H, num_layers=2, dtype=jnp.float64).layers[0]
        for k in range(4)
    )
    # Layer 1 reads both directions of layer 0: its weight_ih is (G*H, 2H).
    wide = lg.init_cell(jax.random.key(9), kind, 2 * H, H, num_layers=1, dtype=jnp.float64)
    layers = (*layers[:2], wide.layers[0], wide.layers[0])
    head = lg.init_cell(jax.random.key(7), kind, N_IN, 2 * H, N_OUT, dtype=jnp.float64)
    return CellParams(layers, head.head_weight, head.head_bias, kind, bidirectional=True)


def test_a_bidirectional_model_is_refused_where_it_cannot_train():
    params = _bidirectional()
    x, y = jnp.ones((T, B, N_IN)), jnp.zeros((T, B, N_OUT))
    with pytest.raises(ValueError, match=r"step t cannot see that future"):
        lg.train_rnn(params, x, y, mode="as_written")
    with pytest.raises(ValueError, match=r"reads the whole sequence.*got window=2"):
        lg.train_rnn(params, x, y, window=2)
    pytest.importorskip("flax")  # to_flax builds it; stepping it layer by layer is refused
    with pytest.raises(ValueError, match=r"reverse direction reads the whole sequence first"):
        lg.flax_loss(lg.to_flax(params), x, y, loop="scan")


def test_a_model_without_a_head_runs_in_rnn_but_not_in_the_loss():
    import dataclasses

    params = dataclasses.replace(_bidirectional(), head_weight=None, head_bias=None)
    x = jnp.ones((T, B, N_IN))
    outputs, h_n = lg.rnn(params, x)
    assert outputs.shape == (T, B, 2 * H) and h_n.shape == (4, B, H)
    with pytest.raises(ValueError, match=r"params has no head .*lg.rnn"):
        lg.rnn_loss(params, x, jnp.zeros((T, B, N_OUT)))


# ------------------------------------------------------------------------- dropout


def test_dropout_between_layers_is_deterministic_for_a_key_and_off_without_one():
    params = dataclasses_replace(_bidirectional(), dropout=0.5)
    x = jax.random.normal(jax.random.key(3), (T, B, N_IN), jnp.float64)
    key = jax.random.key(11)
    first, _ = lg.rnn(params, x, dropout_key=key)
    again, _ = lg.rnn(params, x, dropout_key=key)
    other, _ = lg.rnn(params, x, dropout_key=jax.random.key(12))
    assert_close(first, again, 0.0, "same key, same masks")
    assert float(jnp.max(jnp.abs(first - other))) > 1e-3  # another key, other masks
    evaluation, _ = lg.rnn(params, x)
    no_rate, _ = lg.rnn(dataclasses_replace(params, dropout=0.0), x, dropout_key=key)
    assert_close(evaluation, no_rate, 0.0, "eval mode is dropout=0")


def test_dropout_keeps_the_fraction_and_scale_of_its_rate():
    from loopgrad_jax._cells.layers import _dropout

    x = jnp.ones((200, 50, 40), jnp.float64)
    dropped = _dropout(jax.random.key(0), x, 0.25)
    kept = dropped != 0
    # 400,000 Bernoulli(0.75) draws: the kept fraction's standard deviation is 6.8e-4.
    assert abs(float(kept.mean()) - 0.75) < 5 * 6.8e-4
    np.testing.assert_array_equal(np.asarray(dropped[kept]), 1 / 0.75)  # inverted dropout


@pytest.mark.torch
def test_dropout_equals_pytorch_layers_with_the_same_masks():
    """PyTorch's 2-layer module in training mode is layer 0, dropout, layer 1: with our
    masks applied between two 1-layer PyTorch modules, the outputs agree."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lower, upper = (torch.nn.GRU(n, H, bidirectional=True).double() for n in (N_IN, 2 * H))
    layers = tuple(
        LayerParams(*(jnp.asarray(getattr(m, f"{f}_l0{s}").detach().numpy()) for f in (
            "weight_ih", "weight_hh", "bias_ih", "bias_hh")))
        for m in (lower, upper) for s in ("", "_reverse")
    )  # fmt: skip
    params = CellParams(layers, None, None, "gru", bidirectional=True, dropout=0.4)
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    key = jax.random.key(5)
    ours, _ = lg.rnn(params, jnp.asarray(x.numpy()), dropout_key=key)
    from loopgrad_jax._cells.layers import _dropout

    middle, _ = lower(x)
    mask = _dropout(jax.random.fold_in(key, 1), jnp.ones(middle.shape, jnp.float64), 0.4)
    theirs, _ = upper(middle * torch.tensor(np.asarray(mask)))
    assert_close(ours, theirs.detach().numpy(), F64, "outputs")


def dataclasses_replace(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        # (B, T, I) = (3, 6, 4) given time-major: lengths tell the batch is the first axis.
        (
            lambda p, x: lg.rnn(p, x.swapaxes(0, 1), lengths=jnp.array(LENGTHS)),
            ValueError,
            r"lengths has 3 entries.*B=6 with batch_first=False.*pass batch_first=True",
        ),
        (
            lambda p, x: lg.rnn(p, x.swapaxes(0, 1), hidden0=jnp.zeros((4, B, H))),
            ValueError,
            r"hidden0 must have shape \(4, 6, 5\).*pass batch_first=True",
        ),
        (
            lambda p, x: lg.rnn(p, x.astype(jnp.int32)),
            TypeError,
            r"inputs must have a floating-point dtype",
        ),
        (
            lambda p, x: lg.rnn(p, x[..., :2]),
            ValueError,
            r"inputs must have shape \(T, B, I\) \(batch_first=False\) or, unbatched, \(T, I\), "
            r"with I=4",
        ),
        (
            lambda p, x: lg.rnn(p, x, lengths=jnp.array([T, 0, 7])),
            ValueError,
            r"lengths must be between 1 and T=6.*got \[0, 7\] at examples \[1, 2\]",
        ),
        (
            lambda p, x: lg.rnn(p, x[:, 0], lengths=jnp.array([T])),
            ValueError,
            r"unbatched inputs \(T, I\) have one example",
        ),
        (
            lambda p, x: lg.rnn(p, x, dropout_key=3),
            TypeError,
            r"dropout_key must be a JAX random key .*got int 3",
        ),
        (
            lambda p, x: lg.rnn(lg.init_rnn(jax.random.key(0), 4, 5), x),
            TypeError,
            r"the article's SimpleRNN \(RNNParams\) is no PyTorch module",
        ),
        (
            lambda p, x: lg.rnn(p, x, loop="while"),
            ValueError,
            r"loop='while' cannot be used with lg.rnn",
        ),
    ],
)
def test_bad_module_calls_are_refused_by_name(call, error, match):
    params = _bidirectional()
    x = jnp.ones((T, B, N_IN), jnp.float64)
    with pytest.raises(error, match=match):
        call(params, x)
