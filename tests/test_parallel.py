"""Data parallelism: ``mesh=`` on rnn_loss and train_rnn against one device.

These tests need four CPU devices, which JAX makes only before it starts: in the
suite's processes (one CPU device each) ``test_in_a_process_with_4_devices`` runs this
file again in a new process with ``LOOPGRAD_TEST_DEVICES=4`` (``conftest.py``), and
fails if any test there fails. Split over a mesh of 1, 2 or 4 devices, every result
must equal the single-device one up to the order of floating-point sums. Two real
processes, joined by ``jax.distributed`` and CPU collectives over gloo, are checked in
``test_two_processes_equal_one``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import loopgrad_jax as lg
from loopgrad_jax import _parallel

DEVICES = 4
_HERE = len(jax.devices("cpu")) >= DEVICES


#: What the quick tier runs in the 4-device process: one test of each concern (every
#: mode, the cells, meshes of either axis type, a split batch without ``mesh=``, the
#: refusals, the gradient's and the mean's sums over devices); the full tier runs every
#: test there, every reverse-capable loop kind among them.
QUICK_SAMPLE = (
    "test_every_mode_on_1_2_and_4_devices_equals_one_device and float64"
    " or test_every_cell_kind and lstm"
    " or test_meshes_of_either_axis_type"
    " or (test_inputs_split_by_an_explicit_mesh_without_the_mesh_argument and lstm"
    " and (scan or fori or auto))"
    " or test_an_explicit_mesh_without_the_mesh_argument_refuses_the_forward_method"
    " or test_bad_meshes_are_refused"
    " or test_the_gradient_is_summed_once"
    " or test_the_mean_over_lengths_counts_every_devices_steps"
)


@pytest.mark.skipif(_HERE, reason="this process has the devices: the tests run here")
@pytest.mark.parametrize(
    ("tier", "least"),
    [("quick", 7), pytest.param("full", 24, marks=pytest.mark.slow)],
)
def test_in_a_process_with_4_devices(tier, least):
    """The tests below, in a process of their own with 4 virtual devices: a sample of
    them (:data:`QUICK_SAMPLE`) in the quick tier, all of them in the full tier."""
    env = os.environ | {"LOOPGRAD_TEST_DEVICES": str(DEVICES), "JAX_PLATFORMS": "cpu"}
    # pytest-benchmark, where installed beside xdist, warns at start-up, and the suite
    # turns warnings into errors: the child needs neither.
    flags = ["-q", "-p", "no:cacheprovider", "-p", "no:benchmark"]
    # The sample is chosen by name, from every case (--full): the stride sampling of
    # tests/conftest.py would skip some of the cases it names.
    flags += ["--full"] if tier == "full" else ["--full", "-k", QUICK_SAMPLE]
    command = [sys.executable, "-m", "pytest", __file__, *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, tail
    assert int(summary.split(" passed")[0].split()[-1]) >= least, tail


#: Sums in another order: float64 within 1e-11 (the issue's bound), float32 within 1e-5.
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-11}
T, B, D, H = 4, 4, 2, 3  # D: the input size


def _mesh(n: int, axis_type=AxisType.Explicit, name: str = "batch"):
    return jax.make_mesh((n,), (name,), axis_types=(axis_type,), devices=jax.devices()[:n])


def _problem(kind="article", dtype=jnp.float64, layers=1, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    if kind == "article":
        params = lg.init_rnn(keys[0], input_size=D, hidden_size=H, dtype=dtype)
    else:
        params = lg.init_cell(
            keys[0], kind, input_size=D, hidden_size=H, num_layers=layers, dtype=dtype
        )
    x = jax.random.normal(keys[1], (T, B, D), dtype)
    y = jax.random.normal(keys[2], (T, B, 1), dtype)
    return params, x, y


#: (name, function of (params, x, y, **kw)): every way a mesh is used.
MODES = {
    "loss_and_grad": lambda p, x, y, **kw: jax.value_and_grad(lg.rnn_loss)(p, x, y, **kw),
    "tbptt": lambda p, x, y, **kw: lg.train_rnn(p, x, y, mode="tbptt", window=2, **kw),
    "as_written_forward": lambda p, x, y, **kw: lg.train_rnn(
        p, x, y, mode="as_written", as_written_method="forward", **kw
    ),
    "as_written_reverse": lambda p, x, y, **kw: lg.train_rnn(
        p, x, y, mode="as_written", as_written_method="reverse", **kw
    ),
}


def _same(run, *args, tol, **kw):
    """``run`` over a mesh equals ``run`` on one device; returns the mesh's result.

    The single-device run uses ``scan`` whatever ``loop`` the mesh's run uses (every
    loop kind equals scan on one device: tests/test_rnn.py), so it compiles once.
    """
    expected = run(*args, **{k: v for k, v in kw.items() if k != "mesh"} | {"loop": "scan"})
    actual = run(*args, **kw)
    assert_close(actual, expected, tol)
    return actual


@pytest.mark.parametrize(
    ("devices", "dtype"),
    [(2, jnp.float32), (4, jnp.float64)],  # 2 in float64: every other test; 1: below
    ids=["2-float32", "4-float64"],
)
def test_every_mode_on_1_2_and_4_devices_equals_one_device(devices, dtype):
    params, x, y = _problem(dtype=dtype)
    mesh = _mesh(devices)
    for name, run in MODES.items():
        result = _same(run, params, x, y, tol=TOL[dtype], mesh=mesh, loop="scan")
        if name != "loss_and_grad":  # the hidden state comes back split like the batch
            assert result.hidden.sharding.is_equivalent_to(
                NamedSharding(mesh, P("batch")), result.hidden.ndim
            )


@pytest.mark.parametrize(
    "loop", ["python", "fori", "remat:chunk=2", "remat:checkpoints=2"]
)  # scan: above
def test_every_reverse_capable_loop_kind(loop):
    params, x, y = _problem()
    mesh = _mesh(2)
    for name in ("loss_and_grad", "tbptt"):  # differentiated through the loop
        _same(MODES[name], params, x, y, tol=TOL[jnp.float64], mesh=mesh, loop=loop)


def test_the_mean_over_lengths_counts_every_devices_steps():
    # reduction="mean" with lengths divides by the real steps of the whole batch: the
    # two devices hold 3 and 8 of them, so a per-device count would differ.
    params, x, y = _problem("gru")
    lengths = jnp.array([1, 2, 4, 4])
    mesh = _mesh(2)
    for run in MODES.values():
        kw = {"reduction": "mean", "lengths": lengths, "loop": "scan"}
        _same(run, params, x, y, tol=TOL[jnp.float64], mesh=mesh, **kw)


def test_while_runs_the_forward_only_ways_and_a_mesh_of_one_device_changes_nothing():
    params, x, y = _problem()
    mesh = _mesh(2)
    _same(lg.rnn_loss, params, x, y, tol=TOL[jnp.float64], mesh=mesh, loop="while")
    one = _mesh(1)
    _same(MODES["loss_and_grad"], params, x, y, tol=TOL[jnp.float64], mesh=one, loop="scan")
    _same(MODES["as_written_forward"], params, x, y, tol=1e-11, mesh=mesh, loop="while")


@pytest.mark.parametrize(
    ("kind", "layers", "hoist", "modes"),
    [
        ("rnn_tanh", 1, False, ("loss_and_grad", "tbptt")),
        ("rnn_relu", 2, False, ("as_written_forward", "as_written_reverse")),
        ("lstm", 2, True, ("loss_and_grad", "tbptt", "as_written_forward")),
        ("gru", 2, True, ("loss_and_grad", "as_written_reverse")),
    ],
)
def test_every_cell_kind(kind, layers, hoist, modes):
    params, x, y = _problem(kind, layers=layers)
    mesh = _mesh(2)
    for name in modes:
        extra = {"hoist_input": True} if hoist and name in ("loss_and_grad", "tbptt") else {}
        _same(MODES[name], params, x, y, tol=TOL[jnp.float64], mesh=mesh, loop="scan", **extra)


def _own_cell():
    def step(p, h, x):
        return jnp.tanh(x @ p["w_x"].T + h @ p["w_h"].T)

    def readout(p, h):
        return h @ p["v"].T

    keys = jax.random.split(jax.random.key(7), 3)
    p = {
        "w_x": jax.random.normal(keys[0], (H, D), jnp.float64) / 2,
        "w_h": jax.random.normal(keys[1], (H, H), jnp.float64) / 2,
        "v": jax.random.normal(keys[2], (1, H), jnp.float64),
    }
    return lg.Cell(step, readout), p


def test_your_own_cell():
    cell, p = _own_cell()
    _, x, y = _problem()
    h0 = jnp.zeros((B, H), jnp.float64)
    for name in ("loss_and_grad", "as_written_forward"):
        _same(MODES[name], p, x, y, tol=TOL[jnp.float64], mesh=_mesh(2), cell=cell, hidden0=h0)


@pytest.mark.parametrize(
    ("mode", "optimizer"),
    [
        ("tbptt", optax.lbfgs()),  # a line search: value and value_fn, each a global mean
    ],
    ids=["lbfgs"],
)
def test_optimizers_see_the_global_loss_and_gradient(mode, optimizer):
    params, x, y = _problem()
    kw = {"window": 2} if mode == "tbptt" else {}
    with jax.numpy_dtype_promotion("standard"):  # optax's own promotions
        _same(
            lambda *a, **k: lg.train_rnn(*a, mode=mode, optimizer=optimizer, **kw, **k),
            params,
            x,
            y,
            tol=1e-11,
            mesh=_mesh(2),
        )


def test_outer_gradient_through_training_equals_one_device():
    params, x, y = _problem()

    def final_loss(lr, mesh):
        return lg.train_rnn(params, x, y, lr=lr, mode="tbptt", window=2, mesh=mesh).losses[-1]

    expected = jax.grad(final_loss)(0.05, None)
    assert_close(jax.grad(final_loss)(0.05, _mesh(2)), expected, 1e-11)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_meshes_of_either_axis_type_with_inputs_already_sharded(axis_type):
    params, x0, y0 = _problem()
    mesh = _mesh(2, axis_type, name="data")  # a single axis of any name
    x = jax.device_put(x0, NamedSharding(mesh, P(None, "data")))
    y = jax.device_put(y0, NamedSharding(mesh, P(None, "data")))
    grads = jax.jit(jax.grad(lambda p, x, y: lg.rnn_loss(p, x, y, mesh=mesh)))(params, x, y)
    assert_close(grads, jax.grad(lg.rnn_loss)(params, x0, y0), 1e-11)
    as_written = {"mode": "as_written"}
    assert_close(
        lg.train_rnn(params, x, y, mesh=mesh, **as_written),
        lg.train_rnn(params, x0, y0, **as_written),
        1e-11,
    )
    with jax.set_mesh(mesh):  # inside the mesh's context too
        assert_close(lg.rnn_loss(params, x, y, mesh=mesh), lg.rnn_loss(params, x0, y0), 1e-11)


#: Every way to differentiate or train, as ``test_inputs_split_by_an_explicit_mesh_...``
#: runs each: ``(params, x, y) -> result``.
_SPLIT_RUNS = {
    "scan": lambda p, x, y: jax.value_and_grad(lg.rnn_loss)(p, x, y),
    "hoisted": lambda p, x, y: jax.value_and_grad(lg.rnn_loss)(p, x, y, hoist_input=True),
    "python": lambda p, x, y: jax.value_and_grad(lg.rnn_loss)(p, x, y, loop="python"),
    "fori": lambda p, x, y: jax.value_and_grad(lg.rnn_loss)(p, x, y, loop="fori"),
    "tbptt": lambda p, x, y: lg.train_rnn(p, x, y, mode="tbptt", window=2),
    "reverse": lambda p, x, y: lg.train_rnn(
        p, x, y, mode="as_written", as_written_method="reverse"
    ),
    "auto": lambda p, x, y: lg.train_rnn(p, x, y, mode="as_written"),  # picks reverse
}


def _split_problem(kind):
    params, x0, y0 = _problem(kind, layers=1 if kind == "article" else 2)
    mesh = _mesh(2)
    split = NamedSharding(mesh, P(None, "batch", None))
    return params, x0, y0, mesh, jax.device_put(x0, split), jax.device_put(y0, split)


# The quick tier runs the LSTM (a pair of states), a sample of the runs; every other kind
# runs in the full tier.
@pytest.mark.parametrize("run", list(_SPLIT_RUNS))
@pytest.mark.parametrize(
    "kind", [k if k == "lstm" else pytest.param(k, marks=pytest.mark.slow) for k in lg.CELLS]
)
def test_inputs_split_by_an_explicit_mesh_without_the_mesh_argument(kind, run):
    """Under ``jax.set_mesh`` of an Explicit mesh, the sharding is part of each array's
    type: the default zero ``hidden0`` must be split like the inputs' batch, or the
    step's concatenation and the loop's carry refuse the mix (issue 23)."""
    params, x0, y0, mesh, x, y = _split_problem(kind)
    expected = _SPLIT_RUNS[run](params, x0, y0)
    with jax.set_mesh(mesh):
        actual = _SPLIT_RUNS[run](params, x, y)
    assert_close(actual, expected, TOL[jnp.float64], run)


def test_an_explicit_mesh_without_the_mesh_argument_refuses_the_forward_method():
    params, _, _, mesh, x, y = _split_problem("lstm")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"each example on its own.*mesh="):
        lg.train_rnn(params, x, y, mode="as_written", as_written_method="forward")


def _collectives_in_loops(jaxpr, inside: bool = False) -> list[str]:
    """Names of the cross-device reductions found inside a loop's body, at any depth."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if inside and name.startswith("psum"):
            found.append(name)
        loop = name in ("scan", "while")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _collectives_in_loops(sub, inside or loop)
    return found


