"""``loopgrad-bench --peers``: every peer a row of the one table, computing what JAX computes.

Nothing here times anything: the ratios live only in ``bench/results``.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, cli, peers, report, torch_peers
from loopgrad_jax.bench.cases import Sizes
from loopgrad_jax.bench.run import max_rel_diff

needs_torch = pytest.mark.skipif(not torch_peers.available(), reason="torch is not installed")
TINY = ("--input", "3", "--hidden", "4", "--batch", "2", "--repeats", "5", "--min-time", "0")


def _run(tmp_path, *flags):
    path = tmp_path / "out.json"
    status = cli.main([*TINY, *flags, "--no-progress", "--json", str(path)])
    return status, json.loads(path.read_text())["records"]


def test_parse_keeps_the_order_and_names_what_it_does_not_know():
    assert peers.parse("nnx.RNN, eager,nnx.RNN") == ("nnx.RNN", "eager")
    with pytest.raises(ValueError, match=r"'jaxlib' unknown"):
        peers.parse("eager,jaxlib")
    with pytest.raises(ValueError, match="expected comma-separated peers"):
        peers.parse(" , ")


def test_all_names_the_peers_of_each_case():
    every = ("all",)
    assert peers.rows("rnn_loss", "article", every, torch=True) == [
        ("torch", "eager"),
        ("torch", "nn.RNN"),
        ("torch", "torch.compile"),
        ("torch", "torch.scan"),
        ("flax", "nnx.RNN"),
        ("equinox", "equinox"),
    ]
    assert peers.rows("rnn_loss", "article", every, torch=False) == [
        ("flax", "nnx.RNN"),
        ("equinox", "equinox"),
    ]
    assert peers.rows("rnn_loss", "lstm", every, torch=True) == [
        ("torch", "eager"),
        ("torch", "nn.LSTM"),
        ("flax", "nnx.RNN"),
    ]
    assert peers.rows("rnn_loss_hoisted", "gru", ("fused",), torch=True) == [("torch", "nn.GRU")]
    # Options make peers of their own; flax_loss:LOOP is named, never part of all.
    named = ("nnx.RNN:unroll=8", "flax_loss:scan", "equinox:checkpoints=3")
    assert peers.rows("rnn_loss", "article", named, torch=False) == [
        ("flax", "nnx.RNN:unroll=8"),
        ("flax", "flax_loss:scan"),
        ("equinox", "equinox:checkpoints=3"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nnx.RNN:unroll=0", "nnx.RNN takes ':unroll=K' (K >= 1) or ':again', not 'unroll=0'"),
        ("nnx.RNN:twice", "nnx.RNN takes ':unroll=K' (K >= 1) or ':again', not 'twice'"),
        ("equinox:checkpoints=0", "equinox takes ':checkpoints=C' (C >= 1)"),
        ("equinox:8", "equinox takes ':checkpoints=C' (C >= 1), not '8'"),
        ("flax_loss", "a loop kind must follow 'flax_loss:'"),
        ("flax_loss:loopy", "flax_loss takes a loop kind"),
        ("flax_loss:while", "flax_loss:while has no reverse mode"),
        ("eager:unroll=2", "'eager:unroll=2' unknown"),
    ],
)
def test_peer_options_are_checked_naming_what_each_peer_takes(text, message):
    with pytest.raises(ValueError, match="expected comma-separated peers") as error:
        peers.parse(text)
    assert message in str(error.value)
    assert text in str(error.value)


@pytest.mark.parametrize(
    ("name", "scenario", "sizes", "message"),
    [
        ("equinox", "rnn_loss", Sizes(3, 2, 3, 4, 3, cell="lstm"), "with the article cell"),
        (
            "nnx.RNN",
            "rnn_loss",
            Sizes(3, 2, 3, 4, 3, cell="rnn_relu"),
            "not rnn_loss with rnn_relu",
        ),
        ("flax_loss:python", "rnn_loss", Sizes(30, 2, 3, 4, 3), "T=30 > --max-unroll=10"),
        ("nnx.RNN", "stack", Sizes(3, 2, 3, 4, 3), "runs rnn_loss"),
        ("torch.compile", "rnn_loss", Sizes(30, 2, 3, 4, 3), "T=30 > --max-unroll=10"),
        ("nnx.RNN", "rnn_loss", Sizes(3, 2, 3, 4, 3, cell="lstm", layers=2), "one layer"),
        ("eager", "rnn_loss_hoisted", Sizes(3, 2, 3, 4, 3, cell="lstm"), "no eager peer"),
    ],
)
def test_a_peer_that_cannot_run_a_case_says_why(name, scenario, sizes, message):
    assert message in peers.skip_reason(name, scenario, sizes, 10, "cpu")
    assert peers.skip_reason("nnx.RNN", "rnn_loss", Sizes(3, 2, 3, 4, 3), 10, "cpu") is None


def test_a_missing_package_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setattr(peers, "installed", lambda package: package != "equinox")
    reason = peers.skip_reason("equinox", "rnn_loss", Sizes(3, 2, 3, 4, 3), 10, "cpu")
    assert reason == "equinox is not installed (pip install 'loopgrad_jax[bench]')"
    reason = peers.skip_reason("eager", "rnn_loss", Sizes(3, 2, 3, 4, 3), 10, None)
    assert "torch is not installed" in reason


def _rows(tmp_path, loop: str, length: int, *flags: str) -> dict:
    """``rnn_loss`` with ``loop`` and ``flags``' peers: its records by table name."""
    status, records = _run(
        tmp_path, "--scenarios", "rnn_loss", "--loops", loop, "--lengths", str(length), *flags
    )
    assert status == 0
    return {report.impl_name(r): r for r in records}


