"""Markdown from the committed results: ``bench/RESULTS.md`` and the README's decision table.

``loopgrad-bench report DIR [--out FILE] [--readme README.md] [--check]`` reads every
``*.json`` file in DIR. The results document, as plain Python::

  for path in sorted(DIR.glob("*.json")):
    a heading with the file's name; the machine, versions, commit, date and command
    one table row per record, sorted by (scenario, T, sizes, JAX before its peers, name)

Files written by ``loopgrad-bench`` (``{"meta", "records"}``, records with
:data:`BENCH_KEYS`) are rendered whole; those of ``loopgrad-bench as-written-grid`` (the
as-written methods over a grid of sizes) one row per point rather than per record. Any
other file is listed under "Not rendered" with what its records lack.

The decision table is :data:`DECISIONS`, one :class:`Situation` per row, each naming
the file, scenario and length its figure comes from and which loop kinds to compare
(``None``: every JAX loop kind the case measured). A missing file or record raises
:class:`MissingResult`, naming it: no figure is ever left blank. The figures quote
recorded numbers only (medians, their 95% intervals, the recorded speedups over the
peers); a ratio of two JAX loop kinds is the ratio of their medians, and is marked when
their intervals overlap. Output is deterministic: the same files give the same text.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from loopgrad_jax.bench import as_written_grid, report

#: The lines around the README's decision table; ``--readme`` rewrites what lies between.
START = "<!-- decision-table:start -->"
END = "<!-- decision-table:end -->"

#: The command that regenerates both documents from the repository's root.
COMMAND = "loopgrad-bench report bench/results --out bench/RESULTS.md --readme README.md"

#: Keys every record of a ``loopgrad-bench`` file has (``run.RECORD_KEYS`` holds them all).
BENCH_KEYS: tuple[str, ...] = ("scenario", "loop", "framework", "peer", "length", "run_s_median")

_SIZES = ("batch", "input", "hidden")
_SIZE_LABELS = {"batch": "B", "input": "I", "hidden": "H"}


class MissingResult(ValueError):
    """A file or record that the decision table needs is not in the results folder."""


# --- Reading ---------------------------------------------------------------------------


def load(folder: str | os.PathLike) -> dict[str, Any]:
    """Every ``*.json`` file in ``folder``, parsed, by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No results folder {str(folder)!r}: pass the folder of *.json.")
    files = {}
    for path in sorted(folder.glob("*.json")):
        try:
            files[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from None
    return files


def _kind(data: Any) -> tuple[str, str]:
    """``("bench" | "other", why not rendered)`` of one parsed file."""
    if not (
        isinstance(data, dict)
        and isinstance(data.get("meta"), dict)
        and isinstance(data.get("records"), list)
        and all(isinstance(r, dict) for r in data["records"])
    ):
        return "other", 'not a {"meta": {...}, "records": [...]} file'
    records = data["records"]
    if not records:
        return "other", "it holds no records"
    if all(all(k in r for k in BENCH_KEYS) for r in records):
        return "bench", ""
    keys = ", ".join(sorted({k for r in records for k in r}))
    return "other", (
        f"its records are not loopgrad-bench's (they lack one of {', '.join(BENCH_KEYS)}): "
        f"they hold {keys}{_nested(records)}"
    )


def _nested(records: Sequence[Mapping]) -> str:
    """``; its timings are nested under forward, reverse``, where they are."""
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, dict)})
    return f"; its timings are nested under {', '.join(keys)}" if keys else ""


def _tool(meta: Mapping) -> str:
    """The tool that wrote a file: ``cell_profile`` from ``python -m ....cell_profile``."""
    words = str(meta.get("command") or "").split()
    for word in words:
        if word.startswith("loopgrad_jax.bench."):
            return word.rsplit(".", 1)[1]
    return words[0] if words else "an unrecorded command"


# --- The results document ----------------------------------------------------------------


class Row(NamedTuple):
    """One table row, in the fields it is sorted and printed by."""

    scenario: str
    length: int
    sizes: tuple  # (batch, input, hidden)
    rank: int  # 0: a JAX row, 1: a peer
    impl: str
    median: float | None
    ci: Sequence[float] | None
    memory: int | None
    speedup: str
    skipped: str | None
    other_cores: float | None


def _scenario(record: Mapping) -> str:
    """``rnn_loss``, or ``rnn_module (lstm, 2 layers, bidirectional)``."""
    cell, layers = record.get("cell"), record.get("layers") or 1
    parts = [cell] if cell not in (None, "article") else []
    parts += [f"{layers} layers"] * (layers > 1) + ["bidirectional"] * bool(
        record.get("bidirectional")
    )
    return record["scenario"] + (f" ({', '.join(parts)})" if parts else "")


