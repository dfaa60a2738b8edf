"""bench/RESULTS.md and the README's decision table agree with the committed JSON results.

Every figure a test expects is computed here from the JSON files themselves.
"""

import copy
import random
import re
from pathlib import Path

import pytest

from loopgrad_jax.bench import as_written_grid, report, results_doc
from loopgrad_jax.bench.results_doc import Case

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def files():
    return results_doc.load(RESULTS)


def _bench_files(files):
    return {n: d for n, d in files.items() if results_doc._kind(d)[0] == "bench"}


def _timed_jax(record):
    return record["framework"] == "jax" and record["run_s_median"] and not record["skipped"]


def _rows(data):
    """What a file's table has a row for: a record, or a grid's point (its forward record)."""
    if as_written_grid.is_grid(data["records"]):
        return [point["forward"] for point in as_written_grid.pairs(data["records"])]
    return data["records"]


def _section(document, name):
    """The lines of ``name``'s section of the results document."""
    return document.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0].splitlines()


def test_committed_documents_match_the_data():
    texts = results_doc.documents(RESULTS, ROOT / "bench" / "RESULTS.md", ROOT / "README.md")
    for path, want in texts.items():
        assert path.read_text() == want, (
            f"{path.relative_to(ROOT)} disagrees with bench/results/*.json; regenerate it: "
            f"{results_doc.COMMAND}"
        )


def test_every_file_is_rendered_or_listed_with_a_reason(files):
    document = results_doc.render_results(files)
    listed = document.split("## Not rendered\n", 1)[-1]
    for name, data in files.items():
        kind, why = results_doc._kind(data)
        if kind == "other":
            assert f"- `{name}`" in listed and why.split(":")[0] in listed.replace("\\", "")
        else:
            section = _section(document, name)
            rows = [line for line in section if re.match(r"\| (`|\d)", line)]
            assert len(rows) == len(_rows(data)), name
            assert f"- command: `{data['meta']['command']}`" in section


def test_headers_name_machine_versions_and_commit(files):
    document = results_doc.render_results(files)
    for name, data in _bench_files(files).items():
        meta = data["meta"]
        head = "\n".join(_section(document, name)[:6])
        assert meta["device"] in head and f"jax {meta['jax']}" in head
        assert (f"torch {meta['torch']}" if meta.get("torch") else "torch not used") in head
        assert meta["git"]["commit"][:12] in head and meta["date"] in head
        assert ("uncommitted changes" in head) == meta["git"]["modified"]


def test_rows_quote_the_recorded_time_saved_bytes_and_speedups(files):
    name, data = next(
        (n, d)
        for n, d in _bench_files(files).items()
        if any(_timed_jax(r) and r.get("vs_torch") and r["saved_bytes"] for r in d["records"])
    )
    record = next(
        r
        for r in data["records"]
        if _timed_jax(r) and r.get("vs_torch") and r["saved_bytes"] and not r.get("method")
    )
    median, (low, high) = record["run_s_median"], record["run_s_ci"]
    unit, scale = results_doc._unit(median, results_doc._TIME_UNITS)
    time = f"{median / scale:.3g} {unit} [{low / scale:.3g}-{high / scale:.3g}]"
    line = next(
        line
        for line in _section(results_doc.render_results({name: data}), name)
        if line.startswith(f"| `{record['scenario']}` | {record['length']} |")
        and f"| `{record['loop']}` |" in line
    )
    assert time in line
    assert results_doc._bytes(record["saved_bytes"]) in line
    for peer, ratio in record["vs_torch"].items():
        assert f"torch {peer} {results_doc._ratio(ratio)}" in line


