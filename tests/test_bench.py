"""``loopgrad-bench``: the CLI, its JSON, its figures and its PyTorch peers.

Nothing here times anything: speed claims live only in ``bench/results``.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, cli, flax_peers, report, run, timing, torch_peers
from loopgrad_jax.bench import flops as flops_module
from loopgrad_jax.bench.cases import DEFAULT_SCENARIOS, SCENARIOS, Sizes, make_data
from loopgrad_jax.bench.flops import case_flops, rnn_flops

needs_torch = pytest.mark.skipif(not torch_peers.available(), reason="torch is not installed")

META_KEYS = {
    *("jax", "jaxlib", "torch", "backend", "device", "cpu_count", "date", "command"),
    *("cpu_model", "cpu_features", "xla_flags", "jax_threads", "torch_threads", "thread_env"),
}
SCHEMA_KEYS = {
    "scenario",
    "loop",
    "framework",
    "peer",
    "length",
    "batch",
    "input",
    "hidden",
    "cell",
    "layers",
    "compile_s",
    "run_s_median",
    "run_s_min",
    "run_s_q1",
    "run_s_q3",
    "run_s_ci",
    "memory_bytes",
    "saved_bytes",
    "gflops",
    "skipped",
}
FIGURES = (
    *("lower_s", "compile_s", "run_s_median", "run_s_min", "run_s_ci", "memory_bytes"),
    *("saved_bytes", "gflops", "other_cores"),
)


def _bench(tmp_path: Path, *flags: str) -> tuple[int, dict]:
    """Runs the CLI in-process with a JSON file; returns the exit status and the JSON.

    Few samples and no minimum window, unless ``flags`` say otherwise (the last flag wins):
    these tests check what is recorded, not how fast.
    """
    path = tmp_path / "out.json"
    fast = ["--repeats", "5", "--min-time", "0"]
    status = cli.main([*fast, *flags, "--no-progress", "--json", str(path)])
    return status, json.loads(path.read_text())


#: ``--quick`` at smoke size: T=3 and tiny sizes, so a test's run takes seconds (the
#: preset's own T=10..1000 take a minute); the report says the figures are smoke-size.
TINY = (
    *("--quick", "--lengths", "3", "--input", "3"),
    *("--hidden", "4", "--batch", "2", "--window", "2"),
)
#: Timed calls per record in the ``quick`` fixture: every scenario and loop kind, as
#: ``--quick`` runs them at ``TINY`` sizes, but with no minimum window (its 0.25 s per
#: record would be most of the run); ``test_quick_window_reports_other_cores`` checks
#: what the window adds.
QUICK_REPEATS = 5
#: Its loop kinds: one of each way a row runs (unrolled; a compiled loop; forward-only,
#: so skipped where reverse mode is needed). The other kinds differ only in ``loop=``,
#: which the parity tests check for every kind.
QUICK_LOOPS = ("python", "scan", "while")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``TINY`` run (every scenario, loop kind and peer) for the tests that read it."""
    folder = tmp_path_factory.mktemp("quick")
    argv = [*TINY, "--json", str(folder / "q.json"), "--plot", str(folder / "q.png")]
    argv += ["--repeats", str(QUICK_REPEATS), "--min-time", "0", "--loops", ",".join(QUICK_LOOPS)]
    argv += ["--scenarios", ",".join(DEFAULT_SCENARIOS)]
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
    assert (meta["cell"], meta["layers"]) == ("article", 1)
    assert meta["torch"] == (_torch_version() if torch_peers.available() else None)

    assert meta["cpu_model"].startswith(meta["cpu"])
    assert isinstance(meta["jax_threads"], int) and meta["jax_threads"] >= 1
    assert meta["thread_env"] == {k: os.environ[k] for k in report.THREAD_ENV if k in os.environ}
    if Path("/proc/cpuinfo").exists():
        assert isinstance(meta["cpu_features"], list)
        if meta["backend"] == "cpu":  # a GPU's device line names the GPU instead
            assert (report.vector_width(meta["cpu_features"]) or "?") in meta["device"]

    records = doc["records"]
    peers = sum(len(p) for p in torch_peers.PEERS.values()) if meta["torch"] else 0
    methods = sum(len(SCENARIOS[s].methods) for s in DEFAULT_SCENARIOS)
    assert len(records) == methods * len(QUICK_LOOPS) + peers
    for r in records:
        assert SCHEMA_KEYS <= set(r)
        assert set(r) == set(run.RECORD_KEYS)
        assert r["length"] == 3
        assert (r["batch"], r["input"], r["hidden"]) == (2, 3, 4)
        rnn = SCENARIOS[r["scenario"]].rnn
        assert (r["cell"], r["layers"]) == (("article", 1) if rnn else (None, None))
        assert r["skipped"] is None or not _runs(r)
        assert (r["run_s_median"] is None) == (r["skipped"] is not None)
    assert [
        (r["scenario"], r["method"], r["loop"]) for r in records if r["framework"] == "jax"
    ] == [
        (name, method, loop)
        for name in DEFAULT_SCENARIOS
        for method in SCENARIOS[name].methods
        for loop in QUICK_LOOPS
    ]


def test_quick_jax_figures_are_consistent(quick):
    _, doc, _ = quick
    for r in (r for r in doc["records"] if r["framework"] == "jax" and _runs(r)):
        assert r["peer"] is None
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        _assert_spread(r)
        # CPU reports memory: at least the arguments, e.g. x (2, 3) float32 = 24 bytes.
        assert isinstance(r["memory_bytes"], int) and r["memory_bytes"] >= 24
        # Each scenario keeps something for backward: x itself at the least (24 bytes).
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] >= 24
        if SCENARIOS[r["scenario"]].rnn:
            sizes = dict(length=3, batch=2, input=3, hidden=4)
            assert r["flops"] == case_flops(r["scenario"], method=r["method"], **sizes)
            assert r["gflops"] == pytest.approx(r["flops"] / r["run_s_median"] / 1e9)
            assert r["seqs_per_s"] == pytest.approx(2 / r["run_s_median"])
        else:
            assert r["flops"] is None and r["gflops"] is None and r["seqs_per_s"] is None


def _assert_spread(r: dict, repeats: int = QUICK_REPEATS) -> None:
    """A record's spread: ordered quantiles, an interval around the median, its samples."""
    assert 0 < r["run_s_min"] <= r["run_s_q1"] <= r["run_s_median"] <= r["run_s_q3"]
    low, high = r["run_s_ci"]
    assert low <= r["run_s_median"] <= high
    assert r["run_samples"] == len(r["run_s_samples"]) >= repeats
    assert r["run_number"] >= 1
    assert min(r["run_s_samples"]) == pytest.approx(r["run_s_min"], rel=1e-3)


def test_quick_window_reports_other_cores(tmp_path):
    """``--quick``'s own settings: every record, JAX's and PyTorch's, gets ``other_cores``."""
    argv = [*TINY, "--scenarios", "rnn_loss", "--loops", "scan,python", "--no-progress"]
    assert cli.main([*argv, "--json", str(tmp_path / "q.json")]) == 0
    records = json.loads((tmp_path / "q.json").read_text())["records"]
    assert {r["framework"] for r in records} == (
        {"jax", "torch"} if torch_peers.available() else {"jax"}
    )
    for r in (r for r in records if _runs(r)):
        _assert_spread(r, cli.QUICK["repeats"])
        if timing.machine_busy_s() is not None:  # Linux: every record says how busy others were
            assert r["other_cores"] is not None and r["other_cores"] >= 0


def test_quick_jax_rows_carry_their_ratios_to_the_peers(quick):
    _, doc, _ = quick
    if not doc["meta"]["torch"]:
        pytest.skip("torch is not installed")
    for r in (r for r in doc["records"] if r["framework"] == "jax" and _runs(r)):
        peers = {
            t["peer"]
            for t in doc["records"]
            if t["framework"] == "torch"
            and t["scenario"] == r["scenario"]
            and t["method"] == r["method"]
        }
        assert set(r["vs_torch"] or {}) == peers
        for value, low, high in (r["vs_torch"] or {}).values():
            assert 0 < low <= value <= high


@needs_torch
def test_quick_torch_peers_compute_what_jax_computes(quick):
    _, doc, _ = quick
    torch_rows = [r for r in doc["records"] if r["framework"] == "torch"]
    assert {(r["scenario"], r["peer"]) for r in torch_rows} == {
        (s, p) for s, peers in torch_peers.PEERS.items() for p in peers
    }
    for r in torch_rows:
        assert r["loop"] is None and r["compile_s"] is None and r["memory_bytes"] is None
        _assert_spread(r)
        assert r["saved_bytes"] > 0
        # float32, a handful of steps: a few ulps apart, never a different computation.
        assert r["max_rel_diff"] < 1e-5, r
    methods = {r["peer"]: r["method"] for r in torch_rows if r["scenario"] == "train_as_written"}
    assert methods == {"eager": "reverse", "rtrl": "forward"}


