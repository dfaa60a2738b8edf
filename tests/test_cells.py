"""The cells: PyTorch's modules as CellParams, their conversions and errors, and user cells.

Parity of every cell kind with PyTorch's fixtures lives in the parity tests; this file
checks the API around the cells, and a user's own cell against ``jax.grad`` of a plain
Python loop.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    TOL,
    assert_close,
    contracted_axes_in_loops,
    fixture,
    has_reverse_mode,
    loop_outputs,
    products,
)
from jax.test_util import check_grads

import loopgrad_jax as lg
from loopgrad_jax import _as_written

TORCH_KINDS = lg.CELLS[1:]
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def _state(kind, layers, i=3, h=4, seed=0, dtype=np.float64):
    """A PyTorch-shaped state dict of NumPy arrays, and a head's."""
    rng = np.random.default_rng(seed)
    g = GATES[kind] * h
    rnn = {}
    for k in range(layers):
        rnn[f"weight_ih_l{k}"] = rng.normal(size=(g, i if k == 0 else h)).astype(dtype)
        rnn[f"weight_hh_l{k}"] = rng.normal(size=(g, h)).astype(dtype)
        rnn[f"bias_ih_l{k}"] = rng.normal(size=(g,)).astype(dtype)
        rnn[f"bias_hh_l{k}"] = rng.normal(size=(g,)).astype(dtype)
    head = {"weight": rng.normal(size=(2, h)).astype(dtype), "bias": rng.normal(size=(2,))}
    head["bias"] = head["bias"].astype(dtype)
    return rnn, head


# ------------------------------------------------------------------- registry and init


def test_cells_registry():
    assert lg.CELLS == ("article", "rnn_tanh", "rnn_relu", "lstm", "gru")


@pytest.mark.parametrize("kind", lg.CELLS)
def test_init_cell_draws_within_pytorchs_bounds(kind):
    layers = 1 if kind == "article" else 2
    p = lg.init_cell(
        jax.random.key(0), kind, input_size=3, hidden_size=16, output_size=2, num_layers=layers
    )
    if kind == "article":
        assert isinstance(p, lg.RNNParams)
        return
    assert p.kind == kind and p.num_layers == 2
    leaves = jax.tree.leaves(p)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    bound = 1 / math.sqrt(16)  # nn.RNN/LSTM/GRU and the head nn.Linear(16, 2) alike
    every = np.concatenate([np.ravel(leaf) for leaf in leaves])
    assert np.abs(every).max() <= bound
    # Uniform on [-b, b]: the mean of 10**3+ draws is near 0 and the spread fills it.
    assert abs(every.mean()) < 0.1 * bound
    assert every.max() > 0.95 * bound and every.min() < -0.95 * bound
    rnn_state, head_state = lg.to_torch(p)
    g = GATES[kind] * 16
    assert rnn_state["weight_ih_l0"].shape == (g, 3)
    assert rnn_state["weight_ih_l1"].shape == (g, 16)
    assert head_state["weight"].shape == (2, 16)