def test_busy_rows_are_flagged(files):
    def check(name, data):
        busy = [r for r in _rows(data) if (r["other_cores"] or 0) >= report.BUSY_CORES]
        document = results_doc.render_results({name: data})
        flagged = [line for line in _section(document, name) if "BUSY (" in line]
        assert len(flagged) == len(busy), name
        return len(busy)

    for name, data in _bench_files(files).items():
        check(name, data)
    # A quiet sitting may leave no BUSY record: flag one of a real file's and count again.
    name, data = next(iter(_bench_files(files).items()))
    records = copy.deepcopy(data["records"])
    next(r for r in records if r["run_s_median"] and not r["other_cores"])["other_cores"] = 1.5
    assert check(name, {**data, "records": records}) == check(name, data) + 1


def test_the_busy_threshold_is_report_py_s(files):
    name, data = next(iter(_bench_files(files).items()))
    record = next(r for r in data["records"] if _timed_jax(r))
    below, at = copy.deepcopy(record), copy.deepcopy(record)
    below["other_cores"], below["length"] = report.BUSY_CORES * 0.9, 1
    at["other_cores"], at["length"] = report.BUSY_CORES, 2
    lines = _section(
        results_doc.render_results({name: {"meta": data["meta"], "records": [below, at]}}), name
    )
    rows = [line for line in lines if line.startswith("| `")]
    assert "BUSY" not in rows[0] and f"BUSY ({report.BUSY_CORES:.2g} cores)" in rows[1]


def test_output_is_deterministic(files):
    shuffled = {}
    rng = random.Random(0)
    for name in reversed(list(files)):
        data = copy.deepcopy(files[name])
        if isinstance(data.get("records"), list):
            rng.shuffle(data["records"])
        shuffled[name] = data
    assert results_doc.render_results(shuffled) == results_doc.render_results(files)
    assert results_doc.render_table(shuffled) == results_doc.render_table(files)
    assert results_doc.documents(RESULTS, "x.md") == results_doc.documents(RESULTS, "x.md")


def test_numbers_never_use_exponents(files):
    document = results_doc.render_results(files) + results_doc.render_table(files)
    assert not re.search(r"\de[+-]\d", document)


@pytest.mark.parametrize("row", results_doc.DECISIONS, ids=lambda row: row.situation)
def test_a_missing_file_is_named(files, row):
    for name in row.figure(files).files:
        without = {n: d for n, d in files.items() if n != name}
        with pytest.raises(results_doc.MissingResult, match=re.escape(name)):
            results_doc.render_table(without)


def _a_case(files, *, kinds=1):
    """A file, case and its timed JAX records: the first case with scan and ``kinds``
    other timed JAX loop kinds, at one set of sizes."""
    for name, data in _bench_files(files).items():
        for record in data["records"]:
            if record["loop"] != "scan" or not _timed_jax(record) or record.get("devices", 1) > 1:
                continue
            case = Case(name, record["scenario"], record["length"], record.get("method"))
            try:
                rows = results_doc._records(files, case)
            except ValueError:
                continue
            timed = [r for r in rows if _timed_jax(r)]
            if len(timed) > kinds:
                return case, timed
    raise AssertionError(f"no committed case has scan and {kinds} other JAX loop kinds")


def test_a_missing_record_is_named(files):
    case, timed = _a_case(files)
    loop = next(r["loop"] for r in timed if r["loop"] != "scan")
    figure = results_doc.FastestVsLoop(case, (loop,))
    assert figure(files).loop == loop
    data = copy.deepcopy(files[case.file])
    data["records"] = [r for r in data["records"] if not (r in timed and r["loop"] == loop)]
    with pytest.raises(results_doc.MissingResult, match=rf"{re.escape(case.file)}.*'{loop}'"):
        figure({**files, case.file: data})
    longer = case._replace(length=max(r["length"] for r in data["records"]) + 1)
    with pytest.raises(results_doc.MissingResult, match=f"T={longer.length}"):
        results_doc.FastestVsLoop(longer, None)(files)
    with pytest.raises(results_doc.MissingResult, match="no-such-peer"):
        results_doc.AgainstPeers(case, ("scan",), ("no-such-peer",))(files)