def test_the_gradient_is_summed_once_after_the_loop_not_in_every_step():
    params, x, y = _problem()
    mesh = _mesh(2)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: lg.rnn_loss(p, x, y, mesh=mesh)))(params)
    assert "psum" in str(jaxpr)  # there is a reduction...
    assert _collectives_in_loops(jaxpr.jaxpr) == []  # ...and none inside the time loop


@pytest.mark.parametrize(
    ("mesh", "error", "match"),
    [
        (lambda: "batch", TypeError, r"mesh must be a jax.sharding.Mesh .* got str"),
        (lambda: _mesh(3), ValueError, r"B=4, inputs.shape\[1\]\) must split evenly .* 3"),
        (
            lambda: jax.make_mesh((2, 2), ("x", "y"), devices=jax.devices()[:4]),
            ValueError,
            r"axis named 'batch' or only one axis .* got axes \('x', 'y'\)",
        ),
    ],
    ids=["not_a_mesh", "uneven", "no_batch_axis"],
)
def test_bad_meshes_are_refused_before_anything_runs(mesh, error, match):
    params, x, y = _problem()
    with pytest.raises(error, match=match):
        lg.rnn_loss(params, x, y, mesh=mesh())
    with pytest.raises(error, match=match):
        lg.train_rnn(params, x, y, mesh=mesh())


