"""PyTorch's modules with every option: lg.rnn against the ``module`` fixtures, and
from_torch / to_torch of real modules and their state dicts.

Each fixture case is a module's forward as PyTorch runs it (packed batches through
``pack_padded_sequence(..., enforce_sorted=False)``; a cell module looped over the steps
in Python) and the gradients of a probe ``sum(outputs * r_out) + sum(h_n * r_h)``
(``+ sum(c_n * r_c)`` for an LSTM) of random weights: w.r.t. the weights, the inputs and
``hidden0``. ``loopgrad-parity`` differentiates the same probe of ``lg.rnn`` with
``jax.value_and_grad`` (``parity.scenarios._module``); these tests run its checks.
"""

import sys

import jax
import numpy as np
import pytest
from helpers import assert_close, assert_passes, fixture, parity_params

import loopgrad_jax as lg
from loopgrad_jax import parity

try:
    import flax  # noqa: F401

    NNX = ("nnx_scan",)
except ImportError:  # pragma: no cover - flax is a test dependency
    NNX = ()

CASES = [c["name"] for c in fixture("module", "float64").cases]
#: The comparison is loopgrad-parity's (``parity.scenarios._module``): its suite grid
#: (every case with scan, each other reverse-capable loop kind and option once), a third
#: of it in the quick tier and all of it in the slow tier, with the rest of the command's
#: grid in float64.
SUITE = parity.checks(["module"], grid="suite")
REST = [c for c in parity.checks(["module"], ["float64"]) if c not in SUITE]
#: Flax's loop kind, which loopgrad-parity (no flax dependency) leaves out: scan's checks.
NNX_CHECKS = [
    c._replace(loop=n) for n in NNX for c in SUITE if (c.loop, c.dtype) == ("scan", "float64")
]


@pytest.mark.parametrize("check", parity_params(SUITE, quick_every=3))
def test_module_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.slow
@pytest.mark.parametrize("check", parity_params(REST))
def test_module_matches_pytorch_every_loop(check):
    assert_passes(check)


@pytest.mark.parametrize(
    "check", [pytest.param(c, marks=[pytest.mark.slow] * (i > 0)) for i, c in
              enumerate(NNX_CHECKS)], ids=[c.name for c in NNX_CHECKS]
)  # fmt: skip
def test_module_matches_pytorch_nnx_loop(check):
    assert_passes(check)


def test_module_fixture_is_pytorchs():
    for dtype in ("float32", "float64"):
        f = fixture("module", dtype)
        assert f.header["scenario"] == "module" and f.header["torch_version"].startswith("2.13")
    names = set(CASES)
    for kind in lg.CELLS[1:]:  # every kind: bidirectional, packed, and its cell module
        assert {f"{kind}_bi3_batch_first_packed", f"{kind}_bi2_unbatched", f"{kind}_cell"} <= names
    assert "lstm_proj_bi2_packed" in names


# ------------------------------------------------------------------ real modules in and out