def test_a_skipped_record_is_missing_and_says_why(files):
    name, record = next(
        (n, r)
        for n, d in _bench_files(files).items()
        for r in d["records"]
        if r["framework"] == "jax" and r["skipped"] and (r.get("devices") or 1) == 1
    )
    case = Case(name, record["scenario"], record["length"], record.get("method"))
    with pytest.raises(results_doc.MissingResult, match=re.escape(record["skipped"])):
        results_doc.FastestVsLoop(case, (record["loop"],))(files)


def test_the_fastest_loop_kind_is_picked_from_the_data(files):
    case, timed = _a_case(files, kinds=2)
    fastest = min(timed, key=lambda r: r["run_s_median"])
    row = results_doc.Situation("test", "`{loop}`", results_doc.FastestVsLoop(case, None))
    assert f"| `{fastest['loop']}` |" in results_doc.render_table(files, decisions=[row])
    slowest = max(timed, key=lambda r: r["run_s_median"])
    data = copy.deepcopy(files[case.file])
    for r in data["records"]:
        if r == slowest:
            r["run_s_median"] = fastest["run_s_median"] / 2
            r["run_s_ci"] = [fastest["run_s_median"] / 3, fastest["run_s_median"] / 1.5]
    table = results_doc.render_table({**files, case.file: data}, decisions=[row])
    assert f"| `{slowest['loop']}` |" in table


def test_a_busy_figure_is_flagged(files):
    case, timed = _a_case(files)
    row = results_doc.Situation("test", "`{loop}`", results_doc.FastestVsLoop(case, ("scan",)))
    assert "BUSY" not in results_doc.render_table(files, decisions=[row]) or any(
        (r["other_cores"] or 0) >= report.BUSY_CORES for r in timed
    )
    data = copy.deepcopy(files[case.file])
    for r in data["records"]:
        if r["scenario"] == case.scenario and r["length"] == case.length and r["loop"] == "scan":
            r["other_cores"] = report.BUSY_CORES
    assert "BUSY" in results_doc.render_table({**files, case.file: data}, decisions=[row])


def _made_at(data, commit, date):
    data = copy.deepcopy(data)
    data["meta"]["git"] = {**(data["meta"].get("git") or {}), "commit": commit}
    data["meta"]["date"] = date
    return data


def test_the_newest_commit_is_the_latest_files(files):
    names = sorted(_bench_files(files))[:2]
    old, new = "a" * 40, "b" * 40
    both = {
        names[0]: _made_at(files[names[0]], new, "2100-01-02T00:00:00+00:00"),
        names[1]: _made_at(files[names[1]], old, "2100-01-01T00:00:00+00:00"),
    }
    assert results_doc.newest_commit(both) == new
    assert results_doc.newest_commit({}) is None


def test_a_figure_made_at_earlier_code_is_flagged(files):
    case, _ = _a_case(files)
    row = results_doc.Situation("test", "`{loop}`", results_doc.FastestVsLoop(case, ("scan",)))
    newest = results_doc.newest_commit(files)
    if results_doc._commit(files[case.file]["meta"]) == newest:
        assert "(EARLIER CODE" not in results_doc.render_table(files, decisions=[row])
    earlier = {**files, case.file: _made_at(files[case.file], "0" * 40, "1970-01-01")}
    table = results_doc.render_table(earlier, decisions=[row])
    assert f"(EARLIER CODE: made at `{'0' * 12}`, the newest file at `{newest[:12]}`)" in table
    section = _section(results_doc.render_results(earlier), case.file)
    assert any(line.startswith("- EARLIER CODE: made at `000000000000`") for line in section)
    # Made at the newest commit, it carries no flag.
    same = {**files, case.file: _made_at(files[case.file], newest, "1970-01-01")}
    assert "(EARLIER CODE" not in results_doc.render_table(same, decisions=[row])
    assert not any(
        "EARLIER CODE" in line for line in _section(results_doc.render_results(same), case.file)
    )