def test_a_mesh_other_than_the_enclosing_one_is_refused():
    params, x, y = _problem()
    with jax.set_mesh(_mesh(2)), pytest.raises(ValueError, match="enclosing jax.set_mesh"):
        lg.rnn_loss(params, x, y, mesh=_mesh(4))


def test_a_two_axis_mesh_splits_over_batch_and_copies_over_the_other():
    params, x, y = _problem()
    mesh = jax.make_mesh((2, 2), ("batch", "model"), devices=jax.devices()[:4])
    assert _parallel.check_mesh(mesh, B).size == 2
    _same(MODES["tbptt"], params, x, y, tol=1e-11, mesh=mesh)


# ------------------------------------------------------------------ two processes

WORKER = Path(__file__).with_name("parallel_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """``jax.distributed`` with two processes, each feeding half the batch, equals one."""
    address = f"127.0.0.1:{_free_port()}"
    # One CPU device per process: no device count from XLA_FLAGS (the suite's flags that
    # make XLA compile quickly stay).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    # The workers import the package under test, wherever it was found (installed or not).
    path = os.pathsep.join(
        filter(None, [str(Path(lg.__file__).parents[1]), os.environ.get("PYTHONPATH")])
    )
    env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), "PYTHONPATH": path}
    env.pop("LOOPGRAD_TEST_DEVICES", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), address, str(i), str(tmp_path / f"{i}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:  # both always end, whatever happened to the other
            proc.kill()
            proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 2
        for name, (actual, expected) in result["compared"].items():
            np.testing.assert_allclose(actual, expected, rtol=1e-11, atol=1e-11, err_msg=name)
    # Each process held half the batch of hidden states; together they are the whole.
    halves = [np.asarray(r["hidden_local"]) for r in results]
    np.testing.assert_allclose(
        np.concatenate(halves, axis=0), np.asarray(results[0]["hidden_whole"]), atol=1e-11
    )


# Every test but the one above needs the devices: in the suite's own processes they are
# skipped, and run by test_in_a_process_with_4_devices.
for _name, _test in list(globals().items()):
    if _name.startswith("test_") and _name != "test_in_a_process_with_4_devices":
        globals()[_name] = pytest.mark.skipif(not _HERE, reason="needs 4 devices: run above")(_test)