#: A module of every option for every kind, and the three cell modules (with and
#: without biases).
_BOTH = {"num_layers": 3, "bidirectional": True, "batch_first": True, "dropout": 0.25}
MODULES = {
    "rnn_tanh": ("rnn_tanh", lambda nn: nn.RNN(3, 4, **_BOTH)),
    "rnn_relu_no_bias": (
        "rnn_relu",
        lambda nn: nn.RNN(3, 4, nonlinearity="relu", bias=False, num_layers=2),
    ),
    "lstm_proj": ("lstm", lambda nn: nn.LSTM(3, 4, proj_size=2, **_BOTH)),
    "lstm_proj_no_bias": (
        "lstm",
        lambda nn: nn.LSTM(3, 4, proj_size=2, bias=False, bidirectional=True),
    ),
    "gru_no_bias": ("gru", lambda nn: nn.GRU(3, 4, bias=False, **_BOTH)),
    "rnn_cell_relu": ("rnn_relu", lambda nn: nn.RNNCell(3, 4, nonlinearity="relu")),
    "lstm_cell": ("lstm", lambda nn: nn.LSTMCell(3, 4)),
    "gru_cell_no_bias": ("gru", lambda nn: nn.GRUCell(3, 4, bias=False)),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", list(MODULES))
def test_from_torch_of_every_option_round_trips(name):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    kind, build = MODULES[name]
    module = build(torch.nn)
    d = 2 if getattr(module, "bidirectional", False) else 1
    head = torch.nn.Linear(d * (getattr(module, "proj_size", 0) or 4), 2)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    params = lg.from_torch(module, head)
    assert params.kind == kind
    assert params.cell_module == ("_cell" in name)
    assert params.bidirectional == (d == 2)
    assert params.batch_first == getattr(module, "batch_first", False)
    assert params.dropout == getattr(module, "dropout", 0.0)
    assert params.num_layers == getattr(module, "num_layers", 1)
    rnn_state, head_state = lg.to_torch(params)
    assert list(rnn_state) == list(state)  # the module's keys, in its order
    assert all(isinstance(v, torch.Tensor) for v in (*rnn_state.values(), *head_state.values()))
    with torch.no_grad():
        for p in (*module.parameters(), *head.parameters()):
            p.zero_()
    module.load_state_dict(rnn_state, strict=True)  # a warning would fail: they are errors
    head.load_state_dict(head_state, strict=True)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    # The state dict carries the structure; batch_first and dropout are told.
    told = {"batch_first": params.batch_first, "dropout": params.dropout}
    again = lg.from_torch(state, head.state_dict(), kind=params.kind, **told)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert_close(again, params, 0.0, name)


# ------------------------------------------------------------------ what is refused, and how


def _bi_state():
    """A two-layer bidirectional LSTM's state dict with proj_size=2 (H=4), float64."""
    return dict(fixture("module", "float64").case("lstm_proj_bi2_packed")["rnn_state"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (  # a whole model's state dict: how to select the module's keys
            lambda s: {**{f"lstm.{k}": v for k, v in s.items()}, "fc.weight": s["weight_hr_l0"]},
            r"got a whole model's \(keys 'lstm.weight_ih_l0', .*\): select the module's keys, "
            r"e.g. \{k.removeprefix\('lstm.'\): v for k, v in sd.items\(\) if "
            r"k.startswith\('lstm.'\)\} \(or pass the module itself, model.lstm\)",
        ),
        (  # the second layer reads both directions' outputs: D*P = 4 columns
            lambda s: s | {"weight_ih_l1_reverse": s["weight_ih_l1_reverse"][:, :2]},
            r"rnn\['weight_ih_l1_reverse'\] must have shape \(16, 4\) = \(G\*H, D\*P\) with G=4 "
            r"gates for kind='lstm', H=4, P=2, D=2, got shape \(16, 2\)",
        ),
        (
            lambda s: s | {"weight_hr_l1": s["weight_hr_l1"].T},
            r"rnn\['weight_hr_l1'\] must have shape \(2, 4\) = \(P, H\) .*got shape \(4, 2\)",
        ),
        (
            lambda s: {k: v for k, v in s.items() if k != "bias_hh_l1_reverse"},
            r"missing \['bias_hh_l1_reverse'\], unexpected \[\]",
        ),
    ],
)
def test_from_torch_refuses_bad_state_dicts_naming_the_key(edit, match):
    with pytest.raises(ValueError, match=match):
        lg.from_torch(edit(_bi_state()), kind="lstm")


def test_from_torch_refuses_what_does_not_fit_the_module():
    state = _bi_state()
    with pytest.raises(
        ValueError,
        match=r"weight_hr_l\{l\} keys, an LSTM's projection .* "
        r"kind='gru': pass kind='lstm'",
    ):
        lg.from_torch(state, kind="gru")
    head = {"weight": np.zeros((1, 2)), "bias": np.zeros(1)}  # (O, P): one direction's width
    with pytest.raises(
        ValueError,
        match=r"head\['weight'\] must have shape \(\?, 4\) = "
        r"\(O, D\*H_out\) with D\*H_out=4: .*got shape \(1, 2\)",
    ):
        lg.from_torch(state, head, kind="lstm")
    with pytest.raises(TypeError, match=r"batch_first must be a bool, got 1"):
        lg.from_torch(state, kind="lstm", batch_first=1)
    with pytest.raises(ValueError, match=r"params.dropout must be a number in \[0, 1\), got 1.5"):
        lg.from_torch(state, kind="lstm", dropout=1.5)


@pytest.mark.torch
def test_from_torch_checks_told_options_against_the_module():
    torch = pytest.importorskip("torch")
    module = torch.nn.GRU(3, 4, num_layers=2, batch_first=True, dropout=0.5)
    with pytest.raises(
        ValueError,
        match=r"batch_first=False does not match the module, an "
        r"nn.GRU with batch_first=True; leave batch_first out",
    ):
        lg.from_torch(module, batch_first=False)
    with pytest.raises(ValueError, match=r"dropout=0.1 does not match .* dropout=0.5"):
        lg.from_torch(module, dropout=0.1)
    with pytest.raises(ValueError, match=r"kind='lstm' does not match .* nn.GRUCell"):
        lg.from_torch(torch.nn.GRUCell(3, 4), kind="lstm")


def test_to_torch_gives_numpy_without_torch(monkeypatch):
    params = lg.from_torch(_bi_state(), kind="lstm")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rnn_state, head_state = lg.to_torch(params)
    assert head_state is None
    assert list(rnn_state) == list(_bi_state())
    for k, v in _bi_state().items():
        assert type(rnn_state[k]) is np.ndarray
        np.testing.assert_array_equal(rnn_state[k], v)


def test_to_torch_refuses_a_cell_module_of_two_layers():
    state = fixture("module", "float64").case("gru_l2_packed")["rnn_state"]
    params = lg.from_torch(state, kind="gru")
    bad = type(params)(params.layers, None, None, "gru", cell_module=True)
    with pytest.raises(ValueError, match=r"cell module .* one layer in one direction, got 2"):
        lg.to_torch(bad)
