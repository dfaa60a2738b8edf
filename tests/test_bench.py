"""``loopgrad-bench``: the CLI, its JSON, its figures and its PyTorch peers.

Nothing here times anything: speed claims live only in ``bench/results``.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, cli, report, run, timing, torch_peers
from loopgrad_jax.bench import flops as flops_module
from loopgrad_jax.bench.cases import SCENARIOS, Sizes, make_data, reverse_loops
from loopgrad_jax.bench.flops import rnn_flops

needs_torch = pytest.mark.skipif(not torch_peers.available(), reason="torch is not installed")

META_KEYS = {"jax", "jaxlib", "torch", "backend", "device", "cpu_count", "date", "command"}
SCHEMA_KEYS = {
    "scenario",
    "loop",
    "framework",
    "peer",
    "length",
    "batch",
    "input",
    "hidden",
    "compile_s",
    "run_s_median",
    "run_s_min",
    "memory_bytes",
    "gflops",
    "skipped",
}
FIGURES = ("lower_s", "compile_s", "run_s_median", "run_s_min", "memory_bytes", "gflops")


def _bench(tmp_path: Path, *flags: str) -> tuple[int, dict]:
    """Runs the CLI in-process with a JSON file; returns the exit status and the JSON."""
    path = tmp_path / "out.json"
    status = cli.main([*flags, "--no-progress", "--json", str(path)])
    return status, json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run for the tests that read its output."""
    folder = tmp_path_factory.mktemp("quick")
    argv = ["--quick", "--json", str(folder / "q.json"), "--plot", str(folder / "q.png")]
    status = cli.main([*argv, "--no-progress"])
    return status, json.loads((folder / "q.json").read_text()), folder / "q.png"


# --- --quick, end to end ---------------------------------------------------------------


def test_quick_writes_json_matching_the_schema(quick):
    status, doc, _ = quick
    assert status == 0
    assert set(doc) == {"meta", "records"}
    meta = doc["meta"]
    assert META_KEYS <= set(meta)
    assert meta["jax"] == jax.__version__
    assert meta["backend"] == jax.default_backend()
    assert meta["cpu_count"] == os.cpu_count()
    assert 1 <= meta["usable_cores"] <= meta["cpu_count"]
    assert meta["status"] == "complete"
    assert meta["command"].startswith("loopgrad-bench --quick")
    assert meta["torch"] == (_torch_version() if torch_peers.available() else None)

    records = doc["records"]
    peers = sum(len(p) for p in torch_peers.PEERS.values()) if meta["torch"] else 0
    assert len(records) == len(SCENARIOS) * len(lg.LOOPS) + peers
    for r in records:
        assert SCHEMA_KEYS <= set(r)
        assert set(r) == set(run.RECORD_KEYS)
        assert r["length"] == cli.QUICK["lengths"][0]
        assert (r["batch"], r["input"], r["hidden"]) == (2, 3, 4)
        assert r["skipped"] is None or not _runs(r)
        assert (r["run_s_median"] is None) == (r["skipped"] is not None)
    assert [(r["scenario"], r["loop"]) for r in records if r["framework"] == "jax"] == [
        (s, loop) for s in SCENARIOS for loop in lg.LOOPS
    ]


def test_quick_jax_figures_are_consistent(quick):
    _, doc, _ = quick
    for r in (r for r in doc["records"] if r["framework"] == "jax" and _runs(r)):
        assert r["peer"] is None
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        assert 0 < r["run_s_min"] <= r["run_s_median"]
        # CPU reports memory: at least the arguments, e.g. x (2, 3) float32 = 24 bytes.
        assert isinstance(r["memory_bytes"], int) and r["memory_bytes"] >= 24
        if SCENARIOS[r["scenario"]].rnn:
            sizes = dict(length=3, batch=2, input=3, hidden=4)
            assert r["flops"] == rnn_flops(r["scenario"], **sizes)
            assert r["gflops"] == pytest.approx(r["flops"] / r["run_s_median"] / 1e9)
        else:
            assert r["flops"] is None and r["gflops"] is None


@needs_torch
def test_quick_torch_peers_compute_what_jax_computes(quick):
    _, doc, _ = quick
    torch_rows = [r for r in doc["records"] if r["framework"] == "torch"]
    assert {(r["scenario"], r["peer"]) for r in torch_rows} == {
        (s, p) for s, peers in torch_peers.PEERS.items() for p in peers
    }
    for r in torch_rows:
        assert r["loop"] is None and r["compile_s"] is None and r["memory_bytes"] is None
        assert 0 < r["run_s_min"] <= r["run_s_median"]
        # float32, a handful of steps: a few ulps apart, never a different computation.
        assert r["max_rel_diff"] < 1e-5, r


