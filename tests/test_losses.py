"""Your own loss: ``reduction``, ``loss_fn`` and ``lengths``, against PyTorch's losses.

Each reference runs PyTorch's module and head on the same weights: ``nn.MSELoss()`` and
``nn.CrossEntropyLoss()`` over the head's outputs of the whole sequence, and masked
losses over padded sequences (``lengths``), summed over the real steps and divided by
``B`` (``reduction="sum"``) or by the number of real steps (``"mean"``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TOL, assert_close

import loopgrad_jax as lg

T, B, N_IN, H, N_OUT = 5, 3, 3, 4, 5
LENGTHS = (2, 5, 3)
LOOPS = ("scan", "fori", "python", "remat", "while:max_steps=8")


def cross_entropy(prediction, target):
    """``nn.CrossEntropyLoss()`` of one step: logits ``(B, O)``, class indices ``(B,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(prediction, target).mean()


#: name: (loss, reduction, lengths)
CASES = {
    "mse_mean": ("mse", "mean", None),
    "ce_mean": ("ce", "mean", None),
    "mse_lengths_sum": ("mse", "sum", LENGTHS),
    "ce_lengths_mean": ("ce", "mean", LENGTHS),
}


def _problem(torch, kind="lstm", layers=2, seed=0):
    torch.manual_seed(seed)
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](N_IN, H, num_layers=layers)
    head = torch.nn.Linear(H, N_OUT)
    module, head = module.double(), head.double()
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    y = torch.randn(T, B, N_OUT, dtype=torch.float64)
    classes = torch.randint(0, N_OUT, (T, B))
    return module, head, x, y, classes


def _torch_step_losses(torch, prediction, target, loss):
    """Each example's loss at each step, ``(T, B)``."""
    if loss == "mse":
        return ((prediction - target) ** 2).mean(-1)
    flat = torch.nn.functional.cross_entropy(
        prediction.reshape(-1, N_OUT), target.reshape(-1), reduction="none"
    )
    return flat.reshape(prediction.shape[:2])


def _mask(torch, lengths, steps):
    return (torch.arange(steps)[:, None] < torch.tensor(lengths)[None, :]).double()


def _torch_loss(torch, prediction, target, loss, reduction, lengths):
    if lengths is None:  # PyTorch's own modules: the mean over every step and example
        assert reduction == "mean"
        if loss == "mse":
            return torch.nn.MSELoss()(prediction, target)
        return torch.nn.CrossEntropyLoss()(prediction.reshape(-1, N_OUT), target.reshape(-1))
    mask = _mask(torch, lengths, prediction.shape[0])
    total = (_torch_step_losses(torch, prediction, target, loss) * mask).sum()
    return total / prediction.shape[1] if reduction == "sum" else total / mask.sum()


def _jax_args(torch, module, head, x, y, classes, loss):
    params = lg.from_torch(module, head)
    targets = jnp.asarray(y.numpy()) if loss == "mse" else jnp.asarray(classes.numpy())
    return params, jnp.asarray(x.numpy()), targets


def _loss_fn(loss):
    return None if loss == "mse" else cross_entropy


def _grads_of(module, head):
    return (
        {k: p.grad.numpy() for k, p in module.named_parameters()},
        {k: p.grad.numpy() for k, p in head.named_parameters()},
    )


def _states(module, head):
    return (
        {k: v.numpy() for k, v in module.state_dict().items()},
        {k: v.numpy() for k, v in head.state_dict().items()},
    )


@pytest.mark.torch
# The quick tier: every case with scan and each other loop kind on one case in turn; the
# full tier every loop kind on every case.
@pytest.mark.parametrize(
    ("loop", "case"),
    [
        (loop, case)
        if loop == "scan" or case == list(CASES)[i % len(CASES)]
        else pytest.param(loop, case, marks=pytest.mark.slow)
        for i, loop in enumerate(LOOPS)
        for case in CASES
    ],
)
def test_rnn_loss_and_gradient_match_pytorchs_losses(loop, case):
    torch = pytest.importorskip("torch")
    loss, reduction, lengths = CASES[case]
    module, head, x, y, classes = _problem(torch)
    target = y if loss == "mse" else classes
    expected = _torch_loss(torch, head(module(x)[0]), target, loss, reduction, lengths)
    expected.backward()
    params, inputs, targets = _jax_args(torch, module, head, x, y, classes, loss)

    def ours(p):
        return lg.rnn_loss(
            p,
            inputs,
            targets,
            loop=loop,
            reduction=reduction,
            loss_fn=_loss_fn(loss),
            lengths=None if lengths is None else jnp.asarray(lengths),
        )

    value, grads = jax.value_and_grad(ours)(params)
    np.testing.assert_allclose(value, expected.item(), rtol=TOL["float64"])
    assert_close(lg.to_torch(grads), _grads_of(module, head), TOL["float64"], case)