def test_quick_plot_is_a_png(quick):
    _, _, png = quick
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # bars for every scenario, not an empty canvas


def test_table_prints_every_record_with_speedups(quick, capsys):
    _, doc, _ = quick
    records = doc["records"]
    for table in (report.format_table(records), report.format_table(records, wide=True)):
        lines = table.splitlines()
        assert lines[0].split()[:3] == ["scenario", "T", "impl"]
        # A record's row starts with its scenario and T; the default table's wrapped
        # cells continue on lines that start blank.
        starts = [line for line in lines[2:] if re.match(r"\w+ +\d+ ", line)]
        assert [line.split()[:2] for line in starts] == [
            [r["scenario"], str(r["length"])] for r in records
        ]
        assert "scan forward" in table and "scan reverse" in table
        if doc["meta"]["torch"]:
            assert "nn.RNN" in table and "eager" in table and "torch rtrl" in table
            assert re.search(r"rtrl [\d.]+x \[[\d.]+-[\d.]+\]", table)
    assert len(lines) == 2 + len(records) + 2  # --wide: one line a record
    advice = "\n".join(report.recommend(records))
    for name in DEFAULT_SCENARIOS:
        assert f"\n{name}" in "\n" + advice
    assert "train_as_written forward" in advice and "python vs scan (T=3)" in advice


