"""Your own loss: ``reduction``, ``loss_fn`` and ``lengths``, against PyTorch's losses.

Each reference runs PyTorch's module and head on the same weights: ``nn.MSELoss()`` and
``nn.CrossEntropyLoss()`` over the head's outputs of the whole sequence, and masked
losses over padded sequences (``lengths``), summed over the real steps and divided by
``B`` (``reduction="sum"``) or by the number of real steps (``"mean"``). Training runs
(``train_rnn``) are checked against PyTorch loops that take the same loss of each
update's steps (a window's, or one step's) and step SGD or Adam; ``flax_train`` and
``flax_loss`` against ``train_rnn`` and ``rnn_loss`` on the same weights.
"""

import functools

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
    if reduction == "sum":
        return total / prediction.shape[1]
    return total / mask.sum() if mask.sum() > 0 else total  # no real step: 0


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


def _torch_train(torch, module, head, x, target, window, *, loss, reduction, lengths, optimizer):
    """A PyTorch training loop over one sequence: each update's loss is ``loss`` over its
    steps' head outputs, reduced as :func:`_torch_loss` reduces a whole sequence (the
    mean: ``nn.MSELoss()`` / ``nn.CrossEntropyLoss()`` of the window's outputs, or the
    masked mean over its real steps). ``window=None`` is the article's loop as written
    (an update per step under ``allow_mutation_on_saved_tensors``, as
    torch_reference._cell_train runs it); otherwise truncated BPTT, the GRU's carry
    detached between windows. ``optimizer`` maps the parameters to a torch optimizer.

    Returns each update's loss and the final weights.
    """
    import contextlib

    optimizer = optimizer([*module.parameters(), *head.parameters()])
    as_written = window is None
    size, losses, carry = window or 1, [], None
    context = torch.autograd.graph.allow_mutation_on_saved_tensors
    with context() if as_written else contextlib.nullcontext():
        for start in range(0, x.shape[0], size):
            optimizer.zero_grad()
            if carry is not None and not as_written:
                carry = carry.detach()  # a GRU's carry: one tensor
            outs = []
            for t in range(start, min(start + size, x.shape[0])):
                out, carry = module(x[t : t + 1], carry)
                outs.append(head(out))
            steps = slice(start, start + len(outs))
            window_lengths = None
            if lengths is not None:  # each example's real steps within this window
                window_lengths = [min(max(n - start, 0), len(outs)) for n in lengths]
            value = _torch_loss(
                torch, torch.cat(outs), target[steps], loss, reduction, window_lengths
            )
            value.backward(retain_graph=as_written)
            optimizer.step()
            losses.append(value.item())
    return np.array(losses), _states(module, head)


def _update_losses(losses, window):
    """Our per-step ``TrainResult.losses`` summed per update (``window=None``: one step)."""
    size = window or 1
    return np.array([losses[i : i + size].sum() for i in range(0, len(losses), size)])


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
    window = run.get("window")
    losses, states = _torch_train(
        torch,
        module,
        head,
        x,
        classes,
        window,
        loss="ce",
        reduction="sum",
        lengths=LENGTHS,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
    )
    ours = _update_losses(result.losses, window)
    np.testing.assert_allclose(ours, losses, rtol=TOL["float64"], atol=TOL["float64"])
    assert_close(lg.to_torch(result.params), states, TOL["float64"])


#: train_rnn's runs against PyTorch's loops: name: (train_rnn's mode options, window).
RUNS = {
    "tbptt_2": ({"mode": "tbptt", "window": 2}, 2),
    "whole": ({}, T),  # the default: one update over the whole sequence
    "as_written": ({"mode": "as_written"}, None),
}


@pytest.mark.torch
# The quick tier: windows with lengths, and cross-entropy as written; the full tier every pair.
@pytest.mark.parametrize(
    ("run", "case"),
    [
        (run, case)
        if (run, case) in {("tbptt_2", "mse_lengths_mean"), ("as_written", "ce_mean")}
        else pytest.param(run, case, marks=pytest.mark.slow)
        for run in RUNS
        for case in ["mse_mean", "ce_mean", "mse_lengths_mean"]
    ],
)
def test_train_rnn_mean_with_adam_matches_a_pytorch_loop(run, case):
    # The issue: a GRU trained with Adam on nn.MSELoss() drifted from PyTorch because
    # train_rnn summed over the steps where nn.MSELoss() averages. reduction="mean" is
    # PyTorch's loss of each update's outputs; each window's entries of losses sum to it.
    torch = pytest.importorskip("torch")
    loss, reduction, lengths = {**CASES, "mse_lengths_mean": ("mse", "mean", LENGTHS)}[case]
    options, window = RUNS[run]
    module, head, x, y, classes = _problem(torch, kind="gru", layers=1)
    params, inputs, targets = _jax_args(torch, module, head, x, y, classes, loss)
    # optax.adam's bias correction mixes a Python float with its int32 step count, which
    # this suite's strict dtype promotion refuses; a user's default promotion takes it.
    with jax.numpy_dtype_promotion("standard"):
        result = lg.train_rnn(
            params,
            inputs,
            targets,
            optimizer=optax.adam(0.05),
            reduction=reduction,
            loss_fn=_loss_fn(loss),
            lengths=lengths,
            **options,
        )
    losses, states = _torch_train(
        torch,
        module,
        head,
        x,
        y if loss == "mse" else classes,
        window,
        loss=loss,
        reduction=reduction,
        lengths=lengths,
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
    )
    np.testing.assert_allclose(
        _update_losses(result.losses, window), losses, rtol=TOL["float64"], atol=TOL["float64"]
    )
    assert_close(lg.to_torch(result.params), states, TOL["float64"], case)