@pytest.mark.torch
@pytest.mark.parametrize("case", ["ce_mean", "mse_lengths_sum"])
def test_hoisted_rnn_loss_takes_the_same_losses(case):
    torch = pytest.importorskip("torch")
    loss, reduction, lengths = CASES[case]
    module, head, x, y, classes = _problem(torch, kind="gru")
    target = y if loss == "mse" else classes
    expected = _torch_loss(torch, head(module(x)[0]), target, loss, reduction, lengths)
    params, inputs, targets = _jax_args(torch, module, head, x, y, classes, loss)
    value = lg.rnn_loss(
        params,
        inputs,
        targets,
        hoist_input=True,
        reduction=reduction,
        loss_fn=_loss_fn(loss),
        lengths=lengths,
    )
    np.testing.assert_allclose(value, expected.item(), rtol=TOL["float64"])


def _torch_train(torch, module, head, x, classes, lengths, lr, window):
    """SGD on the masked cross-entropy, summed over each window's steps and divided by
    ``B``; ``window=None`` is the article's loop as written (an update per step under
    ``allow_mutation_on_saved_tensors``, as torch_reference._cell_train runs it)."""
    import contextlib

    optimizer = torch.optim.SGD([*module.parameters(), *head.parameters()], lr=lr)
    mask = _mask(torch, lengths, x.shape[0])
    as_written = window is None
    size, losses, carry = window or 1, [], None
    context = torch.autograd.graph.allow_mutation_on_saved_tensors
    with context() if as_written else contextlib.nullcontext():
        for start in range(0, x.shape[0], size):
            optimizer.zero_grad()
            if carry is not None and not as_written:
                carry = carry.detach()  # a GRU's carry: one tensor
            step_losses = []
            for t in range(start, min(start + size, x.shape[0])):
                out, carry = module(x[t : t + 1], carry)
                each = _torch_step_losses(torch, head(out), classes[t : t + 1], "ce")[0]
                step_losses.append((each * mask[t]).sum() / x.shape[1])
            torch.stack(step_losses).sum().backward(retain_graph=as_written)
            optimizer.step()
            losses.extend(s.item() for s in step_losses)
    return np.array(losses), _states(module, head)


@pytest.mark.torch
@pytest.mark.parametrize(
    "run",
    [
        {"mode": "tbptt", "window": 2},
        {"mode": "as_written", "as_written_method": "forward"},
        {"mode": "as_written", "as_written_method": "reverse", "loop": "fori"},
    ],
    ids=["tbptt", "as_written_forward", "as_written_reverse"],
)
def test_train_rnn_with_loss_fn_and_lengths_matches_pytorch(run):
    torch = pytest.importorskip("torch")
    module, head, x, y, classes = _problem(torch, kind="gru", layers=1)
    params, inputs, targets = _jax_args(torch, module, head, x, y, classes, "ce")
    result = lg.train_rnn(
        params, inputs, targets, lr=0.1, loss_fn=cross_entropy, lengths=LENGTHS, **run
    )
    losses, states = _torch_train(torch, module, head, x, classes, LENGTHS, 0.1, run.get("window"))
    np.testing.assert_allclose(result.losses, losses, rtol=TOL["float64"], atol=TOL["float64"])
    assert_close(lg.to_torch(result.params), states, TOL["float64"])


def _params(kind: str) -> lg.CellParams:
    """A one-layer module of ``kind`` with a head, drawn as PyTorch draws it, in float64."""
    return lg.init_cell(jax.random.key(0), kind, N_IN, H, N_OUT, dtype=jnp.float64)


def test_flax_train_takes_loss_fn_and_class_targets():
    # Equal to train_rnn on the same weights: flax_train runs the model's cells with
    # the same loss_fn (a TorchCell model keeps PyTorch's parameterisation).
    from flax import nnx

    params = _params("gru")
    inputs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    classes = jax.random.randint(jax.random.key(2), (T, B), 0, N_OUT)
    model = lg.to_flax(params)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    ours = lg.flax_train(model, opt, inputs, classes, loss_fn=cross_entropy, mode="tbptt", window=2)
    expected = lg.train_rnn(
        params, inputs, classes, lr=0.1, loss_fn=cross_entropy, mode="tbptt", window=2
    )
    np.testing.assert_allclose(ours.losses, expected.losses, rtol=TOL["float64"])
    assert_close(lg.from_flax(model), expected.params, TOL["float64"])


