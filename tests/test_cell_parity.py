"""PyTorch's ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` against their fixtures, and the weight maps.

Every cell kind runs with every loop kind in float64, under jit where that traces another
program, and with scan in float32 (``parity.checks(..., grid="suite")``;
``loopgrad-parity`` runs the wider ``"full"`` grid, every kind and loop kind in both
dtypes, with the same function).
"""

import numpy as np
import pytest
from helpers import assert_passes, parity_params

import loopgrad_jax as lg
from loopgrad_jax import parity

TORCH_KINDS = tuple(k for k in lg.CELLS if k != "article")


@pytest.mark.parametrize(
    "check", parity_params(parity.checks(["cell_loss"], grid="suite"), quick_every=3)
)
def test_loss_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.parametrize("check", parity_params(parity.checks(["cell_as_written"], grid="suite")))
def test_as_written_matches_pytorch(check):
    assert_passes(check)


@pytest.mark.parametrize("check", parity_params(parity.checks(["cell_tbptt"], grid="suite")))
def test_tbptt_matches_pytorch(check):
    assert_passes(check)


def test_suite_grid_covers_every_kind_with_every_loop_kind_jit_and_dtype():
    # float64 runs every kind with every loop kind; float32, whose programs are the same
    # but for the dtype, every kind with scan (its rounding is what it adds).
    suite = parity.checks(["cell_loss", "cell_as_written", "cell_tbptt"], grid="suite")
    seen = {(c.cell, lg.Loop.parse(c.loop).kind, c.dtype) for c in suite}
    assert seen == {(k, loop, "float64") for k in TORCH_KINDS for loop in lg.LOOPS} | {
        (k, "scan", "float32") for k in TORCH_KINDS
    }
    assert {(c.cell, c.loop) for c in suite if c.jit} >= {(k, "python") for k in TORCH_KINDS}
    assert {(c.scenario, c.method) for c in suite} == {
        (s, m) for s, methods in parity.grid._CELL_METHODS.items() for m in methods
    }
    assert {c.loop for c in suite} >= set(parity.OPTIONS)
    # The wider grid of loopgrad-parity holds every check the suite runs.
    assert set(suite) <= set(parity.checks(["cell_loss", "cell_as_written", "cell_tbptt"]))


@pytest.mark.torch
@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_to_torch_inverts_from_torch(kind, layers):
    torch = pytest.importorskip("torch")
    torch.manual_seed(layers)
    nn = torch.nn
    rnn = {
        "rnn_tanh": lambda: nn.RNN(3, 4, num_layers=layers),
        "rnn_relu": lambda: nn.RNN(3, 4, num_layers=layers, nonlinearity="relu"),
        "lstm": lambda: nn.LSTM(3, 4, num_layers=layers),
        "gru": lambda: nn.GRU(3, 4, num_layers=layers),
    }[kind]()
    head = nn.Linear(4, 2)
    state = {k: v.detach().numpy() for k, v in rnn.state_dict().items()}
    head_state = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    for params in (lg.from_torch(rnn, head), lg.from_torch(state, head_state, kind=kind)):
        assert (params.kind, params.num_layers) == (kind, layers)
        back, back_head = lg.to_torch(params)
        for ours, theirs in ((back, state), (back_head, head_state)):
            assert ours.keys() == theirs.keys()
            for k in theirs:
                assert np.asarray(ours[k]).dtype == theirs[k].dtype, k
                np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