@pytest.mark.slow
def test_train_rnn_mean_windows_without_real_steps_count_zero():
    # Every example ends within the first window: the later windows' mean has no step to
    # average over. Their loss and gradient are 0 (not 0/0), as with reduction="sum".
    params = _params("gru")
    x = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (T, B, N_OUT), jnp.float64)
    lengths = jnp.array([2, 1, 2])
    mean = lg.train_rnn(params, x, y, window=2, reduction="mean", lengths=lengths)
    np.testing.assert_array_equal(mean.losses[2:], 0.0)
    for g in jax.tree.leaves(mean.grads):
        np.testing.assert_array_equal(g[1:], 0.0)
    # The first window is rnn_loss's mean over its 2 steps (5 real ones of 2 * B).
    first = lg.rnn_loss(params, x[:2], y[:2], reduction="mean", lengths=lengths)
    np.testing.assert_allclose(mean.losses[:2].sum(), first, rtol=1e-14)


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


@pytest.mark.parametrize("mode", [pytest.param("tbptt", marks=pytest.mark.slow), "as_written"])
def test_flax_train_with_lengths_and_mean_equals_train_rnn(mode):
    # A TorchCell model keeps PyTorch's parameterisation, so flax_train follows
    # train_rnn on the same weights, which the tests above pin to PyTorch's loops.
    nnx = pytest.importorskip("flax.nnx")
    params = _params("gru")
    inputs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    if mode == "tbptt":  # the squared error, windows of 2
        targets, loss_fn = jax.random.normal(jax.random.key(2), (T, B, N_OUT), jnp.float64), None
        run = {"mode": "tbptt", "window": 2}
    else:  # cross-entropy on class indices, an update per step
        targets, loss_fn = jax.random.randint(jax.random.key(2), (T, B), 0, N_OUT), cross_entropy
        run = {"mode": "as_written"}
    options = {"loss_fn": loss_fn, "lengths": jnp.array(LENGTHS), "reduction": "mean", **run}
    model = lg.to_flax(params)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    ours = lg.flax_train(model, opt, inputs, targets, **options)
    expected = lg.train_rnn(params, inputs, targets, lr=0.1, **options)
    np.testing.assert_allclose(ours.losses, expected.losses, rtol=TOL["float64"])
    assert_close(lg.from_flax(model), expected.params, TOL["float64"], mode)


@pytest.mark.parametrize(
    ("case", "loop"),
    [
        pytest.param(case, loop, marks=[] if quick else [pytest.mark.slow])
        for case in ["mse_lengths_sum", "ce_lengths_mean", "mse_mean"]
        for loop in [None, "scan"]
        for quick in [(case, loop) == ("ce_lengths_mean", None)]
    ],
    ids=lambda v: "nnx.RNN" if v is None else v,
)
def test_flax_loss_takes_lengths_reduction_and_loss_fn_as_rnn_loss(loop, case):
    # loop=None runs nnx.RNN with seq_lengths (zero outputs past each example's end);
    # a loop kind steps the cells on, and the padded steps count for nothing either way.
    nnx = pytest.importorskip("flax.nnx")
    loss, reduction, lengths = CASES[case]
    params = lg.init_cell(jax.random.key(0), "lstm", N_IN, H, N_OUT, 2, dtype=jnp.float64)
    inputs = jax.random.normal(jax.random.key(1), (T, B, N_IN), jnp.float64)
    if loss == "mse":
        targets = jax.random.normal(jax.random.key(2), (T, B, N_OUT), jnp.float64)
    else:
        targets = jax.random.randint(jax.random.key(2), (T, B), 0, N_OUT)
    options = {"reduction": reduction, "loss_fn": _loss_fn(loss), "lengths": lengths}
    model = lg.to_flax(params)
    value, grads = nnx.value_and_grad(
        lambda m: lg.flax_loss(m, inputs, targets, loop=loop, **options)
    )(model)
    expected, expected_grads = jax.value_and_grad(
        lambda p: lg.rnn_loss(p, inputs, targets, **options)
    )(params)
    np.testing.assert_allclose(value, expected, rtol=TOL["float64"])
    grads = lg.from_flax(nnx.merge(nnx.graphdef(model), grads))
    assert_close(grads.layers, expected_grads.layers, TOL["float64"], case)
    assert_close(grads.head_weight, expected_grads.head_weight, TOL["float64"], case)


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
@pytest.mark.parametrize("entry", ["rnn_loss", "train_rnn", "flax_loss", "flax_train"])
def test_bad_loss_options_are_refused_naming_them(entry, kwargs, error, match):
    params, x, y = _small()
    kwargs = dict(kwargs)
    targets = kwargs.pop("targets", y)
    if entry.startswith("flax"):
        nnx = pytest.importorskip("flax.nnx")
        model = lg.to_flax(params)
        if entry == "flax_loss":
            fn = functools.partial(lg.flax_loss, model)
        else:
            opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
            fn = functools.partial(lg.flax_train, model, opt)
        args = (x, targets)
    else:
        fn, args = getattr(lg, entry), (params, x, targets)
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_without_loss_fn_targets_must_still_be_float_outputs():
    params, x, _ = _small()
    with pytest.raises(TypeError, match=r"targets must have a floating-point dtype"):
        lg.rnn_loss(params, x, jnp.zeros((T, B), jnp.int32))
