"""The as-written methods' structure: work, memory, generic cells and how ``auto`` decides.

Parity with PyTorch lives in ``test_train.py``; nothing here times anything.
"""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TOL, assert_close, random_rnn_problem

import loopgrad_jax as lg
from loopgrad_jax import _as_written
from loopgrad_jax._rnn import ARTICLE_CELL
from loopgrad_jax.bench import as_written_grid, cli, report, results_doc, run, timing


def _train(problem, method, *, lr=0.1, loop="scan", step=lg.rnn_cell):
    """The as-written methods on the article's model, its step replaced by ``step``."""
    cell = lg.Cell(step, ARTICLE_CELL.readout)
    params, inputs, targets, hidden0 = problem
    optimizer = optax.sgd(lr)
    return _as_written.train(
        params,
        inputs,
        targets,
        hidden0,
        method=method,
        loop=loop,
        optimizer=optimizer,
        opt_state=optimizer.init(params),
        keep_grads="all",
        cell=cell,
    )


def rms_cell(params, hidden, x):
    """:func:`loopgrad_jax.rnn_cell` on the RMS-normalised hidden state: singular at zero."""
    normed = hidden * jax.lax.rsqrt(jnp.mean(hidden**2, axis=1, keepdims=True))
    return lg.rnn_cell(params, normed, x)


def test_reverse_runs_one_cell_vjp_per_stored_step():
    # Step t re-differentiates steps t, ..., 0: T*(T+1)/2 cell VJPs in all, each of which
    # evaluates the cell once, besides the T forward steps. Masking the slots after t
    # instead of skipping them would evaluate the cell T + T*T times.
    calls = []

    def counting_cell(params, hidden, x):
        jax.debug.callback(lambda: calls.append(None))
        return lg.rnn_cell(params, hidden, x)

    t = 5
    problem = random_rnn_problem(jax.random.key(0), t, 2, 3, 4, 1)
    jax.block_until_ready(jax.jit(lambda: _train(problem, "reverse", step=counting_cell))())
    jax.effects_barrier()
    assert len(calls) == t + t * (t + 1) // 2


def test_cell_singular_at_zero_history_has_finite_outer_gradients():
    # An RMS-normalised cell is NaN at a zero hidden state. No step the loop has not
    # reached may be evaluated, on the way forward or back: jax.grad with respect to lr
    # through the whole run is finite and matches a central difference. In float64 with
    # eps = 1e-6 its error is O(eps**2) from truncation plus O(1e-16 / eps) = 1e-10
    # relative from rounding, so rtol=1e-7 leaves a 1000x margin.
    problem = random_rnn_problem(jax.random.key(3), 5, 2, 3, 4, 1)  # hidden0 != 0
    run = jax.jit(
        lambda lr, method: _train(problem, method, lr=lr, step=rms_cell), static_argnums=1
    )

    def total_loss(lr):
        return run(lr, "reverse").losses.sum()

    grad = jax.jit(jax.grad(total_loss))(0.1)
    assert np.isfinite(grad)
    eps = 1e-6
    central = (total_loss(0.1 + eps) - total_loss(0.1 - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, central, rtol=1e-7)
    # The forward method runs the same cell to the same result.
    assert_close(run(0.1, "forward"), run(0.1, "reverse"), TOL["float64"])


def test_cell_jacobians_are_the_batch_jacobian_blocks():
    params, inputs, _, hidden = random_rnn_problem(jax.random.key(5), 1, 3, 2, 4, 1)
    x = inputs[0]
    jac_p, jac_h = jax.jit(_as_written.cell_jacobians, static_argnums=0)(
        ARTICLE_CELL, params, hidden, x
    )
    full_p, full_h = jax.jit(jax.jacrev(lg.rnn_cell, argnums=(0, 1)))(params, hidden, x)
    # full_h[b, k, c, j] = d new[b, k] / d hidden[c, j]: zero unless b == c.
    rows = np.arange(3)
    assert_close(jac_h, np.asarray(full_h)[rows, :, rows, :], TOL["float64"])
    off_diagonal = np.asarray(full_h).copy()
    off_diagonal[rows, :, rows, :] = 0.0
    assert not off_diagonal.any()
    assert_close(jac_p, full_p, TOL["float64"])


def _temp_bytes(sizes, method, dtype):
    t, b, i, h, o = sizes
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, dtype), lg.init_rnn(jax.random.key(0), i, h, o)
    )
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in ((t, b, i), (t, b, o), (b, h))]

    def run(params, inputs, targets, hidden0):
        return lg.train_rnn(
            params, inputs, targets, hidden0=hidden0, mode="as_written", as_written_method=method
        )

    compiled = jax.jit(run).lower(params, *shapes).compile()  # compiled only, never run
    return compiled.memory_analysis().temp_size_in_bytes


