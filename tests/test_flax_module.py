"""Flax NNX models of PyTorch's modules with their options: bidirectional layers
(``nnx.Bidirectional``), packed batches (``seq_lengths``), LSTM projections, no head;
and :func:`loopgrad_jax.from_flax` of Flax's own ``nnx.RNN`` / ``nnx.Bidirectional``.

Expected values are the PyTorch ``module`` fixtures' (see ``tests/test_module.py``: the
module's forward and the gradients of the probe ``sum(outputs * r_out) + sum(h_n * r_h)``
(``+ sum(c_n * r_c)``)), or :func:`loopgrad_jax.rnn`'s, which those fixtures check.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TOL, assert_close, fixture

import loopgrad_jax as lg

nnx = pytest.importorskip("flax.nnx")

F64 = TOL["float64"]
MODULE_CASES = [c["name"] for c in fixture("module", "float64").cases if not c.get("cell_module")]
#: The quick tier's cases: one of each option, kinds in turn; the slow tier runs every one.
QUICK = {"rnn_relu_bi3_batch_first_packed", "lstm_proj_bi2_packed", "gru_bi2_no_bias"}


def _time_major(c: dict):
    """The case's inputs and hidden0 as a FlaxRNN takes them: time-major and batched."""
    x = jnp.asarray(c["inputs"])
    h0 = c["hidden0"]
    if h0 is not None:
        h0 = tuple(map(jnp.asarray, h0)) if isinstance(h0, list) else jnp.asarray(h0)
    if x.ndim == 2:  # unbatched (T, I): one example
        return x[:, None], None if h0 is None else jax.tree.map(lambda a: a[:, None], h0)
    return (jnp.swapaxes(x, 0, 1) if c.get("batch_first") else x), h0


def _check_module_case(name: str) -> None:
    c = fixture("module", "float64").case(name)
    params = lg.from_torch(c["rnn_state"], kind=c["kind"])
    model = lg.to_flax(params)
    assert model.bidirectional == c["bidirectional"] and model.head is None
    x, hidden0 = _time_major(c)
    lengths = None if c.get("lengths") is None else jnp.asarray(c["lengths"])
    unbatched, batch_first = x.shape[1] == 1 and jnp.ndim(c["inputs"]) == 2, c.get("batch_first")
    weights = [c[r] for r in ("r_h", "r_c") if r in c]
    graphdef, state = nnx.split(model)

    def probe(state, x):
        outputs, h_n = nnx.merge(graphdef, state).module_outputs(x, hidden0, lengths)
        if unbatched:
            outputs, h_n = outputs[:, 0], jax.tree.map(lambda a: a[:, 0], h_n)
        elif batch_first:
            outputs = jnp.swapaxes(outputs, 0, 1)
        finals = h_n if isinstance(h_n, tuple) else (h_n,)
        total = jnp.sum(outputs * c["r_out"])
        for f, r in zip(finals, weights, strict=True):
            total = total + jnp.sum(f * r)
        return total, (outputs, list(finals) if len(finals) == 2 else h_n)

    run = jax.jit(jax.value_and_grad(probe, argnums=(0, 1), has_aux=True))
    (value, (outputs, hidden)), (grads, grad_x) = run(state, x)
    assert_close(value, np.asarray(c["value"]), F64, f"{name}: value")
    assert_close(outputs, c["outputs"], F64, f"{name}: outputs")
    assert_close(hidden, c["hidden"], F64, f"{name}: h_n")
    grads_rnn, grads_head = lg.to_torch(lg.from_flax(nnx.merge(graphdef, grads)))
    assert grads_head is None
    assert list(grads_rnn) == list(c["grads_rnn"]), name
    assert_close(grads_rnn, c["grads_rnn"], F64, f"{name}: grads_rnn")
    grad_x = grad_x[:, 0] if unbatched else jnp.swapaxes(grad_x, 0, 1) if batch_first else grad_x
    assert_close(grad_x, c["grad_inputs"], F64, f"{name}: grad_inputs")


@pytest.mark.parametrize("name", sorted(QUICK))
def test_flax_model_matches_pytorch_module(name):
    _check_module_case(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODULE_CASES if n not in QUICK])
def test_flax_model_matches_pytorch_module_every_case(name):
    _check_module_case(name)


def test_quick_cases_are_fixture_cases():
    assert QUICK <= set(MODULE_CASES)


@pytest.mark.parametrize(
    "name",
    ["rnn_tanh_bi3_batch_first_packed", pytest.param("lstm_bi2_packed", marks=pytest.mark.slow)],
)
def test_builtin_cells_bidirectional_packed_match_pytorch_forward(name):
    c = fixture("module", "float64").case(name)
    model = lg.to_flax(lg.from_torch(c["rnn_state"], kind=c["kind"]), cells="flax")
    x, hidden0 = _time_major(c)
    outputs, h_n = model.module_outputs(x, hidden0, jnp.asarray(c["lengths"]))
    if c.get("batch_first"):
        outputs = jnp.swapaxes(outputs, 0, 1)
    assert_close(outputs, c["outputs"], F64, name)
    assert_close(list(h_n) if isinstance(h_n, tuple) else h_n, c["hidden"], F64, name)