def _impl(record: Mapping) -> str:
    """``report.impl_name``, and the precision of a reduced-precision row (``scan bf16``)."""
    return " ".join(filter(None, (report.impl_name(record), record.get("precision"))))


def _speedups(pairs: Mapping[str, Sequence[float]]) -> str:
    return ", ".join(f"{peer} {_ratio(v)}" for peer, v in sorted(pairs.items()))


def _bench_rows(records: Sequence[Mapping]) -> list[Row]:
    ratios = report.speedups(records)
    peers = {r["peer"]: report.impl_name(r) for r in records if r["framework"] != "jax"}
    return [
        Row(
            _scenario(r),
            r["length"],
            tuple(r.get(k) for k in _SIZES),
            int(r["framework"] != "jax"),
            _impl(r),
            r["run_s_median"],
            r.get("run_s_ci"),
            r.get("saved_bytes"),
            _speedups({peers.get(p, p): v for p, v in ratios.get(index, {}).items()}),
            r.get("skipped"),
            r.get("other_cores"),
        )
        for index, r in enumerate(records)
    ]


def _varying(rows: Sequence[Row]) -> list[int]:
    """The positions in ``Row.sizes`` that differ between rows of one scenario and length."""
    out = []
    for i in range(len(_SIZES)):
        seen: dict[tuple, set] = {}
        for row in rows:
            seen.setdefault((row.scenario, row.length), set()).add(row.sizes[i])
        if any(len(v) > 1 for v in seen.values()):
            out.append(i)
    return out


def _order(row: Row) -> tuple:
    sizes = tuple(-1 if s is None else s for s in row.sizes)
    return (row.scenario, row.length, sizes, row.rank, row.impl)


_TIME_UNITS = (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0))
_BYTE_UNITS = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30))


def _sig(value: float) -> str:
    """Three significant digits, never in exponent form: ``0.477``, ``81.6``, ``2,610``."""
    rounded = float(f"{value:.3g}")  # 999.6 rounds to 1000: written 1,000, not 1e+03
    if abs(rounded) >= 1000:
        return f"{rounded:,.0f}"
    return f"{value:.3g}"


def _unit(value: float, units: Sequence[tuple[str, float]]) -> tuple[str, float]:
    """The largest of ``units`` (ascending) that ``value`` fills, or the next one up where
    its three digits would round to 1000 (``0.996 MiB``, not ``1,020 KiB``)."""
    index = max([i for i, (_, scale) in enumerate(units) if value >= scale] or [0])
    if float(f"{value / units[index][1]:.3g}") >= 1000 and index + 1 < len(units):
        index += 1
    return units[index]


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    name, scale = _unit(value, _TIME_UNITS)
    return f"{_sig(value / scale)} {name}"


def _bytes(value: int | None) -> str:
    if value is None:
        return ""
    name, scale = _unit(value, _BYTE_UNITS)
    return f"{_sig(value / scale)} {name}"


def _ratio(values: Sequence[float]) -> str:
    """``81.6x [77.8-92.3]``: a recorded ratio and its 95% interval (none where ``nan``)."""
    value, low, high = values
    if math.isnan(low) or math.isnan(high):
        return f"{_sig(value)}x"
    return f"{_sig(value)}x [{_sig(low)}-{_sig(high)}]"


def _escape(text: str) -> str:
    """Text for a markdown table cell, read literally."""
    for char in "\\`*_<|":
        text = text.replace(char, "\\" + char)
    return text


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _time(median: float, ci: Sequence[float] | None) -> str:
    """``3.06 ms [2.68-3.14]``: the median and its 95% interval, in the median's unit."""
    if ci is None:
        return _seconds(median)
    name, scale = _unit(median, _TIME_UNITS)
    return f"{_sig(median / scale)} {name} [{_sig(ci[0] / scale)}-{_sig(ci[1] / scale)}]"


def _busy(other_cores: float | None) -> str:
    """The BUSY flag of ``report.format_table``: other processes' cores during the timing."""
    if (other_cores or 0) >= report.BUSY_CORES:
        return f"BUSY ({other_cores:.2g} cores)"
    return ""


def _commit(meta: Mapping) -> str | None:
    """The commit a file's run recorded, or ``None``."""
    git = meta.get("git")
    return git["commit"] if isinstance(git, dict) and git.get("commit") else None


def newest_commit(files: Mapping[str, Any]) -> str | None:
    """The commit of the most recently made file (the latest ``meta.date``): the code
    every other file is compared against. ``None`` when no file records one."""
    dated = [
        (str(data["meta"].get("date") or ""), commit)
        for data in files.values()
        if isinstance(data, dict)
        and isinstance(data.get("meta"), dict)
        and (commit := _commit(data["meta"]))
    ]
    return max(dated)[1] if dated else None


