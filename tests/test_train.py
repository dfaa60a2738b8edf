"""Scenario 3's training loops: ``train_rnn`` as the article writes it, and truncated BPTT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    DTYPES,
    LOOP_VARIANTS,
    TOL,
    assert_close,
    assert_passes,
    count_compilations,
    fixture,
    has_reverse_mode,
    params_of,
    parity_params,
    random_rnn_problem,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import loopgrad_jax as lg
from loopgrad_jax import parity

REVERSE_VARIANTS = tuple(filter(has_reverse_mode, LOOP_VARIANTS))


def _train(params, inputs, targets, hidden0, **kwargs):
    return lg.train_rnn(params, inputs, targets, hidden0=hidden0, **kwargs)


def _is_resumed(check):
    return "resume_at" in fixture(check.scenario, check.dtype).case(check.case)


AS_WRITTEN_CHECKS = parity.checks(["train_as_written"], grid="suite")


@pytest.mark.parametrize(
    "check", parity_params([c for c in AS_WRITTEN_CHECKS if not _is_resumed(c)], quick_every=2)
)
def test_as_written_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.parametrize(
    "check", parity_params(parity.checks(["train_tbptt"], grid="suite"), quick_every=2)
)
def test_tbptt_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.parametrize("dtype", DTYPES)
def test_article_literal_raises_at_step_two(dtype):
    record = fixture("article_literal", dtype).case("article")
    assert record["raised"] is True
    assert record["exception_type"] == "RuntimeError"
    assert "modified by an inplace operation" in record["message"]
    assert record["step"] == 2
    assert record["losses_before"].shape == (2,)


@settings(max_examples=2, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    t=st.integers(1, 8),
    b=st.integers(1, 3),
    i=st.integers(1, 3),
    h=st.integers(1, 4),
    o=st.integers(1, 2),
)
def test_forward_and_reverse_methods_agree(seed, t, b, i, h, o):
    problem = random_rnn_problem(jax.random.key(seed), t, b, i, h, o)
    fwd = _train(*problem, lr=0.1, mode="as_written", as_written_method="forward")
    rev = _train(*problem, lr=0.1, mode="as_written", as_written_method="reverse", loop="fori")
    assert_close(fwd, rev, TOL["float64"])


@settings(max_examples=2, deadline=None)
@pytest.mark.slow  # the full tier: many drawn examples (3.8 s)
@given(
    seed=st.integers(0, 2**16),
    t=st.integers(1, 9),
    window=st.integers(1, 9),
    loop=st.sampled_from(REVERSE_VARIANTS),
)
def test_tbptt_windows(seed, t, window, loop):
    window = min(window, t)
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(seed), t, 2, 2, 3, 1)
    result = _train(params, inputs, targets, hidden0, mode="tbptt", window=window, loop=loop)
    # The first window's gradient is the full-BPTT gradient of the first `window` steps.
    first = jax.grad(lg.rnn_loss)(params, inputs[:window], targets[:window], hidden0=hidden0)
    assert_close(jax.tree.map(lambda g: g[0], result.grads), first, TOL["float64"])
    # Each later window starts from the weights after the updates before it.
    p = params
    for k in range(result.grads.i2h_bias.shape[0]):
        p = jax.tree.map(lambda w, g, k=k: w - 0.01 * g[k], p, result.grads)
    assert_close(result.params, p, TOL["float64"])


def _tbptt_over_four_windows(loop, lr=0.1, params=None, inputs=None):
    problem = random_rnn_problem(jax.random.key(20), 7, 2, 2, 3, 1)
    params = problem[0] if params is None else params
    inputs = problem[1] if inputs is None else inputs
    return lg.train_rnn(
        params, inputs, problem[2], hidden0=problem[3], lr=lr, mode="tbptt", window=2, loop=loop
    )


@pytest.mark.parametrize("loop", ["while:max_steps=2", "while:max_steps=2:checkpoints=2"])
def test_tbptt_bounded_while_bounds_each_window_not_their_number(loop):
    # max_steps bounded the loop over the windows too: windows of 2, 2, 2 and 1 steps
    # (T=7; the loop runs the three full ones) were refused with "length=3 exceeds the
    # loop's max_steps=2".
    expected = _tbptt_over_four_windows("scan")
    assert_close(_tbptt_over_four_windows(loop), expected, TOL["float64"])


@pytest.mark.slow  # the full tier (3.5 s)
def test_tbptt_bounded_while_run_differentiates_as_scan():
    # (A loop with checkpoints has no reverse mode of its reverse mode: Loop's docstring.)
    params, inputs = random_rnn_problem(jax.random.key(20), 7, 2, 2, 3, 1)[:2]

    def run(lr, params, inputs, loop):
        r = _tbptt_over_four_windows(loop, lr, params, inputs)
        return r.losses.sum() + sum(leaf.sum() for leaf in jax.tree.leaves(r.params))

    grads = jax.grad(run, argnums=(0, 1, 2))
    expected = grads(jnp.float64(0.1), params, inputs, "scan")
    assert_close(
        grads(jnp.float64(0.1), params, inputs, "while:max_steps=2"), expected, TOL["float64"]
    )


def test_default_is_one_update_over_the_whole_sequence():
    # The default was the article's per-step loop (mode="as_written"): T updates.
    problem = random_rnn_problem(jax.random.key(1), 9, 2, 3, 4, 2)
    default = _train(*problem)
    assert default.grads.i2h_bias.shape[0] == 1
    assert_close(default, _train(*problem, mode="tbptt", window=9), 0.0)
    assert_close(_train(*problem, mode="tbptt"), default, 0.0)


def test_window_T_is_one_backward_over_the_sequence():
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(1), 9, 2, 3, 4, 2)
    result = _train(params, inputs, targets, hidden0, mode="tbptt", window=9)
    loss, grad = jax.value_and_grad(lg.rnn_loss)(params, inputs, targets, hidden0=hidden0)
    assert_close(jax.tree.map(lambda g: g[0], result.grads), grad, TOL["float64"])
    np.testing.assert_allclose(result.losses.sum(), loss, rtol=TOL["float64"])


def test_first_as_written_step_is_plain_gradient():
    # At t=0 there is no history: the gradient is that of the first step's loss alone.
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(2), 5, 2, 3, 4, 1)
    for method in ("forward", "reverse"):
        result = _train(
            params, inputs, targets, hidden0, mode="as_written", as_written_method=method
        )
        first = jax.grad(lg.rnn_loss)(params, inputs[:1], targets[:1], hidden0=hidden0)
        assert_close(jax.tree.map(lambda g: g[0], result.grads), first, TOL["float64"])


def test_jitted_train_rnn_compiles_once():
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(0), 6, 2, 3, 4, 1)
    traces = []

    @jax.jit
    def train(params, inputs, targets, hidden0):
        traces.append(None)  # runs once per trace
        return lg.train_rnn(params, inputs, targets, hidden0=hidden0, mode="as_written")

    first = train(params, inputs, targets, hidden0)
    moved = jax.tree.map(lambda a: a + 1.0, (params, inputs, targets, hidden0))
    second = train(*moved)
    assert len(traces) == 1
    assert train._cache_size() == 1
    assert not np.allclose(first.losses, second.losses)


def test_custom_optimizer_state_is_carried():
    # optax.sgd with momentum keeps a trace; with momentum 0 it must equal plain SGD.
    problem = random_rnn_problem(jax.random.key(4), 6, 2, 3, 4, 1)
    plain = _train(*problem, lr=0.05, mode="tbptt", window=2)
    zero = _train(*problem, mode="tbptt", window=2, optimizer=optax.sgd(0.05, momentum=0.0))
    heavy = _train(*problem, mode="tbptt", window=2, optimizer=optax.sgd(0.05, momentum=0.9))
    # optax.sgd(momentum=0.0) keeps a (zero-weighted) trace in its state; the rest is equal.
    assert_close(zero._replace(opt_state=None), plain._replace(opt_state=None), TOL["float64"])
    # With momentum the second update is lr * (g2 + 0.9 g1), not lr * g2.
    g = heavy.grads.i2h_weight
    after_two = problem[0].i2h_weight - 0.05 * g[0] - 0.05 * (g[1] + 0.9 * g[0])
    later = heavy.params.i2h_weight
    assert not np.allclose(later, plain.params.i2h_weight)
    two = _train(
        *(p[:4] if i in (1, 2) else p for i, p in enumerate(problem)),
        mode="tbptt",
        window=2,
        optimizer=optax.sgd(0.05, momentum=0.9),
    )
    np.testing.assert_allclose(two.params.i2h_weight, after_two, rtol=TOL["float64"])


def test_multi_steps_is_accepted_and_accumulates_as_optax_documents():
    # optax.MultiSteps has init and update but is no GradientTransformation: it was refused.
    # Its semantics, written out: each update's gradient is accumulated, and every
    # second one applies SGD to the mean of the two; between, the weights stay.
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(21), 5, 2, 3, 4, 1)
    # (MultiSteps accumulates in float32 unless told; float64 keeps the comparison exact.)
    optimizer = optax.MultiSteps(optax.sgd(0.3), every_k_schedule=2, accumulator_dtype=jnp.float64)
    with jax.numpy_dtype_promotion("standard"):  # optax's own promotions (scenarios._promotion)
        result = _train(
            params, inputs, targets, hidden0, mode="tbptt", window=1, optimizer=optimizer
        )

    def step(p, h, x, y):
        h = lg.rnn_cell(p, h, x)
        return lg.step_loss(p, h, y), h

    p, h, pending, losses = params, hidden0, None, []
    for t in range(5):
        (loss, new_h), g = jax.value_and_grad(step, has_aux=True)(p, h, inputs[t], targets[t])
        losses.append(loss)
        h = new_h
        if pending is None:
            pending = g
        else:
            p = jax.tree.map(lambda w, a, b: w - 0.3 * (a + b) / 2, p, pending, g)
            pending = None
    assert_close(result.params, p, TOL["float64"], "params")
    assert_close(result.losses, jnp.stack(losses), TOL["float64"], "losses")
    assert_close(result.hidden, h, TOL["float64"], "hidden")


def test_an_optimizer_without_init_and_update_is_refused():
    problem = random_rnn_problem(jax.random.key(0), 4, 1, 2, 3, 1)

    class InitOnly:
        def init(self, params):
            return ()

    want = (
        r"optimizer must be an optax.GradientTransformation, or an object with methods .*InitOnly"
    )
    with pytest.raises(TypeError, match=want):
        _train(*problem, optimizer=InitOnly())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "bptt"}, ValueError, r"mode must be one of 'as_written', 'tbptt', got 'bptt'"),
        ({"as_written_method": "rtrl"}, ValueError, r"as_written_method must be one of 'auto'"),
        ({"mode": "tbptt", "window": 0}, ValueError, r"window must be an int >= 1, got 0"),
        ({"mode": "tbptt", "window": 5}, ValueError, r"window must be between 1 and T=4"),
        ({"mode": "tbptt", "window": 1.5}, TypeError, r"window must be a Python int"),
        ({"mode": "as_written", "window": 2}, ValueError, r"window applies only to mode='tbptt'"),
        ({"mode": "tbptt", "as_written_method": "forward"}, ValueError, r"applies only to"),
        ({"lr": -0.1}, ValueError, r"lr must be a finite number >= 0 .*, got -0.1"),
        ({"lr": float("nan")}, ValueError, r"lr must be a finite number >= 0 .*, got nan"),
        ({"lr": "0.1"}, TypeError, r"lr must be a number or a scalar array, got str '0.1'"),
        ({"lr": np.ones(2)}, TypeError, r"lr must be a real scalar, got an array of shape \(2,\)"),
        (
            {"lr": 0.1, "optimizer": optax.sgd(0.1)},
            ValueError,
            r"lr sets the learning rate of the default optimizer.*set the learning rate on",
        ),
        ({"keep_grads": "first"}, ValueError, r"keep_grads must be one of 'all', 'last', 'none'"),
        ({"hoist_input": 1}, TypeError, r"hoist_input must be a bool, got int"),
        (
            {"optimizer": optax.sgd(0.1, momentum=0.9), "opt_state": optax.sgd(0.1).init({})},
            ValueError,
            r"opt_state must have the structure optimizer.init\(params\) gives",
        ),
        ({"optimizer": "adam"}, TypeError, r"optimizer must be an optax.GradientTransformation"),
        ({"loop": "for"}, ValueError, r"loop must be one of"),
        (
            {"mode": "tbptt", "loop": "while"},
            ValueError,
            r"loop='while' cannot be used with "
            r"train_rnn\(mode='tbptt'\).*static memory bounds.*'python', 'scan', 'fori', 'remat'",
        ),
        (
            {"mode": "as_written", "hoist_input": True},
            ValueError,
            r"hoist_input applies only to mode='tbptt'",
        ),
        (
            {"mode": "tbptt", "window": 3, "loop": "while:max_steps=2"},
            ValueError,
            r"window=3 exceeds the loop's max_steps=2 .* bounds each window's loop",
        ),
        (
            {"mode": "as_written", "loop": "while:max_steps=2"},
            ValueError,
            r"T=4 exceeds the loop's max_steps=2",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(0), 4, 1, 2, 3, 1)
    with pytest.raises(error, match=match):
        _train(params, inputs, targets, hidden0, **kwargs)


def test_traced_window_explains_static_arguments():
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(0), 4, 1, 2, 3, 1)
    fn = jax.jit(lambda w: _train(params, inputs, targets, hidden0, mode="tbptt", window=w))
    with pytest.raises(TypeError, match=r"window must be a static Python int"):
        fn(2)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("rmsprop", 0.1), {}, ValueError, r"name must be one of 'sgd', 'adam', 'adamw'"),
        (("sgd", 0.1), {"betas": (0.9, 0.99)}, TypeError, r"takes momentum, nesterov, weight"),
        (("sgd", 0.1), {"nesterov": True}, ValueError, r"nesterov=True needs momentum > 0"),
    ],
)
def test_torch_optimizer_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        lg.torch_optimizer(*args, **kwargs)


def test_torch_optimizer_sgd_weight_decay_is_l2_on_the_gradient():
    # torch.optim.SGD(weight_decay=wd): p <- p - lr * (g + wd * p).
    params = {"w": jnp.array([1.0, -2.0], jnp.float64)}
    grads = {"w": jnp.array([0.5, 0.25], jnp.float64)}
    opt = lg.torch_optimizer("sgd", 0.1, weight_decay=0.01)
    updates, _ = opt.update(grads, opt.init(params), params)
    expected = -0.1 * (grads["w"] + 0.01 * params["w"])
    np.testing.assert_allclose(updates["w"], expected, rtol=TOL["float64"])


# ------------------------------------------------------------ continuing a run


@pytest.mark.parametrize("check", parity_params([c for c in AS_WRITTEN_CHECKS if _is_resumed(c)]))
def test_as_written_second_call_starts_a_new_history_as_pytorch_does(check):
    # PyTorch ran the loop for `resume_at` steps, then went on from hidden.detach() with
    # the same model and optimizer: a new graph, which is what a second call computes.
    assert_passes(check)
    # One call keeps the history across the cut: its gradient there differs.
    c = fixture(check.scenario, check.dtype).case(check.case)
    opt = lg.torch_optimizer(**c["optimizer"])
    kwargs = {"optimizer": opt, "mode": "as_written", "as_written_method": check.method}
    kwargs["loop"] = check.loop
    params, x, y = params_of(c["params"]), c["inputs"], c["targets"]
    one = lg.train_rnn(params, x, y, hidden0=c["hidden0"], **kwargs)
    cut = c["resume_at"]
    # The passed check matched the two calls' gradients to these, PyTorch's.
    assert not np.allclose(one.grads.i2h_weight[cut], c["grads"]["i2h_weight"][cut], rtol=1e-3)


#: Every optimizer kind: plain, with state, and those that take the loss (value, value_fn).
RESUMABLE_OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: lg.torch_optimizer("sgd", 0.05, momentum=0.9),
    "adam": lambda: lg.torch_optimizer("adam", 0.05),
    "lbfgs": lambda: optax.lbfgs(),
    "plateau": lambda: optax.chain(
        optax.sgd(0.05), optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    ),
}


# lbfgs resumes like the others (its state is all in opt_state), but its line search takes
# 40 s to compile here; test_optimizers_that_need_the_loss_get_it runs it instead.
# One optimizer per kind of state: Adam's moments and step count (a superset of
# momentum's trace), a contrib transformation's own (sgd has none: every other resume
# test uses it); nesterov and adamw keep the same states as momentum and adam.
@pytest.mark.parametrize("name", ["adam", "plateau"])
def test_tbptt_two_calls_split_at_a_window_equal_one(name):
    params, x, y, h0 = random_rnn_problem(jax.random.key(7), 8, 2, 3, 4, 1)
    cut = 3  # windows of 3, 3, 2: the second call runs a full window and a shorter one
    kwargs = {"mode": "tbptt", "window": 3, "optimizer": RESUMABLE_OPTIMIZERS[name]()}
    with jax.numpy_dtype_promotion("standard"):  # optax's own promotions (scenarios._promotion)
        one = lg.train_rnn(params, x, y, hidden0=h0, **kwargs)
        first = lg.train_rnn(params, x[:cut], y[:cut], hidden0=h0, **kwargs)
        second = lg.train_rnn(
            first.params,
            x[cut:],
            y[cut:],
            hidden0=first.hidden,
            opt_state=first.opt_state,
            **kwargs,
        )
    assert_close(jnp.concatenate([first.losses, second.losses]), one.losses, TOL["float64"])
    grads = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first.grads, second.grads)
    assert_close(grads, one.grads, TOL["float64"], "grads")
    assert_close(second.params, one.params, TOL["float64"], "params")
    assert_close(second.hidden, one.hidden, TOL["float64"], "hidden")
    assert_close(second.opt_state, one.opt_state, TOL["float64"], "opt_state")


def _window_oracle(optimizer, params, x, y, h0, window):
    """Truncated BPTT in a plain Python loop, passing optax everything it may need."""
    update = optax.with_extra_args_support(optimizer).update

    @jax.jit  # one window's update; jitted only because eager line searches are slow
    def window_update(params, state, hidden, xw, yw):
        def loss(p):
            return lg.rnn_loss(p, xw, yw, hidden0=hidden, loop="scan")

        value, grad = jax.value_and_grad(loss)(params)
        updates, state = update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state, hidden = optimizer.init(params), h0
    for start in range(0, x.shape[0], window):
        xw, yw = x[start : start + window], y[start : start + window]
        new_params, state = window_update(params, state, hidden, xw, yw)
        # The window's last hidden state, at the weights before this update.
        hidden = lg.train_rnn(params, xw, yw, hidden0=hidden, mode="tbptt", window=1, lr=0).hidden
        params = new_params
    return params


@pytest.mark.parametrize("name", [pytest.param("lbfgs", marks=pytest.mark.slow), "plateau"])
def test_optimizers_that_need_the_loss_get_it(name):
    # optax.lbfgs needs value, grad and value_fn; reduce_on_plateau needs value.
    # Three windows of 3: the oracle compiles one window's update, once.
    problem = random_rnn_problem(jax.random.key(8), 9, 2, 3, 4, 1)
    optimizer = RESUMABLE_OPTIMIZERS[name]()
    with jax.numpy_dtype_promotion("standard"):
        result = _train(*problem, mode="tbptt", window=3, optimizer=optimizer)
        expected = _window_oracle(optimizer, *problem, window=3)
    assert_close(result.params, expected, TOL["float64"])


def test_as_written_passes_each_step_loss_as_value():
    # reduce_on_plateau halves the step after `patience` steps without a lower loss.
    problem = random_rnn_problem(jax.random.key(9), 8, 2, 3, 4, 1)
    optimizer = RESUMABLE_OPTIMIZERS["plateau"]()
    with jax.numpy_dtype_promotion("standard"):
        result = _train(*problem, mode="as_written", optimizer=optimizer)
        params, state = problem[0], optimizer.init(problem[0])
        for t in range(8):
            grad = jax.tree.map(lambda g, t=t: g[t], result.grads)
            updates, state = optimizer.update(grad, state, params, value=result.losses[t])
            params = optax.apply_updates(params, updates)
    assert_close(result.params, params, TOL["float64"])
    assert state[1].scale < 1.0  # the plateau rule did act


# ------------------------------------------------------------ outer gradients

OUTER_RUNS = {
    "tbptt_w2": {"mode": "tbptt", "window": 2},  # two windows of 2 and a last one of 1
    "tbptt_wT": {"mode": "tbptt", "window": 5},  # d hidden / d hidden0 is not zero
    "as_written_forward": {"mode": "as_written", "as_written_method": "forward"},
    "as_written_reverse": {"mode": "as_written", "as_written_method": "reverse"},
}


@pytest.mark.parametrize("run", OUTER_RUNS)
def test_outer_gradients_match_finite_differences(run):
    # The derivative of the whole run with respect to lr, the inputs, hidden0 and the
    # initial weights (what meta-learning differentiates), against float64 finite
    # differences. A stop_gradient on the carried hidden state made this fail.
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(10), 5, 2, 2, 3, 1)

    def train(lr, inputs, hidden0, params):
        r = lg.train_rnn(params, inputs, targets, lr=lr, hidden0=hidden0, **OUTER_RUNS[run])
        return r.params, r.losses, r.hidden

    args = (jnp.float64(0.3), inputs, hidden0, params)
    check_grads(train, args, order=1, modes=["rev"])


def test_traced_negative_lr_poisons_the_run():
    problem = random_rnn_problem(jax.random.key(11), 4, 1, 2, 3, 1)
    run = jax.jit(lambda lr: _train(*problem, lr=lr, mode="tbptt", window=2).params)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(run(0.1)))
    assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(run(-0.1)))


@pytest.mark.parametrize("mode", lg.MODES)
@pytest.mark.parametrize("lr", [-0.1, float("inf"), float("nan")])
def test_traced_bad_lr_poisons_the_gradients(mode, lr):
    # A poisoned value with a finite gradient (d/d lr was 0.0) stalls a meta-learner
    # silently: every derivative of the poisoned weights must be NaN as well.
    params, inputs, targets, hidden0 = random_rnn_problem(jax.random.key(11), 4, 1, 2, 3, 1)
    window = {"tbptt": {"window": 2}, "as_written": {}}[mode]

    def final_weights(lr, params, inputs):
        r = lg.train_rnn(params, inputs, targets, hidden0=hidden0, lr=lr, mode=mode, **window)
        return sum(leaf.sum() for leaf in jax.tree.leaves(r.params))

    grads = jax.grad(final_weights, argnums=(0, 1, 2))(jnp.float64(lr), params, inputs)
    assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(grads))
    finite = jax.grad(final_weights, argnums=(0, 1, 2))(jnp.float64(0.1), params, inputs)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(finite))


@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), jnp.float32(0.25), 1])
def test_lr_takes_numpy_and_jax_scalars(lr):
    problem = random_rnn_problem(jax.random.key(12), 4, 1, 2, 3, 1)
    expected = _train(*problem, lr=float(lr), mode="as_written")
    assert_close(_train(*problem, lr=lr, mode="as_written"), expected, TOL["float64"])


def test_opt_state_of_other_shapes_is_refused():
    params, x, y, h0 = random_rnn_problem(jax.random.key(13), 4, 1, 2, 3, 1)
    optimizer = optax.sgd(0.1, momentum=0.9)
    other = random_rnn_problem(jax.random.key(13), 4, 1, 2, 5, 1)[0]
    with pytest.raises(ValueError, match=r"opt_state\[0\]\.trace\.i2h_weight must have shape"):
        lg.train_rnn(params, x, y, optimizer=optimizer, opt_state=optimizer.init(other))


# ------------------------------------------------------------ what is returned


@pytest.mark.parametrize("mode", lg.MODES)
def test_keep_grads(mode):
    params, x, y, h0 = random_rnn_problem(jax.random.key(14), 7, 2, 3, 4, 1, dtype=jnp.float32)
    kwargs = {"mode": mode, "window": 3} if mode == "tbptt" else {"mode": mode}
    compiled = {
        k: jax.jit(lambda *a, k=k: lg.train_rnn(*a, keep_grads=k, **kwargs))
        .lower(params, x, y)
        .compile()
        for k in lg.KEEP_GRADS
    }
    kept = {k: fn(params, x, y) for k, fn in compiled.items()}
    assert_close(kept["last"].grads, jax.tree.map(lambda g: g[-1], kept["all"].grads), 0.0)
    assert kept["none"].grads is None
    for k in ("last", "none"):
        assert_close(kept[k].params, kept["all"].params, 0.0, k)

    updates = kept["all"].grads.i2h_bias.shape[0]
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    # The outputs hold every update's gradient, one, or none (XLA may pad each buffer).
    none, last, every = (
        compiled[k].memory_analysis().output_size_in_bytes for k in ("none", "last", "all")
    )
    assert every - none >= updates * weights
    assert weights <= last - none < 2 * weights


# ------------------------------------------------------------ compilation


TRAIN_CALLS = {
    "as_written": lambda p, x, y, h, lr: lg.train_rnn(p, x, y, hidden0=h, lr=lr, mode="as_written"),
    "reverse": lambda p, x, y, h, lr: lg.train_rnn(
        p, x, y, hidden0=h, lr=lr, mode="as_written", as_written_method="reverse"
    ),
    "tbptt": lambda p, x, y, h, lr: lg.train_rnn(p, x, y, hidden0=h, lr=lr, mode="tbptt", window=1),
    "grad_lr": lambda p, x, y, h, lr: jax.grad(
        lambda lr: lg.train_rnn(p, x, y, hidden0=h, lr=lr, mode="tbptt", window=1).losses.sum()
    )(lr),
}


@pytest.mark.parametrize("call", TRAIN_CALLS)
def test_repeated_eager_calls_compile_once(call):
    t = 4 + list(TRAIN_CALLS).index(call)
    # Sizes no other test uses, so the first call compiles (clearing JAX's caches instead
    # made every later test in the process compile again).
    first = random_rnn_problem(jax.random.key(15), t, 3, 5, 7, 1)
    second = random_rnn_problem(jax.random.key(16), t, 3, 5, 7, 1)
    with count_compilations() as lowered:
        TRAIN_CALLS[call](*first, 0.1)
    assert lowered  # the counter sees compilations
    with count_compilations() as lowered:
        TRAIN_CALLS[call](*second, 0.2)  # new values and a new lr: nothing to compile
    assert lowered == []


def test_equal_torch_optimizer_specs_compile_once():
    # torch_optimizer built a new object per call, and train_rnn compiled again for each.
    first = random_rnn_problem(jax.random.key(17), 5, 2, 4, 6, 1)
    second = random_rnn_problem(jax.random.key(18), 5, 2, 4, 6, 1)

    def train(problem):
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and float
            adam = lg.torch_optimizer("adam", lr=1e-3)
            return _train(*problem, mode="tbptt", window=1, optimizer=adam)

    with count_compilations() as lowered:
        train(first)
    assert lowered
    with count_compilations() as lowered:
        train(second)
    assert lowered == []


def _elman_step(p, h, x):
    return jnp.tanh(jnp.concatenate([x, h], axis=1) @ p["w"].T)


def _elman_readout(p, h):
    return h @ p["v"].T


def test_a_cell_of_fresh_lambdas_compiles_again_and_a_reused_one_does_not():
    # What the Cell docstring tells users: a Cell is compared by its functions.
    key = jax.random.split(jax.random.key(19), 3)
    params = {
        "w": jax.random.normal(key[0], (5, 8), jnp.float64),
        "v": jax.random.normal(key[1], (1, 5), jnp.float64),
    }
    x = jax.random.normal(key[2], (6, 2, 3), jnp.float64)
    y, h0 = jnp.zeros((6, 2, 1), jnp.float64), jnp.zeros((2, 5), jnp.float64)

    def fresh():
        return lg.Cell(lambda p, h, x: _elman_step(p, h, x), lambda p, h: _elman_readout(p, h))

    def train(cell):
        return lg.train_rnn(params, x, y, hidden0=h0, cell=cell, mode="as_written")

    runs = {}
    for name, make in [("module", lambda: lg.Cell(_elman_step, _elman_readout)), ("fresh", fresh)]:
        with count_compilations() as lowered:
            result = train(make())
        assert lowered, name
        with count_compilations() as lowered:
            runs[name] = train(make())  # a new Cell of the same shapes
        assert bool(lowered) == (name == "fresh"), name
        assert_close(runs[name], result, 0.0, name)
    assert_close(runs["fresh"], runs["module"], 0.0)


def test_line_search_is_refused_in_as_written_mode():
    problem = random_rnn_problem(jax.random.key(0), 4, 1, 2, 3, 1)
    want = r"optimizer's update needs 'value_fn', which mode='as_written' cannot give.*tbptt"
    with jax.numpy_dtype_promotion("standard"), pytest.raises(ValueError, match=want):
        _train(*problem, mode="as_written", optimizer=optax.lbfgs())


def test_tbptt_with_the_parallel_kind_runs_its_windows_in_turn():
    # The parallel kind solves each window's time loop; the windows carry the weights and
    # Adam's state (an integer step count, which DEER refuses as a carry) one after another.
    params, x, y, h0 = random_rnn_problem(jax.random.key(40), 6, 2, 3, 4, 1)
    adam = lg.torch_optimizer("adam", lr=0.01)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: a float to an int32 power
        runs = {
            loop: lg.train_rnn(params, x, y, hidden0=h0, window=2, optimizer=adam, loop=loop)
            for loop in ("scan", "parallel")
        }
    assert_close(runs["parallel"], runs["scan"], TOL["float64"], "parallel against scan")