# ------------------------------------------------------------------- round trips


def _bi_params(kind: str, head: bool = True, proj: int = 0) -> lg.CellParams:
    p = lg.init_cell(
        jax.random.key(1),
        kind,
        input_size=3,
        hidden_size=4,
        output_size=2 if head else None,
        num_layers=2,
        bidirectional=True,
        proj_size=proj,
        dtype=jnp.float64,
    )
    return p


@pytest.mark.parametrize(
    ("kind", "head", "proj"),
    [("rnn_tanh", True, 0), ("rnn_relu", False, 0), ("lstm", True, 2), ("gru", False, 0)],
)
def test_from_flax_inverts_to_flax_bidirectional(kind, head, proj):
    p = _bi_params(kind, head, proj)
    back = lg.from_flax(lg.to_flax(p))
    assert jax.tree.structure(back) == jax.tree.structure(p)
    assert back.bidirectional and back.kind == kind
    assert_close(back, p, 0.0, kind)


@pytest.mark.parametrize("kind", ["rnn_relu", "lstm"])
def test_builtin_cells_round_trip_keeps_the_forward_pass(kind):
    p = _bi_params(kind, head=False)
    x = jax.random.normal(jax.random.key(2), (5, 3, 3), jnp.float64)
    lengths = jnp.array([5, 1, 3])
    back = lg.from_flax(lg.to_flax(p, cells="flax"))
    assert_close(lg.rnn(back, x, lengths=lengths), lg.rnn(p, x, lengths=lengths), F64, kind)


@pytest.mark.slow  # the full tier (2.9 s)
def test_headed_bidirectional_model_loss_and_gradient_equal_rnn_loss():
    p = _bi_params("gru")
    x = jax.random.normal(jax.random.key(2), (5, 3, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (5, 3, 2), jnp.float64)
    model = lg.to_flax(p)
    loss, grads = nnx.value_and_grad(lambda m: lg.flax_loss(m, x, y))(model)
    expected, expected_grads = jax.value_and_grad(lg.rnn_loss)(p, x, y)
    assert_close(loss, expected, F64, "loss")
    assert_close(lg.from_flax(nnx.merge(nnx.graphdef(model), grads)), expected_grads, F64, "grads")
    outputs, _ = lg.rnn(p, x)
    assert_close(model(x), outputs @ p.head_weight.T + p.head_bias[None, None], F64, "head")


# ------------------------------------------------------------------- Flax's own layers


def _flax_cell(name: str, i: int, h: int, rngs):
    opts = {"param_dtype": jnp.float64, "dtype": jnp.float64, "rngs": rngs}
    if name == "simple_relu":
        return nnx.SimpleCell(i, h, activation_fn=nnx.relu, **opts)
    cell = {
        "simple": nnx.SimpleCell,
        "lstm": nnx.LSTMCell,
        "optimized_lstm": nnx.OptimizedLSTMCell,
        "gru": nnx.GRUCell,
    }[name](i, h, **opts)
    # Flax draws zero biases: random ones check where each bias is read from.
    for path, v in nnx.iter_graph(cell):
        if isinstance(v, nnx.Param) and path[-1] == "bias":
            v[...] = jax.random.normal(jax.random.key(len(path)), v.shape, jnp.float64)
    return cell


slow = pytest.mark.slow
FLAX_CELLS = {
    "simple": "rnn_tanh",
    "simple_relu": "rnn_relu",
    "lstm": "lstm",
    "optimized_lstm": "lstm",
    "gru": "gru",
}


@pytest.mark.parametrize(
    ("name", "bidirectional"),
    [
        pytest.param(n, bi, id=f"{n}-{'bi' if bi else 'uni'}", marks=() if quick else slow)
        for n in FLAX_CELLS
        for bi, quick in ((True, True), (False, n == "optimized_lstm"))
    ],
)
def test_from_flax_reads_flax_own_layers(name, bidirectional):
    rngs, i, h, b, t = nnx.Rngs(0), 3, 4, 3, 5
    d = 2 if bidirectional else 1
    layers = []
    for layer in range(2):
        rnns = [nnx.RNN(_flax_cell(name, i if layer == 0 else d * h, h, rngs)) for _ in range(d)]
        layers.append(nnx.Bidirectional(*rnns) if bidirectional else rnns[0])
    params = lg.from_flax(layers if bidirectional else nnx.List(layers))
    assert params.kind == FLAX_CELLS[name] and params.bidirectional == bidirectional
    assert params.batch_first and params.head_weight is None  # nnx.RNN is batch-major
    x = jax.random.normal(jax.random.key(4), (b, t, i), jnp.float64)
    lengths = jnp.array([5, 2, 1])
    keys = jax.random.split(jax.random.key(5), 2)
    h0 = jax.random.normal(keys[0], (2 * d, b, h), jnp.float64)
    c0 = jax.random.normal(keys[1], (2 * d, b, h), jnp.float64)
    lstm = params.kind == "lstm"
    carries = [(c0[k], h0[k]) if lstm else h0[k] for k in range(2 * d)]  # Flax's (c, h)
    out, finals = x, []
    for k, layer in enumerate(layers):
        init = (carries[2 * k], carries[2 * k + 1]) if bidirectional else carries[k]
        carry, out = layer(out, initial_carry=init, seq_lengths=lengths, return_carry=True)
        finals.extend(carry if bidirectional else [carry])
    outputs, h_n = lg.rnn(params, x, (h0, c0) if lstm else h0, lengths=lengths)
    live = (jnp.arange(t)[None, :] < lengths[:, None])[..., None]
    assert_close(outputs, jnp.where(live, out, 0), F64, name)  # zero where Flax's run on
    if lstm:
        h_n = h_n[0], h_n[1]
        finals = (jnp.stack([f[1] for f in finals]), jnp.stack([f[0] for f in finals]))
    assert_close(h_n, finals if lstm else jnp.stack(finals), F64, name)


def test_from_flax_refuses_what_pytorch_has_not():
    rngs = nnx.Rngs(0)
    cell = nnx.GRUCell(3, 4, rngs=rngs)
    cases = [
        (nnx.RNN(cell, reverse=True), ValueError, r"model is an nnx.RNN with reverse=True"),
        (
            nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell), merge_fn=jnp.add),
            ValueError,
            r"model.merge_fn is add: PyTorch concatenates",
        ),
        (
            nnx.RNN(nnx.SimpleCell(3, 4, residual=True, rngs=rngs)),
            ValueError,
            r"model.cell is a residual nnx.SimpleCell",
        ),
        (
            nnx.RNN(nnx.SimpleCell(3, 4, activation_fn=nnx.gelu, rngs=rngs)),
            ValueError,
            r"model.cell.activation_fn must be tanh or relu .*got gelu",
        ),
        (
            nnx.RNN(nnx.LSTMCell(3, 4, gate_fn=nnx.hard_sigmoid, rngs=rngs)),
            ValueError,
            r"model.cell.gate_fn must be sigmoid, PyTorch's, got hard_sigmoid",
        ),
        (
            [nnx.RNN(cell), nnx.RNN(nnx.OptimizedLSTMCell(4, 4, rngs=rngs))],
            ValueError,
            r"model\[1\].cell is a 'lstm' cell and model\[0\].cell a 'gru' one",
        ),
        (
            [nnx.RNN(cell), nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell))],
            ValueError,
            r"all nnx.RNN or all nnx.Bidirectional",
        ),
        ([nnx.RNN(cell), nnx.Linear(4, 4, rngs=rngs)], TypeError, r"model\[1\] must be an nnx.RNN"),
        (
            nnx.RNN(nnx.Linear(3, 4, rngs=rngs)),
            TypeError,
            r"model.cell is a Linear, which this library does not map",
        ),
        ([], TypeError, r"model must be a loopgrad_jax.FlaxRNN .* or a non-empty list"),
        (  # layer 1 reads 4 features, not layer 0's 2*4
            [nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell))] * 2,
            ValueError,
            r"weight_ih",
        ),
    ]
    for model, error, match in cases:
        with pytest.raises(error, match=match):
            lg.from_flax(model)


