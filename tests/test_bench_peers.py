"""``loopgrad-bench --peers``: every peer a row of the one table, computing what JAX computes.

Nothing here times anything: the ratios live only in ``bench/results``.
"""

from __future__ import annotations

import json

import pytest

from loopgrad_jax.bench import cli, peers, report, torch_peers
from loopgrad_jax.bench.cases import Sizes

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


@pytest.mark.parametrize(
    ("name", "scenario", "sizes", "message"),
    [
        ("equinox", "rnn_loss", Sizes(3, 2, 3, 4, 3, cell="lstm"), "with the article cell"),
        ("nnx.RNN", "rnn_loss", Sizes(3, 2, 3, 4, 3, cell="gru"), "not rnn_loss with gru"),
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


@needs_torch
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
