"""``loop="cudnn"``: an nn.LSTM through ``jax.experimental.rnn``'s cuDNN kernel.

On any backend the wiring (weights packed into cuDNN's flat layout, the batch-major
layout, ``(h_0, c_0)`` and ``lengths``) runs through ``jax.experimental.rnn.lstm_ref``,
the pure-JAX reference JAX ships beside the kernel (``cudnn.REFERENCE``), and is checked
against ``loop="scan"`` and PyTorch's ``module`` fixtures; every refusal is checked by
its message. On a CUDA GPU the real kernel runs the fixtures too (skipped elsewhere).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, assert_passes, fixture

import loopgrad_jax as lg
from loopgrad_jax import parity
from loopgrad_jax._cells import cudnn, module_forward, to_carry

ON_CUDA = jax.default_backend() == "gpu"
TOL = {"float32": 1e-5, "float64": 1e-12}

#: The module fixtures' LSTM cases that cuDNN runs: all but the projection.
CASES = [
    c["name"]
    for c in fixture("module", "float64").cases
    if c["kind"] == "lstm" and not c.get("proj_size")
]


@pytest.fixture
def reference():
    """``loop="cudnn"`` through ``lstm_ref`` (pure JAX) for the test's duration."""
    with cudnn.using(cudnn.REFERENCE) as kernel:
        yield kernel


def _problem(num_layers, bidirectional, dtype, bias=True, t=5, b=3, i=3, h=4):
    keys = jax.random.split(jax.random.key(7), 4)
    p = lg.init_cell(keys[0], "lstm", input_size=i, hidden_size=h, num_layers=num_layers,
                     bidirectional=bidirectional, bias=bias, dtype=dtype)  # fmt: skip
    states = num_layers * (2 if bidirectional else 1)
    x = jax.random.normal(keys[1], (t, b, i), dtype)
    h0 = jax.random.normal(keys[2], (states, b, h), dtype)
    c0 = jax.random.normal(keys[3], (states, b, h), dtype)
    return p, x, (h0, c0)


def _probe(outputs, h_n, c_n):
    """A scalar that weighs every output and final state differently."""
    return jnp.sum(jnp.sin(outputs) * outputs) + jnp.sum(jnp.cos(h_n)) + jnp.sum(c_n**2)


def _value_and_grads(forward, p, x, hidden0, live):
    def loss(p, x, hidden0):
        finals, outputs = forward(p, x, to_carry("lstm", hidden0), live)
        h_n, c_n = (jnp.stack(s) for s in zip(*finals, strict=True))
        return _probe(outputs, h_n, c_n), (outputs, h_n, c_n)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, x, hidden0)


# ------------------------------------------------------------------------- the wiring


def test_pack_weights_is_what_unpack_lstm_weights_reads():
    from jax.experimental import rnn

    for bias in (True, False):
        p, _, _ = _problem(2, True, jnp.float32, bias=bias)
        flat = cudnn.pack_weights(p)
        assert flat.shape == (rnn.get_num_params_in_lstm(3, 4, 2, True),)
        w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(flat, 3, 4, 2, True)
        for k, layer in enumerate(p.layers):
            np.testing.assert_array_equal(w_ih[k], layer.weight_ih)
            np.testing.assert_array_equal(w_hh[k], layer.weight_hh)
            for got, want in ((b_ih[k], layer.bias_ih), (b_hh[k], layer.bias_hh)):
                np.testing.assert_array_equal(got, np.zeros(16) if want is None else want)


def test_wiring_through_lstm_ref_equals_scan_quick():
    """The quick tier's case of the grid below: bidirectional, packed (lengths 1 and T)."""
    _check_wiring(1, True, (5, 1, 3), "float64")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lengths", [None, (5, 1, 3)], ids=["full", "packed"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
@pytest.mark.parametrize("num_layers", [2, 1])
def test_wiring_through_lstm_ref_equals_scan(num_layers, bidirectional, lengths, dtype):
    _check_wiring(num_layers, bidirectional, lengths, dtype)