@pytest.mark.torch
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_init_cell_shapes_equal_pytorchs(kind):
    torch = pytest.importorskip("torch")
    modules = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}
    cls = modules.get(kind, {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(kind))
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    module = cls(3, 5, num_layers=2, **extra)
    ours, _ = lg.to_torch(
        lg.init_cell(jax.random.key(1), kind, input_size=3, hidden_size=5, num_layers=2)
    )
    theirs = module.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": "rnn"}, ValueError, r"kind must be one of 'article', 'rnn_tanh'.*got 'rnn'"),
        ({"num_layers": 0}, ValueError, r"num_layers must be an int >= 1, got 0"),
        ({"kind": "article", "num_layers": 2}, ValueError, r"num_layers must be 1, got 2"),
        ({"dtype": jnp.int32}, TypeError, r"dtype must be a floating-point dtype, got int32"),
        ({"bias": 0}, TypeError, r"bias must be a bool, got int 0"),
        ({"kind": "article", "bias": False}, ValueError, r"SimpleRNN is .*bias must be True"),
        ({"kind": "article", "bidirectional": True}, ValueError, r"bidirectional must be False"),
        ({"kind": "article", "output_size": None}, ValueError, r"has a head .*output_size=None"),
        ({"proj_size": 2}, ValueError, r"proj_size is an LSTM's.*got proj_size=2 with kind='gru'"),
        ({"kind": "lstm", "proj_size": 4}, ValueError, r"below hidden_size=4, got proj_size=4"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"bidirectional": 1}, TypeError, r"bidirectional must be a bool, got int 1"),
    ],
)
def test_init_cell_bad_input(kwargs, error, match):
    args = {"kind": "gru", "input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        lg.init_cell(jax.random.key(0), args.pop("kind"), **args)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_init_cell_draws_pytorchs_module_with_its_options(kind):
    torch = pytest.importorskip("torch")
    options = {
        "bidirectional": True,
        "num_layers": 3,
        **({"proj_size": 2} if kind == "lstm" else {}),
    }
    cls = {"rnn_tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    module = cls(3, 4, **options)
    p = lg.init_cell(jax.random.key(0), kind, 3, 4, None, **options)
    assert p.head_weight is None and p.num_layers == 3 and p.directions == 2
    # The same keys and shapes as the module's (to_torch's names): it loads strictly.
    ours = {k: tuple(v.shape) for k, v in lg.to_torch(p)[0].items()}
    assert ours == {k: tuple(v.shape) for k, v in module.state_dict().items()}
    bound = 1 / 4**0.5  # every weight uniform on [-1/sqrt(H), 1/sqrt(H)], as PyTorch draws
    assert all(float(jnp.max(jnp.abs(a))) <= bound for a in jax.tree.leaves(p))


def test_init_cell_and_init_rnn_take_the_sizes_by_position_or_by_name():
    key = jax.random.key(0)
    by_name = lg.init_cell(key, "lstm", input_size=3, hidden_size=4, output_size=2, num_layers=2)
    assert_close(lg.init_cell(key, "lstm", 3, 4, 2, 2), by_name, 0.0)
    article = lg.init_rnn(key, input_size=3, hidden_size=4, output_size=2)
    assert_close(lg.init_rnn(key, 3, 4, 2), article, 0.0)
    assert_close(lg.init_cell(key, "article", 3, 4, 2), article, 0.0)


# ------------------------------------------------------------------- from_torch / to_torch


@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_to_torch_inverts_from_torch_on_state_dicts(kind, layers):
    rnn, head = _state(kind, layers)
    p = lg.from_torch(rnn, head, kind=kind)
    assert p.kind == kind and p.num_layers == layers
    back_rnn, back_head = lg.to_torch(p)
    assert back_rnn.keys() == rnn.keys() and back_head.keys() == head.keys()
    for k in rnn:
        np.testing.assert_array_equal(back_rnn[k], rnn[k])
        assert np.asarray(back_rnn[k]).dtype == rnn[k].dtype
    for k in head:
        np.testing.assert_array_equal(back_head[k], head[k])


def test_from_torch_takes_jax_arrays_and_to_torch_takes_stacked_gradients():
    rnn, head = _state("lstm", 1)
    p = lg.from_torch({k: jnp.asarray(v) for k, v in rnn.items()}, head, kind="lstm")
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a, 3 * a]), p)  # like TrainResult.grads
    grads_rnn, grads_head = lg.to_torch(stacked)
    np.testing.assert_array_equal(grads_rnn["weight_hh_l0"][2], 3 * rnn["weight_hh_l0"])
    np.testing.assert_array_equal(grads_head["bias"][1], 2 * head["bias"])


def test_to_torch_of_the_article_names_the_simple_rnns_weights():
    p = lg.init_rnn(jax.random.key(0), 3, 4, 2)
    rnn_state, head_state = lg.to_torch(p)
    assert set(rnn_state) == {"i2h.weight", "i2h.bias"}
    np.testing.assert_array_equal(head_state["weight"], p.h2o_weight)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r, h: r.pop("bias_hh_l1"), r"missing \['bias_hh_l1'\], unexpected \[\]"),
        (lambda r, h: r.update(extra_l0=r["bias_ih_l0"]), r"unexpected \['extra_l0'\]"),
        (
            lambda r, h: [r.pop(k) for k in ("bias_ih_l1", "bias_hh_l1")],
            r"bias_hh_l\{l\} unless built with bias=False.* missing \['bias_ih_l1', 'bias_hh_l1'\]",
        ),
        (  # one key of a second direction: the others are missing
            lambda r, h: r.update(weight_ih_l0_reverse=r["weight_ih_l0"]),
            r"missing \['weight_hh_l0_reverse', 'bias_ih_l0_reverse', 'bias_hh_l0_reverse', ",
        ),
        (  # a projection in one layer: every layer has one
            lambda r, h: r.update(weight_hr_l0=r["weight_hh_l0"]),
            r"missing \['weight_hr_l1'\], unexpected \[\]",
        ),
        (
            lambda r, h: r.update(weight_ih=r["weight_ih_l0"]),
            r"or a cell module's weight_ih, .*missing \['weight_hh', 'bias_ih', 'bias_hh'\], "
            r"unexpected \['weight_ih_l0', ",
        ),
        (
            lambda r, h: r.update({f"lstm.{k}": v for k, v in r.items()}),
            r"got a whole model's \(keys 'weight_ih_l0', .* and \d+ more\): .*"
            r"\{k.removeprefix\('lstm.'\): v for k, v in sd.items\(\) if k.startswith\('lstm.'\)\}",
        ),
        (
            lambda r, h: r.update(weight_hh_l1=r["weight_hh_l1"][:, :3]),
            r"rnn\['weight_hh_l1'\] must have shape \(16, 4\).*got shape \(16, 3\)",
        ),
        (
            lambda r, h: r.update(bias_ih_l0=r["bias_ih_l0"][:12]),
            r"rnn\['bias_ih_l0'\] must have shape \(16,\).*got shape \(12,\)",
        ),
        (
            lambda r, h: r.update(weight_ih_l0=r["weight_ih_l0"].astype(np.int64)),
            r"rnn\['weight_ih_l0'\] must have a floating-point dtype.*got int64",
        ),
        (
            lambda r, h: h.update(weight=h["weight"][:, :3]),
            r"head\['weight'\] must have shape \(\?, 4\) = \(O, D\*H_out\) with D\*H_out=4.*"
            r"got shape \(2, 3\)",
        ),
        (
            lambda r, h: h.pop("bias"),
            r"head has no 'bias' .* pass \{'weight': head.weight, 'bias': torch.zeros\(O\)\}",
        ),
        (
            lambda r, h: h.update(scale=h["bias"]),
            r"head must hold exactly 'weight' \(O, D\*H_out\)",
        ),
    ],
)
def test_from_torch_refuses_bad_state_dicts(edit, match):
    rnn, head = _state("lstm", 2)
    edit(rnn, head)
    with pytest.raises((ValueError, TypeError), match=match):
        lg.from_torch(rnn, head, kind="lstm")


