"""Flax NNX models of every cell kind against the PyTorch fixtures; the nnx_* loop kinds.

Mirrors :mod:`loopgrad_jax._flax` and the ``nnx_*`` branch of :mod:`loopgrad_jax._loops`.
Every expected value is a PyTorch fixture's, or the library's own result that the
fixtures check (``tests/test_cell_parity.py``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TOL, assert_close, contracted_axes_in_loops, count_compilations, fixture

import loopgrad_jax as lg

nnx = pytest.importorskip("flax.nnx")
from loopgrad_jax import _flax  # noqa: E402 - after the skip: it imports Flax

TORCH_KINDS = tuple(k for k in lg.CELLS if k != "article")
F64 = TOL["float64"]


def _case(scenario: str, name: str) -> dict:
    return fixture(scenario, "float64").case(name)


def _params_of(c: dict):
    if "params" in c:
        return lg.RNNParams(**{k: jnp.asarray(v) for k, v in c["params"].items()})
    return lg.from_torch(c["rnn_state"], c["head_state"], kind=c["kind"])


def _hidden0(c: dict):
    h0 = c["hidden0"]
    if h0 is None:
        return None
    return tuple(jnp.asarray(a) for a in h0) if isinstance(h0, list) else jnp.asarray(h0)


def _loss_case(kind: str, layers: int = 1) -> dict:
    if kind == "article":
        return _case("rnn_loss", "article" if layers == 1 else "batch")
    return _case("cell_loss", f"{kind}_l1" if layers == 1 else f"{kind}_l2h")


def _as_torch(grads, kind: str) -> dict:
    """A gradient in the library's form as the fixture's fields name it."""
    if kind == "article":
        return {"grads": grads._asdict()}
    rnn, head = lg.to_torch(grads)
    return {"grads_rnn": rnn, "grads_head": head}


def _expected(c: dict, fields) -> dict:
    return {f: c[f] for f in fields}


def _grads_of(model, loss_fn):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, lg.from_flax(nnx.merge(nnx.graphdef(model), grads))


def _zero_b_hn(params: lg.CellParams) -> lg.CellParams:
    h = params.layers[0].weight_hh.shape[1]
    layers = tuple(
        lg.LayerParams(
            layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh.at[2 * h :].set(0)
        )
        for layer in params.layers
    )
    return lg.CellParams(layers, params.head_weight, params.head_bias, params.kind)


# ------------------------------------------------------------------- to_flax, from_flax


@pytest.mark.parametrize("cells", _flax.CELL_SETS)
@pytest.mark.parametrize(
    "kind, layers", [("article", 1), ("rnn_tanh", 1), ("rnn_relu", 2), ("lstm", 2), ("gru", 2)]
)
def test_from_flax_inverts_to_flax(kind, layers, cells):
    params = lg.init_cell(
        jax.random.key(layers),
        kind,
        input_size=3,
        hidden_size=4,
        output_size=2,
        num_layers=layers,
        dtype=jnp.float64,
    )
    if kind == "gru" and cells == "flax":
        params = _zero_b_hn(params)
    model = lg.to_flax(params, cells=cells)
    # Only nnx.Param variables: the model's state is its weights.
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    assert sum(a.size for a in jax.tree.leaves(nnx.state(model))) == sum(
        a.size for a in jax.tree.leaves(params)
    ) - (0 if cells == "torch" or kind == "article" else 4 * lg._cells.GATES[kind] * layers)
    back = lg.from_flax(model)
    if cells == "torch" or kind == "article":
        assert_close(back, params, 0.0, "round trip")
        return
    # Flax's cells keep one bias per layer: the sum of PyTorch's two, where Flax keeps it.
    for ours, theirs in zip(back.layers, params.layers, strict=True):
        np.testing.assert_array_equal(ours.weight_ih, theirs.weight_ih)
        np.testing.assert_array_equal(ours.weight_hh, theirs.weight_hh)
        np.testing.assert_allclose(
            ours.bias_ih + ours.bias_hh, theirs.bias_ih + theirs.bias_hh, rtol=0, atol=1e-15
        )


def test_builtin_cells_are_flax_own():
    def cell_type(kind):
        p = lg.init_cell(jax.random.key(0), kind, input_size=3, hidden_size=4)
        p = _zero_b_hn(p) if kind == "gru" else p
        return type(lg.to_flax(p, cells="flax").layers[0].cell)

    kinds = {kind: cell_type(kind) for kind in TORCH_KINDS}
    assert kinds == {
        "rnn_tanh": nnx.SimpleCell,
        "rnn_relu": nnx.SimpleCell,
        "lstm": nnx.OptimizedLSTMCell,
        "gru": nnx.GRUCell,
    }
    assert type(lg.to_flax(lg.init_rnn(jax.random.key(0), 3, 4)).layers[0].cell) is (nnx.SimpleCell)
    p = lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=4, num_layers=2)
    assert all(isinstance(layer, nnx.RNN) for layer in lg.to_flax(p).layers)


# ------------------------------------------------------------------- parity with PyTorch

# Every kind runs as the model runs itself (nnx.RNN); each loop kind on one kind in turn.
_LOSS_RUNS = [(kind, None) for kind in lg.CELLS] + [
    (lg.CELLS[i % len(lg.CELLS)], loop)
    for i, loop in enumerate(("python", "scan", "fori", "remat", *lg.NNX_LOOPS, "while"))
]


@pytest.mark.parametrize("kind, loop", _LOSS_RUNS, ids=str)
def test_loss_and_gradient_match_pytorch(kind, loop):
    c = _loss_case(kind)
    model = lg.to_flax(_params_of(c))

    def loss_fn(m):
        return lg.flax_loss(m, c["inputs"], c["targets"], hidden0=_hidden0(c), loop=loop)

    if loop == "while":  # forward mode only: jax.jacfwd over the weights' state
        graphdef, state = nnx.split(model)
        loss = loss_fn(model)
        grads = jax.jacfwd(lambda s: loss_fn(nnx.merge(graphdef, s)))(state)
        grads = lg.from_flax(nnx.merge(graphdef, grads))
    else:
        loss, grads = _grads_of(model, loss_fn)
    fields = ("grads",) if kind == "article" else ("grads_rnn", "grads_head")
    assert_close(
        {"loss": loss, **_as_torch(grads, kind)}, _expected(c, ("loss", *fields)), F64, kind
    )


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_two_layers_from_a_random_state_match_pytorch(kind):
    c = _loss_case(kind, layers=2)
    model = lg.to_flax(_params_of(c))
    loss, grads = _grads_of(
        model, lambda m: lg.flax_loss(m, c["inputs"], c["targets"], hidden0=_hidden0(c))
    )
    assert_close(
        {"loss": loss, **_as_torch(grads, kind)},
        _expected(c, ("loss", "grads_rnn", "grads_head")),
        F64,
        kind,
    )


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_bias_free_layers_match_pytorch_and_hold_no_bias(kind):
    # PyTorch's bias=False: TorchCell holds no bias parameter, so nothing is trained there,
    # and the loss and gradient are the bias-free module's.
    c = _case("cell_loss", f"{kind}_l2h_nobias")
    params = _params_of(c)
    model = lg.to_flax(params)
    assert all(layer.cell.bias_ih is None and layer.cell.bias_hh is None for layer in model.layers)
    back = lg.from_flax(model)
    assert all(layer.bias_ih is None and layer.bias_hh is None for layer in back.layers)
    loss, grads = _grads_of(
        model, lambda m: lg.flax_loss(m, c["inputs"], c["targets"], hidden0=_hidden0(c))
    )
    assert not any("bias" in name for name in lg.to_torch(grads)[0])
    assert_close(
        {"loss": loss, **_as_torch(grads, kind)},
        _expected(c, ("loss", "grads_rnn", "grads_head")),
        F64,
        kind,
    )
    with pytest.raises(ValueError, match=r"params.layers\[0\] has no biases .*cells='torch'"):
        lg.to_flax(params, cells="flax")


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_builtin_cells_give_pytorch_forward_pass_and_bias_gradient(kind):
    # Flax's cells: the same loss; the one bias's gradient is either PyTorch bias's.
    c = _loss_case(kind)
    params = _params_of(c)
    if kind == "gru":  # nnx.GRUCell has no b_hn: the case's is random, so it is refused
        with pytest.raises(ValueError, match=r"params.layers\[0\].bias_hh has a non-zero b_hn"):
            lg.to_flax(params, cells="flax")
        return
    model = lg.to_flax(params, cells="flax")
    loss, grads = _grads_of(
        model, lambda m: lg.flax_loss(m, c["inputs"], c["targets"], hidden0=_hidden0(c))
    )
    rnn, head = lg.to_torch(grads)
    expected = c["grads_rnn"]
    assert_close(loss, c["loss"], F64, "loss")
    assert_close(head, c["grads_head"], F64, "head")
    for name in ("weight_ih_l0", "weight_hh_l0"):
        assert_close(rnn[name], expected[name], F64, name)
    kept = "bias_hh_l0" if kind == "lstm" else "bias_ih_l0"
    for name in ("bias_ih_l0", "bias_hh_l0"):
        assert_close(rnn[kept], expected[name], F64, name)


def test_builtin_cells_one_bias_moves_half_as_far_under_sgd():
    # One SGD update from the same weights: the gradient g of Flax's one bias is that of
    # each of PyTorch's two, so PyTorch's sum b_ih + b_hh moves by 2 lr g, Flax's by lr g.
    c = _train_case("cell_tbptt", "rnn_tanh")
    params, x, y = _params_of(c), c["inputs"], c["targets"]
    moved = {}
    for cells in _flax.CELL_SETS:
        model = lg.to_flax(params, cells=cells)
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        lg.flax_train(model, opt, x, y, mode="tbptt", window=len(x))
        after = lg.from_flax(model).layers[0]
        before = params.layers[0]
        moved[cells] = (after.bias_ih + after.bias_hh) - (before.bias_ih + before.bias_hh)
    assert float(jnp.max(jnp.abs(moved["flax"]))) > 1e-3
    assert_close(moved["torch"], 2 * moved["flax"], F64, "bias sum")


def test_gru_builtin_cell_matches_when_b_hn_is_zero():
    c = _loss_case("gru")
    params = _zero_b_hn(_params_of(c))
    x, y, h0 = c["inputs"], c["targets"], _hidden0(c)
    ours = lg.flax_loss(lg.to_flax(params, cells="flax"), x, y, hidden0=h0)
    assert_close(ours, lg.rnn_loss(params, x, y, hidden0=h0), F64, "loss")


# ------------------------------------------------------------------- training


def _train_case(scenario: str, kind: str) -> dict:
    if kind == "article":
        name = {"cell_as_written": "train_as_written", "cell_tbptt": "train_tbptt"}[scenario]
        return _case(name, "article" if scenario == "cell_as_written" else "article_w3")
    return _case(scenario, f"{kind}_l1" if scenario == "cell_as_written" else f"{kind}_l1_w2")


_TRAIN_RUNS = [
    ("cell_as_written", "rnn_tanh", "scan", "forward"),
    ("cell_as_written", "lstm", "nnx_scan", "reverse"),
    ("cell_as_written", "article", "nnx_fori", "forward"),
    ("cell_tbptt", "gru", "nnx_scan", "auto"),
    ("cell_tbptt", "rnn_relu", "nnx_remat", "auto"),
    ("cell_tbptt", "article", "scan", "auto"),
]


@pytest.mark.parametrize("scenario, kind, loop, method", _TRAIN_RUNS, ids=str)
def test_flax_train_follows_pytorch_and_updates_in_place(scenario, kind, loop, method):
    c = _train_case(scenario, kind)
    assert c["optimizer"]["name"] == "sgd" and not c["optimizer"].get("momentum")
    model = lg.to_flax(_params_of(c))
    opt = nnx.Optimizer(model, optax.sgd(c["optimizer"]["lr"]), wrt=nnx.Param)
    kwargs = {"mode": "as_written", "as_written_method": method}
    if scenario == "cell_tbptt":
        kwargs = {"mode": "tbptt", "window": c["window"]}
    result = lg.flax_train(
        model, opt, c["inputs"], c["targets"], hidden0=_hidden0(c), loop=loop, **kwargs
    )
    graphdef = nnx.graphdef(model)
    grads = lg.from_flax(nnx.merge(graphdef, result.grads))
    final = lg.from_flax(model)
    if kind == "article":
        actual = {
            "losses": result.losses,
            "grads": grads._asdict(),
            "final_params": final._asdict(),
            "hidden": result.hidden,
        }
        fields = ("losses", "grads", "final_params", "hidden")
    else:
        rnn, head = lg.to_torch(grads)
        final_rnn, final_head = lg.to_torch(final)
        hidden = list(result.hidden) if kind == "lstm" else result.hidden
        actual = {
            "losses": result.losses,
            "grads_rnn": rnn,
            "grads_head": head,
            "final_rnn_state": final_rnn,
            "final_head_state": final_head,
            "hidden": hidden,
        }
        fields = tuple(actual)
    assert_close(actual, _expected(c, fields), F64, f"{kind} {loop}")
    # In place: the model holds the result's weights, the optimizer counted every update.
    assert_close(nnx.as_pure(nnx.state(model)), result.params, 0.0, "model")
    assert int(opt.step[...]) == jax.tree.leaves(result.grads)[0].shape[0]


def test_flax_train_with_pytorch_optimizer_state_across_two_calls():
    # Momentum, resumed: two calls with the optimizer's state carried in the nnx.Optimizer.
    c = _case("train_as_written", "article_momentum_resumed")
    model = lg.to_flax(_params_of(c))
    opt = nnx.Optimizer(model, lg.torch_optimizer(**c["optimizer"]), wrt=nnx.Param)
    cut = c["resume_at"]
    x, y = jnp.asarray(c["inputs"]), jnp.asarray(c["targets"])
    mode = "as_written"  # the case's mode
    first = lg.flax_train(model, opt, x[:cut], y[:cut], hidden0=_hidden0(c), mode=mode)
    second = lg.flax_train(model, opt, x[cut:], y[cut:], hidden0=first.hidden, mode=mode)
    losses = jnp.concatenate([first.losses, second.losses])
    assert_close(
        {"losses": losses, "final_params": lg.from_flax(model)._asdict()},
        _expected(c, ("losses", "final_params")),
        F64,
        "resumed",
    )


def test_model_closed_over_by_jax_transforms():
    # nnx.RNN's lifted scan refuses a module from an outer trace level; flax_loss copies
    # it. The input gradient and a vmap over sequences must equal the lax.scan path's.
    c = _loss_case("gru")
    model = lg.to_flax(_params_of(c))
    x, y = jnp.asarray(c["inputs"]), jnp.asarray(c["targets"])

    def input_grad(loop):
        return jax.grad(lambda x: lg.flax_loss(model, x, y, loop=loop))(x)

    assert_close(input_grad(None), input_grad("scan"), F64, "jax.grad closed over")
    per_seq = jax.vmap(lambda x, y: lg.flax_loss(model, x[:, None], y[:, None]), (1, 1))(x, y)
    expected = [
        lg.flax_loss(model, x[:, b : b + 1], y[:, b : b + 1], loop="scan")
        for b in range(x.shape[1])
    ]
    assert_close(per_seq, jnp.stack(expected), F64, "jax.vmap closed over")


def _grad_by_nnx(model, x, y, loop):
    return nnx.grad(lambda m: lg.flax_loss(m, x, y, loop=loop))(model)


def _grad_by_jax(model, x, y, loop):
    graphdef, state = nnx.split(model)
    return jax.grad(lambda s: lg.flax_loss(nnx.merge(graphdef, s), x, y, loop=loop))(state)


_EAGER_CALLS = {
    "loss": lambda model, x, y, loop: lg.flax_loss(model, x, y, loop=loop),
    "nnx.grad": _grad_by_nnx,
    "jax.grad": _grad_by_jax,
}


@pytest.mark.parametrize("call", _EAGER_CALLS)
@pytest.mark.parametrize("loop", [None, "scan"], ids=str)
def test_repeated_eager_flax_loss_compiles_once(call, loop):
    # flax_loss ran op by op and compiled nnx.RNN's scan again on every call (110-210 ms
    # per loss, 711 ms per gradient for an LSTM at T=50, against 0.7 / 3.2 ms for rnn_loss).
    # Sizes no other test uses, so the first call compiles.
    t = 9 + list(_EAGER_CALLS).index(call)
    h = {None: 6, "scan": 7}[loop]
    model, other = (
        lg.to_flax(lg.init_cell(jax.random.key(k), "lstm", input_size=3, hidden_size=h))
        for k in (0, 1)
    )
    x, y = jnp.ones((t, 2, 3), jnp.float32), jnp.zeros((t, 2, 1), jnp.float32)
    x2 = jnp.full_like(x, 2.0)
    call = _EAGER_CALLS[call]
    with count_compilations() as lowered:
        first = call(model, x, y, loop)
    assert lowered
    with count_compilations() as lowered:
        second = call(other, x2, y, loop)  # another model and inputs of the same shapes
    assert lowered == []
    assert not np.allclose(jax.tree.leaves(first)[0], jax.tree.leaves(second)[0])


# ------------------------------------------------------------------- the nnx_* loop kinds


@pytest.mark.parametrize(
    "loop", [*lg.NNX_LOOPS, "nnx_scan:unroll=2", "nnx_remat:policy=dots_saveable"]
)
def test_nnx_loops_equal_lax_scan(loop):
    key = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(key[0], (3, 3), jnp.float64)
    xs = jax.random.normal(key[1], (7, 3), jnp.float64)
    h0 = jax.random.normal(key[2], (3,), jnp.float64)

    def run(w, h0, loop, reverse=False):
        def body(h, x):
            h = jnp.tanh(w @ h + x)
            return h, jnp.sum(h**2)

        h, ys = lg.run_loop(body, h0, xs, length=7, loop=loop, reverse=reverse)
        return jnp.sum(h) + jnp.sum(ys * jnp.arange(7.0, dtype=jnp.float64))

    for reverse in (False, True):
        expected = jax.value_and_grad(run, argnums=(0, 1))(w, h0, "scan", reverse)
        actual = jax.value_and_grad(run, argnums=(0, 1))(w, h0, loop, reverse)
        assert_close(actual, expected, F64, f"{loop} reverse={reverse}")
        ones = (jnp.ones_like(w),)
        tangent = jax.jvp(functools.partial(run, h0=h0, loop=loop, reverse=reverse), (w,), ones)
        tangent_ref = jax.jvp(
            functools.partial(run, h0=h0, loop="scan", reverse=reverse), (w,), ones
        )
        assert_close(tangent, tangent_ref, F64, f"{loop} jvp")


def test_nnx_loop_options_are_checked():
    assert str(lg.Loop.parse("nnx_remat:policy=dots_saveable")) == "nnx_remat:policy=dots_saveable"
    assert lg.Loop.parse("nnx_fori").reverse_mode
    with pytest.raises(ValueError, match="loop chunk applies to 'remat' only"):
        lg.Loop.parse("nnx_remat:chunk=2")
    with pytest.raises(ValueError, match="loop policy applies to 'remat' and 'nnx_remat'"):
        lg.Loop.parse("nnx_scan:policy=dots_saveable")


def test_article_rnn_loss_with_nnx_loops_matches_pytorch():
    c = _case("rnn_loss", "article")
    params = _params_of(c)
    for loop in lg.NNX_LOOPS:
        loss, grads = jax.value_and_grad(lg.rnn_loss)(
            params, c["inputs"], c["targets"], hidden0=_hidden0(c), loop=loop
        )
        assert_close(
            {"loss": loss, "grads": grads._asdict()}, _expected(c, ("loss", "grads")), F64, loop
        )


# ------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_its_name():
    p = lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=4)
    model = lg.to_flax(p)
    x, y = jnp.ones((5, 2, 3), jnp.float32), jnp.zeros((5, 2, 1), jnp.float32)
    with pytest.raises(TypeError, match="params must be an RNNParams .* or a CellParams"):
        lg.to_flax({"w": x})
    with pytest.raises(ValueError, match="cells must be one of 'torch', 'flax'"):
        lg.to_flax(p, cells="linen")
    with pytest.raises(TypeError, match="model must be a loopgrad_jax.FlaxRNN"):
        lg.from_flax(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"inputs must have shape .* = \(T, B, I\) with I=3"):
        lg.flax_loss(model, jnp.ones((5, 2, 4)), y)
    with pytest.raises(ValueError, match=r"targets must have shape .* = \(T, B, O\)"):
        lg.flax_loss(model, x, jnp.zeros((5, 2, 2)))
    with pytest.raises(ValueError, match=r"hidden0 of an LSTM must be the pair \(h0, c0\)"):
        lg.flax_loss(model, x, y, hidden0=jnp.zeros((1, 2, 4)))
    with pytest.raises(
        TypeError, match="inputs: float64, targets: float64, model.head.kernel: float32"
    ):
        lg.flax_loss(model, x.astype(jnp.float64), y.astype(jnp.float64))
    article = lg.to_flax(lg.init_rnn(jax.random.key(0), 3, 4))
    with pytest.raises(ValueError, match=r"hidden0 must have shape .* = \(B, H\) with B=2, H=4"):
        lg.flax_loss(article, x, y, hidden0=jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(TypeError, match="optimizer must be an nnx.Optimizer"):
        lg.flax_train(model, optax.sgd(0.1), x, y)
    other = lg.to_flax(lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=5))
    with pytest.raises(ValueError, match="optimizer must be an nnx.Optimizer of this model"):
        lg.flax_train(model, nnx.Optimizer(other, optax.sgd(0.1, 0.9), wrt=nnx.Param), x, y)
    model.layers[0].cell = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"model.layers\[0\].cell is a Linear"):
        lg.from_flax(model)


@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize("loop", ["scan", "fori", "remat"])
def test_torch_cells_products_inside_the_loops_read_each_weight_along_its_rows(kind, loop):
    # TorchCell steps with the library's cell products (tests/test_cells.py says why):
    # two layers, so the second layer's input side is differentiated too.
    p = lg.init_cell(jax.random.key(0), kind, 3, 4, 2, num_layers=2, dtype=jnp.float64)
    graphdef, state = nnx.split(lg.to_flax(p))
    x = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2, 2), jnp.float64)
    grad = jax.grad(lambda s: lg.flax_loss(nnx.merge(graphdef, s), x, y, loop=loop))
    contracted = contracted_axes_in_loops(jax.make_jaxpr(grad)(state).jaxpr)
    assert contracted  # the check below is not vacuous
    assert all(axes == (0,) for axes in contracted), contracted