def _check_wiring(num_layers, bidirectional, lengths, dtype):
    """Outputs, h_n, c_n and the gradients w.r.t. the weights, inputs and (h_0, c_0).

    Lengths 1 and T are among the packed ones: ``lstm_ref`` zeroes the outputs from each
    example's length on, takes the forward direction's final state at its last real step
    and starts the reverse direction there, as PyTorch's packed sequences run.
    """
    p, x, hidden0 = _problem(num_layers, bidirectional, jnp.dtype(dtype))
    live = None if lengths is None else jnp.arange(5)[:, None] < jnp.array(lengths)[None, :]
    got = _value_and_grads(
        lambda p, x, c, live: cudnn.module_forward(p, x, c, live=live, kernel_=cudnn.REFERENCE),
        p, x, hidden0, live,
    )  # fmt: skip
    want = _value_and_grads(
        lambda p, x, c, live: module_forward(p, x, c, lg.Loop("scan"), live=live),
        p, x, hidden0, live,
    )  # fmt: skip
    assert_close(got, want, TOL[dtype], "lstm_ref wiring vs scan")
    if lengths is not None:  # padded steps: zero outputs, zero input gradients
        (_, (outputs, _, _)), (_, grad_x, _) = got
        assert float(jnp.abs(outputs[1:, 1]).max()) == 0.0
        assert float(jnp.abs(grad_x[1:, 1]).max()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("batch_first", [True, False])
def test_rnn_cudnn_through_lstm_ref_equals_scan(reference, batch_first):
    """lg.rnn's layouts around the kernel: batch_first, lengths, hidden0, bias=False."""
    p, x, hidden0 = _problem(2, True, jnp.float32, bias=False)
    x = jnp.swapaxes(x, 0, 1) if batch_first else x
    lengths = jnp.array([5, 1, 3])

    def loss(p, x, hidden0, loop):
        outputs, (h_n, c_n) = lg.rnn(p, x, hidden0, lengths=lengths, batch_first=batch_first,
                                     loop=loop)  # fmt: skip
        return _probe(outputs, h_n, c_n), (outputs, h_n, c_n)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    assert_close(grad(p, x, hidden0, "cudnn"), grad(p, x, hidden0, "scan"), 1e-5, "lg.rnn")
    # Unbatched (T, I), default zero states, under jax.jit.
    run = jax.jit(lambda x: lg.rnn(p, x, loop="cudnn"))
    assert_close(run(x[:, 0]), lg.rnn(p, x[:, 0]), 1e-5, "unbatched")


@pytest.mark.slow
def test_rnn_loss_and_train_rnn_cudnn_through_lstm_ref_equal_scan(reference):
    p, x, hidden0 = _problem(2, False, jnp.float64)
    p = lg.init_cell(jax.random.key(3), "lstm", input_size=3, hidden_size=4, num_layers=2,
                     output_size=2, dtype=jnp.float64)  # fmt: skip
    y = jax.random.normal(jax.random.key(4), (5, 3, 2), jnp.float64)
    lengths = jnp.array([2, 5, 4])

    def loss(p, loop):
        return lg.rnn_loss(p, x, y, hidden0=hidden0, lengths=lengths, loop=loop)

    grad = jax.value_and_grad(loss)
    assert_close(grad(p, "cudnn"), grad(p, "scan"), 1e-12, "rnn_loss")
    got, want = (
        lg.train_rnn(p, x, y, hidden0=hidden0, window=2, lr=0.1, loop=loop)
        for loop in ("cudnn", "scan")
    )
    assert_close(got, want, 1e-12, "train_rnn tbptt")


def _fixture_checks(dtypes):
    return [
        pytest.param(parity.Check("module", case, "lstm", "", "cudnn", False, dtype),
                     id=f"{dtype}-{case}")
        for dtype in dtypes
        for case in CASES
    ]  # fmt: skip


def test_fixture_cases_cover_what_cudnn_runs():
    assert {"lstm_bi2_packed", "lstm_bi3_batch_first_packed", "lstm_bi2_no_bias"} <= set(CASES)
    assert {"lstm_cell", "lstm_bi2_unbatched", "lstm_l2_packed"} <= set(CASES)
    lengths = {n for c in fixture("module", "float64").cases if c["name"] in CASES
               for n in (c.get("lengths") or ())}  # fmt: skip
    assert {1, 5} <= lengths  # length 1 and T = 5


@pytest.mark.slow
@pytest.mark.parametrize("check", _fixture_checks(["float64", "float32"]))
def test_cudnn_wiring_matches_pytorch_fixtures(reference, check):
    assert_passes(check)


# ------------------------------------------------------------------------- the refusals


def _lstm(**options):
    return lg.init_cell(jax.random.key(0), "lstm", input_size=3, hidden_size=4, **options)


X = np.ones((5, 2, 3), np.float32)


#: Each refusal: the call, and a pattern of its message.
REFUSALS = {
    "gru": (
        lambda: lg.rnn(
            lg.init_cell(jax.random.key(0), "gru", input_size=3, hidden_size=4), X, loop="cudnn"
        ),
        r"loop='cudnn' in lg.rnn runs LSTMs only .* got params.kind='gru'; use loop='scan'",
    ),
    "rnn_tanh": (
        lambda: lg.rnn(
            lg.init_cell(jax.random.key(0), "rnn_tanh", input_size=3, hidden_size=4),
            X,
            loop="cudnn",
        ),
        r"runs LSTMs only .* got params.kind='rnn_tanh'; use loop='scan'",
    ),
    "article": (
        lambda: lg.rnn_loss(lg.init_rnn(jax.random.key(0), 3, 4), X, X[..., :1], loop="cudnn"),
        r"loop='cudnn' in lg.rnn_loss runs PyTorch's nn.LSTM only .* params is the "
        r"article's SimpleRNN \(RNNParams\); use loop='scan'",
    ),
    "custom_cell": (
        lambda: lg.rnn_loss(
            {"w": jnp.ones((3, 4), jnp.float32)},
            X,
            X[..., :1],
            hidden0=jnp.zeros((2, 4), jnp.float32),
            loop="cudnn",
            cell=lg.Cell(lambda p, h, x: jnp.tanh(x @ p["w"] + h), lambda p, h: h[:, :1]),
        ),
        r"runs PyTorch's nn.LSTM only .* not a cell=lg.Cell\(...\) of your own; use "
        r"loop='scan'",
    ),
    "proj_size": (
        lambda: lg.rnn(_lstm(proj_size=2), X, loop="cudnn"),
        r"cannot run an LSTM with proj_size .* use loop='scan'",
    ),
    "bf16": (
        lambda: lg.rnn(_lstm(), X, loop="cudnn", precision="bf16"),
        r"float32 only: precision=Precision\(.*bfloat16.*\) .* pass precision=None; use "
        r"loop='scan'",
    ),
    "dropout_key": (
        lambda: lg.rnn(
            _lstm(num_layers=2, dropout=0.5), X, loop="cudnn", dropout_key=jax.random.key(1)
        ),
        r"does not run dropout between layers \(dropout_key given, params.dropout=0.5\): "
        r"cuDNN's dropout masks .* pass dropout_key=None",
    ),
    "float64": (
        lambda: lg.rnn(_lstm(dtype=jnp.float64), X.astype(np.float64), loop="cudnn"),
        r"loop='cudnn' in lg.rnn computes in float32 only .* got float64 inputs and "
        r"weights; use loop='scan'",
    ),
    "mesh": (
        lambda: lg.rnn_loss(
            _lstm(output_size=1), X, X[..., :1], loop="cudnn", mesh=jax.make_mesh((1,), ("batch",))
        ),
        r"loop='cudnn' in lg.rnn_loss does not split the batch over a mesh",
    ),
    "as_written": (
        lambda: lg.train_rnn(_lstm(output_size=1), X, X[..., :1], loop="cudnn", mode="as_written"),
        r"train_rnn\(mode='as_written'\) updates the weights after every step.*use "
        r"mode='tbptt' with loop='cudnn', or mode='as_written' with loop='scan'",
    ),
    "run_loop": (
        lambda: lg.run_loop(lambda c, x: (c, x), X[0], X, length=5, loop="cudnn"),
        r"run_loop .* runs a loop body step by step, which it cannot; use one of 'python', "
        r"'scan'",
    ),
    "accumulate_loss": (
        lambda: lg.accumulate_loss(2.0, 3, loop="cudnn"),
        r"loop='cudnn' runs a whole nn.LSTM in cuDNN's fused kernel",
    ),
    "unroll": (
        lambda: lg.rnn(_lstm(), X, loop="cudnn:unroll=2"),
        r"loop unroll applies to .* got unroll=2 with kind 'cudnn'",
    ),
}


def test_cudnn_refuses_what_it_cannot_run():
    """Every refusal, with its message (one test: each is cheap, and all run quick)."""
    for name, (call, match) in REFUSALS.items():
        with pytest.raises(ValueError, match=match) as raised:
            call()
        assert raised.type is ValueError, name


@pytest.mark.skipif(ON_CUDA, reason="the refusal of a backend without CUDA")
def test_cudnn_needs_a_cuda_gpu():
    match = (
        r"loop='cudnn' in lg.rnn needs a CUDA GPU \(cuDNN, through jax.experimental.rnn.lstm\), "
        r"but the inputs are on cpu \(jax.default_backend\(\) is 'cpu'\); use loop='scan'"
    )
    with pytest.raises(ValueError, match=match):
        lg.rnn(_lstm(), X, loop="cudnn")
    with pytest.raises(ValueError, match=match.replace("lg.rnn", "lg.rnn_loss")):
        jax.jit(lambda x: lg.rnn_loss(_lstm(output_size=1), x, x[..., :1], loop="cudnn"))(X)


def test_cudnn_kind():
    spec = lg.Loop.parse("cudnn")
    assert "cudnn" in lg.FUSED_LOOPS and "cudnn" not in lg.LOOPS
    assert spec.reverse_mode and not spec.forward_mode
    assert str(spec) == "cudnn"
    assert cudnn.kernel() is cudnn.CUDNN


# ------------------------------------------------------------------------- on a CUDA GPU


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU (cuDNN)")
def test_cudnn_matches_pytorch_fixtures_on_gpu():
    """The real kernel, ``jax.experimental.rnn.lstm``, through ``lg.rnn(loop="cudnn")``, on
    every LSTM case it runs (one test, so that the quick tier runs them all on a GPU)."""
    with cudnn.using(cudnn.CUDNN):
        for case in CASES:
            assert_passes(parity.Check("module", case, "lstm", "", "cudnn", False, "float32"))