def test_from_torch_state_dict_needs_a_known_kind():
    rnn, head = _state("gru", 1)
    with pytest.raises(ValueError, match=r"kind is required when rnn is a state dict"):
        lg.from_torch(rnn, head)
    with pytest.raises(ValueError, match=r"kind must be one of 'rnn_tanh'.*got 'article'"):
        lg.from_torch(rnn, head, kind="article")
    with pytest.raises(ValueError, match=r"weight_hh_l0'\] must have shape \(G\*H, H\) with G=4"):
        lg.from_torch(rnn, head, kind="lstm")  # a GRU's 3 gates are not an LSTM's 4


def test_from_torch_refuses_other_objects():
    rnn, head = _state("gru", 1)
    with pytest.raises(TypeError, match=r"rnn must be a torch.nn.RNN, LSTM or GRU module, an "):
        lg.from_torch([1, 2], head, kind="gru")
    with pytest.raises(TypeError, match=r"head must be None, a torch.nn.Linear\(D\*H_out, O\)"):
        lg.from_torch(rnn, object(), kind="gru")


@pytest.mark.torch
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_from_torch_reads_the_kind_off_a_module(kind):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    module = {
        "rnn_tanh": lambda: nn.RNN(3, 4, num_layers=2),
        "rnn_relu": lambda: nn.RNN(3, 4, nonlinearity="relu"),
        "lstm": lambda: nn.LSTM(3, 4),
        "gru": lambda: nn.GRU(3, 4, num_layers=2),
    }[kind]()
    head = nn.Linear(4, 2)
    p = lg.from_torch(module, head)
    assert p.kind == kind and p.num_layers == module.num_layers
    back, back_head = lg.to_torch(p)
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy())
    np.testing.assert_array_equal(back_head["weight"], head.weight.detach().numpy())
    other = "gru" if kind != "gru" else "lstm"
    with pytest.raises(ValueError, match=f"kind='{other}' does not match the module"):
        lg.from_torch(module, head, kind=other)


# ------------------------------------------------------------------- bias=False


def _torch_module(nn, kind, *args, **kwargs):
    if kind.startswith("rnn_"):
        return nn.RNN(*args, nonlinearity=kind[4:], **kwargs)
    return {"lstm": nn.LSTM, "gru": nn.GRU}[kind](*args, **kwargs)


def _has_no_layer_bias(params):
    """No bias in any layer: ``None``, so no leaves (head: weight and bias)."""
    layers = params.layers
    return (
        all(layer.bias_ih is None and layer.bias_hh is None for layer in layers)
        and len(jax.tree.leaves(params)) == 2 * len(layers) + 2
    )