def test_a_stand_in_is_labelled(files):
    case, timed = _a_case(files)
    row = results_doc.StandIn(
        results_doc.FastestVsLoop(case, ("no-such-kind",)),
        results_doc.FastestVsLoop(case, ("scan",)),
        "why",
    )
    assert row(files).text.startswith("stand-in: why. ")


def test_a_grid_file_is_a_row_per_point(files):
    # `loopgrad-bench as-written-grid`'s files: both methods of a point on one row.
    grids = {n: d for n, d in files.items() if as_written_grid.is_grid(d["records"])}
    assert grids  # the committed calibration data and its check
    for name, data in grids.items():
        section = _section(results_doc.render_results({name: data}), name)
        points = as_written_grid.pairs(data["records"])
        timed = [p for p in points if not p["forward"]["skipped"]]
        worst = max(p["forward"]["auto_over_faster"] for p in timed)
        assert f"- {len(points)} points, {len(timed)} timed" in "\n".join(section)
        assert f"at most {worst:.2f}x" in "\n".join(section)
        rows = {}
        for line in section:
            if re.match(r"\| \d", line):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                rows[tuple(map(int, cells[:4]))] = cells[4:]
        assert list(rows) == sorted(rows) and len(rows) == len(points)
        for point in points:
            forward, reverse = point["forward"], point["reverse"]
            cells = rows[tuple(forward[k] for k in ("input", "hidden", "batch", "length"))]
            auto = f"`{'forward' if forward['auto'] else 'reverse'}`"
            if forward["skipped"]:
                reason = f"skipped: {results_doc._escape(forward['skipped'])}"
                assert cells == [reason, "", "", auto, "", ""]
                continue
            faster = f"`{'forward' if forward['faster'] else 'reverse'}`"
            times = [
                results_doc._escape(results_doc._time(r["run_s_median"], r["run_s_ci"]))
                for r in (forward, reverse)
            ]
            assert cells[:5] == [*times, faster, auto, f"{forward['auto_over_faster']:.2f}x"]
            assert ("re-timed (first run: " in cells[5]) == ("first_run" in forward)


def test_files_of_other_shapes_are_listed_not_rendered(files):
    meta = {"command": "python -m loopgrad_jax.bench.somewhere"}
    odd = {
        "a_profile.json": {"meta": meta, "records": [{"part": "forward", "run_s_median": 1.0}]},
        "b_ratio.json": {
            "meta": meta,
            "records": [{"setting": "s", "framework": "jax", "length": 3, "vs_new": [1, 1, 1]}],
        },
        "c_list.json": [1, 2],
    }
    listed = results_doc.render_results(odd).split("## Not rendered\n", 1)[1]
    assert "`a_profile.json` (written by `somewhere`)" in listed and "part" in listed
    assert "`b_ratio.json`" in listed and "setting" in listed
    assert "`c_list.json`" in listed


def test_the_readme_block_is_rewritten_in_place():
    text = f"# a\n\n{results_doc.START}\nold\n{results_doc.END}\n\nprose\n"
    new = results_doc.rewrite_block(text, "new")
    assert new == f"# a\n\n{results_doc.START}\nnew\n{results_doc.END}\n\nprose\n"
    assert results_doc.rewrite_block(new, "new") == new
    with pytest.raises(ValueError, match="decision-table:start"):
        results_doc.rewrite_block("# a\n", "new")


def test_the_command(tmp_path, capsys):
    from loopgrad_jax.bench import cli

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{results_doc.START}\n{results_doc.END}\n")
    out = tmp_path / "RESULTS.md"
    argv = ["report", str(RESULTS), "--out", str(out), "--readme", str(readme)]
    assert cli.main([*argv, "--check"]) == 1
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--check"]) == 0
    assert out.read_text() == (ROOT / "bench" / "RESULTS.md").read_text()
    assert "| situation | pick |" in readme.read_text()
    assert cli.main(["report", str(tmp_path / "absent")]) == 2
    assert "No results folder" in capsys.readouterr().err