# One size at a time around a base point, for each method, float32 and float64 in turn:
# every term of the estimate (B*H*P, B*H*H and P + B*H for forward; T*(P + B*H) for
# reverse) dominates somewhere. (T >= 2: with one step XLA removes the loop and its buffers.)
_BASE = lg.RNNSizes(length=20, batch=2, input=5, hidden=8, output=1)
_VARIED = [
    _BASE,
    _BASE._replace(length=200),
    _BASE._replace(batch=16),
    _BASE._replace(hidden=32),
]
MEMORY_GRID = [
    (sizes, method, ("float32", "float64")[(k + (method == "reverse")) % 2])
    for method in ("forward", "reverse")
    for k, sizes in enumerate(_VARIED)
]


# The full tier (3 s): compiles every method at several sizes.
@pytest.mark.slow
def test_compiled_temp_memory_is_within_2x_of_the_estimate():
    for sizes, method, dtype in MEMORY_GRID:
        estimate = lg.as_written_cost(sizes, method, jnp.dtype(dtype).itemsize).memory_bytes
        measured = _temp_bytes(sizes, method, dtype)
        assert estimate / 2 <= measured <= 2 * estimate, (sizes, method, dtype, measured, estimate)


def test_auto_keeps_forward_under_the_memory_cap():
    # I=64, H=256, B=32: P = 82,433, so forward's sensitivity alone is 2*B*H*P*4 = 5.4 GB.
    # At T=1,000,000 the time model favours forward (its work grows as T, reverse's as T**2),
    # but it would not fit under FORWARD_MEMORY_LIMIT.
    big = lg.RNNSizes(length=1_000_000, batch=32, input=64, hidden=256, output=1)
    assert _as_written.num_params(big) == 82_433
    forward = _as_written.estimated_seconds(big, "forward")
    assert forward < _as_written.estimated_seconds(big, "reverse")
    memory = lg.as_written_cost(big, "forward").memory_bytes
    assert memory >= 2 * 32 * 256 * 82_433 * 4 > _as_written.FORWARD_MEMORY_LIMIT
    assert _as_written.choose_method(big, jnp.float32) == "reverse"


def test_cost_of_an_unknown_method_names_it():
    sizes = lg.RNNSizes(length=3, batch=1, input=1, hidden=1, output=1)
    with pytest.raises(ValueError, match=r"method must be 'forward' or 'reverse', got 'auto'"):
        lg.as_written_cost(sizes, "auto")