def test_quick_plot_is_a_png(quick):
    _, _, png = quick
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # five panels of lines, not an empty canvas


def test_table_prints_every_record_with_speedups(quick, capsys):
    _, doc, _ = quick
    table = report.format_table(doc["records"])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["scenario", "T", "impl"]
    assert len(lines) == 2 + len(doc["records"]) + 1
    if doc["meta"]["torch"]:
        assert "nn.RNN" in table and "eager" in table


# --- FLOP count --------------------------------------------------------------------------


def test_rnn_flops_matches_a_hand_count():
    # B=2, I=3, H=4, O=1, T=5. One step, forward:
    #   i2h: (2 x 7) @ (7 x 4) = 2*7*4 = 56 multiply-adds = 112 FLOPs
    #   h2o: (2 x 4) @ (4 x 1) = 2*4*1 =  8 multiply-adds =  16 FLOPs   -> 128 per step
    # Backward, per product: one product of the same size for the weight's gradient and
    # one for the input's: 2 * 128 = 256. Forward + backward = 384 per step, 5 steps: 1920.
    sizes = dict(length=5, batch=2, input=3, hidden=4)
    assert rnn_flops("rnn_loss", **sizes) == 1920
    assert rnn_flops("train_tbptt", **sizes) == 1920
    # As written: step t runs forward (112 + 16), back through its head (2 * 16 = 32) and
    # back through the t cells so far (t * 2 * 112 = 224 t):
    #   sum over t = 1..5 of (160 + 224 t) = 5 * 160 + 224 * 15 = 800 + 3360 = 4160.
    assert rnn_flops("train_as_written", **sizes) == 4160
    with pytest.raises(ValueError, match="scenario must be one of .* got 'stack'"):
        rnn_flops("stack", **sizes)