@pytest.mark.torch
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_bias_false_modules_come_and_go_without_bias_keys(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = _torch_module(torch.nn, kind, 3, 4, num_layers=2, bias=False)
    head = torch.nn.Linear(4, 2)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    for p in (lg.from_torch(module, head), lg.from_torch(state, head.state_dict(), kind=kind)):
        assert _has_no_layer_bias(p)
        back, _ = lg.to_torch(p)
        module.load_state_dict(back, strict=True)
        assert back.keys() == state.keys()
        for k in state:
            np.testing.assert_array_equal(back[k], state[k])


# The quick tier: the gated cells, whose biases sit on more than one gate.
@pytest.mark.parametrize(
    "kind", [k if GATES[k] > 1 else pytest.param(k, marks=pytest.mark.slow) for k in TORCH_KINDS]
)
def test_bias_false_params_train_and_differentiate_without_biases(kind):
    p = lg.init_cell(jax.random.key(0), kind, 3, 4, 2, num_layers=2, bias=False, dtype=jnp.float64)
    assert _has_no_layer_bias(p)
    assert set(lg.to_torch(p)[0]) == {f"weight_{w}_l{k}" for w in ("ih", "hh") for k in (0, 1)}
    x = jax.random.normal(jax.random.key(1), (4, 2, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (4, 2, 2), jnp.float64)
    assert _has_no_layer_bias(jax.grad(lg.rnn_loss)(p, x, y))
    runs = [
        {"mode": "tbptt", "window": 2},
        {"mode": "tbptt", "window": 2, "hoist_input": True},
        {"mode": "as_written", "as_written_method": "forward"},
        {"mode": "as_written", "as_written_method": "reverse"},
    ]
    for kw in runs:
        result = lg.train_rnn(p, x, y, **kw)
        assert _has_no_layer_bias(result.params) and _has_no_layer_bias(result.grads), kw


@pytest.mark.parametrize("hoist_input", [False, True])
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_bias_false_training_steps_by_pytorchs_gradient(kind, hoist_input):
    """tbptt with one window of T is one step of SGD along PyTorch's gradient of the loss."""
    c = fixture("cell_loss", "float64").case(f"{kind}_l2h_nobias")
    p = lg.from_torch(c["rnn_state"], c["head_state"], kind=kind)
    hidden0 = tuple(c["hidden0"]) if kind == "lstm" else c["hidden0"]
    t, lr = c["inputs"].shape[0], 0.5
    result = lg.train_rnn(
        p,
        c["inputs"],
        c["targets"],
        hidden0=hidden0,
        mode="tbptt",
        window=t,
        lr=lr,
        hoist_input=hoist_input,
    )
    tol = TOL["float64"]
    assert_close(result.losses.sum(), c["loss"], tol)
    grads, head_grads = lg.to_torch(jax.tree.map(lambda g: g[0], result.grads))
    final, final_head = lg.to_torch(result.params)
    assert_close(grads, c["grads_rnn"], tol)
    assert_close(head_grads, c["grads_head"], tol)
    stepped = {k: c["rnn_state"][k] - lr * c["grads_rnn"][k] for k in c["rnn_state"]}
    assert_close(final, stepped, tol)


def test_params_with_biases_in_some_layers_only_are_refused():
    p, x, y = _problem("gru")
    bare = dataclasses.replace(p.layers[1], bias_ih=None, bias_hh=None)
    mixed = dataclasses.replace(p, layers=(p.layers[0], bare))
    with pytest.raises(ValueError, match=r"params.layers\[1\].bias_ih must be an array as "):
        lg.rnn_loss(mixed, x, y)
    half = dataclasses.replace(p, layers=(dataclasses.replace(p.layers[0], bias_ih=None), bare))
    with pytest.raises(ValueError, match=r"layers\[0\].bias_hh must be None .* got shape \(12,\)"):
        lg.rnn_loss(half, x, y)


# ------------------------------------------------------------------- hidden0


def _problem(kind, layers=2, t=4, b=2, seed=0):
    p = lg.init_cell(
        jax.random.key(seed),
        kind,
        input_size=3,
        hidden_size=4,
        output_size=2,
        num_layers=layers,
        dtype=jnp.float64,
    )
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    return p, jax.random.normal(kx, (t, b, 3), jnp.float64), jax.random.normal(ky, (t, b, 2))


@pytest.mark.parametrize(
    ("kind", "hidden0", "match"),
    [
        (
            "gru",
            jnp.zeros((2, 4)),
            r"hidden0 must have shape \(2, 2, 4\) = \(D\*num_layers, B, H_out\)",
        ),
        (
            "gru",
            (jnp.zeros((2, 2, 4)),),
            r"hidden0 of a gru cell must be one \(D\*num_layers, B, H_out\)",
        ),
        ("lstm", jnp.zeros((2, 2, 4)), r"hidden0 of an LSTM must be the pair \(h0, c0\)"),
        (
            "lstm",
            (jnp.zeros((2, 2, 4)), jnp.zeros((1, 2, 4))),
            r"hidden0\[1\] \(c0\) must have shape \(2, 2, 4\).*got shape \(1, 2, 4\)",
        ),
        ("rnn_tanh", jnp.zeros((2, 2, 4), jnp.int32), r"hidden0 must have a floating-point"),
        ("rnn_tanh", jnp.zeros((2, 2, 4), jnp.float32), r"all arrays must share one"),
    ],
)
def test_bad_hidden0_is_refused_by_name(kind, hidden0, match):
    p, x, y = _problem(kind)
    with pytest.raises((ValueError, TypeError), match=match):
        lg.rnn_loss(p, x, y, hidden0=hidden0)
    with pytest.raises((ValueError, TypeError), match=match):
        lg.train_rnn(p, x, y, hidden0=hidden0)


def test_bad_cell_params_are_refused_by_name():
    p, x, y = _problem("lstm")
    with pytest.raises(ValueError, match=r"inputs must have shape \(\?, \?, 3\).*with I=3"):
        lg.rnn_loss(p, x[..., :2], y)
    with pytest.raises(ValueError, match=r"targets must have shape \(4, 2, 2\)"):
        lg.rnn_loss(p, x, y[..., :1])
    broken = lg.CellParams(p.layers, p.head_weight, p.head_bias, "lstmx")
    with pytest.raises(ValueError, match=r"params.kind must be one of 'rnn_tanh'.*'lstmx'"):
        lg.rnn_loss(broken, x, y)
    wrong = lg.CellParams(p.layers, p.head_weight, p.head_bias, "gru")
    with pytest.raises(
        ValueError,
        match=r"params.layers\[0\].weight_hh must have shape \(G\*H, H_out\) with G=3 gates "
        r"for kind='gru', got shape \(16, 4\)",
    ):
        lg.rnn_loss(wrong, x, y)
    with pytest.raises(TypeError, match=r"params must be an RNNParams .* or a CellParams"):
        lg.rnn_loss({"w": x}, x, y)


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_hidden_follows_pytorchs_layout(kind):
    p, x, y = _problem(kind, layers=2)
    result = lg.train_rnn(p, x, y, mode="tbptt", window=2, lr=0.0)
    shapes = jax.tree.map(jnp.shape, result.hidden)
    assert shapes == (((2, 2, 4), (2, 2, 4)) if kind == "lstm" else (2, 2, 4))
    # Continuing from that state equals one run (lr=0: the weights never change).
    first = lg.train_rnn(p, x[:2], y[:2], mode="tbptt", window=2, lr=0.0)
    rest = lg.train_rnn(p, x[2:], y[2:], mode="tbptt", window=2, lr=0.0, hidden0=first.hidden)
    assert_close(rest.hidden, result.hidden, TOL["float64"])


# ------------------------------------------------------------------- hoisted, layer by layer


def _random_hidden0(kind, layers, b, h, seed=3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    h0 = jax.random.normal(k1, (layers, b, h), jnp.float64)
    return (h0, jax.random.normal(k2, (layers, b, h), jnp.float64)) if kind == "lstm" else h0


@pytest.mark.parametrize(
    ("kind", "loop"),
    [  # every kind and loop kind once; the full tier adds python and remat (3-4 s each)
        pytest.param("rnn_tanh", "python", marks=pytest.mark.slow),
        ("lstm", "scan"),
        pytest.param("gru", "scan", marks=pytest.mark.slow),  # quick: gru under while
        pytest.param("lstm", "remat:chunk=2", marks=pytest.mark.slow),
        ("gru", "while"),
    ],
)
def test_hoisted_layer_by_layer_equals_stepping_every_layer(kind, loop):
    # hoist_input=True runs PyTorch's modules layer after layer over the sequence, with
    # its own differentiation rule: the value, the gradient with respect to every input
    # (reverse mode where the loop has it, forward mode always) equal those of the
    # per-step body that steps all layers together.
    p, x, y = _problem(kind, layers=2, t=5)
    h0 = _random_hidden0(kind, 2, 2, 4)

    def loss(hoist):
        return lambda p, x, h0: lg.rnn_loss(p, x, y, hidden0=h0, loop=loop, hoist_input=hoist)

    args = (p, x, h0)
    assert_close(loss(True)(*args), loss(False)(*args), 1e-12)
    tangents = jax.tree.map(
        lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), args
    )
    hoisted = jax.jvp(loss(True), args, tangents)
    assert_close(hoisted, jax.jvp(loss(False), args, tangents), TOL["float64"])
    if has_reverse_mode(loop):
        got = jax.grad(loss(True), argnums=(0, 1, 2))(*args)
        assert_close(got, jax.grad(loss(False), argnums=(0, 1, 2))(*args), TOL["float64"])


@pytest.mark.parametrize("kind", ["lstm", pytest.param("gru", marks=pytest.mark.slow)])
def test_hoisted_second_derivatives_equal_stepping_every_layer(kind):
    # The rule is built from differentiable JAX code: a Hessian-vector product
    # (forward over reverse) goes through it.
    p, x, y = _problem(kind, layers=2, t=4)

    def hvp(hoist):
        grad = jax.grad(lambda p: lg.rnn_loss(p, x, y, hoist_input=hoist))
        return jax.jvp(grad, (p,), (jax.tree.map(jnp.ones_like, p),))[1]

    assert_close(hvp(True), hvp(False), TOL["float64"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_hoisted_remat_keeps_the_inputs_it_recomputes_from(kind):
    # remat recomputes each step in the backward pass from the loop's inputs, the
    # hoisted projection x W_ih^T + b_ih (one block per gate), which it keeps. A rule
    # linearising the loop would keep the gates' coefficients instead.
    p, x, y = _problem(kind, layers=1, t=40)
    f = lambda p: lg.rnn_loss(p, x, y, loop="remat", hoist_input=True)  # noqa: E731
    kept = [leaf for leaf in jax.tree.leaves(jax.vjp(f, p)[1]) if leaf.shape == (40, 2, 4)]
    layer = p.layers[0]
    projection = x @ layer.weight_ih.T + layer.bias_ih[None, None, :]
    for block in jnp.split(projection, GATES[kind], axis=-1):
        assert any(np.allclose(leaf, block, rtol=1e-6, atol=1e-6) for leaf in kept)


def _dots_inside_loops(jaxpr):
    """Output shapes of every ``dot_general`` in a (closed) jaxpr, and whether in a loop."""
    return [(eqn.outvars[0].aval.shape, inside) for eqn, inside in products(jaxpr)]


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_hoisted_gradient_of_the_recurrent_weights_is_products_after_the_loop(kind):
    # Without the hoist, reverse mode adds a (G*H, H) product into dW_hh at every step
    # inside the loop (for nn.RNN, a product into the joined (I + H, H) kernel); hoisted,
    # every product inside the loop is (B, .)-shaped and dW_hh is one (H, H) product per
    # gate block outside.
    p, x, y = _problem(kind, layers=1, t=5)
    g = GATES[kind] * 4
    weight_shaped = {(g, 4), (4, g)}
    joined = {(3 + 4, g), (g, 3 + 4)} if kind in ("rnn_tanh", "rnn_relu") else set()

    def dots(hoist):
        grad = jax.grad(lambda p: lg.rnn_loss(p, x, y, hoist_input=hoist))
        return _dots_inside_loops(jax.make_jaxpr(grad)(p).jaxpr)

    assert any(shape in weight_shaped | joined and inside for shape, inside in dots(False))
    hoisted = dots(True)
    assert not any(shape in weight_shaped | {(4, 4)} and inside for shape, inside in hoisted)
    outside = [shape for shape, inside in hoisted if shape == (4, 4) and not inside]
    assert len(outside) == GATES[kind]


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """The shape of every value a (closed) jaxpr computes, nested jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        found |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found |= _shapes(sub)
    return found


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_hoisted_gradient_never_joins_the_gate_blocks_of_every_step(kind, bidirectional):
    # Hoisted, the input side is one product per gate block, each block reaches the loop
    # as its own (T, B, H) array, and reverse mode's products read the loop's cotangents
    # block by block: no (T, B, G*H) array, nor its (T * B, G*H) reshape, is written
    # (each was one more large array written and read; docs/notes.md).
    p = lg.init_cell(
        jax.random.key(0), kind, 3, 4, 1, 2, bidirectional=bidirectional, dtype=jnp.float64
    )
    t, b, g = 5, 2, GATES[kind] * 4
    x = jax.random.normal(jax.random.key(1), (t, b, 3), jnp.float64)
    grad = jax.grad(lambda p: jnp.sum(lg.rnn(p, x, loop="scan")[0] ** 2))
    shapes = _shapes(jax.make_jaxpr(grad)(p).jaxpr)
    assert (t, b, 4) in shapes  # the blocks themselves
    assert not shapes & {(t, b, g), (t * b, g)}, sorted(shapes)


@pytest.mark.parametrize("kind", lg.CELLS)
@pytest.mark.parametrize("hoist", [False, True])
@pytest.mark.parametrize("loop", ["scan", "fori", "remat"])
def test_products_inside_the_loops_read_each_weight_along_its_rows(kind, hoist, loop):
    # Every product a step makes, forward or backward, contracts its second operand along
    # its first axis: a (K, N) row-major matrix, as XLA's CPU backend multiplies fastest.
    # The forward multiplies by the weight's transpose (copied once, outside the loop),
    # the backward by the weight as stored. Written h @ W.T throughout, the backward
    # multiplied by the transposed copy along its rows (contracted axis 1): the hoisted
    # GRU gradient at I=64, H=256, B=32, T=1000 on 2 devices took 455 against 378 ms.
    if kind == "article":
        p = lg.init_rnn(jax.random.key(0), 3, 4, 2, dtype=jnp.float64)
    else:
        p = lg.init_cell(jax.random.key(0), kind, 3, 4, 2, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2, 2), jnp.float64)
    grad = jax.grad(lambda p: lg.rnn_loss(p, x, y, loop=loop, hoist_input=hoist))
    contracted = contracted_axes_in_loops(jax.make_jaxpr(grad)(p).jaxpr)
    assert contracted  # the check below is not vacuous
    assert all(axes == (0,) for axes in contracted), contracted


@pytest.mark.parametrize("loop", ["scan", "fori"])  # the loops that join (not remat)
@pytest.mark.parametrize("kind", ["article", "rnn_tanh", "rnn_relu"])
def test_joined_step_accumulates_its_weight_gradient_as_the_kernel(kind, loop):
    # The joined nn.RNN step (not hoisted) adds [x, h]^T @ dpre into its weight's
    # gradient at every step: the backward loop carries that sum in the kernel's
    # (I + H, H) layout, as the forward reads it, not the weight's (H, I + H). Carried as
    # (H, I + H), the article's model at I=64, H=256, B=32, T=1000 with scan on one
    # device took 227-231 against 199-210 ms (alternating processes, docs/notes.md).
    if kind == "article":
        p = lg.init_rnn(jax.random.key(0), 3, 4, 2, dtype=jnp.float64)
        kernels = {(3 + 4, 4)}
    else:
        p = lg.init_cell(jax.random.key(0), kind, 3, 4, 2, num_layers=2, dtype=jnp.float64)
        kernels = {(3 + 4, 4), (4 + 4, 4)}
    x = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2, 2), jnp.float64)
    grad = jax.grad(lambda p: lg.rnn_loss(p, x, y, loop=loop, hoist_input=False))
    carried = loop_outputs(jax.make_jaxpr(grad)(p).jaxpr)
    assert kernels <= carried
    assert not {(n, k) for k, n in kernels} & carried


# ------------------------------------------------------------------- cost


def test_as_written_cost_counts_each_cells_carry_and_weights():
    sizes = lg.RNNSizes(length=10, batch=3, input=5, hidden=4, output=2)
    dims = {kind: _as_written.Dims.of_cell(kind, *sizes, num_layers=2) for kind in TORCH_KINDS}
    for kind, d in dims.items():
        p = lg.init_cell(
            jax.random.key(0), kind, input_size=5, hidden_size=4, output_size=2, num_layers=2
        )
        assert d.params == sum(leaf.size for leaf in jax.tree.leaves(p))
        assert d.carry == (16 if kind == "lstm" else 8)  # 2*L*H numbers for an LSTM
    forward = {k: lg.as_written_cost(sizes, "forward", kind=k, num_layers=2) for k in TORCH_KINDS}
    # The sensitivity, 2*B*N*P numbers, dominates forward's memory at these sizes.
    for kind, cost in forward.items():
        d = dims[kind]
        assert cost.memory_bytes >= 2 * d.batch * d.carry * d.params * 4
    assert lg.as_written_cost(sizes, "forward") == lg.as_written_cost(
        sizes, "forward", kind="article"
    )
    with pytest.raises(ValueError, match=r"kind must be one of 'article'.*got 'elman'"):
        lg.as_written_cost(sizes, "forward", kind="elman")


def _temp_bytes(kind, layers, method, t=20, b=2, i=5, h=8):
    p = lg.init_cell(jax.random.key(0), kind, input_size=i, hidden_size=h, num_layers=layers)
    x = jax.ShapeDtypeStruct((t, b, i), jnp.float32)
    y = jax.ShapeDtypeStruct((t, b, 1), jnp.float32)

    def run(p, x, y):
        return lg.train_rnn(p, x, y, mode="as_written", as_written_method=method, keep_grads="none")

    compiled = jax.jit(run).lower(p, x, y).compile()  # compiled only, never run
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(("kind", "layers"), [("lstm", 2), ("gru", 1)])
def test_compiled_temp_memory_of_cells_is_within_2x_of_the_estimate(kind, layers):
    sizes = lg.RNNSizes(length=20, batch=2, input=5, hidden=8, output=1)
    for method in ("forward", "reverse"):
        estimate = lg.as_written_cost(sizes, method, kind=kind, num_layers=layers).memory_bytes
        measured = _temp_bytes(kind, layers, method)
        assert estimate / 2 <= measured <= 2 * estimate, (method, measured, estimate)


# ------------------------------------------------------------------- a user's own cell


def gated_step(p, carry, x):
    """A minimal gated cell with a two-part carry (a running sum beside the state)."""
    h, s = carry
    u = jnp.concatenate([x, h], axis=1)
    gate = jax.nn.sigmoid(u @ p["wg"].T)
    h = gate * jnp.tanh(u @ p["w"].T) + (1 - gate) * h
    return h, s + h


def gated_readout(p, carry):
    h, s = carry
    return jnp.concatenate([h, s], axis=1) @ p["v"].T


GATED = lg.Cell(gated_step, gated_readout)


def _gated_problem(t=5, b=2, i=3, h=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    p = {
        "w": 0.5 * jax.random.normal(k[0], (h, i + h), jnp.float64),
        "wg": 0.5 * jax.random.normal(k[1], (h, i + h), jnp.float64),
        "v": 0.5 * jax.random.normal(k[2], (2, 2 * h), jnp.float64),
    }
    x = jax.random.normal(k[3], (t, b, i), jnp.float64)
    y = jax.random.normal(k[4], (t, b, 2), jnp.float64)
    h0 = (jax.random.normal(k[5], (b, h), jnp.float64), jnp.zeros((b, h), jnp.float64))
    return p, x, y, h0


def _plain_loss(p, x, y, carry):
    """The oracle: the user's cell in a plain Python loop."""
    total = 0.0
    for t in range(x.shape[0]):
        carry = gated_step(p, carry, x[t])
        total = total + jnp.mean((gated_readout(p, carry) - y[t]) ** 2)
    return total, carry


@pytest.mark.parametrize("loop", [*lg.LOOPS, "remat:chunk=2"])
def test_own_cell_loss_and_gradient_equal_a_plain_loop(loop):
    p, x, y, h0 = _gated_problem()
    expected, grads = jax.value_and_grad(lambda p: _plain_loss(p, x, y, h0)[0])(p)
    assert_close(lg.rnn_loss(p, x, y, hidden0=h0, cell=GATED, loop=loop), expected, 1e-12)
    if has_reverse_mode(loop):
        got = jax.grad(lg.rnn_loss)(p, x, y, hidden0=h0, cell=GATED, loop=loop)
        assert_close(got, grads, TOL["float64"])


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_own_cell_as_written_equals_a_plain_loop(method):
    # The as-written gradient at step t sums d loss_t / d(weights used at step s) over
    # s <= t, each at the weights of step s: in a plain loop, the gradient of loss_t with
    # respect to a separate copy of the weights per step, summed over the copies.
    p, x, y, h0 = _gated_problem()
    lr, steps = 0.1, x.shape[0]
    result = lg.train_rnn(
        p, x, y, hidden0=h0, cell=GATED, lr=lr, mode="as_written", as_written_method=method
    )
    history, weights, carry = [], p, h0
    for t in range(steps):
        history.append(weights)

        def loss_t(copies, t=t):
            c = h0
            for s in range(t + 1):
                c = gated_step(copies[s], c, x[s])
            return jnp.mean((gated_readout(copies[t], c) - y[t]) ** 2)

        grads = jax.grad(loss_t)(history)
        g = jax.tree.map(lambda *gs: sum(gs), *grads)
        assert_close(jax.tree.map(lambda a, t=t: a[t], result.grads), g, TOL["float64"])
        carry = gated_step(weights, carry, x[t])
        weights = jax.tree.map(lambda w, g: w - lr * g, weights, g)
    assert_close(result.params, weights, TOL["float64"])
    assert_close(result.hidden, carry, TOL["float64"])


def test_own_cell_tbptt_window_T_is_one_gradient_step():
    p, x, y, h0 = _gated_problem()
    result = lg.train_rnn(
        p, x, y, hidden0=h0, cell=GATED, mode="tbptt", window=5, optimizer=optax.sgd(0.1)
    )
    grads = jax.grad(lambda p: _plain_loss(p, x, y, h0)[0])(p)
    assert_close(jax.tree.map(lambda g: g[0], result.grads), grads, TOL["float64"])
    assert_close(result.params, jax.tree.map(lambda w, g: w - 0.1 * g, p, grads), TOL["float64"])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda p, x, y, h0: lg.rnn_loss(p, x, y, cell=GATED),
            ValueError,
            r"hidden0 is required with a custom cell",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(p, x, y, hidden0=h0, cell=GATED, hoist_input=True),
            ValueError,
            r"hoist_input=True needs the cell's input projection, but this cell has none",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(p, x, y, hidden0=h0, cell=gated_step),
            TypeError,
            r"cell must be a loopgrad_jax.Cell\(step, readout\).*got function",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(
                p, x, y, hidden0=h0, cell=lg.Cell(gated_step, gated_readout, project=len)
            ),
            ValueError,
            r"cell.project and cell.step_projected come together",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(p, x, y, hidden0=h0[0], cell=GATED),
            ValueError,
            r"calling the cell on one step failed",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(
                p, x, y, hidden0=h0, cell=lg.Cell(lambda p, c, x: c[0], gated_readout)
            ),
            ValueError,
            r"cell.step must return a carry shaped like hidden0",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(p, x, y[..., :1], hidden0=h0, cell=GATED),
            ValueError,
            r"cell.readout must return \(B, O\) = \(2, 1\)",
        ),
        (
            lambda p, x, y, h0: lg.rnn_loss(p, x, y, hidden0=(h0[0][:1], h0[1]), cell=GATED),
            ValueError,
            r"hidden0\[0\] must lead with the batch axis B=2",
        ),
    ],
)
def test_own_cell_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(*_gated_problem())


@pytest.mark.parametrize("kind", [k for k in lg.CELLS if k != "article"])
def test_loop_form_keeps_every_step_and_leaves_the_gru_alone(kind):
    from loopgrad_jax import _cells

    p = lg.init_cell(
        jax.random.key(3), kind, input_size=3, hidden_size=4, num_layers=2, dtype=jnp.float64
    )
    built = _cells.loop_form(p)
    if kind == "gru":  # its b_hn sits inside r * (h W_hn^T + b_hn): nothing to fold
        assert built is p
        return
    if kind == "lstm":
        assert all(layer.bias_hh is None for layer in built.layers)
    else:  # one (H, I_k + H) weight and one bias per layer
        assert [layer.weight.shape for layer in built.layers] == [(4, 3 + 4), (4, 4 + 4)]
        assert all(np.array_equal(layer.kernel, layer.weight.T) for layer in built.layers)
        assert all(layer.bias.shape == (4,) for layer in built.layers)
    x = jax.random.normal(jax.random.key(4), (2, 3), jnp.float64)
    h = jax.random.normal(jax.random.key(5), (2, 2, 4), jnp.float64)
    carry = _cells.to_carry(kind, (h, jnp.cos(h)) if kind == "lstm" else h)
    assert_close(_cells.torch_step(built, carry, x), _cells.torch_step(p, carry, x), 1e-15)


def test_article_loop_form_is_the_articles_step():
    from loopgrad_jax import _cells
    from loopgrad_jax._rnn import article_readout

    p = lg.init_rnn(jax.random.key(6), input_size=3, hidden_size=4, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(7), (2, 3), jnp.float64)
    h = jax.random.normal(jax.random.key(8), (2, 4), jnp.float64)
    built = _cells.article_loop_form(p)
    (new,) = _cells.torch_step(built, (h,), x)
    assert_close(new, lg.rnn_cell(p, h, x), 1e-15)
    assert_close(_cells.torch_readout(built, (new,)), article_readout(p, new), 1e-15)


def test_tanh_derivative_is_jaxs_own():
    from loopgrad_jax._cells import equations

    x = jnp.linspace(-20.0, 20.0, 401, dtype=jnp.float64)
    assert_close(equations._tanh(x), jnp.tanh(x), 0.0)
    # Up to rounding: JAX's rule evaluates (1 + y) * (1 - y) in another order.
    assert_close(jax.vmap(jax.grad(equations._tanh))(x), jax.vmap(jax.grad(jnp.tanh))(x), 1e-15)
    check_grads(equations._tanh, (x,), order=2, modes=("fwd", "rev"))


def test_tanh_leaves_reverse_mode_one_array_to_store():
    from loopgrad_jax._cells import equations

    def stored(f, x):
        pullback = jax.eval_shape(lambda x: jax.vjp(f, x)[1], x)
        return [leaf.shape for leaf in jax.tree.leaves(pullback)]

    x = jnp.ones((5, 3))
    assert stored(jnp.tanh, x) == [(5, 3), (5, 3)]  # y and 1 - y
    assert stored(equations._tanh, x) == [(5, 3)]  # (1 - y) * (1 + y)