def test_lengths_of_T_and_mean_are_the_plain_sum_over_T():
    params = _params("lstm")
    x = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (T, B, N_OUT), jnp.float64)
    total = lg.rnn_loss(params, x, y)
    full = jnp.full((B,), T)
    np.testing.assert_allclose(lg.rnn_loss(params, x, y, lengths=full), total, rtol=1e-14)
    mean = lg.rnn_loss(params, x, y, reduction="mean", lengths=full)
    np.testing.assert_allclose(mean, total / T, rtol=1e-14)


@pytest.mark.parametrize("entry", ["rnn_loss", "train_rnn"])
def test_traced_lengths_out_of_range_poison_loss_and_gradients(entry):
    params = _params("gru")
    x = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (T, B, N_OUT), jnp.float64)

    def value(p, lengths):
        if entry == "rnn_loss":
            return lg.rnn_loss(p, x, y, lengths=lengths, reduction="mean")
        return lg.train_rnn(p, x, y, lengths=lengths, mode="tbptt", window=2).losses.sum()

    run = jax.jit(jax.value_and_grad(value))
    good_value, good_grads = run(params, jnp.array([1, T, 3]))
    assert np.isfinite(good_value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(good_grads))
    for bad in ([0, T, 3], [1, T + 1, 3]):
        bad_value, bad_grads = run(params, jnp.array(bad))
        assert np.isnan(bad_value), bad
        assert all(np.all(np.isnan(g)) for g in jax.tree.leaves(bad_grads)), bad


def _small():
    params = _params("gru")
    x = jnp.zeros((T, B, N_IN), jnp.float64)
    y = jnp.zeros((T, B, N_OUT), jnp.float64)
    return params, x, y


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "avg"}, ValueError, r"reduction must be one of 'sum', 'mean', got 'avg'"),
        ({"loss_fn": "mse"}, TypeError, r"loss_fn must be a function .* got str"),
        (
            {"loss_fn": lambda p, y: (p - y) ** 2},
            ValueError,
            r"loss_fn must return a floating-point scalar .* got float64\[3, 5\] for "
            r"prediction_t float64\[3, 5\] and target_t float64\[3, 5\]",
        ),
        (
            {"loss_fn": lambda p, y: p[y]},
            ValueError,
            r"calling loss_fn on one step \(prediction_t float64\[3, 5\] and target_t "
            r"float64\[3, 5\]\) failed",
        ),
        (
            {"loss_fn": cross_entropy, "targets": jnp.zeros((T, 2), jnp.int32)},
            ValueError,
            r"targets must have shape \(T, B, \.\.\.\) with T=5, B=3 from inputs, got shape "
            r"\(5, 2\)",
        ),
        ({"lengths": [0, 5, 3]}, ValueError, r"lengths must be between 1 and T=5 .* got \[0\] "),
        ({"lengths": [1, 6, 3]}, ValueError, r"got \[6\] at examples \[1\]"),
        ({"lengths": [1.0, 2.0, 3.0]}, TypeError, r"lengths must be integers .* float"),
        ({"lengths": [1, 2]}, ValueError, r"lengths must have shape \(3,\) = \(B,\) with B=3"),
    ],
)
@pytest.mark.parametrize("entry", ["rnn_loss", "train_rnn"])
def test_bad_loss_options_are_refused_naming_them(entry, kwargs, error, match):
    params, x, y = _small()
    kwargs = dict(kwargs)
    targets = kwargs.pop("targets", y)
    if entry == "train_rnn":
        if "reduction" in kwargs:
            pytest.skip("reduction is rnn_loss's")
        fn = lg.train_rnn
    else:
        fn = lg.rnn_loss
    with pytest.raises(error, match=match):
        fn(params, x, targets, **kwargs)


def test_without_loss_fn_targets_must_still_be_float_outputs():
    params, x, _ = _small()
    with pytest.raises(TypeError, match=r"targets must have a floating-point dtype"):
        lg.rnn_loss(params, x, jnp.zeros((T, B), jnp.int32))