def test_to_flax_and_its_model_refuse_what_they_cannot_run():
    p = _bi_params("lstm", proj=2)
    with pytest.raises(ValueError, match=r"LSTM projection .* use cells='torch'"):
        lg.to_flax(p, cells="flax")
    model = lg.to_flax(p)
    x, y = jnp.ones((4, 2, 3)), jnp.zeros((4, 2, 2))
    with pytest.raises(ValueError, match=r"reverse direction reads the whole sequence first"):
        lg.flax_loss(model, x, y, loop="scan")
    with pytest.raises(ValueError, match=r"flax_train steps every layer .*lg.train_rnn"):
        lg.flax_train(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), x, y)
    with pytest.raises(ValueError, match=r"lengths must be between 1 and T=4 .*got \[5\]"):
        model.module_outputs(x, lengths=jnp.array([5, 2]))
    with pytest.raises(ValueError, match=r"D\*num_layers=4, B=2, H_out=2"):
        model.module_outputs(x, (jnp.zeros((4, 2, 4)), jnp.zeros((4, 2, 4))))


def test_headless_unidirectional_projection_model_trains_stepwise():
    p = dataclasses.replace(_bi_params("lstm", head=False, proj=2), bidirectional=False)
    p = dataclasses.replace(p, layers=p.layers[:1])
    x = jax.random.normal(jax.random.key(2), (5, 3, 3), jnp.float64)
    y = jnp.zeros((5, 3, 2), jnp.float64)
    model = lg.to_flax(p)
    outputs, h_n = lg.rnn(p, x)
    assert_close(model(x), outputs, F64, "outputs")
    for loop in (None, "scan"):
        assert_close(
            lg.flax_loss(model, x, y, loop=loop),
            jnp.sum(jnp.mean(outputs**2, (1, 2))),
            F64,
            str(loop),
        )
    result = lg.flax_train(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), x, y)
    assert_close(result.hidden, h_n, F64, "hidden")