def _earlier(meta: Mapping, newest: str | None) -> str:
    """The flag of a file made at other code than the newest file (``""`` if none): its
    figures may not hold at the newest code, as a BUSY row's may not on a quiet machine."""
    commit = _commit(meta)
    if newest is None or commit is None or commit == newest:
        return ""
    return f"EARLIER CODE: made at {_code(commit[:12])}, the newest file at {_code(newest[:12])}"


def _header(meta: Mapping, newest: str | None = None) -> list[str]:
    """What ran, where, when: the lines above a file's table, and :func:`_earlier`'s flag
    against ``newest`` (:func:`newest_commit` of the files rendered beside it)."""
    versions = [f"jax {meta.get('jax') or 'not recorded'}"]
    if meta.get("jaxlib"):
        versions[0] += f" (jaxlib {meta['jaxlib']})"
    versions.append(f"torch {meta['torch']}" if meta.get("torch") else "torch not used")
    versions += [f"{name} {meta[name]}" for name in ("flax", "equinox") if meta.get(name)]
    commit = "not recorded"
    if recorded := _commit(meta):
        commit = _code(recorded[:12]) + (
            " with uncommitted changes" if meta["git"].get("modified") else ""
        )
    lines = [
        f"- machine: {_escape(str(meta.get('device') or 'not recorded'))}"
        + (f"; CPU {_escape(meta['cpu_model'])}" if meta.get("cpu_model") else ""),
        f"- versions: {_escape(', '.join(versions))}",
        f"- commit: {commit}; date: {_escape(str(meta.get('date') or 'not recorded'))}",
        f"- command: {_code(str(meta.get('command') or 'not recorded'))}",
    ]
    if meta.get("status") not in (None, "complete"):
        lines.append(f"- status: {_escape(str(meta['status']))} (the run did not finish)")
    if earlier := _earlier(meta, newest):
        lines.append(f"- {earlier}: re-run it before comparing its figures with the others")
    return lines