def test_flops_docstring_example_runs():
    result = doctest.testmod(flops_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lengths", "0"),
        ("--lengths", "10,ten"),
        ("--scenarios", "rnn_loss,nope"),
        ("--loops", "scan,do_while"),
        ("--hidden", "-1"),
        ("--batch", "1.5"),
        ("--repeats", "3"),
        ("--max-unroll", "many"),
        ("--backend", "cuda"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert value.split(",")[-1] in err  # what was given
    assert "expected" in err or "choose from" in err  # what was expected


def test_window_longer_than_every_length_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--lengths", "4,8", "--window", "9"])
    assert exit_info.value.code == 2
    assert "argument --window: expected at most the longest of --lengths (8), got 9" in (
        capsys.readouterr().err
    )


def test_output_in_a_missing_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", "--json", str(tmp_path / "nowhere" / "out.json")])
    assert exit_info.value.code == 2
    assert "argument --json: expected a file path in an existing folder" in (
        capsys.readouterr().err
    )


def test_absent_backend_names_the_available_ones(monkeypatch, capsys):
    monkeypatch.setattr(cli, "available_backends", lambda: ["cpu"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", "--backend", "gpu"])
    assert exit_info.value.code == 2
    assert "backend 'gpu' is not available; available backends: cpu" in capsys.readouterr().err


def test_available_backends_holds_the_default_one():
    assert jax.default_backend() in cli.available_backends()


# --- interrupted and crashed runs --------------------------------------------------------


def _fail_on_second_case(monkeypatch, error: BaseException) -> None:
    real, calls = timing.time_jax, []

    def time_jax(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(timing, "time_jax", time_jax)


def test_interrupted_run_leaves_valid_json_with_the_finished_records(monkeypatch, tmp_path):
    _fail_on_second_case(monkeypatch, KeyboardInterrupt())
    status, doc = _bench(tmp_path, "--quick", "--scenarios", "accumulate", "--no-torch")
    assert status == 130
    assert doc["meta"]["status"] == "interrupted"
    [record] = doc["records"]
    assert (record["scenario"], record["loop"], record["length"]) == ("accumulate", "python", 3)
    assert record["run_s_median"] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_crashed_run_keeps_the_finished_records(monkeypatch, tmp_path):
    _fail_on_second_case(monkeypatch, RuntimeError("out of memory"))
    path = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["--quick", "--scenarios", "stack", "--no-torch", "--json", str(path)])
    doc = json.loads(path.read_text())
    assert doc["meta"]["status"] == "failed: RuntimeError: out of memory"
    assert [(r["scenario"], r["loop"]) for r in doc["records"]] == [("stack", "python")]


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(path, {"status": "running"}, [{"a": 1}])
    report.write_json(path, {"status": "complete"}, [{"a": 1}, {"a": 2}])
    assert json.loads(path.read_text()) == {
        "meta": {"status": "complete"},
        "records": [{"a": 1}, {"a": 2}],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


# --- skips, peers, defaults --------------------------------------------------------------


def test_long_python_loops_are_recorded_as_skipped(tmp_path):
    status, doc = _bench(
        tmp_path,
        *("--quick", "--scenarios", "accumulate", "--lengths", "3,6"),
        *("--max-unroll", "4", "--loops", "python,scan", "--no-torch"),
    )
    assert status == 0
    by_case = {(r["loop"], r["length"]): r for r in doc["records"]}
    assert set(by_case) == {("python", 3), ("scan", 3), ("python", 6), ("scan", 6)}
    skipped = by_case["python", 6]
    assert "T=6 > --max-unroll=4" in skipped["skipped"]
    assert all(skipped[k] is None for k in FIGURES)
    for key in (("python", 3), ("scan", 3), ("scan", 6)):
        assert by_case[key]["skipped"] is None and by_case[key]["run_s_median"] > 0


def test_a_case_that_cannot_trace_is_recorded_as_skipped(monkeypatch, tmp_path):
    def build(scenario, loop, sizes):
        def f(x):
            raise ValueError(f"{loop} cannot do this\nsecond line")

        return f

    monkeypatch.setattr(cases, "build_case", build)
    status, doc = _bench(
        tmp_path, "--quick", "--scenarios", "stack", "--loops", "scan", "--no-torch"
    )
    assert status == 0
    [record] = doc["records"]
    assert record["skipped"] == "cannot trace: ValueError: scan cannot do this"
    assert all(record[k] is None for k in FIGURES)


def test_loops_without_reverse_mode_skip_the_gradient_scenarios(monkeypatch, tmp_path):
    monkeypatch.setattr(cases, "reverse_loops", lambda: ("python",))
    status, doc = _bench(
        tmp_path, "--quick", "--scenarios", "accumulate", "--loops", "python,scan", "--no-torch"
    )
    assert status == 0
    python_row, scan_row = doc["records"]
    assert python_row["skipped"] is None
    assert scan_row["skipped"] == "the 'scan' loop has no reverse mode, which accumulate needs"


@needs_torch
def test_quadratic_torch_loop_is_recorded_as_skipped(tmp_path):
    status, doc = _bench(
        tmp_path,
        *("--quick", "--scenarios", "train_as_written", "--loops", "scan"),
        *("--max-quadratic", "2"),
    )
    assert status == 0
    jax_row, torch_row = doc["records"]
    assert jax_row["skipped"] is None and jax_row["gflops"] > 0
    assert torch_row["peer"] == "eager"
    assert "O(T**2)" in torch_row["skipped"] and "T=3 > --max-quadratic=2" in torch_row["skipped"]


def test_without_torch_there_are_no_peers(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch_peers, "available", lambda: False)
    status, doc = _bench(tmp_path, "--quick", "--scenarios", "accumulate", "--loops", "scan")
    assert status == 0
    assert doc["meta"]["torch"] is None
    assert [r["framework"] for r in doc["records"]] == ["jax"]
    assert "pip install 'loopgrad_jax[torch]'" in capsys.readouterr().err


def test_defaults_come_from_one_place():
    args = cli.build_parser().parse_args([])
    assert args.loops == lg.LOOPS
    assert args.scenarios == tuple(SCENARIOS)
    assert cli.DEFAULTS["max_unroll"] == 100
    assert cli.build_parser().parse_args(["--lengths", "100,10,100"]).lengths == (10, 100)


def test_help_states_the_flop_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "3 * T * (cell + head)" in out
    assert "T*(cell + 3*head) + T*(T+1)*cell" in out
    for name in (*SCENARIOS, *lg.LOOPS, "--max-unroll", "--backend", "--quick", "--json"):
        assert name in out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "loopgrad_jax.bench", "--lengths", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "argument --lengths: expected comma-separated ints >= 1" in done.stderr


# --- pieces ------------------------------------------------------------------------------


def test_time_calls_takes_median_and_min_after_warmup(monkeypatch):
    # A fake clock: the timed calls take 3, 1, 4, 1, 5 seconds, inside a 14-second window.
    ticks = iter([0, 0, 3, 3, 4, 4, 8, 8, 9, 9, 14, 14])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    calls = []
    times = timing.time_calls(lambda: calls.append(1) or len(calls), warmup=2, repeats=5)
    assert len(calls) == 7
    assert (times.median_s, times.min_s, times.output) == (3, 1, 7)
    assert times.other_cores is None or times.other_cores >= 0  # None off Linux


def test_time_jax_compiles_afresh_each_repeat():
    built = []

    def build():
        built.append(1)
        return lambda x: (x * 2.0).sum()

    x = np.ones((3,), np.float32)
    measured = timing.time_jax(build, (x,), warmup=1, repeats=5, compile_repeats=2)
    assert len(built) == 2
    assert float(measured.run.output) == 6.0
    assert measured.memory_bytes == 12 + 4  # x (3 float32) in, one float32 out, no temps


def test_memory_bytes_is_none_when_the_backend_says_nothing():
    class Silent:
        def memory_analysis(self):
            return None

    class Unsupported:
        def memory_analysis(self):
            raise NotImplementedError

    assert timing.memory_bytes(Silent()) is None
    assert timing.memory_bytes(Unsupported()) is None


def test_max_rel_diff_is_relative_to_the_reference():
    want = (np.array([1.0, -4.0]), np.array(0.0))
    assert run.max_rel_diff((np.array([1.0, -4.2]), np.array(0.0)), want) == pytest.approx(0.05)
    assert run.max_rel_diff((np.array([1.0, -4.0]), np.array(0.3)), want) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="expected 2 outputs to compare, got 1"):
        run.max_rel_diff((np.array(1.0),), want)


def test_speedup_is_torch_time_over_jax_time():
    rows = [
        {"scenario": "rnn_loss", "length": 10, "framework": "jax", "run_s_median": 0.002},
        {"scenario": "rnn_loss", "length": 10, "framework": "torch", "peer": "eager"},
        {"scenario": "rnn_loss", "length": 10, "framework": "torch", "peer": "nn.RNN"},
        {"scenario": "rnn_loss", "length": 99, "framework": "torch", "peer": "eager"},
    ]
    for row, seconds in zip(rows[1:], (0.1, 0.03, 7.0), strict=True):
        row["run_s_median"] = seconds
    assert report.speedups(rows) == {0: {"eager": pytest.approx(50.0), "nn.RNN": 15.0}}


def test_table_flags_records_timed_on_a_busy_machine():
    record = dict.fromkeys(run.RECORD_KEYS)
    record.update(scenario="stack", length=5, framework="jax", loop="scan", run_s_median=1e-3)
    quiet, busy = {**record, "other_cores": 0.1}, {**record, "other_cores": 1.5}
    assert "BUSY" not in report.format_table([quiet])
    assert "BUSY: other processes used 1.5 cores" in report.format_table([busy])


def test_make_data_is_seeded_and_shaped():
    sizes = Sizes(length=4, batch=2, input=3, hidden=5, window=2)
    a, b, c = make_data(sizes, 0), make_data(sizes, 0), make_data(sizes, 1)
    assert [p.shape for p in a.params] == [(5, 8), (5,), (1, 5), (1,)]
    assert (a.x.shape, a.inputs.shape, a.targets.shape) == ((2, 3), (4, 2, 3), (4, 2, 1))
    assert all(leaf.dtype == np.float32 for leaf in (a.x, *a.params, a.inputs, a.targets))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)
    bound = 1 / np.sqrt(8)  # PyTorch's nn.Linear(8, 5) init
    assert np.abs(a.params.i2h_weight).max() <= bound


def _runs(record: dict) -> bool:
    """Whether a --quick record should have run: reverse mode needs a loop that has it."""
    loop = record["loop"]
    return loop is None or loop in reverse_loops() or not SCENARIOS[record["scenario"]].reverse


def _torch_version() -> str:
    import torch

    return torch.__version__


def test_device_names_the_cores_this_process_may_use(monkeypatch):
    # Under `taskset -c 0` on a 2-core machine the record must not claim 2 cores.
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(report, "usable_cores", lambda: 1)
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    assert report.describe_device(cpu).endswith("(1 core of 2)")
    monkeypatch.setattr(report, "usable_cores", lambda: 2)
    assert report.describe_device(cpu).endswith("(2 cores)")