def _agree(rows: dict, names) -> None:
    """Each of ``names`` ran and computed JAX's loss and gradient (float32: sums in another
    order differ in a few units of the last place)."""
    for name in names:
        assert rows[name]["skipped"] is None and rows[name]["run_s_median"] > 0, name
        assert rows[name]["max_rel_diff"] < 1e-5, name


# PyTorch's compiled and functional-scan peers run through dynamo, which warns about its
# own deprecated internals. torch.compile takes seconds even at T=4: the full tier.
@needs_torch
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_every_peer_is_a_row_computing_jaxs_loss_and_gradient(tmp_path):
    rows = _rows(tmp_path, "scan", 4, "--peers", "all")
    peers_run = ["torch eager", "torch nn.RNN", "torch.compile", "torch.scan"]
    peers_run += ["flax nnx.RNN", "equinox"]
    assert list(rows) == ["scan", *peers_run]
    _agree(rows, peers_run)
    assert set(rows["scan"]["vs_torch"]) == {r["peer"] for r in rows.values() if r["peer"]}
    assert rows["torch.compile"]["compile_s"] > 0  # its first call, the compile


# The full tier: dynamo traces the functional scan's body (5 s).
@needs_torch
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_pytorchs_own_loops_compute_jaxs_loss_and_gradient(tmp_path):
    # --max-unroll 1: torch.compile of the loop (tens of seconds to compile) is skipped.
    rows = _rows(
        tmp_path, "scan", 3, "--peers", "eager,torch.compile,torch.scan", "--max-unroll", "1"
    )
    assert list(rows) == ["scan", "torch eager", "torch.compile", "torch.scan"]
    assert "--max-unroll=1" in rows["torch.compile"]["skipped"]
    _agree(rows, ("torch eager", "torch.scan"))
    assert rows["torch.scan"]["compile_s"] > 0  # its first call, timed alone
    assert set(rows["scan"]["vs_torch"]) == {"eager", "torch.scan"}


# The full tier: three peers compiled beside the loop (6 s).
@needs_torch
@pytest.mark.slow
def test_the_jax_peers_compute_jaxs_loss_and_gradient(tmp_path):
    rows = _rows(tmp_path, "remat:checkpoints=2", 4, "--peers", "equinox,nnx.RNN,fused")
    assert list(rows) == ["remat:checkpoints=2", "equinox", "flax nnx.RNN", "torch nn.RNN"]
    _agree(rows, ("equinox", "flax nnx.RNN", "torch nn.RNN"))
    assert set(rows["remat:checkpoints=2"]["vs_torch"]) == {"equinox", "nnx.RNN", "nn.RNN"}


def test_peers_of_a_cell_compute_jaxs_loss_and_gradient(tmp_path):
    status, records = _run(
        tmp_path,
        *("--scenarios", "rnn_loss", "--cell", "lstm", "--loops", "scan", "--lengths", "3"),
        *("--peers", "nnx.RNN,equinox", "--no-torch"),
    )
    assert status == 0
    flax_row, equinox_row = (r for r in records if r["framework"] != "jax")
    assert flax_row["peer"] == "nnx.RNN" and flax_row["max_rel_diff"] < 1e-5
    assert "article cell" in equinox_row["skipped"] and equinox_row["run_s_median"] is None


def test_no_torch_with_named_peers_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--peers", "eager,nnx.RNN", "--no-torch"])
    assert exit_info.value.code == 2
    assert "--no-torch: not allowed with --peers naming PyTorch's peers (eager)" in (
        capsys.readouterr().err
    )


def test_an_unknown_peer_is_refused_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--peers", "keras"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --peers" in err and "'keras' unknown" in err and "nnx.RNN" in err


