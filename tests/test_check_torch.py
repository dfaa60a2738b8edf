"""lg.check_against_torch: the user's own module in PyTorch against lg.rnn, every option;
and that it fails when the two differ."""

import math
import sys

import jax
import numpy as np
import pytest

import loopgrad_jax as lg
from loopgrad_jax import check_torch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

T, B = 4, 3


def _h0(rng, lead, h, h_out=None, lstm=False):
    h0 = rng.standard_normal((*lead, h_out or h))
    return (h0, rng.standard_normal((*lead, h))) if lstm else h0


#: name: (module, inputs' shape, lengths, hidden0's maker, the second loop kind)
CASES = {
    "rnn_tanh_bi2_packed": (
        lambda nn: nn.RNN(3, 4, num_layers=2, bidirectional=True),
        (T, B, 3),
        [4, 1, 3],
        lambda rng: _h0(rng, (4, B), 4),
        "fori",
    ),
    "lstm_proj_bi_batch_first_packed": (
        lambda nn: nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=True),
        (B, T, 3),
        [2, 4, 1],
        lambda rng: _h0(rng, (2, B), 4, 2, lstm=True),
        "while",
    ),
    "gru_no_bias_l2": (
        lambda nn: nn.GRU(3, 4, num_layers=2, bias=False),
        (T, B, 3),
        None,
        lambda rng: None,
        "remat",
    ),
    "rnn_relu_unbatched": (
        lambda nn: nn.RNN(3, 4, nonlinearity="relu", bidirectional=True),
        (T, 3),
        None,
        lambda rng: _h0(rng, (2,), 4),
        "python",
    ),
    "lstm_cell": (
        lambda nn: nn.LSTMCell(3, 4),
        (T, B, 3),
        None,
        lambda rng: _h0(rng, (B,), 4, lstm=True),
        "remat:checkpoints=2",
    ),
    "gru_cell_unbatched": (lambda nn: nn.GRUCell(3, 4), (T, 3), None, lambda rng: None, "fori"),
}


def _call(name, loops, dtype="float64", module=None):
    build, shape, lengths, h0, _ = CASES[name]
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    module = build(torch.nn) if module is None else module
    x = rng.standard_normal(shape)
    return check_torch.check_against_torch(
        module, x, lengths=lengths, hidden0=h0(rng), loops=loops, dtype=dtype
    )


@pytest.mark.parametrize("name", list(CASES))
def test_every_option_passes(name):
    other = CASES[name][4]
    result = _call(name, ("scan", other))
    assert result.passed, str(result)
    assert list(result.errors) == ["scan", other] and not result.messages
    lstm = "lstm" in name
    columns = ["outputs", "h_n", *(["c_n"] if lstm else []), "d weights", "d inputs"]
    columns += [] if CASES[name][3](np.random.default_rng(0)) is None else ["d hidden0"]
    assert result.columns == tuple(columns)
    assert all(0 <= e <= 1e-10 for row in result.errors.values() for e in row.values())
    assert result.tolerance == lg.parity.TOL["float64"]


def test_float32_and_the_table():
    result = _call("lstm_proj_bi_batch_first_packed", ("scan",), dtype="float32")
    assert result.passed and result.dtype == "float32" and result.tolerance == 1e-5
    lines = str(result).splitlines()
    assert lines[0].startswith("LSTM(3, 4, proj_size=2, batch_first=True, bidirectional=True)")
    assert lines[0].endswith("tolerance 1e-05: passed")
    assert lines[1].split() == [
        "loop", "outputs", "h_n", "c_n", "d", "weights", "d", "inputs", "d", "hidden0", "pass",
    ]  # fmt: skip
    assert lines[3].split()[0] == "scan" and lines[3].split()[-1] == "pass"
    assert result.as_json()["errors"]["scan"]["outputs"] == result.errors["scan"]["outputs"]


def test_the_users_module_is_left_as_it_is():
    module = torch.nn.GRU(3, 4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _call("gru_no_bias_l2", ("scan",), module=torch.nn.GRU(3, 4, num_layers=2, bias=False))
    check_torch.check_against_torch(module, np.ones((T, B, 3)), loops=("scan",))
    assert all(v.dtype == torch.float32 for v in module.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())


# ------------------------------------------------------------------ it can fail


class _Scaled(torch.nn.GRU):
    """A GRU whose forward is not nn.GRU's: its outputs scaled by 1.01."""

    def forward(self, x, h=None):
        out, h_n = super().forward(x, h)
        return out * 1.01, h_n


def test_a_module_whose_forward_differs_fails():
    result = _call("gru_no_bias_l2", ("scan",), module=_Scaled(3, 4, num_layers=2, bias=False))
    assert not result.passed
    row = result.errors["scan"]
    assert row["outputs"] > 1e-4 and row["d weights"] > 1e-4
    assert row["h_n"] <= 1e-10  # the final states are the module's own
    assert result.failed_loops() == ["scan"]
    assert "FAILED" in str(result).splitlines()[0] and "FAIL" in str(result).splitlines()[-1]


def test_weights_imported_as_another_nonlinearity_fail(monkeypatch):
    def as_relu(module):  # the tanh module's state dict read as a relu module's
        return lg.from_torch(module.state_dict(), kind="rnn_relu")

    monkeypatch.setattr(check_torch, "from_torch", as_relu)
    result = _call("rnn_tanh_bi2_packed", ("scan",))
    assert not result.passed and result.worst > 1e-3
    assert all(e > 1e-3 for e in result.errors["scan"].values())


def test_a_run_that_raises_is_a_failed_row(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(check_torch, "rnn", broken)
    result = _call("gru_cell_unbatched", ("scan",))
    assert not result.passed and math.isinf(result.worst)
    assert result.messages == {"scan": "RuntimeError: boom"}
    assert "scan: RuntimeError: boom" in str(result)


# ------------------------------------------------------------------ refusals


def test_bad_arguments_are_refused():
    gru, cell, x = torch.nn.GRU(3, 4), torch.nn.GRUCell(3, 4), np.ones((T, B, 3))
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64', got 'float16'"):
        check_torch.check_against_torch(gru, x, dtype="float16")
    with pytest.raises(ValueError, match="loop must be one of 'python', .*got 'nope'"):
        check_torch.check_against_torch(gru, x, loops=("scan", "nope"))
    with pytest.raises(ValueError, match="a cell module .GRUCell. steps through every step"):
        check_torch.check_against_torch(cell, x, lengths=[1, 2, 3])
    with pytest.raises(TypeError, match="module must be a torch.nn.RNN, LSTM or GRU"):
        check_torch.check_against_torch({"weight_ih_l0": 1}, x)
    with pytest.raises(TypeError, match="rnn must be a torch.nn.RNN"):
        check_torch.check_against_torch(torch.nn.Linear(3, 4), x)


def test_float64_without_x64_says_so():
    with (
        jax.enable_x64(False),
        pytest.raises(ValueError, match=r"jax.config.update\('jax_enable_x64', True\) first"),
    ):
        check_torch.check_against_torch(torch.nn.GRU(3, 4), np.ones((T, B, 3)))


def test_without_torch_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'loopgrad_jax\[torch\]'"):
        check_torch.check_against_torch(object(), np.ones((T, B, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_option_with_every_loop_kind(name):
    result = _call(name, check_torch.DEFAULT_LOOPS)
    assert result.passed, str(result)
    assert list(result.errors) == list(check_torch.DEFAULT_LOOPS)