def render_file(name: str, data: Mapping, newest: str | None = None) -> list[str]:
    """One file's section of the results document: heading, header and table; ``newest``
    as for :func:`_header`."""
    kind, why = _kind(data)
    if kind == "other":
        raise ValueError(f"{name} cannot be rendered: {why}.")
    meta, records = data["meta"], data["records"]
    if as_written_grid.is_grid(records):
        return _grid_file(name, meta, records, newest)
    rows, memory = _bench_rows(records), "saved for backward"
    varying = _varying(rows)
    head = [
        "scenario",
        "T",
        *(_SIZE_LABELS[_SIZES[i]] for i in varying),
        "implementation",
        "run time, median [95% CI]",
        memory,
        "speedup vs peers [95% CI]",
        "busy",
    ]
    lines = [f"## {name}", "", *_header(meta, newest), ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---:" if h in ("T", "B", "I", "H") else "---" for h in head) + "|")
    body = []
    for row in rows:
        run = (
            f"skipped: {_escape(row.skipped)}"
            if row.skipped
            else _escape(_time(row.median, row.ci))
        )
        cells = [
            _code(row.scenario),
            str(row.length),
            *(str(row.sizes[i]) for i in varying),
            _code(row.impl),
            run,
            _bytes(row.memory),
            _escape(row.speedup),
            _busy(row.other_cores),
        ]
        body.append((_order(row), "| " + " | ".join(cells) + " |"))
    # Sorted by the row's fields, then its text: the records' order in the file is no key.
    return lines + [line for _, line in sorted(body)] + [""]


def _grid_file(
    name: str, meta: Mapping, records: Sequence[Mapping], newest: str | None = None
) -> list[str]:
    """A grid's section (``loopgrad-bench as-written-grid``): a row per point, sorted by
    its sizes: both methods' times, the faster, auto's pick and its time over the faster's."""
    points = sorted(
        as_written_grid.pairs(records), key=lambda p: as_written_grid.sizes_key(p["forward"])
    )
    timed = [p for p in points if not as_written_grid.skip_reason(p)]
    rechecked = sum("first_run" in p["forward"] for p in points)
    lines = [f"## {name}", "", *_header(meta, newest)]
    if timed:
        worst = max(p["forward"]["auto_over_faster"] for p in timed)
        lines.append(
            f"- {len(points)} points, {len(timed)} timed, {meta.get('dtype', 'float32')}: "
            f"auto's pick (by the run's `time_model`) at most {worst:.2f}x the faster "
            "method's time" + (f"; {rechecked} re-timed by `--recheck`" if rechecked else "")
        )
    head = ["I", "H", "B", "T", "forward [95% CI]", "reverse [95% CI]", "faster", "auto"]
    head += ["auto/faster", "busy"]
    lines += ["", "| " + " | ".join(head) + " |", "|---:|---:|---:|---:|---|---|---|---|---:|---|"]
    for point in points:
        forward = point["forward"]
        auto = as_written_grid.auto_method(point)
        sizes = [str(v) for v in as_written_grid.sizes_key(forward)]
        skipped = as_written_grid.skip_reason(point)
        if skipped:
            cells = [f"skipped: {_escape(skipped)}", "", "", _code(auto), "", ""]
        else:
            busy = _busy(forward["other_cores"])
            first = forward.get("first_run")
            if first:
                cores = f"{first['other_cores']:.2g}"
                busy += f"{'; ' * bool(busy)}re-timed (first run: {cores} other "
                busy += f"core{'s' * (cores != '1')} busy)"
            cells = [
                *(
                    _escape(_time(point[m]["run_s_median"], point[m]["run_s_ci"]))
                    for m in as_written_grid.METHODS
                ),
                _code(as_written_grid.faster_method(point)),
                _code(auto),
                f"{forward['auto_over_faster']:.2f}x",
                busy,
            ]
        lines.append("| " + " | ".join([*sizes, *cells]) + " |")
    return [*lines, ""]


def render_results(files: Mapping[str, Any]) -> str:
    """The results document (``bench/RESULTS.md``) of every file in ``files``."""
    lines = [
        "# Benchmark results",
        "",
        f"Generated from the JSON files in `bench/results/` by `{COMMAND}`; edit",
        "`loopgrad_jax/bench/results_doc.py` or the data, not this file. One section per file,",
        "in name order, its rows sorted by scenario, T, sizes, then JAX loop kinds before",
        "their peers.",
        "",
        "- scenario: as `loopgrad-bench` names it, with the cell, layers and direction of an",
        "  RNN other than the article's.",
        "- T: the loop's length; B, I, H (where they vary): batch, input and hidden sizes.",
        "- run time: the median seconds per call and the 95% bootstrap interval of the median.",
        "- saved for backward: what a JAX loop keeps for the backward pass (jax.vjp's",
        "  residuals) or a peer's: PyTorch's saved tensors, a JAX peer's residuals.",
        "- speedup vs peers: the peer's time over this row's (above 1: this row is faster),",
        "  with its 95% bootstrap interval, as the run recorded it.",
        f"- busy: BUSY when other processes kept at least {report.BUSY_CORES:g} cores busy",
        "  while the row's case was timed: its times are suspect.",
        "- EARLIER CODE, under a file's heading: the file was made at another commit than the",
        "  most recent file; the library may have changed since, so re-run it before",
        "  comparing its figures with the others'.",
        "- a grid of `loopgrad-bench as-written-grid`: a row per point (I, H, B, T), sorted by",
        "  them: each as-written method's run time, the faster, the method",
        '  `as_written_method="auto"` picks there and its time over the faster\'s.',
        "",
    ]
    other, newest = [], newest_commit(files)
    for name in sorted(files):
        kind, why = _kind(files[name])
        if kind == "other":
            meta = files[name].get("meta") if isinstance(files[name], dict) else None
            tool = f" (written by {_code(_tool(meta))})" if isinstance(meta, dict) else ""
            other.append(f"- {_code(name)}{tool}: {_escape(why)}.")
        else:
            lines += render_file(name, files[name], newest)
    if other:
        lines += ["## Not rendered", "", *other, ""]
    return "\n".join(lines)


# --- The decision table ------------------------------------------------------------------


class Case(NamedTuple):
    """Where a figure's records come from: one scenario at one length in one file.

    Only float32 rows count (no ``precision``), JAX's with the batch over ``devices``
    devices (PyTorch's peers run on one); the case must hold one set of sizes.
    """

    file: str
    scenario: str
    length: int
    method: str | None = None  # train_as_written's algorithm, "forward" or "reverse"
    devices: int = 1  # JAX rows with the batch split over this many devices

    def label(self) -> str:
        method = f" ({self.method} method)" if self.method else ""
        split = f" on {self.devices} devices" if self.devices > 1 else ""
        return f"{self.scenario}{method} at T={self.length}{split}"


class Figure(NamedTuple):
    """What one row's figure settled on."""

    loop: str  # the loop kind it is about; fills a Situation's "{loop}"
    text: str  # markdown
    files: tuple[str, ...]  # where its numbers come from
    busy: bool  # some record it quotes was timed on a busy machine


def _records(files: Mapping[str, Any], case: Case) -> list[dict]:
    """The records of ``case``; raises :class:`MissingResult` if there are none."""
    if case.file not in files:
        raise MissingResult(
            f"The decision table needs {case.file}, which is not among the results files; "
            "add it, or edit results_doc.DECISIONS."
        )
    kind, why = _kind(files[case.file])
    if kind != "bench":
        raise MissingResult(f"{case.file} is not a loopgrad-bench results file ({why}).")
    rows = [
        r
        for r in files[case.file]["records"]
        if r["scenario"] == case.scenario
        and r["length"] == case.length
        and r.get("method") == case.method
        and (r.get("devices") or 1) == (case.devices if r["framework"] == "jax" else 1)
        and not r.get("precision")
    ]
    if not rows:
        raise MissingResult(f"{case.file} has no record of {case.label()}.")
    sizes = {tuple(r.get(k) for k in (*_SIZES, "cell", "layers")) for r in rows}
    if len(sizes) > 1:
        raise ValueError(
            f"{case.file} holds {case.label()} at {len(sizes)} sets of sizes; a Case needs one."
        )
    return rows


def _jax(rows: Sequence[dict], case: Case, loops: Sequence[str] | None) -> list[dict]:
    """The timed JAX records whose loop matches one of ``loops`` (fnmatch patterns; None:
    every one), fastest first; raises :class:`MissingResult` if there are none."""
    found = [
        r
        for r in rows
        if r["framework"] == "jax"
        and (loops is None or any(fnmatch.fnmatchcase(r["loop"], p) for p in loops))
    ]
    timed = [r for r in found if r["run_s_median"] and not r.get("skipped")]
    if not timed:
        which = "JAX loop kind" if loops is None else " or ".join(map(repr, loops))
        skipped = "".join(
            f"; {r['loop']!r} was skipped: {r['skipped']}" for r in found if r.get("skipped")
        )
        raise MissingResult(f"{case.file} has no timed {which} record of {case.label()}{skipped}.")
    return sorted(timed, key=lambda r: (r["run_s_median"], r["loop"]))


def _one(rows: Sequence[dict], case: Case, loop: str) -> dict:
    return next(r for r in _jax(rows, case, (loop,)) if r["loop"] == loop)


def _context(case: Case, rows: Sequence[Mapping]) -> str:
    """``rnn_loss, lstm, T=1000, I=64, H=256, B=32``: what a figure measured."""
    first = rows[0]
    parts = [_code(case.scenario) + (f" ({case.method} method)" if case.method else "")]
    if first.get("cell") not in (None, "article"):
        parts.append(str(first["cell"]))
    parts.append(f"T={case.length}")
    parts += [f"{_SIZE_LABELS[k]}={first[k]}" for k in ("input", "hidden", "batch") if first.get(k)]
    if case.devices > 1:
        parts.append(f"the batch split over {case.devices} devices")
    return ", ".join(parts) + ": "


def _ties(best: Mapping, others: Sequence[Mapping]) -> str:
    """``; `fori` within its interval``: the loop kinds not clearly slower than ``best``."""
    close = [
        _code(r["loop"])
        for r in others
        if r is not best and report._overlap(r.get("run_s_ci"), best.get("run_s_ci"))
    ]
    return f"; {', '.join(close)} within its interval" if close else ""


def _is_busy(*records: Mapping) -> bool:
    return any((r.get("other_cores") or 0) >= report.BUSY_CORES for r in records)


def _vs(record: Mapping, baseline: Mapping, *, seconds: bool = True) -> str:
    """``0.477x `scan`'s time (28.7 ms)``: a ratio of medians, and whether the two
    intervals overlap (then neither is clearly faster)."""
    ratio = record["run_s_median"] / baseline["run_s_median"]
    notes = [_seconds(baseline["run_s_median"])] * seconds
    if report._overlap(record.get("run_s_ci"), baseline.get("run_s_ci")):
        notes.append("intervals overlap")
    text = f"{_sig(ratio)}x {_code(baseline['loop'])}'s time"
    return text + (f" ({'; '.join(notes)})" if notes else "")


class AgainstPeers(NamedTuple):
    """The fastest of ``loops`` with its recorded speedups over ``peers`` (None: all)."""

    case: Case
    loops: tuple[str, ...] | None = None
    peers: tuple[str, ...] | None = None
    mention_fastest: bool = False  # name a faster JAX loop kind of the case, if any

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        rows = _records(files, self.case)
        candidates = _jax(rows, self.case, self.loops)
        best = candidates[0]
        measured = {r["peer"]: r for r in rows if r["framework"] != "jax" and r["run_s_median"]}
        vs = best.get("vs_torch") or {}
        wanted = sorted(vs) if self.peers is None else self.peers
        missing = [p for p in wanted if p not in vs or p not in measured]
        if missing or not wanted:
            raise MissingResult(
                f"{self.case.file} records no speedup of {best['loop']!r} over "
                f"{', '.join(missing) or 'any peer'} for {self.case.label()}."
            )
        text = (
            _context(self.case, rows)
            + (f"{_code(best['loop'])} {_time(best['run_s_median'], best.get('run_s_ci'))}; ")
            + (
                ", ".join(
                    f"{_ratio(vs[p])} vs {report.impl_name(measured[p])} "
                    f"({_seconds(measured[p]['run_s_median'])})"
                    for p in wanted
                )
            )
        )
        text += _ties(best, candidates)
        quoted = [best, *(measured[p] for p in wanted)]
        fastest = _jax(rows, self.case, None)[0]
        if self.mention_fastest and fastest is not best:
            text += (
                f"; fastest here: {_code(fastest['loop'])} {_seconds(fastest['run_s_median'])}, "
                f"{_vs(fastest, best, seconds=False)}"
            )
            quoted.append(fastest)
        return Figure(best["loop"], text, (self.case.file,), _is_busy(*quoted))


class FastestVsLoop(NamedTuple):
    """The fastest of ``loops`` (None: every JAX loop kind) against ``baseline``'s time."""

    case: Case
    loops: tuple[str, ...] | None
    baseline: str = "scan"

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        rows = _records(files, self.case)
        candidates = _jax(rows, self.case, self.loops)
        best = candidates[0]
        base = _one(rows, self.case, self.baseline)
        text = _context(self.case, rows)
        text += f"{_code(best['loop'])} {_time(best['run_s_median'], best.get('run_s_ci'))}"
        if best is base:
            others = [r for r in _jax(rows, self.case, None) if r is not base]
            if others:
                text += f", the fastest; next {_code(others[0]['loop'])} at {_vs(others[0], base)}"
            return Figure(best["loop"], text, (self.case.file,), _is_busy(best, *others[:1]))
        text += f", {_vs(best, base)}" + _ties(best, [r for r in candidates if r is not base])
        return Figure(best["loop"], text, (self.case.file,), _is_busy(best, base))


class MemoryVsLoop(NamedTuple):
    """What each of ``loops`` keeps for backward against ``baseline``, and at what time."""

    case: Case
    loops: tuple[str, ...]
    baseline: str = "scan"

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        rows = _records(files, self.case)
        base = _one(rows, self.case, self.baseline)
        picked = [_one(rows, self.case, loop) for loop in self.loops]
        for r in (base, *picked):
            if r.get("saved_bytes") is None:
                raise MissingResult(
                    f"{self.case.file}'s {r['loop']!r} record of {self.case.label()} "
                    "has no saved_bytes."
                )
        parts = [
            f"{_code(r['loop'])} keeps {_bytes(r['saved_bytes'])} in {_vs(r, base)}"
            for r in sorted(picked, key=lambda r: (r["saved_bytes"], r["loop"]))
        ]
        text = (
            _context(self.case, rows)
            + "; ".join(parts)
            + f"; {_code(base['loop'])} keeps {_bytes(base['saved_bytes'])} for backward"
        )
        loop = min(picked, key=lambda r: (r["saved_bytes"], r["loop"]))["loop"]
        return Figure(loop, text, (self.case.file,), _is_busy(base, *picked))


class CompileAndRun(NamedTuple):
    """``loop`` against ``baseline``: time to trace and compile, then time per call."""

    case: Case
    loop: str = "python"
    baseline: str = "scan"

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        rows = _records(files, self.case)
        mine, base = _one(rows, self.case, self.loop), _one(rows, self.case, self.baseline)
        for r in (mine, base):
            if r.get("compile_s") is None or r.get("lower_s") is None:
                raise MissingResult(
                    f"{self.case.file}'s {r['loop']!r} record of {self.case.label()} "
                    "has no lower_s or compile_s."
                )
        setup = [r["lower_s"] + r["compile_s"] for r in (mine, base)]
        text = _context(self.case, rows) + (
            f"{_code(mine['loop'])} took {_seconds(setup[0])} to trace and compile, "
            f"{_sig(setup[0] / setup[1])}x {_code(base['loop'])}'s ({_seconds(setup[1])}), "
            f"then ran {_seconds(mine['run_s_median'])} a call, {_vs(mine, base)}"
        )
        return Figure(mine["loop"], text, (self.case.file,), _is_busy(mine, base))


class StandIn(NamedTuple):
    """``wanted``'s figure or, while the results hold none, ``instead``'s, labelled with
    ``why``: the figure the row should show and where it should come from."""

    wanted: Callable[[Mapping[str, Any]], Figure]
    instead: Callable[[Mapping[str, Any]], Figure]
    why: str

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        try:
            return self.wanted(files)
        except MissingResult:
            got = self.instead(files)
            return got._replace(text=f"stand-in: {self.why}. {got.text}")


class Several(NamedTuple):
    """Figures side by side in one cell, a line each."""

    parts: tuple[Callable[[Mapping[str, Any]], Figure], ...]

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        got = [figure(files) for figure in self.parts]
        return Figure(
            " / ".join(dict.fromkeys(f.loop for f in got)),
            "<br>".join(f.text for f in got),
            tuple(dict.fromkeys(name for f in got for name in f.files)),
            any(f.busy for f in got),
        )


class FastestOf(NamedTuple):
    """The figure of whichever of ``parts`` has the fastest JAX loop kind (e.g. the same
    module per step and layer by layer)."""

    parts: tuple[AgainstPeers, ...]

    def __call__(self, files: Mapping[str, Any]) -> Figure:
        def best(part: AgainstPeers) -> float:
            return _jax(_records(files, part.case), part.case, part.loops)[0]["run_s_median"]

        return min(self.parts, key=best)(files)


class Situation(NamedTuple):
    """One row of the decision table."""

    situation: str
    pick: str  # the loop kind to pick; "{loop}" stands for the one the figure settled on
    figure: Callable[[Mapping[str, Any]], Figure]


def _against_fused_modules(devices: int) -> Several:
    """Each of PyTorch's cells at T=1000 beside its fused module, per step or layer by
    layer, whichever is faster, with the batch over ``devices`` devices."""
    return Several(
        tuple(
            FastestOf(
                tuple(
                    AgainstPeers(
                        Case(f"cpu_{cell}.json", scenario, 1000, devices=devices), None, (peer,)
                    )
                    for scenario in ("rnn_loss", "rnn_loss_hoisted")
                )
            )
            for cell, peer in (("rnn_tanh", "nn.RNN"), ("lstm", "nn.LSTM"), ("gru", "nn.GRU"))
        )
    )


#: The decision table, row by row. Edit here when the committed files change: each
#: figure names its file, scenario and length; ``loops=None`` compares every JAX loop
#: kind the case measured, so a re-made file with other kinds needs no edit.
DECISIONS: tuple[Situation, ...] = (
    Situation(
        "Default: a gradient through a loop of fixed length",
        '`loop="scan"`',
        Several(
            (
                AgainstPeers(
                    Case("cpu_article.json", "rnn_loss", 1000),
                    loops=("scan",),
                    peers=("eager", "nn.RNN"),
                    mention_fastest=True,
                ),
                AgainstPeers(
                    Case("cpu_large.json", "rnn_loss", 1000),
                    loops=("scan",),
                    peers=("eager", "nn.RNN"),
                    mention_fastest=True,
                ),
            )
        ),
    ),
    Situation(
        "Memory-bound: the loop's residuals do not fit",
        "`remat`, `remat:chunk=K`, or `remat:checkpoints=C` for at most C carries",
        MemoryVsLoop(Case("cpu_remat.json", "rnn_loss", 1000), ("remat", "remat:chunk=10")),
    ),
    Situation(
        "Length known only at run time",
        '`loop="while:max_steps=N"` (a bounded scan; plain `while` has no reverse mode)',
        FastestVsLoop(Case("cpu_article.json", "rnn_loss", 1000), ("while:max_steps=*",)),
    ),
    Situation(
        "GPU",
        "`{loop}`",
        FastestVsLoop(Case("gpu_large.json", "rnn_loss", 1000), None),
    ),
    Situation(
        "PyTorch's nn.RNN, nn.LSTM, nn.GRU at I=64, H=256, B=32",
        "`{loop}`, per step (`rnn_loss`) or layer by layer (`rnn_loss_hoisted`: "
        "`hoist_input=True`, `lg.rnn`), whichever the figure names",
        _against_fused_modules(devices=1),
    ),
    Situation(
        "A batch of 2 or more on a CPU with several cores",
        "`{loop}` with `mesh=` over virtual CPU devices, one per core "
        '(`jax.config.update("jax_num_cpu_devices", n)`): one step\'s small products '
        "keep one core busy, so split examples run side by side",
        _against_fused_modules(devices=2),
    ),
    Situation(
        "Training the article's per-step loop",
        '`mode="as_written"`, `as_written_method="forward"`, `loop="{loop}"`',
        AgainstPeers(
            Case("cpu_as_written.json", "train_as_written", 1000, "forward"), None, ("rtrl",)
        ),
    ),
    Situation(
        "The Python loop",
        "`python` only to debug short loops; never under `jit` for long T: it unrolls, so "
        "compile time grows with T",
        CompileAndRun(Case("cpu_article.json", "rnn_loss", 100), "python", "scan"),
    ),
)


def _source(name: str, meta: Mapping, link: str) -> str:
    """E.g. ``[cpu_article.json](bench/results/cpu_article.json), cpu: ..., `c18e32eab01e`,
    2026-11-27``."""
    commit = "commit not recorded"
    if recorded := _commit(meta):
        commit = _code(recorded[:12]) + ("+changes" if meta["git"].get("modified") else "")
    date = str(meta.get("date") or "date not recorded")[:10]
    device = _escape(str(meta.get("device") or "machine not recorded"))
    return f"[{name}]({link}/{name}), {device}, {commit}, {date}"


def render_table(
    files: Mapping[str, Any],
    link: str = "bench/results",
    results: str = "bench/RESULTS.md",
    decisions: Sequence[Situation] = DECISIONS,
) -> str:
    """The decision table, markdown, between (not including) the marker lines.

    ``link`` and ``results``: the results folder and the results document, relative to
    the document the table goes in.
    """
    lines = [
        f"<!-- generated by `{COMMAND}` from the files it cites; edit "
        "loopgrad_jax/bench/results_doc.py (DECISIONS), not this table -->",
        "| situation | pick | current figure | source |",
        "|---|---|---|---|",
    ]
    newest = newest_commit(files)
    for row in decisions:
        figure = row.figure(files)
        text = figure.text + (" (BUSY: timed on a busy machine)" if figure.busy else "")
        earlier = dict.fromkeys(
            e for n in figure.files if (e := _earlier(files[n]["meta"], newest))
        )
        text += "".join(f" ({e})" for e in earlier)
        sources = "; ".join(_source(n, files[n]["meta"], link) for n in figure.files)
        pick = row.pick.replace("{loop}", figure.loop)
        lines.append(f"| {_escape(row.situation)} | {pick} | {text} | {sources} |")
    lines += [
        "",
        "Times: medians, with their 95% intervals in brackets. `Nx vs peer`: the peer's time",
        "over the JAX loop's (above 1: JAX is faster), with the 95% interval the run recorded.",
        '`Nx scan\'s time`: a ratio of medians ("intervals overlap": neither is clearly',
        "faster). EARLIER CODE: the figure's file was made at another commit than the most",
        "recent file, so the library may have changed since it was measured. Every file's",
        f"full table: [{results}]({results}).",
    ]
    return "\n".join(lines)


def rewrite_block(text: str, table: str, path: str = "README.md") -> str:
    """``text`` with what lies between the :data:`START` and :data:`END` lines replaced."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(
            f"{path} needs one {START!r} line and, after it, one {END!r} line around the "
            f"decision table; found {len(starts)} and {len(ends)}."
        )
    return "\n".join([*lines[: starts[0] + 1], table, *lines[ends[0] :]])


# --- Command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopgrad-bench report",
        description="Markdown from the committed JSON results: the results document and the "
        "README's decision table.",
        epilog=f"Regenerate both: {COMMAND}",
    )
    parser.add_argument("folder", metavar="DIR", help="the folder of *.json results")
    parser.add_argument("--out", metavar="FILE", help="write the results document here")
    parser.add_argument(
        "--readme",
        metavar="FILE",
        help=f"rewrite the decision table between {START} and {END} in this file",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if --out or --readme differ from what the data gives",
    )
    return parser


def documents(
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    readme: str | os.PathLike | None = None,
) -> dict[Path, str]:
    """What ``--out`` and ``--readme`` should hold, by path: the results document, and
    ``readme``'s text with its decision table regenerated from ``folder``."""
    files = load(folder)
    texts = {}
    if out is not None:
        texts[Path(out)] = render_results(files)
    if readme is not None:
        readme = Path(readme)
        # Links relative to the README; the results document lives beside the folder
        # (bench/RESULTS.md), wherever --out writes.
        results, here = Path(folder).resolve(), readme.resolve().parent
        table = render_table(
            files,
            Path(os.path.relpath(results, here)).as_posix(),
            Path(os.path.relpath(results.parent / "RESULTS.md", here)).as_posix(),
        )
        texts[readme] = rewrite_block(readme.read_text(), table, str(readme))
    return {path: text.rstrip("\n") + "\n" for path, text in texts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``loopgrad-bench report``: returns 0, 1 if ``--check`` found a stale document, 2 on
    bad arguments or missing data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check and not (args.out or args.readme):
        parser.error("--check needs --out or --readme")
    try:
        if not (args.out or args.readme):
            print(render_results(load(args.folder)))
            return 0
        texts = documents(args.folder, args.out, args.readme)
    except (OSError, ValueError) as error:
        print(f"loopgrad-bench report: {error}", file=sys.stderr)
        return 2
    stale = [path for path, text in texts.items() if not path.exists() or path.read_text() != text]
    if args.check:
        if stale:
            print(
                f"out of date: {', '.join(map(str, stale))}; regenerate with {COMMAND}",
                file=sys.stderr,
            )
        return int(bool(stale))
    for path in stale:
        path.write_text(texts[path])
    return 0