# The full tier (3.6 s): test_b_hn_stays_where_flax_is_missing and the peers' check of
# every cell stay in the quick one.
@pytest.mark.slow
def test_the_flax_gru_runs_with_b_hn_zero_and_its_check_leaves_b_hn_out(tmp_path):
    pytest.importorskip("flax")
    status, records = _run(
        tmp_path,
        *("--scenarios", "rnn_loss", "--cell", "gru", "--loops", "scan", "--lengths", "3"),
        *("--peers", "nnx.RNN,flax_loss:scan", "--no-torch"),
    )
    assert status == 0
    rows = {report.impl_name(r): r for r in records}
    _agree(rows, ("flax nnx.RNN", "flax_loss:scan"))
    meta = json.loads((tmp_path / "out.json").read_text())["meta"]
    assert meta["gru_b_hn_zero"] is True and meta["flax"]
    # What the check leaves out is b_hn's gradient alone, which nnx.GRUCell cannot give:
    # with it, the peer's (its one bias's, dn) differs from JAX's (r * dn).
    data = peers.adapt(cases.make_data(Sizes(3, 2, 3, 4, 3, cell="gru"), 0), ("nnx.RNN",))
    hidden = 4
    assert all(not layer.bias_hh[2 * hidden :].any() for layer in data.params.layers)
    built = peers.build("nnx.RNN", data, Sizes(3, 2, 3, 4, 3, cell="gru"), jax.devices()[0])
    ours = jax.jit(
        lambda p, x, y: (lambda v, g: (v, *jax.tree.leaves(g)))(
            *jax.value_and_grad(lg.rnn_loss)(p, x, y)
        )
    )(data.params, data.inputs, data.targets)
    theirs = [np.asarray(a) for a in built.call()]
    ours = [np.asarray(a) for a in ours]
    assert max_rel_diff(theirs, ours) > 1e-3
    assert max_rel_diff(built.comparable(theirs), built.comparable(ours)) < 1e-5
    assert peers.zero_b_hn("gru", ("eager", "fused")) is False
    assert peers.zero_b_hn("lstm", ("nnx.RNN",)) is False


def test_b_hn_stays_where_flax_is_missing(monkeypatch):
    # Without Flax its peers are skipped: no row computes with b_hn zero.
    assert peers.zero_b_hn("gru", ("nnx.RNN",)) is True
    assert peers.zero_b_hn("gru", ("all",)) is True
    monkeypatch.setattr(peers, "installed", lambda package: package != "flax")
    assert peers.zero_b_hn("gru", ("nnx.RNN",)) is False
    assert peers.zero_b_hn("gru", ("all",)) is False
    data = cases.make_data(Sizes(3, 2, 3, 4, 3, cell="gru"), 0)
    assert peers.adapt(data, ("all",)) is data


# The full tier: each row's gradient compiled twice, timed and counted (4 s).
@pytest.mark.slow
def test_the_checkpoints_preset_counts_evaluations_beside_equinox(tmp_path, capsys):
    equinox = pytest.importorskip("equinox")
    status, records = _run(
        tmp_path,
        *("--preset", "checkpoints", "--lengths", "12"),
        *("--loops", "scan,remat,remat:checkpoints=3", "--peers", "equinox:checkpoints=3"),
    )
    assert status == 0
    meta = json.loads((tmp_path / "out.json").read_text())["meta"]
    assert meta["equinox"] == equinox.__version__ and meta["evaluations"] is True
    rows = {report.impl_name(r): r for r in records}
    assert list(rows) == ["scan", "remat", "remat:checkpoints=3", "equinox:checkpoints=3"]
    assert rows["scan"]["evaluations"] == 12  # the forward pass; backward reads residuals
    assert rows["remat"]["evaluations"] == 24  # once more inside each step's VJP
    fewest = lg.checkpointed_evaluations(12, 3)
    assert rows["remat:checkpoints=3"]["evaluations"] == fewest
    assert rows["equinox:checkpoints=3"]["evaluations"] >= fewest  # nobody beats the optimum
    _agree(rows, ["equinox:checkpoints=3"])
    assert rows["equinox:checkpoints=3"]["temp_bytes"] > 0
    assert rows["equinox:checkpoints=3"]["saved_bytes"] > 0
    value, low, high = rows["remat:checkpoints=3"]["vs_torch"]["equinox:checkpoints=3"]
    assert 0 < low <= value <= high
    note = f"evals/T {fewest / 12:.2f} (fewest {fewest / 12:.2f})"
    assert report.evaluations_note(rows["remat:checkpoints=3"]) == note
    assert "evals/T" in capsys.readouterr().out  # the table's note column


@pytest.mark.slow  # the full tier: five Flax peers compiled (2.5 s)
def test_the_flax_preset_names_its_rows(tmp_path):
    pytest.importorskip("flax")
    status, records = _run(tmp_path, "--preset", "flax", "--lengths", "3", "--loops", "scan")
    assert status == 0
    rows = {report.impl_name(r): r for r in records}
    assert list(rows) == [
        "scan", "flax nnx.RNN", "flax nnx.RNN:unroll=8", "flax_loss:scan",
        "flax_loss:nnx_scan", "flax nnx.RNN:again",
    ]  # fmt: skip
    _agree(rows, list(rows)[1:])
    # The same program twice: the same numbers.
    assert rows["flax nnx.RNN"]["max_rel_diff"] == rows["flax nnx.RNN:again"]["max_rel_diff"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "argument --preset: expected one of checkpoints, flax, got 'nope'"),
        (
            ["--evaluations", "--cell", "lstm", "--scenarios", "rnn_loss"],
            "argument --evaluations: counts the body evaluations of the article's rnn_loss, "
            "got --cell lstm",
        ),
        (["--preset", "checkpoints", "--cell", "lstm"], "argument --evaluations"),
    ],
)
def test_bad_presets_and_evaluations_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