def test_fit_recovers_the_prices_that_made_the_times(tmp_path, capsys):
    # Times made by a known model are fitted back to it exactly (prices of 2 digits), from
    # the records of a grid's JSON file: one a method a point, paired by their sizes.
    model = {
        "forward": {
            "call": 2.1e-4,
            "step": 1.5e-5,
            "row": 3.3e-6,
            "number": 4.4e-9,
            "flop": 3.2e-11,
            "batched_flop": 5.3e-11,
        },
        "reverse": {
            "call": 1.3e-4,
            "slot": 6.1e-7,
            "vjp": 2.7e-6,
            "weight": 1.1e-9,
            "activation": 4.7e-9,
            "flop": 1.9e-10,
        },
    }
    records = []
    for sizes in as_written_grid.points(
        {"input": (3, 40), "hidden": (2, 9, 30), "batch": (1, 7), "length": (5, 60, 700)}
    ):
        for method in ("reverse", "forward"):  # either order: paired by sizes
            record = as_written_grid.new_record(sizes, method)
            record["run_s_median"] = _as_written.estimated_seconds(sizes, method, 4, model)
            records.append(record)
    # A point skipped as too slow has no timing: the fit leaves it out.
    for record in as_written_grid.measure(
        _BASE, "float32", repeats=3, max_call_s=0.0, point_budget_s=0.0
    ).values():
        assert record["skipped"].startswith("a call is estimated at")
        records.append(record)
    assert as_written_grid.fit(records) == model
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"meta": {}, "records": records}))
    assert as_written_grid.main(["--fit", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0]) == model
    assert out[1].split() == [*"IHBT", "forward", "reverse", "faster", "fit", "forward", "fit"] + [
        "reverse",
        "fit",
        "pick",
        "pick/faster",
    ]
    assert len(out) == 3 + 36 and max(map(len, out[1:])) <= 120
    # Under the fitted model (the one that made the times) a pick is the faster method or,
    # within auto's margin, reverse.
    ratios = [float(line.split()[-1].rstrip("x")) for line in out[3:]]
    assert min(ratios) == 1.0 and max(ratios) < 1 / _as_written.FORWARD_MARGIN
    # A point missing one method's record is named.
    with pytest.raises(ValueError, match=r"at I=3 H=2 B=1 T=5, got reverse alone"):
        as_written_grid.pairs(records[:1] + records[2:])


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    """A one-point grid written by ``loopgrad-bench as-written-grid``, and what it printed."""
    path = tmp_path_factory.mktemp("grid") / "grid.json"
    argv = ["as-written-grid", "--input", "2", "--hidden", "3", "--batch", "1", "--length", "3"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([*argv, "--repeats", "3", "--json", str(path)]) == 0
    return path, json.loads(path.read_text()), out.getvalue()


def test_grid_writes_both_methods_as_loopgrad_bench_records(grid_file):
    path, doc, printed = grid_file
    meta = doc["meta"]
    assert meta["format_version"] == report.FORMAT_VERSION and meta["status"] == "complete"
    assert {"cpu", "usable_cores", "jax", "jaxlib", "git", "date"} <= set(meta)
    assert meta["command"] == (
        f"loopgrad-bench as-written-grid --input 2 --hidden 3 --batch 1 --length 3 --repeats 3 "
        f"--json {path}"
    )
    assert meta["grid"] == {"input": [2], "hidden": [3], "batch": [1], "length": [3]}
    assert meta["time_model"] == _as_written.TIME_MODEL and meta["dtype"] == "float32"
    forward, reverse = doc["records"]
    sizes = lg.RNNSizes(length=3, batch=1, input=2, hidden=3, output=1)
    median = {r["method"]: r["run_s_median"] for r in (forward, reverse)}
    faster = min(median, key=median.get)
    auto = _as_written.choose_method(sizes, "float32")
    for r in (forward, reverse):
        assert set(run.RECORD_KEYS) | set(as_written_grid.GRID_KEYS) == set(r)
        assert (r["scenario"], r["loop"], r["framework"], r["peer"]) == (
            "train_as_written", "scan", "jax", None
        )  # fmt: skip
        assert (r["input"], r["hidden"], r["batch"], r["length"], r["skipped"]) == (
            2,
            3,
            1,
            3,
            None,
        )
        assert (r["cell"], r["layers"], r["devices"]) == ("article", 1, 1)
        cost = lg.as_written_cost(sizes, r["method"])
        assert r["flops"] == round(cost.flops) and r["estimated_temp_bytes"] == cost.memory_bytes
        low, high = r["run_s_ci"]
        assert low <= r["run_s_median"] <= high
        assert r["run_s_min"] <= r["run_s_q1"] <= r["run_s_median"] <= r["run_s_q3"]
        assert r["run_samples"] == len(r["run_s_samples"]) >= 3 and r["run_number"] == 1
        assert r["run_s_samples"] == timing.round_samples(r["run_s_samples"])
        assert r["auto"] == (r["method"] == auto) and r["faster"] == (r["method"] == faster)
        assert r["auto_over_faster"] == median[auto] / median[faster]
        assert r["temp_bytes"] > 0 and r["gflops"] == r["flops"] / r["run_s_median"] / 1e9
    assert (forward["method"], reverse["method"]) == ("forward", "reverse")
    assert forward["other_cores"] == reverse["other_cores"]
    assert meta["worst_auto_over_faster"] == forward["auto_over_faster"]
    # The table printed while it ran: a head, then a line a point, within 120 columns.
    head, rule, line = printed.splitlines()
    assert head.split() == [*"IHBT", "forward", "reverse", "faster", "auto", "auto/faster", "busy"]
    assert line.split()[:4] == ["2", "3", "1", "3"] and max(map(len, (head, line))) <= 120
    assert line.split()[8:11] == [faster, auto, f"{forward['auto_over_faster']:.2f}x"]


def test_grid_file_renders_in_the_results_document(grid_file):
    _, doc, _ = grid_file
    assert results_doc._kind(doc) == ("bench", "")
    forward, reverse = doc["records"]
    lines = results_doc.render_file("grid.json", doc)
    row = next(line for line in lines if line.startswith("| 2 | 3 | 1 | 3 |"))
    for r in (forward, reverse):
        assert results_doc._escape(results_doc._time(r["run_s_median"], r["run_s_ci"])) in row
    faster = next(r["method"] for r in (forward, reverse) if r["faster"])
    auto = next(r["method"] for r in (forward, reverse) if r["auto"])
    assert f"| `{faster}` | `{auto}` | {forward['auto_over_faster']:.2f}x |" in row


@pytest.mark.slow  # the full tier (1.5 s)
def test_grid_recheck_retimes_only_the_busy_points(tmp_path):
    first, rechecked = tmp_path / "first.json", tmp_path / "rechecked.json"
    argv = ["--input", "2", "--hidden", "3", "--batch", "1", "--length", "3,4", "--repeats", "3"]
    assert cli.main(["as-written-grid", *argv, "--json", str(first)]) == 0
    doc = json.loads(first.read_text())
    quiet, busy = doc["records"][:2], doc["records"][2:]
    for r in quiet:
        r["other_cores"] = 0.1
    for r in busy:
        r["other_cores"] = 0.9
    # A point skipped as too slow has no timing: it is kept as it is.
    sizes = lg.RNNSizes(length=5, batch=1, input=2, hidden=3, output=1)
    skipped = list(
        as_written_grid.measure(
            sizes, "float32", repeats=3, max_call_s=0.0, point_budget_s=0.0
        ).values()
    )
    doc["records"] += skipped
    first.write_text(json.dumps(doc))
    assert as_written_grid.main(["--recheck", str(first), "--json", str(rechecked)]) == 0
    again = json.loads(rechecked.read_text())
    assert again["meta"]["recheck"] == {"of": str(first), "busy_above": 0.3}
    assert again["meta"]["grid"] == {"input": [2], "hidden": [3], "batch": [1], "length": [3, 4, 5]}
    records = again["records"]
    assert records[:2] == quiet and records[4:] == skipped
    retimed = records[2:4]
    for old, new in zip(busy, retimed, strict=True):
        assert (new["method"], new["length"], new["hidden"]) == (old["method"], 4, 3)
        assert new["first_run"] == {
            "run_s_median": old["run_s_median"],
            "other_cores": 0.9,
            "faster": old["faster"],
            "auto_over_faster": old["auto_over_faster"],
        }
        assert new["run_s_samples"] != old["run_s_samples"]
    assert retimed[0]["auto_over_faster"] == retimed[1]["auto_over_faster"]
