"""``loopgrad-parity``: the command runs the suite's checks, reports them, and can fail."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import FIXTURES

import loopgrad_jax as lg
from loopgrad_jax import fixtures, parity

# A few cheap checks: scenario 1 with scan in one dtype: the five cases, the first under
# jit, and scan's option (unroll=3) on the first case eagerly and under jit.
FEW = ["--scenario", "accumulate", "--loop", "scan", "--dtype", "float64", "--no-progress"]


def test_module_runs_and_writes_json(tmp_path):
    out = tmp_path / "parity.json"
    done = subprocess.run(
        [sys.executable, "-m", "loopgrad_jax.parity", *FEW, "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["failed"] == 0 and doc["fixtures"] == "shipped"
    records = doc["records"]
    assert doc["checks"] == len(records) == 8
    assert {r["case"] for r in records} == {c["name"] for c in _cases("accumulate")}
    assert all(r["passed"] and r["error"] <= r["tolerance"] == 1e-10 for r in records)
    assert {(r["loop"], r["dtype"], r["scenario"]) for r in records} == {
        ("scan", "float64", "accumulate"),
        ("scan:unroll=3", "float64", "accumulate"),
    }
    # The table: a header, a rule, one row per check, and the summary.
    assert done.stdout.splitlines()[0].split() == [
        "case", "scenario", "method", "loop", "jit", "dtype", "max", "rel", "error", "pass",
    ]  # fmt: skip
    assert "8 of 8 checks passed (shipped fixtures)." in done.stdout


def _cases(scenario):
    return parity.load(scenario, "float64").cases


def _corrupted_copy(tmp_path, scenario="accumulate", index=1, field="grad"):
    """The shipped fixtures, with one recorded gradient off by 1e-6: valid files, wrong value."""
    folder = tmp_path / "fixtures"
    folder.mkdir()
    for path in FIXTURES.glob("*.json"):
        (folder / path.name).write_bytes(path.read_bytes())
    f = fixtures.load_fixture(folder / f"{scenario}_float64.json")
    cases = [dict(c) for c in f.cases]
    cases[index][field] = cases[index][field] + np.float64(1e-6)
    fixtures.write_fixture(f.path, f.header, cases)
    return folder, cases[index]["name"]


def test_a_wrong_fixture_fails_with_exit_status_1(tmp_path, capsys):
    folder, broken = _corrupted_copy(tmp_path)
    out = tmp_path / "parity.json"
    status = parity.main([*FEW, "--fixtures", str(folder), "--json", str(out)])
    assert status == 1
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["failed"] == 1
    (failed,) = [r for r in doc["records"] if not r["passed"]]
    assert failed["case"] == broken and failed["field"] == "grad"
    assert 1e-10 < failed["error"] < 1e-5
    stdout = capsys.readouterr().out
    assert "7 of 8 checks passed" in stdout
    assert f"FAILED accumulate/{broken}/scan/eager/float64: grad: max |actual - expected|" in stdout


def test_a_raising_check_fails_and_the_rest_still_run(monkeypatch, capsys):
    def broken(check, case):
        raise RuntimeError("boom")

    monkeypatch.setitem(parity.scenarios._RUNNERS, "accumulate", broken)
    assert parity.main(FEW) == 1
    stdout = capsys.readouterr().out
    assert "0 of 8 checks passed" in stdout
    assert "FAILED accumulate/article/scan/eager/float64: RuntimeError: boom" in stdout


def test_the_module_grid_has_every_reverse_loop_kind_and_its_suite_samples_each():
    full, suite = parity.checks(["module"]), parity.checks(["module"], grid="suite")
    names = [c["name"] for c in _cases("module")]
    assert set(suite) <= set(full) and len(suite) < len(full) / 5
    for grid in (full, suite):
        assert [*dict.fromkeys(c.case for c in grid)] == names
        assert {c.cell for c in grid} == set(lg.CELLS[1:]) and {c.method for c in grid} == {""}
        assert {c.loop for c in grid} == set(parity.REVERSE_VARIANTS)
    # Every case with every kind and option in both dtypes, python under jit too; every
    # kind under jit on the first case.
    every = {(n, v, d) for n in names for v in parity.REVERSE_VARIANTS for d in parity.DTYPES}
    assert {(c.case, c.loop, c.dtype) for c in full if not c.jit} == every
    assert {(c.case, c.loop) for c in full if c.jit and c.case != names[0]} == {
        (n, "python") for n in names[1:]
    }
    assert {c.loop for c in full if c.jit and c.case == names[0]} == set(parity.REVERSE_VARIANTS)
    # The suite: float32 with scan on every case; the other kinds once each, eagerly.
    assert {(c.case, c.loop) for c in suite if c.dtype == "float32"} == {(n, "scan") for n in names}
    others = [c.loop for c in suite if c.loop != "scan" and not c.jit]
    assert sorted(others) == sorted(set(parity.REVERSE_VARIANTS) - {"scan"})
    assert len({c.case for c in suite if c.loop != "scan"}) == len(parity.REVERSE_VARIANTS)


def test_a_wrong_module_gradient_fails(tmp_path):
    index = [c["name"] for c in _cases("module")].index("gru_cell")
    folder, broken = _corrupted_copy(tmp_path, "module", index, "grad_hidden0")
    check = parity.Check("module", broken, "gru", "", "scan", False, "float64")
    assert parity.run_check(check).passed
    record = parity.run_check(check, folder)
    assert not record.passed and record.field == "grad_hidden0"
    assert 1e-10 < record.error < 1e-5 and record.message.startswith("grad_hidden0: max |")
    # A gradient the case records as absent (no hidden0) must be absent.
    error, field, message = parity.compare({"g": np.zeros(2)}, {"g": None}, "float64")
    assert (error, field, message) == (float("inf"), "g", "g: ndarray != None")
    assert parity.compare({"g": None}, {"g": None}, "float64") == (0.0, "g", "")


def test_a_tampered_fixture_is_an_error(tmp_path, capsys):
    folder, _ = _corrupted_copy(tmp_path)
    path = folder / "accumulate_float64.json"
    path.write_text(path.read_text().replace('"n": 5', '"n": 6'))
    assert parity.main([*FEW, "--fixtures", str(folder)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_filters_select_cells_and_loop_kinds():
    every = parity.checks(["cell_tbptt", "train_tbptt"])
    chosen = parity.select(every, cells=("lstm",), loops=("remat",))
    assert chosen and {c.cell for c in chosen} == {"lstm"}
    remats = {"remat", "remat:policy=dots_saveable", "remat:chunk=4", "remat:checkpoints=3"}
    assert {c.loop for c in chosen} == remats
    exact = parity.select(every, cells=("article",), loops=("remat:chunk=4",))
    assert exact and {(c.scenario, c.loop) for c in exact} == {("train_tbptt", "remat:chunk=4")}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--scenario", "accumulate,rnn"], r"unknown scenario 'rnn'"),
        (["--cell", "lstm", "--scenario", "accumulate"], r"no check matches"),
        (["--loop", "for"], r"loop must be one of"),
        (["--live", "--fixtures", "x"], r"--live: not allowed with --fixtures"),
        (["--json", "/no/such/folder/out.json"], r"--json: folder .* does not exist"),
    ],
)
def test_bad_arguments_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exit:
        parity.main(argv)
    assert exit.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_live_without_torch_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(SystemExit) as exit:
        parity.main(["--live", *FEW])
    assert exit.value.code == 2
    assert "--live: needs PyTorch, which is not installed" in capsys.readouterr().err


@pytest.mark.torch
def test_live_regenerates_with_the_installed_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "parity.json"
    assert parity.main(["--live", *FEW, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["fixtures"] == "live" and doc["passed"] and doc["checks"] == 8
    assert doc["versions"]["torch"] == doc["fixtures_torch_version"]


def test_progress_without_tqdm_counts_on_stderr(monkeypatch, capsys):
    # pip install 'loopgrad_jax[torch]' brings no tqdm: the command counts instead.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert parity.main([a for a in FEW if a != "--no-progress"]) == 0
    assert "\r8/8 checks" in capsys.readouterr().err


def test_compiled_programs_are_dropped_after_each_check(monkeypatch):
    # Hundreds of checks' programs exhausted the process's memory mappings.
    cleared = []
    monkeypatch.setattr(parity.cli.jax, "clear_caches", lambda: cleared.append(1))
    assert parity.main(FEW) == 0
    assert len(cleared) == 8


# ------------------------------------------------------------------ --module FILE: your own


def _saved(tmp_path, module, name="module.pt"):
    torch = pytest.importorskip("torch")
    path = tmp_path / name
    torch.save(module, path)
    return str(path)


@pytest.mark.torch
def test_a_saved_module_is_checked_and_exits_0(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=True)
    path, out = _saved(tmp_path, lstm), tmp_path / "module.json"
    argv = ["--module", path, "--steps", "4", "--batch", "2", "--lengths", "--loop", "scan"]
    assert parity.main([*argv, "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"{path}: random inputs 2x4x3, lengths [" in stdout  # batch_first: (B, T, I)
    for dtype, tol in (("float32", "1e-05"), ("float64", "1e-10")):
        assert f"bidirectional=True) in {dtype}, max |jax - torch| / (1 + |torch|), " in stdout
        assert f"tolerance {tol}: passed" in stdout
    rows = [line.split() for line in stdout.splitlines() if line.startswith("scan")]
    assert len(rows) == 2 and all(r[-1] == "pass" and len(r) == 8 for r in rows)
    doc = json.loads(out.read_text())
    assert doc["passed"] and [r["dtype"] for r in doc["results"]] == ["float32", "float64"]
    assert set(doc["results"][1]["errors"]) == {"scan"}


@pytest.mark.torch
def test_a_saved_module_that_differs_exits_1(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    from loopgrad_jax import check_torch

    path = _saved(tmp_path, torch.nn.RNN(3, 4))  # tanh, read as relu on the JAX side
    as_relu = check_torch.from_torch
    monkeypatch.setattr(
        check_torch, "from_torch", lambda m: as_relu(m.state_dict(), kind="rnn_relu")
    )
    argv = ["--module", path, "--loop", "scan", "--dtype", "float64"]
    assert parity.main(argv) == 1
    stdout = capsys.readouterr().out
    assert "tolerance 1e-10: FAILED" in stdout and stdout.rstrip().endswith("FAIL")


@pytest.mark.torch
@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("dict", r"holds a state dict, not a torch.nn module: save the module itself"),
        ("linear", r"holds a Linear, not a module this checks: rnn must be a torch.nn.RNN"),
        ("text", r"torch.load cannot read it"),
    ],
)
def test_a_file_that_is_no_module_exits_2(tmp_path, content, match, capsys):
    torch = pytest.importorskip("torch")
    if content == "text":
        path = tmp_path / "module.pt"
        path.write_text("not a module")
        path = str(path)
    else:
        made = {
            "dict": lambda: torch.nn.GRU(3, 4).state_dict(),
            "linear": lambda: torch.nn.Linear(3, 4),
        }
        path = _saved(tmp_path, made[content]())
    with pytest.raises(SystemExit) as exit:
        parity.main(["--module", path, "--loop", "scan"])
    assert exit.value.code == 2
    assert re.search(f"--module: .*{match}", capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--module", "m.pt", "--live"], r"--module: not allowed with --live"),
        (["--module", "m.pt", "--scenario", "stack"], r"--module: not allowed with --scenario"),
        (["--module", "m.pt", "--lengths", "--unbatched"], r"--lengths: not allowed with"),
        (["--module", "m.pt", "--steps", "0"], r"--steps: expected an integer >= 1, got '0'"),
    ],
)
def test_module_with_bad_arguments_exits_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exit:
        parity.main(argv)
    assert exit.value.code == 2
    assert re.search(match, capsys.readouterr().err)