def test_show_prints_a_saved_file_without_measuring(quick, tmp_path, capsys):
    _, doc, _ = quick
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["--show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(report.format_table(doc["records"]))
    assert "\n".join(report.wrap_advice(report.recommend(doc["records"]))) in out
    assert cli.main(["--show", str(path), "--wide"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(report.format_table(doc["records"], wide=True))
    assert "\n".join(report.wrap_advice(report.recommend(doc["records"]))) in out


def test_default_table_fits_120_columns_and_wide_keeps_every_column(quick):
    _, doc, _ = quick
    records = [dict(r) for r in doc["records"]]
    # Longer than this run's: a Flax peer's name, a loop with options, a busy machine.
    for r in records:
        r["other_cores"] = 1.5
        if r["framework"] == "jax" and r["run_s_median"]:
            r["vs_torch"] = {**(r["vs_torch"] or {}), "nnx.Bidirectional": [0.853, 0.801, 0.902]}
    records[1]["loop"] = "remat:policy=dots_saveable"
    table = report.format_table(records)
    assert max(len(line) for line in table.splitlines()) <= 120
    assert "remat:policy=dots_saveable" in table  # the impl wraps last
    assert all(part in table for part in ("nnx.Bidirectional", "0.853x", "[0.801-0.902]"))
    assert re.search(r"BUSY: 1.5\s+other\s+cores", table)  # maybe wrapped
    advice = report.recommend(records)
    printed = report.wrap_advice(advice)
    assert max(map(len, advice)) > 120 >= max(map(len, printed))
    assert " ".join(" ".join(advice).split()) == " ".join(" ".join(printed).split())
    header = re.split(r"  +", table.splitlines()[0])
    assert header == [
        *("scenario", "T", "impl", "run median [95% CI]", "saved", "speedup vs peers"),
        "note",
    ]
    wide = report.format_table(records, wide=True).splitlines()
    assert re.split(r"  +", wide[0]) == [
        *("scenario", "T", "impl", "lower", "compile", "run (median)", "95% CI", "min"),
        *("saved", "temp", "GFLOP/s", "speedup vs peers [95% CI]", "note"),
    ]
    first = records[0]  # accumulate's python loop: every figure but GFLOP/s
    assert first["loop"] == "python" and first["run_s_median"]
    assert wide[2].split("  ")[0] == "accumulate" and max(map(len, wide)) > 120
    for key in ("lower_s", "compile_s", "run_s_median", "run_s_min"):
        assert report._seconds(first[key]) in wide[2]
    assert report._bytes(first["temp_bytes"]) in wide[2]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, r"--show: expected a JSON file written by --json, got '.*missing.json'"),
        ("not json", r"--show: expected a JSON file written by --json, got '.*bad.json'"),
        ('{"meta": {}}', r"an object with 'meta' and 'records'\), got '.*bad.json'"),
        (
            '{"meta": {"command": "python -m loopgrad_jax.bench.cell_profile"}, '
            '"records": [{"part": "forward", "framework": "jax", "length": 3}]}',
            r"records of loopgrad-bench --json, got '.*bad.json', written by "
            r"'python -m loopgrad_jax.bench.cell_profile', whose records lack scenario, loop, "
            r"peer, run_s_median",
        ),
    ],
    ids=["missing", "not_json", "no_records", "another_tool"],
)
def test_show_refuses_what_is_not_a_results_file(text, match, tmp_path, capsys):
    path = tmp_path / ("missing.json" if text is None else "bad.json")
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--show", str(path)])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_show_prints_a_grid_file_a_line_a_point(capsys):
    # A file of `loopgrad-bench as-written-grid`: the table it printed while it ran, each
    # point's two records (forward, reverse) on one line; --wide, a line a record.
    path = Path(__file__).parent.parent / "bench" / "results" / "cpu_as_written_grid.json"
    doc = json.loads(path.read_text())
    assert cli.main(["--show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-6:] == ["forward", "reverse", "faster", "auto", "auto/faster", "busy"]
    points = {}
    for r in doc["records"]:
        points.setdefault((r["input"], r["hidden"], r["batch"], r["length"]), {})[r["method"]] = r
    body, footer = lines[2 : 2 + len(points)], " ".join(lines[2 + len(points) :])
    assert len(points) == len(doc["records"]) // 2 and footer.startswith("auto's pick")
    assert max(map(len, lines)) <= report.TABLE_WIDTH
    for line, (sizes, point) in zip(body, points.items(), strict=True):
        assert tuple(map(int, line.split()[:4])) == sizes
        forward, reverse = point["forward"], point["reverse"]
        if forward["skipped"]:
            assert f"skipped: {forward['skipped']}" in line
            continue
        auto = "forward" if forward["auto"] else "reverse"
        faster = "forward" if forward["faster"] else "reverse"
        assert line.split()[4:11] == [
            f"{forward['run_s_median'] * 1e3:.2f}", "ms",
            f"{reverse['run_s_median'] * 1e3:.2f}", "ms",
            faster, auto, f"{forward['auto_over_faster']:.2f}x",
        ]  # fmt: skip
    assert f"at most {doc['meta']['worst_auto_over_faster']:.2f}x" in footer
    assert cli.main(["--show", str(path), "--wide"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("train_as_written ") for line in wide) == len(doc["records"])


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
    # A GRU (3 gates, G*H = 12), two layers: 12*(3+4) + 12*(4+4) = 180 multiply-adds per
    # example and step, cell = 2*2*180 = 720 FLOPs; head 16: 3 * 5 * 736 = 11040.
    assert rnn_flops("rnn_loss", **sizes, cell="gru", layers=2) == 11040
    # One tanh layer has the article's products (its two biases are not counted).
    assert rnn_flops("rnn_loss", **sizes, cell="rnn_tanh") == 1920
    with pytest.raises(ValueError, match="scenario must be one of .* got 'stack'"):
        rnn_flops("stack", **sizes)


def test_flops_docstring_example_runs():
    result = doctest.testmod(flops_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
    result = doctest.testmod(timing, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_each_as_written_algorithm_is_counted_by_what_it_does():
    sizes = dict(length=5, batch=2, input=3, hidden=4)
    rnn_sizes = lg.RNNSizes(5, 2, 3, 4, 1)
    for method in ("forward", "reverse"):
        want = round(lg.as_written_cost(rnn_sizes, method, 4).flops)
        assert case_flops("train_as_written", method=method, **sizes) == want
    # The rtrl peer runs JAX's forward algorithm; eager walks PyTorch's retained graph.
    assert case_flops("train_as_written", peer="rtrl", **sizes) == case_flops(
        "train_as_written", method="forward", **sizes
    )
    assert case_flops("train_as_written", peer="eager", **sizes) == 4160
    assert case_flops("rnn_loss", peer="nn.RNN", **sizes) == 1920
    assert case_flops("stack", **sizes) is None
    with pytest.raises(ValueError, match="needs a method .* or a peer"):
        case_flops("train_as_written", **sizes)


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
        ("--min-time", "soon"),
        ("--sweep", "depth"),
        ("--sweep", "hidden=8,0"),
        ("--cell", "rnn_gelu"),
        ("--layers", "0"),
        ("--devices", "2,0"),
        ("--devices", "1,x"),
        ("--devices", "64"),  # more than this process has: JAX started before --devices
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(flag, value, capsys):
    jax.devices("cpu")  # JAX has started, whatever ran before in this worker: --devices 64
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


def test_layers_need_a_cell_that_has_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--layers", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --layers: expected 1 with --cell article" in err and "got 2" in err


def test_cell_choices_come_from_lg_cells(capsys):
    args = cli.build_parser().parse_args([])
    assert (args.cell, args.layers) == (lg.CELLS[0], 1) == ("article", 1)
    with pytest.raises(SystemExit):
        cli.main(["--cell", "nope"])
    assert f"choose from {', '.join(map(repr, lg.CELLS))}" in capsys.readouterr().err


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
    real, calls = timing.time_interleaved, []

    def time_interleaved(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(timing, "time_interleaved", time_interleaved)


def test_interrupted_run_leaves_valid_json_with_the_finished_records(monkeypatch, tmp_path):
    _fail_on_second_case(monkeypatch, KeyboardInterrupt())
    status, doc = _bench(
        tmp_path,
        *TINY,
        "--scenarios",
        "accumulate",
        "--lengths",
        "2,3",
        "--loops",
        "scan",
        "--no-torch",
    )
    assert status == 130
    assert doc["meta"]["status"] == "interrupted"
    [record] = doc["records"]
    assert (record["scenario"], record["loop"], record["length"]) == ("accumulate", "scan", 2)
    assert record["run_s_median"] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_crashed_run_keeps_the_finished_records(monkeypatch, tmp_path):
    _fail_on_second_case(monkeypatch, RuntimeError("out of memory"))
    path = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(
            [*TINY, "--scenarios", "stack", "--lengths", "2,3", "--loops", "python,scan"]
            + ["--no-torch", "--json", str(path)]
        )
    doc = json.loads(path.read_text())
    assert doc["meta"]["status"] == "failed: RuntimeError: out of memory"
    assert [(r["scenario"], r["loop"], r["length"]) for r in doc["records"]] == [
        ("stack", "python", 2),
        ("stack", "scan", 2),
    ]


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
        *(*TINY, "--scenarios", "accumulate", "--lengths", "3,6"),
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
    def build(scenario, loop, sizes, method=None, mesh=None):
        def f(x):
            raise ValueError(f"{loop} cannot do this\nsecond line")

        return f

    monkeypatch.setattr(cases, "build_case", build)
    status, doc = _bench(tmp_path, *TINY, "--scenarios", "stack", "--loops", "scan", "--no-torch")
    assert status == 0
    [record] = doc["records"]
    assert record["skipped"] == "cannot trace: ValueError: scan cannot do this"
    assert all(record[k] is None for k in FIGURES)


def test_full_deer_is_skipped_where_its_jacobians_would_not_fit():
    limits = cases.Limits(max_unroll=100, max_quadratic=300)
    large = Sizes(length=1000, batch=32, input=64, hidden=256, window=10, cell="lstm")
    reason = cases.skip_reason("rnn_loss", "parallel", large, limits)
    # n = B*H*states = 32*256*2 = 16384; 1000 * n**2 * 4 bytes = 1000 GiB
    assert "n=16384" in reason and "1,000.0 GiB > 2 GiB" in reason
    assert cases.skip_reason("rnn_loss", "parallel:jacobian=diag", large, limits) is None
    article = Sizes(length=10000, batch=1, input=10, hidden=5, window=10)
    assert cases.skip_reason("rnn_loss", "parallel", article, limits) is None  # 1 MB


def test_loops_without_reverse_mode_skip_the_gradient_scenarios(tmp_path):
    loops = "while,while:max_steps=8"
    status, doc = _bench(
        tmp_path, *TINY, "--scenarios", "accumulate", "--loops", loops, "--no-torch"
    )
    assert status == 0
    unbounded, bounded = doc["records"]
    assert unbounded["skipped"] == "the 'while' loop has no reverse mode, which accumulate needs"
    assert bounded["skipped"] is None and bounded["run_s_median"] > 0


@needs_torch
def test_quadratic_as_written_algorithms_are_recorded_as_skipped(tmp_path):
    status, doc = _bench(
        tmp_path,
        *(*TINY, "--scenarios", "train_as_written", "--loops", "scan"),
        *("--max-quadratic", "2"),
    )
    assert status == 0
    forward, rtrl, reverse, eager = doc["records"]
    assert [(r["loop"] or r["peer"], r["method"]) for r in doc["records"]] == [
        ("scan", "forward"),
        ("rtrl", "forward"),
        ("scan", "reverse"),
        ("eager", "reverse"),
    ]
    assert forward["skipped"] is None and forward["gflops"] > 0
    assert rtrl["skipped"] is None and rtrl["max_rel_diff"] < 1e-5
    assert forward["vs_torch"].keys() == {"rtrl"}
    for row, who in ((reverse, "the reverse method"), (eager, "PyTorch's retained graph")):
        assert row["skipped"].startswith(f"{who} does O(T**2) work")
        assert "T=3 > --max-quadratic=2" in row["skipped"]


def test_the_reverse_methods_python_loop_is_skipped_by_its_unrolled_size():
    sizes, limits = Sizes(13, 1, 3, 4, 1), cases.Limits(max_unroll=100, max_quadratic=300)
    # 13 * 14 / 2 = 91 cell gradients unroll; 14 steps would unroll 105.
    assert cases.skip_reason("train_as_written", "python", sizes, limits, "reverse") is None
    assert cases.skip_reason("train_as_written", "python", sizes, limits, "forward") is None
    longer = sizes._replace(length=14)
    assert "105 > --max-unroll=100" in cases.skip_reason(
        "train_as_written", "python", longer, limits, "reverse"
    )
    assert cases.skip_reason("train_as_written", "scan", longer, limits, "reverse") is None


def test_without_torch_there_are_no_peers(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch_peers, "available", lambda: False)
    status, doc = _bench(tmp_path, *TINY, "--scenarios", "accumulate", "--loops", "scan")
    assert status == 0
    assert doc["meta"]["torch"] is None
    assert [r["framework"] for r in doc["records"]] == ["jax"]
    assert "pip install 'loopgrad_jax[torch]'" in capsys.readouterr().err


def test_defaults_come_from_one_place():
    args = cli.build_parser().parse_args([])
    assert args.loops is None  # main: DEFAULTS["loops"], or QUICK's under --quick
    assert cli.DEFAULTS["loops"] == lg.LOOPS
    assert args.scenarios is None  # main: DEFAULT_SCENARIOS, or rnn_module (--bidirectional)
    assert DEFAULT_SCENARIOS == tuple(s for s in SCENARIOS if s != "rnn_module")
    assert cli.DEFAULTS["max_unroll"] == 100
    assert cli.DEFAULTS["repeats"] >= 20
    assert cli.QUICK["min_time"] >= timing.MIN_LOAD_WINDOW_S  # so other_cores is reported
    assert cli.build_parser().parse_args(["--lengths", "100,10,100"]).lengths == (10, 100)
    parse = cli.build_parser().parse_args
    assert parse(["--sweep", "batch"]).sweep == ("batch", cli.SWEEP_DEFAULTS["batch"])
    assert parse(["--sweep", "hidden=64,8,64"]).sweep == ("hidden", (8, 64))


def test_help_states_the_flop_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "3 * T * (cell + head)" in out
    assert "T*(cell + 3*head) + T*(T+1)*cell" in out
    for name in (*SCENARIOS, *lg.LOOPS, "--max-unroll", "--backend", "--quick", "--json", "--wide"):
        assert name in out
    for name in ("loopgrad-bench report DIR", "loopgrad-bench as-written-grid"):  # subcommands
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


def test_time_interleaved_alternates_implementations_until_both_minimums(monkeypatch):
    # A fake clock that only the calls move: "slow" takes 3 ms, "fast" 1 ms.
    clock, order = [0.0], []

    def call(name: str, seconds: float):
        def run():
            clock[0] += seconds
            order.append(name)
            return len(order)

        return run

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    firsts = []
    measured = timing.time_interleaved(
        {"slow": call("slow", 3e-3), "fast": call("fast", 1e-3)},
        warmup=2,
        min_samples=4,
        min_time=0.04,
        sync={"slow": lambda out: out, "fast": lambda out: out},
        first={"slow": lambda: firsts.append(1)},
    )
    assert firsts == [1]  # instead of the first warm-up call, once
    # Autorange: one slow call reaches SAMPLE_MIN_S (2 ms), fast ones need 2 per sample.
    assert measured.number == {"slow": 1, "fast": 2}
    # A round takes 3 + 2 * 1 = 5 ms: 4 rounds take 20 ms < 40 ms, so 8 rounds.
    assert measured.samples["slow"] == pytest.approx([3e-3] * 8)
    assert measured.samples["fast"] == pytest.approx([1e-3] * 8)
    assert measured.window_s == pytest.approx(0.04)
    timed = order[-24:]  # 8 rounds of 1 slow and 2 fast calls; every other round reversed
    assert timed[:6] == ["slow", "fast", "fast", "fast", "fast", "slow"]
    # The last round (the 8th, reversed) ends with slow: the outputs are the last calls'.
    assert measured.outputs["slow"] == len(order) and measured.outputs["fast"] == len(order) - 1


def test_busy_ticks_count_a_virtual_machines_steal_time():
    assert timing.busy_ticks("cpu  100 20 30 999 5 0 7 40 0 0") == 190  # 100+20+30 + steal 40
    assert timing.busy_ticks("cpu 1 2 3 4") == 6  # a kernel with no steal column
    result = doctest.testmod(timing, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0


def test_spread_and_ratio_intervals():
    samples = [1.0, 2.0, 3.0, 4.0, 100.0]
    stats = timing.spread(samples, number=3)
    assert (stats.median_s, stats.min_s, stats.q1_s, stats.q3_s) == (3.0, 1.0, 2.0, 4.0)
    assert stats.ci_s[0] <= 3.0 <= stats.ci_s[1] and stats.ci_s[1] <= 100.0
    assert (stats.samples, stats.number) == (5, 3)
    assert timing.spread(samples) == timing.spread(samples)  # seeded: reproducible
    # Rounds that slow both sides alike: resampled in pairs, the ratio's interval is exact.
    jax_side = [1.0, 1.5, 1.0, 3.0, 1.2, 2.0]
    torch_side = [2 * t for t in jax_side]
    assert timing.ratio(torch_side, jax_side) == (2.0, 2.0, 2.0)
    # Unpaired (timed in separate blocks, or of different counts), the same spread gives an
    # honest, wider interval.
    value, low, high = timing.ratio(torch_side, jax_side, paired=False)
    assert value == 2.0 and low < 2.0 < high
    assert timing.ratio(torch_side, jax_side[:5])[1] < 2.0
    with pytest.raises(ValueError, match="both sides need samples, got 0 and 6"):
        timing.ratio([], jax_side)
    assert timing.round_samples([0.000123456, 12.3456]) == [0.0001235, 12.35]


def test_compile_jax_compiles_afresh_each_repeat():
    built = []

    def build():
        built.append(1)
        return lambda x: (x * 2.0).sum()

    x = np.ones((3,), np.float32)
    measured = timing.compile_jax(build, (x,), compile_repeats=2)
    assert len(built) == 2
    assert float(measured.compiled(x)) == 6.0
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
    # A format-1 file: no intervals, so the ratio of medians, case by case.
    rows = [
        {"scenario": "rnn_loss", "length": 10, "framework": "jax", "run_s_median": 0.002},
        {"scenario": "rnn_loss", "length": 10, "framework": "torch", "peer": "eager"},
        {"scenario": "rnn_loss", "length": 10, "framework": "torch", "peer": "nn.RNN"},
        {"scenario": "rnn_loss", "length": 99, "framework": "torch", "peer": "eager"},
    ]
    for row, seconds in zip(rows[1:], (0.1, 0.03, 7.0), strict=True):
        row["run_s_median"] = seconds
    ratios = report.speedups(rows)
    assert list(ratios) == [0] and set(ratios[0]) == {"eager", "nn.RNN"}
    assert ratios[0]["eager"][0] == pytest.approx(50.0)
    assert ratios[0]["nn.RNN"][0] == pytest.approx(15.0)
    assert report.format_ratio(ratios[0]["eager"]) == "50x"
    # A measured ratio keeps its interval.
    rows[0]["vs_torch"] = {"eager": [50.0, 41.0, 62.5]}
    assert report.speedups(rows) == {0: {"eager": [50.0, 41.0, 62.5]}}
    assert report.format_ratio([50.0, 41.0, 62.5]) == "50x [41-62.5]"
    # Past 999, whole numbers rather than 1.3e+03.
    assert report.format_ratio([948.0, 758.0, 1304.2]) == "948x [758-1304]"
    assert report.format_ratio([1304.2, math.nan, math.nan]) == "1304x"


def _row(loop, length, seconds, ci, compile_s, saved, **extra) -> dict:
    """A measured JAX rnn_loss record at I=10, H=5, B=1."""
    record = dict.fromkeys(run.RECORD_KEYS)
    record.update(scenario="rnn_loss", framework="jax", loop=loop, length=length, batch=1)
    record.update(input=10, hidden=5, run_s_median=seconds, run_s_ci=list(ci), lower_s=0.0)
    record.update(compile_s=compile_s, saved_bytes=saved, **extra)
    return record


def test_recommendation_names_fastest_smallest_and_the_break_even():
    rows = [
        _row("python", 100, 1.0e-3, (0.9e-3, 1.1e-3), 3.0, 4000),
        _row("scan", 100, 1.5e-3, (1.4e-3, 1.6e-3), 0.5, 3000),
        _row("remat", 100, 2.0e-3, (1.9e-3, 2.1e-3), 0.6, 1000),
    ]
    advice = report.recommend(rows)
    assert advice[0] == "rnn_loss (T=100, B=1, I=10, H=5):"
    assert advice[1] == "  fastest: python 1 ms; next scan 1.5x its time"
    assert advice[2] == (
        "  smallest: remat keeps 1000 B for backward at 2x the time of python (3.91 KiB)"
    )
    # python pays 2.5 s more to compile and saves 0.5 ms a call: even after 5,000 calls.
    assert advice[3].endswith(": scan costs less in total up to 5,000 calls, python beyond")
    # Intervals that overlap make no winner per call: the quicker compile wins.
    rows[1]["run_s_ci"] = [0.95e-3, 1.6e-3]
    advice = report.recommend(rows)
    assert "python within its interval (no clear winner)" not in advice[1]
    assert "scan within its interval (no clear winner)" in advice[1]
    assert advice[3].endswith("so scan, quicker to compile, costs less in total")
    # Slower per call and slower to compile: never.
    rows[0].update(run_s_median=2.5e-3, run_s_ci=[2.4e-3, 2.6e-3])
    assert report.recommend(rows)[3].endswith(": scan costs less from the first call")
    # A data-parallel row is fastest: its bytes are per device, not counted.
    rows.append(_row("scan", 100, 0.5e-3, (0.4e-3, 0.6e-3), 0.5, None, devices=2))
    advice = report.recommend(rows)
    assert advice[1].startswith("  fastest: scan on 2 devices 500 us; next")
    assert advice[2] == (
        "  smallest: remat keeps 1000 B for backward at 4x the time of scan on 2 devices"
        " (not counted)"
    )


def _peer(peer, length, seconds, **extra) -> dict:
    """A measured PyTorch rnn_loss record beside :func:`_row`'s."""
    record = dict.fromkeys(run.RECORD_KEYS)
    record.update(scenario="rnn_loss", framework="torch", peer=peer, length=length, batch=1)
    record.update(input=10, hidden=5, run_s_median=seconds, **extra)
    return record


def test_recommendation_flags_each_figure_from_a_busy_row():
    def rows(scan=0.1, remat=0.1, python=0.1, peer=0.1):
        return [
            _row("scan", 100, 1.0e-3, (0.9e-3, 1.1e-3), 0.5, 3000, other_cores=scan)
            | {"vs_torch": {"nn.GRU": [107.0, 14.9, 288.0]}},
            _row("remat", 100, 2.0e-3, (1.9e-3, 2.1e-3), 0.6, 1000, other_cores=remat),
            _row("python", 100, 1.5e-3, (1.4e-3, 1.6e-3), 3.0, 4000, other_cores=python),
            _peer("nn.GRU", 100, 0.107, other_cores=peer),
        ]

    quiet = report.recommend(rows())
    assert "BUSY" not in "\n".join(quiet)
    assert (
        quiet[1]
        == "  fastest: scan 1 ms; next python 1.5x its time; vs peers nn.GRU 107x [14.9-288]"
    )
    # The peer alone was timed on a busy machine: its ratio says so, nothing else does.
    advice = report.recommend(rows(peer=1.4))
    assert advice[1] == quiet[1] + " (BUSY: 1.4 other cores)"
    assert advice[2:] == quiet[2:]
    # The fastest loop was: every figure drawn from it.
    advice = report.recommend(rows(scan=1.5))
    flag = " (BUSY: 1.5 other cores)"
    assert advice[1] == (
        f"  fastest: scan 1 ms{flag}; next python 1.5x its time{flag}; "
        f"vs peers nn.GRU 107x [14.9-288]{flag}"
    )
    assert advice[2] == (
        f"  smallest: remat keeps 1000 B for backward at 2x the time of scan (2.93 KiB){flag}"
    )
    assert advice[3] == (
        "  python vs scan (T=100): python 1.5 ms per call, 3 s to trace and compile; "
        f"scan 1 ms, 500 ms{flag}: scan costs less from the first call"
    )
    # The python loop was: the break-even line's python figures, and "next python".
    advice = report.recommend(rows(python=1))
    assert advice[1] == quiet[1].replace("1.5x its time", "1.5x its time (BUSY: 1 other core)")
    assert advice[3].startswith(
        "  python vs scan (T=100): python 1.5 ms per call, 3 s to trace and compile "
        "(BUSY: 1 other core); scan 1 ms, 500 ms: "
    )


def test_a_smoke_size_run_says_so_before_its_ranking(quick):
    _, doc, _ = quick
    advice = report.recommend(doc["records"])
    assert advice[0].startswith("smoke-size run: the figures below come from loops of T=3,")
    assert "these figures say nothing about which loop kind to use for loops of 100" in (
        " ".join(advice)
    )
    assert max(map(len, advice[: advice.index("accumulate (T=3, x of shape (2, 3)):")])) <= 120
    # --quick's own sizes: no note, the first line is the first scenario's.
    assert (cli.QUICK["input"], cli.QUICK["hidden"], cli.QUICK["batch"]) == (10, 5, 1)
    rows = [_row("scan", t, 1e-3, (0.9e-3, 1.1e-3), 0.5, 1) for t in cli.QUICK["lengths"]]
    advice = report.recommend(rows)
    assert advice[0] == f"rnn_loss (T={max(cli.QUICK['lengths'])}, B=1, I=10, H=5):"
    assert "smoke-size" not in "\n".join(advice)
    # The rule is the longest length, SMOKE_LENGTH steps and up, scenario by scenario.
    below = report.SMOKE_LENGTH - 1
    assert report.recommend([rows[0] | {"length": below}])[0].startswith("smoke-size run")
    stack = rows[0] | {"scenario": "stack", "length": 3}
    advice = report.recommend([*rows, stack])
    assert advice[0].startswith(
        "smoke-size run: the figures below for stack come from loops of T=3,"
    )


def test_quick_measures_the_articles_sizes_where_loop_kinds_differ(monkeypatch):
    plans = []
    monkeypatch.setattr(cli, "_run", lambda plan, *args, **kwargs: plans.append(plan) or [])
    assert cli.main(["--quick", "--no-progress"]) == 0
    [plan] = plans
    assert {100, 1000} <= set(plan.lengths)
    assert (plan.input, plan.hidden, plan.batch) == (10, 5, 1)  # the article's, the defaults
    assert plan.scenarios == cli.QUICK_SCENARIOS and plan.loops == cli.QUICK["loops"]
    ran = [
        t
        for t in run.tasks(plan)
        if cases.skip_reason(
            t.scenario, t.name if t.framework == "jax" else None, t.sizes, plan.limits, t.method
        )
        is None
    ]
    # Python loops compile in a time that grows with T: run only at the shortest length.
    assert max(t.length for t in ran if t.name == "python") < 100
    for scenario in plan.scenarios:
        assert {t.length for t in ran if (t.scenario, t.name) == (scenario, "scan")} == set(
            plan.lengths
        )


def test_throughput_across_a_swept_size():
    rows = [
        _row("scan", 100, 1e-3, (0.9e-3, 1.1e-3), 0.5, 1, batch=1, seqs_per_s=1000.0),
        _row("scan", 100, 2e-3, (1.9e-3, 2.1e-3), 0.5, 1, batch=8, seqs_per_s=4000.0),
    ]
    table = report.throughput_table(rows).splitlines()
    assert table[0] == "throughput (sequences per second) across batch:"
    assert table[1].split() == ["scenario", "T", "impl", "B=1", "B=8"]
    assert table[3].split() == ["rnn_loss", "100", "scan", "1e+03", "4e+03"]
    assert report.throughput_table(rows[:1]) is None  # nothing swept


@needs_torch
def test_blocks_time_each_implementation_alone(tmp_path):
    status, doc = _bench(
        tmp_path,
        *(*TINY, "--scenarios", "stack", "--loops", "scan", "--timing", "blocks"),
    )
    assert status == 0 and doc["meta"]["timing"] == "blocks"
    jax_row, torch_row = doc["records"]
    assert torch_row["max_rel_diff"] < 1e-5
    value, low, high = jax_row["vs_torch"]["eager"]
    assert value == pytest.approx(torch_row["run_s_median"] / jax_row["run_s_median"])
    assert low <= value <= high


def test_sweep_runs_each_size_and_reports_sequences_per_second(tmp_path, capsys):
    status, doc = _bench(
        tmp_path,
        *(*TINY, "--scenarios", "rnn_loss", "--loops", "scan", "--no-torch"),
        *("--sweep", "batch=1,3"),
    )
    assert status == 0
    assert doc["meta"]["sweep"] == ["batch", [1, 3]]
    assert [r["batch"] for r in doc["records"]] == [1, 3]
    for r in doc["records"]:
        assert r["seqs_per_s"] == pytest.approx(r["batch"] / r["run_s_median"])
    assert "throughput (sequences per second) across batch:" in capsys.readouterr().out


# --- --cell and --layers ------------------------------------------------------------------


@needs_torch
def test_a_two_layer_lstm_runs_beside_its_peers_on_the_same_weights(tmp_path, capsys):
    status, doc = _bench(
        tmp_path,
        *(*TINY, "--cell", "lstm", "--layers", "2", "--scenarios", "rnn_loss,accumulate"),
        *("--loops", "scan"),
    )
    assert status == 0
    assert (doc["meta"]["cell"], doc["meta"]["layers"]) == ("lstm", 2)
    rows = {(r["scenario"], r["loop"] or r["peer"]): r for r in doc["records"]}
    assert list(rows) == [
        ("rnn_loss", "scan"),
        ("rnn_loss", "eager"),
        ("rnn_loss", "nn.LSTM"),
        ("accumulate", "scan"),
        ("accumulate", "eager"),
    ]
    # The scalar scenarios have no cell; the RNN ones record theirs.
    assert (rows["accumulate", "scan"]["cell"], rows["accumulate", "scan"]["layers"]) == (
        None,
        None,
    )
    # B=2, I=3, H=4, O=1, T=3, 4 gates (G*H = 16): layer 0 16*(3+4) = 112 and layer 1
    # 16*(4+4) = 128 multiply-adds per example, cell = 2*2*240 = 960, head = 2*2*4 = 16
    # FLOPs; 3 * T * (960 + 16) = 8784.
    for peer in ("scan", "eager", "nn.LSTM"):
        r = rows["rnn_loss", peer]
        assert (r["cell"], r["layers"], r["flops"]) == ("lstm", 2, 8784)
        assert r["saved_bytes"] > 0
    for peer in ("eager", "nn.LSTM"):  # loss and all 10 gradients, on the same weights
        assert rows["rnn_loss", peer]["max_rel_diff"] < 1e-5
    assert set(rows["rnn_loss", "scan"]["vs_torch"]) == {"eager", "nn.LSTM"}
    assert "rnn_loss (lstm, 2 layers, T=3, B=2, I=3, H=4):" in capsys.readouterr().out


@needs_torch
@pytest.mark.slow  # the full tier: a packed module compiled beside three loops (4 s)
def test_a_bidirectional_packed_lstm_runs_beside_pytorchs_packed_module(tmp_path, capsys):
    status, doc = _bench(
        tmp_path,
        *("--cell", "lstm", "--layers", "2", "--bidirectional", "--lengths-spread", "0.5"),
        *("--lengths", "4", "--batch", "2", "--input", "3", "--hidden", "3", "--loops", "scan"),
    )
    assert status == 0
    meta = doc["meta"]
    assert (meta["bidirectional"], meta["lengths_spread"]) == (True, 0.5)
    rows = {r["loop"] or r["peer"]: r for r in doc["records"]}
    flax = ["nnx.Bidirectional"] if flax_peers.available() else []
    assert list(rows) == ["scan", *flax, "nn.LSTM"]
    # Per example: layer 0, 12*(3+3) = 72 multiply-adds a direction; layer 1 reads both
    # directions, 12*(6+3) = 108; cell = 2*B*2*(72+108) = 1440 FLOPs; no head: 3*T*cell.
    for name, r in rows.items():
        assert r["scenario"] == "rnn_module" and r["skipped"] is None
        assert (r["cell"], r["layers"], r["bidirectional"], r["lengths_spread"]) == (
            "lstm",
            2,
            True,
            0.5,
        )
        assert r["flops"] == 3 * 4 * 1440
        if name != "scan":  # the loss and all 16 gradients, checked against JAX's
            assert r["max_rel_diff"] < 1e-5
    assert set(rows["scan"]["vs_torch"]) == {*flax, "nn.LSTM"}
    assert "torch nn.LSTM" in capsys.readouterr().out
    # The lengths are unsorted, so PyTorch's packing needs enforce_sorted=False, and they
    # matter: the same peer without them (nothing packed) computes another loss.
    sizes = Sizes(4, 2, 3, 3, 1, cell="lstm", layers=2, bidirectional=True, spread=0.5)
    data = make_data(sizes, 0)
    assert data.lengths.tolist() == [3, 4]
    packed = torch_peers.build_peer("rnn_module", "nn.LSTM", data, sizes, "cpu")()
    whole = torch_peers.build_peer(
        "rnn_module", "nn.LSTM", data._replace(lengths=None), sizes._replace(spread=None), "cpu"
    )()
    assert abs(float(packed[0]) - float(whole[0])) > 1e-3 * abs(float(whole[0]))
    result = doctest.testmod(cases, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--cell", "lstm", "--lengths-spread", "1.5"],
            "argument --lengths-spread: expected a number in [0, 1]",
        ),
        (["--cell", "lstm", "--lengths-spread", "x"], "argument --lengths-spread: expected"),
        (["--bidirectional"], "argument --bidirectional: rnn_module runs PyTorch's modules"),
        (["--scenarios", "rnn_module"], "--cell article (the article's SimpleRNN"),
        (
            ["--cell", "gru", "--bidirectional", "--scenarios", "rnn_loss,rnn_module"],
            "argument --bidirectional: applies to rnn_module",
        ),
    ],
)
def test_module_options_that_cannot_apply_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_peers_are_named_by_cell():
    assert torch_peers.peers("rnn_loss") == torch_peers.PEERS["rnn_loss"] == ("eager", "nn.RNN")
    assert torch_peers.peers("rnn_loss", "rnn_relu") == ("eager", "nn.RNN")
    assert torch_peers.peers("rnn_loss", "lstm") == ("eager", "nn.LSTM")
    assert torch_peers.peers("rnn_loss_hoisted", "gru") == ("nn.GRU",)
    assert torch_peers.peers("train_as_written", "gru") == ("eager", "rtrl")
    assert torch_peers.peers("accumulate", "lstm") == ("eager",)
    result = doctest.testmod(torch_peers, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@needs_torch
def test_gru_training_peers_agree_with_each_other_and_with_jax():
    sizes = Sizes(length=3, batch=2, input=3, hidden=4, window=3, cell="gru", layers=2)
    data = make_data(sizes, 0)

    def peer(scenario, name):
        return torch_peers.to_numpy(torch_peers.build_peer(scenario, name, data, sizes, "cpu")())

    # The as-written loop's two PyTorch algorithms compute the same updates.
    eager, rtrl = peer("train_as_written", "eager"), peer("train_as_written", "rtrl")
    assert run.max_rel_diff(rtrl, eager) < 1e-5
    # TBPTT with one window of T steps is one SGD step on the full-sequence gradient.
    tbptt, fused = peer("train_tbptt", "eager"), peer("rnn_loss", "nn.GRU")
    start = jax.tree.leaves(data.params)
    stepped = [p - cases.LR * g for p, g in zip(start, fused[1:], strict=True)]
    assert run.max_rel_diff(tbptt[1:], stepped) < 1e-6
    # And JAX's tbptt, compiled once, agrees with the PyTorch loop.
    f = jax.jit(cases.build_case("train_tbptt", "scan", sizes))
    ours = [np.asarray(a) for a in f(*cases.case_args("train_tbptt", data))]
    assert run.max_rel_diff(tbptt, ours) < 1e-5


@pytest.mark.slow  # the full tier (1.7 s)
@needs_torch
def test_cell_profile_times_each_part_on_both_sides(tmp_path, capsys):
    from loopgrad_jax.bench import cell_profile

    path = tmp_path / "profile.json"
    argv = ["--cell", "gru", "--length", "3", "--input", "3", "--hidden", "4", "--batch", "2"]
    assert cell_profile.main([*argv, "--repeats", "5", "--min-time", "0", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["meta"]["sizes"]["cell"] == "gru" and doc["meta"]["jax"] == jax.__version__
    _check_profile_rows(doc["records"])
    assert "dW in one" in capsys.readouterr().out


def _check_profile_rows(records):
    parts = ("forward", "gradient", "h @ W_hh^T", "dg @ W_hh", "dW += dg^T h", "dW in one")
    jax_only = [
        f"{p}{s}" for p in ("forward", "backward", "gradient") for s in ("", ", layer rule")
    ]
    rows = {(r["part"], r["framework"]): r for r in records}
    expected = {(p, f) for p in parts for f in ("jax", "torch")} | {(p, "jax") for p in jax_only}
    assert set(rows) == expected
    for (part, _), r in rows.items():
        assert r["run_s_median"] > 0 and r["run_samples"] >= 5
        # 3 steps of (2, 4) x (4, 12) products: 2 * 3 * 2 * 4 * 12 = 576 FLOPs each; the
        # gradient rnn_flops' 3 * 3 * (2*2*12*(3+4) + 2*2*4) = 3168, its forward a third.
        counts = {"forward": 1056, "backward": 3168 - 1056, "gradient": 3168}
        assert r["flops"] == counts.get(part.split(",")[0], 576)
        assert (r["minor_faults"] is None) == (not part.startswith("gradient"))


@pytest.mark.slow  # the full tier (2.4 s)
@needs_torch
def test_profile_flag_adds_the_profile_to_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    argv = ["--scenarios", "rnn_loss", "--loops", "scan", "--cell", "gru", "--lengths", "3"]
    argv += ["--input", "3", "--hidden", "4", "--batch", "2", "--repeats", "5"]
    argv += ["--min-time", "0", "--no-progress", "--profile", "--json", str(path)]
    assert cli.main(argv) == 0
    doc = json.loads(path.read_text())
    assert doc["records"] and doc["meta"]["profile"]["loop"] == "scan"
    _check_profile_rows(doc["meta"]["profile"]["rows"])
    assert "gradient, layer rule" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cell", "article"], "argument --profile: needs a PyTorch --cell"),
        (["--cell", "lstm", "--layers", "2"], "got --layers 2 --precision float32"),
        (["--cell", "lstm", "--precision", "bf16"], "got --layers 1 --precision bf16"),
    ],
    ids=["article", "layers", "precision"],
)
def test_profile_flag_refuses_what_it_cannot_profile(argv, message, capsys):
    if "--cell" in argv and argv[1] != "article" and not torch_peers.available():
        pytest.skip("needs torch")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--profile", *argv, "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_table_flags_records_timed_on_a_busy_machine():
    record = dict.fromkeys(run.RECORD_KEYS)
    record.update(scenario="stack", length=5, framework="jax", loop="scan", run_s_median=1e-3)
    quiet, busy = {**record, "other_cores": 0.1}, {**record, "other_cores": 1.5}
    for wide in (False, True):
        assert "BUSY" not in report.format_table([quiet], wide=wide).splitlines()[2]
    assert "BUSY: 1.5 other cores" in report.format_table([busy])
    assert "BUSY: other processes used 1.5 cores" in report.format_table([busy], wide=True)


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
    # A cell: PyTorch's layout and init (+-1/sqrt(H)); the scalar scenarios' x unchanged.
    lstm = make_data(sizes._replace(cell="lstm", layers=2), 0)
    assert isinstance(lstm.params, lg.CellParams) and lstm.params.kind == "lstm"
    assert [p.shape for p in jax.tree.leaves(lstm.params)] == [
        *((20, 3), (20, 5), (20,), (20,)),
        *((20, 5), (20, 5), (20,), (20,)),
        *((1, 5), (1,)),
    ]
    leaves = jax.tree.leaves(lstm.params)
    assert all(p.dtype == np.float32 and np.abs(p).max() <= 1 / np.sqrt(5) for p in leaves)
    assert lstm.inputs.shape == a.inputs.shape


def _runs(record: dict) -> bool:
    """Whether a --quick record should have run: reverse mode needs a loop that has it."""
    loop = record["loop"]
    reverse = loop is None or lg.Loop.parse(loop).reverse_mode
    return reverse or not SCENARIOS[record["scenario"]].reverse


def _torch_version() -> str:
    import torch

    return torch.__version__


def test_device_names_the_cores_this_process_may_use(monkeypatch):
    # Under `taskset -c 0` on a 2-core machine the record must not claim 2 cores.
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(report, "usable_cores", lambda: 1)
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    assert "(1 core of 2" in report.describe_device(cpu)
    monkeypatch.setattr(report, "usable_cores", lambda: 2)
    assert "(2 cores" in report.describe_device(cpu)


# --- what the numbers were measured on ---------------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
stepping\t: 1
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_tile

processor\t: 1
model name\t: ignored: the first block is enough
"""


def test_gpu_info_reads_nvidia_smi_and_says_nothing_without_it():
    info = report.gpu_info("NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\n")
    assert (info["name"], info["driver"], info["memory"]) == (
        "NVIDIA H100 80GB HBM3",
        "550.54.15",
        "81559 MiB",
    )
    assert report.gpu_info("") is None and report.gpu_info("garbled") is None


def test_cpu_features_and_model_come_from_cpuinfo():
    features = report.cpu_features(CPUINFO)
    assert features == ["sse4_2", "avx", "avx2", "fma", "avx512f"] + [
        "amx_tile",
        "avx512_bf16",
        "avx512bw",
    ]
    assert report.vector_width(features) == "AVX-512 + AMX"
    assert report.vector_width(["sse4_2", "avx", "avx2", "fma"]) == "AVX2"
    assert report.vector_width(["asimd"]) == "NEON"
    assert report.vector_width([]) is None
    assert report.cpu_features("processor\t: 0\n") is None
    assert report.cpu_model(cpuinfo=CPUINFO) == "AMD EPYC 9R14"
    assert report.cpu_model(detailed=True, cpuinfo=CPUINFO) == (
        "AMD EPYC 9R14 (family 25, model 17, stepping 1)"
    )


def test_device_line_shows_the_vector_width(monkeypatch):
    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(report, "cpu_features", lambda: ["avx", "avx2", "avx512f"])
    assert report.describe_device(cpu).endswith(", AVX-512)")
    monkeypatch.setattr(report, "cpu_features", lambda: None)
    assert report.describe_device(cpu).endswith("cores)")


def test_jax_threads_says_how_it_was_found():
    threads, source = report.jax_threads()
    assert 1 <= threads
    if Path("/proc/self/task").exists():
        # Linux: XLA's intra-op pool, one thread per core this process may use.
        assert source == "threads named XLAEigen in this process"
        assert threads == report.usable_cores()


# --- memory kept for backward, both sides ------------------------------------------------


def test_residual_bytes_counts_what_the_pullback_keeps():
    x = np.ones((5,), np.float32)
    # sin's derivative needs cos(x): 5 float32s. A sum's needs nothing.
    assert cases.residual_bytes(lambda x: jax.numpy.sin(x).sum(), x) == 20
    assert cases.residual_bytes(lambda x: x.sum(), x) == 0


def test_residual_bytes_counts_an_array_kept_twice_once():
    @jax.custom_vjp
    def square(x):
        return x * x

    def forward(x):
        y = x + 1
        return x * x, (y, y, x * 2)  # y: one array, kept twice

    square.defvjp(forward, lambda res, g: (res[0] * 0 + res[2] * g,))
    x = np.ones((5,), np.float32)
    # Counted by identity: y once and x * 2, 5 float32s each.
    assert cases.residual_bytes(lambda x: square(x).sum(), x) == 40


def test_chunked_remat_keeps_less_than_scan():
    sizes = Sizes(length=40, batch=2, input=3, hidden=8, window=1)
    data = make_data(sizes, 0)
    saved = {
        loop: cases.saved_bytes("rnn_loss", loop, sizes, data) for loop in ("scan", "remat:chunk=8")
    }
    assert saved["remat:chunk=8"] < saved["scan"] / 2
    tbptt = cases.saved_bytes("train_tbptt", "scan", sizes._replace(window=4), data)
    assert tbptt < saved["scan"] / 5  # one 4-step window, not 40 steps


@needs_torch
def test_torch_saved_bytes_match_a_hand_count():
    # rnn_loss eager, T=3, B=2, I=3, H=4, O=1, per step: cat([x, h]) (2 x 7), tanh's output
    # (2 x 4; the head saves the same tensor) and the head's error (2 x 1) = 24 floats; and
    # the weights W (4 x 7) and V (1 x 4), once each however often saved: 32 floats.
    # (3 * 24 + 32) * 4 bytes = 416.
    sizes = Sizes(length=3, batch=2, input=3, hidden=4, window=2)
    data = make_data(sizes, 0)
    call, counter = torch_peers.saved_bytes("rnn_loss", "eager", data, sizes, "cpu")
    call()
    assert counter.peak == 416
    # TBPTT frees each window's graph before the next: T=4, window 2 keeps 2 steps at most,
    # (2 * 24 + 32) * 4 = 320 bytes, not 4 steps' 512.
    sizes = sizes._replace(length=4)
    call, counter = torch_peers.saved_bytes(
        "train_tbptt", "eager", make_data(sizes, 0), sizes, "cpu"
    )
    call()
    assert counter.peak == 320
    # The rtrl peer keeps no graph between steps, only S = dh/dp: B * H * P floats.
    p = 4 * 7 + 4 + 4 + 1
    sizes = sizes._replace(length=3)
    call, counter = torch_peers.saved_bytes("train_as_written", "rtrl", data, sizes, "cpu")
    call()
    assert counter.peak == 2 * 4 * p * 4


@needs_torch
def test_the_retained_graph_grows_with_every_step():
    kept = {}
    for length in (2, 4):
        sizes = Sizes(length=length, batch=2, input=3, hidden=4, window=1)
        call, counter = torch_peers.saved_bytes(
            "train_as_written", "eager", make_data(sizes, 0), sizes, "cpu"
        )
        call()
        kept[length] = counter.peak
    # Each step keeps its cat and tanh output (2 x 7 + 2 x 4 floats = 88 bytes) at least.
    assert kept[2] > 0 and kept[4] - kept[2] >= 2 * 88


# --- the progress bar, the reproduction script -------------------------------------------


@pytest.mark.slow  # the full tier: a new process (3 s)
def test_no_progress_never_imports_tqdm():
    code = (
        "import sys; from loopgrad_jax.bench import cli; "
        f"status = cli.main([*{TINY}, '--scenarios', 'accumulate', '--loops', 'scan', "
        "'--no-torch', '--no-progress', '--min-time', '0', '--repeats', '5']); "
        "assert status == 0; assert 'tqdm' not in sys.modules, 'tqdm was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


RESULTS = Path(__file__).parent.parent / "bench" / "results"


def test_reproduce_script_writes_every_committed_result():
    # Each `bench NAME ...` line writes NAME.json and NAME.txt, and NAME.png but for the
    # second and third runs of a headline command (NAME_run2, NAME_run3).
    script = (RESULTS.parent / "reproduce.sh").read_text()
    names = re.findall(r"^bench (\w+)", script, flags=re.M)
    assert len(names) == len(set(names)) >= 8
    written = {f"{n}.{ext}" for n in names for ext in ("json", "txt")}
    written |= {f"{n}.png" for n in names if not re.search(r"_run[23]$", n)}
    # Files other commands write, named in full: "$OUT/NAME" here, "$out/NAME" in
    # gpu_check.sh (the GPU host's checks).
    gpu_script = (RESULTS.parent / "gpu_check.sh").read_text()
    written |= set(re.findall(r'\$OUT/(\w+\.\w+)"', script))
    written |= set(re.findall(r'\$out/(\w+\.\w+)"', gpu_script))
    # gpu_check.sh's `bench NAME ...` lines write NAME.json and NAME.txt.
    gpu_names = re.findall(r"^bench (\w+)", gpu_script, flags=re.M)
    written |= {f"{n}.{ext}" for n in gpu_names for ext in ("json", "txt")}
    committed = {p.name for p in RESULTS.iterdir()}
    assert committed <= written, sorted(committed - written)


def test_torch_peers_follow_jaxs_matmul_precision():
    # On a GPU the peers allow TF32 exactly when JAX's float32 products may use it.
    with jax.default_matmul_precision("highest"):
        assert not torch_peers.tf32_allowed()
    with jax.default_matmul_precision("tensorfloat32"):
        assert torch_peers.tf32_allowed()


# The full tier (4 s): test_parallel's 4-device process checks mesh= in the quick tier.
@pytest.mark.slow
def test_devices_add_data_parallel_rows_beside_one_device(tmp_path):
    """In a new process, as a user runs it: the CLI makes the virtual CPU devices."""
    path = tmp_path / "dp.json"
    argv = [
        *(*TINY, "--scenarios", "accumulate,rnn_loss,train_tbptt", "--loops", "scan"),
        *("--devices", "2,3", "--backend", "cpu", "--no-torch", "--repeats", "5"),
        *("--min-time", "0"),
        *("--no-progress", "--json", str(path)),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "loopgrad_jax.bench", *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(path.read_text())
    assert doc["meta"]["devices"] == [1, 2, 3]
    rows = {(r["scenario"], r["devices"]): r for r in doc["records"]}
    # the scalar scenarios have no batch to split: one device only
    assert set(rows) == {
        ("accumulate", 1),
        *((s, n) for s in ("rnn_loss", "train_tbptt") for n in (1, 2, 3)),
    }
    for scenario in ("rnn_loss", "train_tbptt"):
        one, two, three = (rows[scenario, n] for n in (1, 2, 3))
        assert two["skipped"] is None and two["run_s_median"] > 0
        assert two["max_rel_diff"] < 1e-5  # the same results as one device, in float32
        assert two["saved_bytes"] is None and one["saved_bytes"] > 0
        assert report.impl_name(two) == "scan x2 devices"
        # B=2 does not split over 3 devices: skipped, saying why
        assert "must split evenly" in three["skipped"] and three["run_s_median"] is None
    assert "scan x2 devices" in done.stdout


# --- the plot: drawn from committed results, checked by what it holds -------------------


def _results(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())["records"]


def _panels(figure) -> dict[str, object]:
    """The figure's panels by their gid: ``"time <scenario>"``, ``"memory <scenario>"``."""
    return {ax.get_gid(): ax for ax in figure.axes if ax.get_gid()}


def _bars(ax) -> list:
    return [p for p in ax.patches if p.get_gid()]


def _lines(ax) -> list:
    return [line for line in ax.lines if line.get_gid() not in (None, "BUSY")]


def _plot_record(framework: str, name: str, **extra) -> dict:
    """A measured rnn_loss record at T=100 of a JAX loop kind or a peer named ``name``."""
    record = dict.fromkeys(run.RECORD_KEYS)
    record.update(scenario="rnn_loss", framework=framework, length=100, batch=1, devices=1)
    record.update({"loop": name} if framework == "jax" else {"peer": name, "devices": None})
    record.update(run_s_median=1e-3, run_s_ci=[0.9e-3, 1.2e-3], saved_bytes=4096)
    record.update(other_cores=0.0)
    record.update(extra)
    return record


@pytest.mark.parametrize("name", ["cpu_lstm", "cpu_article", "cpu_lstm_batch"])
def test_plot_has_a_time_and_a_memory_panel_per_scenario(name):
    from loopgrad_jax.bench.plot import draw

    records = _results(name)
    sweep = "batch" if name == "cpu_lstm_batch" else "length"
    panels = _panels(draw(records, name, x=sweep))
    scenarios = {r["scenario"] for r in records}
    assert set(panels) == {f"{kind} {s}" for s in scenarios for kind in ("time", "memory")}


def test_plot_of_one_length_draws_a_bar_per_measured_implementation():
    from loopgrad_jax.bench.plot import draw

    records = _results("cpu_lstm")  # T=1000 only; rnn_loss_hoisted has no nn.LSTM peer
    panels = _panels(draw(records, "cpu_lstm"))
    for scenario in ("rnn_loss", "rnn_loss_hoisted"):
        names = [report.impl_name(r) for r in records if r["scenario"] == scenario]
        time_bars = _bars(panels[f"time {scenario}"])
        assert sorted(bar.get_gid() for bar in time_bars) == sorted(names)
        # the fastest on top (the y axis runs downwards)
        by_height = sorted(time_bars, key=lambda bar: bar.get_y())
        medians = sorted(r["run_s_median"] for r in records if r["scenario"] == scenario)
        assert [bar.get_x() + bar.get_width() for bar in by_height] == pytest.approx(medians)
        saved = [r for r in records if r["scenario"] == scenario and r["saved_bytes"]]
        assert 0 < len(saved) < len(names)  # the rows on 2 devices have no one figure
        assert len(_bars(panels[f"memory {scenario}"])) == len(saved)
    assert not _lines(panels["time rnn_loss"])


def test_plot_leaves_skipped_cases_and_unmeasured_memory_out():
    from loopgrad_jax.bench.plot import draw

    records = [
        _plot_record("jax", "scan"),
        _plot_record("jax", "scan", devices=2, saved_bytes=None),  # "scan x2 devices"
        _plot_record("jax", "while", run_s_median=None, run_s_ci=None, skipped="no reverse"),
        _plot_record("torch", "eager", run_s_median=3e-3, run_s_ci=[2e-3, 4e-3]),
    ]
    panels = _panels(draw(records, "skips"))
    assert [b.get_gid() for b in _bars(panels["time rnn_loss"])] == [
        "scan", "scan x2 devices", "torch eager"
    ]  # fmt: skip
    assert [b.get_gid() for b in _bars(panels["memory rnn_loss"])] == ["scan", "torch eager"]
    assert "not measured" in [t.get_text() for t in panels["memory rnn_loss"].texts]
    tick_labels = [t.get_text() for t in panels["time rnn_loss"].get_yticklabels()]
    assert not any("while" in label for label in tick_labels)


def test_plot_gives_every_implementation_a_colour_of_its_own():
    from matplotlib.colors import to_hex

    from loopgrad_jax.bench.plot import draw

    records = _results("cpu_article")  # 19 implementations: loop kinds, methods, peers
    colors: dict[str, str] = {}
    for ax in draw(records, "cpu_article").axes:
        for line in _lines(ax):
            assert colors.setdefault(line.get_gid(), to_hex(line.get_color())) == to_hex(
                line.get_color()
            ), line.get_gid()  # one colour in every panel
    frameworks = {report.impl_name(r): r["framework"] for r in records if not r["skipped"]}
    assert set(colors) == set(frameworks)
    assert len(set(colors.values())) == len(colors)
    # PyTorch's peers are greys, the JAX loop kinds and the other peers are not.
    for name, color in colors.items():
        grey = len({color[1:3], color[3:5], color[5:7]}) == 1
        assert grey == (frameworks[name] == "torch"), (name, color)


def test_plot_gives_every_bar_a_colour_of_its_own():
    from loopgrad_jax.bench.plot import draw

    records = [_plot_record("jax", loop) for loop in ("scan", "scan:unroll=8", "remat", "fori")]
    records += [_plot_record("torch", peer) for peer in ("eager", "nn.RNN")]
    bars = _bars(_panels(draw(records, "colours"))["time rnn_loss"])
    assert len(bars) == 6 and len({tuple(b.get_facecolor()) for b in bars}) == 6


def test_plot_marks_busy_records():
    from loopgrad_jax.bench.plot import draw

    records = [_plot_record("jax", "scan"), _plot_record("jax", "fori", other_cores=1.5)]
    ax = _panels(draw(records, "busy"))["time rnn_loss"]
    hatched = {bar.get_gid() for bar in _bars(ax) if bar.get_hatch()}
    assert hatched == {"fori"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["scan", "fori (BUSY)"]
    # Over several lengths: a ring round each BUSY point.
    deer = _results("cpu_deer")  # T = 100, 1000, 10000: mark the longest BUSY
    for r in deer:
        if r["length"] == 10000 and r["run_s_median"]:
            r["other_cores"] = 1.5
    rings = [line for line in _panels(draw(deer, "cpu_deer"))["time rnn_loss"].lines
             if line.get_gid() == "BUSY"]  # fmt: skip
    busy = [r for r in deer if (r["other_cores"] or 0) >= report.BUSY_CORES]
    assert busy and sum(len(ring.get_xdata()) for ring in rings) == len(busy)


@pytest.mark.parametrize(("name", "x"), [("cpu_large", "length"), ("cpu_lstm_batch", "batch")])
def test_plot_of_several_lengths_or_sizes_draws_lines(name, x):
    from loopgrad_jax.bench.plot import draw

    panels = _panels(draw(_results(name), name, x=x))
    records = [r for r in _results(name) if r["scenario"] == "rnn_loss"]
    lines = {line.get_gid(): line for line in _lines(panels["time rnn_loss"])}
    assert not _bars(panels["time rnn_loss"])
    # "while" (no reverse mode) was skipped at every length: no line at all
    assert set(lines) == {report.impl_name(r) for r in records if not r["skipped"]}
    for impl, line in lines.items():
        # a point per measured case; a skipped one leaves no point, never a zero
        measured = [r for r in records if report.impl_name(r) == impl and not r["skipped"]]
        assert list(line.get_xdata()) == sorted(r[x] for r in measured)
        assert list(line.get_ydata()) == [
            r["run_s_median"] for r in sorted(measured, key=lambda r: r[x])
        ]


def test_plot_records_writes_a_png_and_names_a_path_it_cannot_write(tmp_path):
    from loopgrad_jax.bench.plot import plot_records

    records = _results("cpu_parallel")
    path = tmp_path / "parallel.png"
    plot_records(records, path, "cpu_parallel")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = tmp_path / "no such folder" / "parallel.png"
    with pytest.raises(FileNotFoundError, match="Cannot write the plot to .*no such folder"):
        plot_records(records, missing, "cpu_parallel")
    with pytest.raises(ValueError, match="at least one record"):
        plot_records([], path, "nothing")


def test_deer_is_not_timed_on_long_training_runs():
    # Its Jacobians grow as T * n**2 and a training run carries its weights: skipped, with
    # the reason, past DEER_TRAIN_MAX_T; the loss scenarios and shorter runs are timed.
    limits = cases.Limits(100, 300)
    long = cases.Sizes(cases.DEER_TRAIN_MAX_T + 1, 1, 10, 5, 10)
    short = long._replace(length=cases.DEER_TRAIN_MAX_T)
    for scenario in ("train_as_written", "train_tbptt"):
        reason = cases.skip_reason(scenario, "parallel", long, limits, method="forward")
        assert reason is not None and "T*n*n Jacobian numbers" in reason
        assert cases.skip_reason(scenario, "parallel", short, limits, method="forward") is None
        assert cases.skip_reason(scenario, "scan", long, limits, method="forward") is None
    assert cases.skip_reason("rnn_loss", "parallel", long, limits) is None


def test_plot_title_names_the_window_only_where_train_tbptt_ran():
    meta = {"device": "cpu: a CPU", "jax": "0.0"}
    plan = run.Plan(
        scenarios=["rnn_loss"],
        loops=["scan"],
        lengths=[10, 100],
        batch=2,
        input=3,
        hidden=4,
        window=5,
        limits=cases.Limits(max_unroll=10, max_quadratic=10),
        warmup=1,
        repeats=5,
        compile_repeats=1,
        compile_warmup=True,
        seed=0,
        torch=None,
        cell="gru",
        layers=2,
    )
    assert cli.plot_title(meta, plan) == "cpu: a CPU, jax 0.0, gru x2 layers, I=3, H=4, B=2"
    tbptt = plan._replace(scenarios=["rnn_loss", "train_tbptt"], cell="article", layers=1)
    assert cli.plot_title(meta, tbptt) == "cpu: a CPU, jax 0.0, I=3, H=4, B=2, window=5"
    swept = plan._replace(sweep=("batch", (1, 8)))
    assert cli.plot_title(meta, swept).endswith("I=3, H=4, B=1,8")
