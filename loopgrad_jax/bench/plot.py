"""The PNG of a run: per scenario, time per call beside the memory kept for backward.

Each scenario gets two panels side by side, every implementation in one colour
throughout the figure:

* time: seconds per call (``run_s_median``), whiskers its 95% interval (``run_s_ci``);
* memory: the bytes kept for the backward pass (``saved_bytes``: JAX's ``jax.vjp``
  residuals, PyTorch's saved tensors), "not measured" where the run has none (a batch
  split over devices).

Run at one length (and one size): horizontal bars, one per implementation, the fastest
on top (the as-written methods in a block each), the value written beside each bar. Run
at several lengths, or with ``--sweep``: lines over the length (or the swept size), on
log-log axes.

Colours: each JAX loop kind has a hue of its own (``scan`` is orange in every figure)
and its variants (``scan:unroll=8``, ``scan forward``, ``scan x2 devices``) shades of
it; PyTorch's peers are greys, Flax's browns. A record timed while other processes kept
:data:`~loopgrad_jax.bench.report.BUSY_CORES` or more cores busy is BUSY: a hatched bar
with a red label, or a red ring round the point. Skipped cases are absent. Compile times
and the executables' temp bytes are left to the table and the JSON.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from loopgrad_jax._loops import LOOPS, NNX_LOOPS
from loopgrad_jax.bench.report import BUSY_CORES, _bytes, _seconds, impl_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

#: One hue per JAX loop kind, in the order of ``LOOPS + NNX_LOOPS`` (tab10 without its
#: grey and brown, which the peers use, then darker hues); unknown kinds take the rest.
HUES = (
    "#1f77b4",  # python: blue
    "#ff7f0e",  # scan: orange
    "#2ca02c",  # fori: green
    "#d62728",  # remat: red
    "#9467bd",  # while: purple
    "#17becf",  # parallel: cyan
    "#bcbd22",  # nnx_scan: olive
    "#e377c2",  # nnx_fori: pink
    "#7b4173",  # nnx_remat: plum
    "#393b79",
    "#637939",
)
#: The peers' colour families, by framework: greys for PyTorch, browns for Flax, olive
#: for equinox.
PEER_COLORS = {"torch": "#666666", "flax": "#8c564b", "equinox": "#8a8a2e"}
_PEER_NAMES = {"torch": "PyTorch", "flax": "Flax", "equinox": "equinox"}
#: How far a family's variants mix its colour toward white (the first ones) or black
#: (the last ones), spread evenly over these two ranges: far enough from the colour and
#: from each other to tell apart, never so light that a line fades into the background.
_LIGHTER = (0.6, 0.25)
_DARKER = (-0.25, -0.6)
#: Line styles of the other sizes a sweep ran at (its lengths).
_DASHES = ("-", "--", ":", "-.")
_JAX_MARKERS = ("o", "s", "D", "P", "X", "h", "*")
_PEER_MARKERS = ("^", "v", "<", ">", "d", "p", "8")
_BUSY = "#c00000"
_DPI = 110
_AXIS_NAMES = {"length": "length T", "batch": "batch B", "hidden": "hidden H", "input": "input I"}
_SIZE_LETTERS = {"length": "T", "batch": "B", "input": "I", "hidden": "H"}
_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))
_BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("bytes", 1))
#: A bar panel turns logarithmic when its values span more than this factor (on a
#: linear one the short bars would vanish).
_LOG_SPAN = 30
#: The most columns a legend of lines has.
_LEGEND_COLUMNS = 7


def plot_records(
    records: Sequence[Mapping], path: str | os.PathLike, title: str, x: str = "length"
) -> None:
    """Writes the figure of ``records`` (see :func:`draw`) to ``path`` as a PNG.

    Raises:
      OSError: ``path`` cannot be written (its folder is missing or read-only).
    """
    figure = draw(records, title, x)
    try:
        figure.savefig(path, dpi=_DPI, format="png")
    except OSError as error:
        raise OSError(
            error.errno,
            f"Cannot write the plot to {os.fspath(path)!r}: {error.strerror or error}; "
            "give a path in a folder that exists and is writable.",
        ) from error


def draw(records: Sequence[Mapping], title: str, x: str = "length") -> Figure:
    """The figure of ``records``: a time and a memory panel per scenario.

    Args:
      records: the records of a run (:data:`loopgrad_jax.bench.run.RECORD_KEYS`).
      title: the figure's title (the machine and the sizes).
      x: the record key the lines run over when several values were run: ``"length"``,
        or the size a ``--sweep`` varied (``"batch"``, ``"hidden"``, ``"input"``).

    Returns:
      A matplotlib figure, not attached to pyplot. Each panel's ``gid`` is ``"time
      <scenario>"`` or ``"memory <scenario>"``; each bar's and line's ``gid`` is the
      implementation it draws, each BUSY ring's ``"BUSY"``.
    """
    from matplotlib.figure import Figure

    if x not in _AXIS_NAMES:
        raise ValueError(f"x must be one of {', '.join(_AXIS_NAMES)}, got {x!r}.")
    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    if not scenarios:
        raise ValueError("records must hold at least one record to plot, got none.")
    measured = [r for r in records if not r["skipped"] and r["run_s_median"]]
    # Sizes other than x that differ between records name each line (a sweep run at
    # several lengths: "scan T=100").
    others = [k for k in _SIZE_LETTERS if k != x and len({r.get(k) for r in measured}) > 1]
    sizes = {id(r): "".join(f" {_SIZE_LETTERS[k]}={r.get(k)}" for k in others) for r in measured}
    labels = {id(r): impl_name(r) + sizes[id(r)] for r in measured}
    # ... and each of those sizes has a line style of its own.
    in_order = sorted(measured, key=lambda r: tuple(r.get(k) for k in others))
    dashes = {size: _DASHES[k % len(_DASHES)]
              for k, size in enumerate(dict.fromkeys(sizes[id(r)] for r in in_order))}  # fmt: skip
    styles = _styles(measured, dashed_peers=len(dashes) <= 1)
    bars = len({r[x] for r in measured}) <= 1
    by_scenario = {s: [r for r in measured if r["scenario"] == s] for s in scenarios}

    blocks = 1 if len(scenarios) <= 3 else 2  # scenarios side by side
    rows = math.ceil(len(scenarios) / blocks)
    slots = {s: _bar_slots(by_scenario[s]) for s in scenarios}
    # Every bar as thick as the others: a row of panels is as tall as its most bars.
    depths = [
        max(len(slots[s]) for s in scenarios[row * blocks : (row + 1) * blocks])
        for row in range(rows)
    ]
    if bars:
        heights = [1.3 + 0.32 * depth for depth in depths]
        legend_height = 0.4
    else:
        heights = [3.3] * rows
        families = [style["family"] for style in styles.values()]
        depth = max((families.count(f) for f in families), default=1)
        legend_height = 0.22 * max(depth, math.ceil(len(styles) / _LEGEND_COLUMNS)) + 0.3
    figure = Figure(
        figsize=(9.0 if blocks == 1 else 16.0, sum(heights) + 0.5 + legend_height),
        layout="constrained",
    )
    grid = figure.add_gridspec(
        rows, 2 * blocks, height_ratios=heights, width_ratios=[1.3, 1.0] * blocks
    )
    busy_seen = False
    for k, scenario in enumerate(scenarios):
        row, block = divmod(k, blocks)
        time_ax = figure.add_subplot(grid[row, 2 * block])
        memory_ax = figure.add_subplot(grid[row, 2 * block + 1], sharey=time_ax if bars else None)
        time_ax.set_gid(f"time {scenario}")
        memory_ax.set_gid(f"memory {scenario}")
        if bars:
            busy_seen |= _draw_bars(
                time_ax, memory_ax, scenario, slots[scenario], depths[row], labels, styles
            )
        else:
            rows_here = by_scenario[scenario]
            busy_seen |= _draw_lines(
                time_ax, memory_ax, scenario, rows_here, x, sizes, dashes, styles
            )
        if not by_scenario[scenario]:
            for ax in (time_ax, memory_ax):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.5, 0.5, "every case skipped", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")  # fmt: skip
    _legend(figure, styles, dashes, bars, busy_seen)
    figure.suptitle(title, fontsize="medium")
    return figure


def _styles(records: Sequence[Mapping], dashed_peers: bool) -> dict[str, dict]:
    """Colour, marker and line style of each implementation, JAX's first, peers after.

    One family per JAX loop kind (its variants: shades of its hue) and per peer framework
    (greys, browns): every implementation has a colour of its own.
    """
    families: dict[str, list[str]] = {}
    for r in records:
        family = r["loop"].split(":")[0] if r["framework"] == "jax" else r["framework"]
        names = families.setdefault(family, [])
        if impl_name(r) not in names:
            names.append(impl_name(r))
    kinds = LOOPS + NNX_LOOPS
    jax_families = sorted(
        (f for f in families if f not in PEER_COLORS),
        key=lambda f: kinds.index(f) if f in kinds else len(kinds),
    )
    spare = iter(HUES[len(kinds) :])
    hues = {f: HUES[kinds.index(f)] if f in kinds else next(spare, "#7f7f7f") for f in jax_families}
    hues |= {f: PEER_COLORS[f] for f in PEER_COLORS if f in families}
    styles = {}
    for family, hue in hues.items():
        peer = family in PEER_COLORS
        markers = _PEER_MARKERS if peer else _JAX_MARKERS
        # The plain kind ("scan") takes the hue itself, its variants the shades.
        names = sorted(families[family], key=lambda name: name != family)
        for i, (name, amount) in enumerate(zip(names, _shades(len(names)), strict=True)):
            styles[name] = {
                "color": _shade(hue, amount),
                "marker": markers[i % len(markers)],
                "linestyle": "--" if peer and dashed_peers else "-",
                "peer": peer,
                "family": family,
            }
    return styles


def _shades(count: int) -> list[float]:
    """The shades of a family of ``count``: 0 (its colour), then its variants' shades."""
    light, dark = _LIGHTER[0] - _LIGHTER[1], _DARKER[0] - _DARKER[1]
    out = [0.0]
    for k in range(count - 1):
        along = (light + dark) * (k / (count - 2) if count > 2 else 0.0)
        out.append(_LIGHTER[0] - along if along <= light else _DARKER[0] - (along - light))
    return out


def _shade(color: str, amount: float) -> str:
    from matplotlib.colors import to_hex, to_rgb

    target = 1.0 if amount > 0 else 0.0
    return to_hex([c + (target - c) * abs(amount) for c in to_rgb(color)])


def _byte_tick(value: float) -> str:
    """``"64 KiB"``, ``"512 B"``: a tick of a byte axis."""
    return _bytes(round(value))


def _saved(record: Mapping) -> int | None:
    return record.get("saved_bytes")


def _busy(record: Mapping) -> bool:
    return (record.get("other_cores") or 0) >= BUSY_CORES


def _bar_slots(rows: Sequence[Mapping]) -> list[Mapping | str]:
    """The bars of one scenario top to bottom: records, fastest first, in a block per
    as-written method headed by its name (a string)."""
    slots: list[Mapping | str] = []
    for method in dict.fromkeys(r.get("method") for r in rows):
        if method is not None:
            slots.append(f"{method} method")
        slots += sorted((r for r in rows if r.get("method") == method), key=_median)
    return slots


def _median(record: Mapping) -> float:
    return record["run_s_median"]


def _draw_bars(
    time_ax: Axes, memory_ax: Axes, scenario, slots, height: int, labels, styles
) -> bool:
    """One bar per implementation in each panel, the panels ``height`` slots tall;
    returns whether any was BUSY."""
    from matplotlib.transforms import blended_transform_factory

    records = [s for s in slots if not isinstance(s, str)]
    lengths = sorted({r["length"] for r in records})
    at = f", T={lengths[0]}" if len(lengths) == 1 else ""
    time_ax.set_title(f"{scenario}{at}: time per call", fontsize="medium")
    memory_ax.set_title("memory kept for backward", fontsize="medium")
    intervals = [r.get("run_s_ci") or [_median(r)] * 2 for r in records]
    time_left = _bar_axis(
        time_ax.xaxis,
        min((ci[0] for ci in intervals), default=1e-3),
        max((ci[1] for ci in intervals), default=1.0),
        _TIME_UNITS,
        "per call (median; whiskers: 95% CI)",
    )
    saved = [_saved(r) for r in records if _saved(r)]
    memory_left = _bar_axis(
        memory_ax.xaxis,
        min(saved, default=1),
        max(saved, default=1 << 10),
        _BYTE_UNITS,
        "kept for the backward pass",
    )
    ticks, tick_labels = [], []
    left_edge = blended_transform_factory(time_ax.transAxes, time_ax.transData)
    memory_left_edge = blended_transform_factory(memory_ax.transAxes, memory_ax.transData)
    for y, slot in enumerate(slots):
        if isinstance(slot, str):  # a method's heading, under a rule if a block is above
            time_ax.text(0.01, y, slot, transform=left_edge, va="center", style="italic")
            if y:
                for ax in (time_ax, memory_ax):
                    ax.axhline(y - 0.6, color="0.5", linewidth=0.8)
            continue
        r, label, style = slot, labels[id(slot)], styles[impl_name(slot)]
        busy = _busy(r)
        median = _median(r)
        ci = r.get("run_s_ci")
        bar = time_ax.barh(
            y,
            median - time_left,
            left=time_left,
            height=0.7,
            color=style["color"],
            edgecolor=_BUSY if busy else "0.25",
            linewidth=1.2 if busy else 0.5,
            hatch="///" if busy else None,
            xerr=[[median - ci[0]], [ci[1] - median]] if ci else None,
            error_kw={"ecolor": "black", "capsize": 3, "linewidth": 1},
        )
        bar.patches[0].set_gid(label)
        time_ax.text(ci[1] if ci else median, y, f" {_seconds(median)}", va="center",
                     fontsize="small", color=_BUSY if busy else "black")  # fmt: skip
        ticks.append(y)
        tick_labels.append(f"{label} (BUSY)" if busy else label)
        if _saved(r):
            bar = memory_ax.barh(
                y,
                _saved(r) - memory_left,
                left=memory_left,
                height=0.7,
                color=style["color"],
                edgecolor="0.25",
                linewidth=0.5,
            )
            bar.patches[0].set_gid(label)
            memory_ax.text(_saved(r), y, f" {_bytes(_saved(r))}", va="center",
                           fontsize="small")  # fmt: skip
        else:
            memory_ax.text(0.02, y, "not measured", transform=memory_left_edge, va="center",
                           style="italic", color="0.4", fontsize="small")  # fmt: skip
    time_ax.set_yticks(ticks, tick_labels)
    for text, r in zip(time_ax.get_yticklabels(), records, strict=True):
        if _busy(r):
            text.set_color(_BUSY)
    time_ax.set_ylim(height - 0.4, -0.6)  # the first slot on top
    time_ax.tick_params(axis="y", length=0)
    memory_ax.tick_params(axis="y", length=0, labelleft=False)
    return any(_busy(r) for r in records)


def _bar_axis(axis: Axis, low: float, high: float, units, what: str) -> float:
    """Scales a bar panel's value axis for values from ``low`` to ``high``, with room on
    the right for the values written beside the bars; returns where the bars start.

    Linear from 0, ticked in one unit named in the axis label (``"ms " + what``);
    logarithmic when the values span more than :data:`_LOG_SPAN`, each tick with its
    unit.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    axis.axes.grid(True, axis="x", alpha=0.3)
    if high / low <= _LOG_SPAN:
        unit, scale = next((u for u in units if high >= u[1]), units[-1])
        ticks = MaxNLocator(nbins=4).tick_values(0, high / scale)
        axis.set_major_locator(FixedLocator([t * scale for t in ticks if t >= 0]))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:g}"))
        axis.set_label_text(f"{unit} {what}")
        axis.axes.set_xlim(0, high * 1.5)
        return 0.0
    left = low / 2
    axis.axes.set_xscale("log")
    axis.axes.set_xlim(left, high * (high / left) ** 0.5)
    binary = units is _BYTE_UNITS
    _log_ticks(axis, left, high, _byte_tick if binary else _seconds, binary=binary)
    axis.set_label_text(f"{'bytes' if binary else 'seconds'} {what}")
    return left


def _log_ticks(axis: Axis, low: float, high: float, label: Callable, binary: bool) -> None:
    """Ticks a logarithmic axis at round values, each labelled with its unit: powers of
    two for bytes (1 KiB, 8 KiB, ...), 1-2-5 steps for seconds over a short span."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    if binary:
        axis.set_major_locator(LogLocator(base=2, numticks=7))
        axis.set_minor_locator(NullLocator())
    else:
        subs = (1.0, 2.0, 5.0) if high / low < 300 else (1.0,)
        axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
        axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))


def _draw_lines(time_ax: Axes, memory_ax: Axes, scenario, rows, x, sizes, dashes, styles) -> bool:
    """One line per implementation (and other sizes, ``sizes``) over ``x`` in each panel;
    returns whether any point was BUSY."""
    from matplotlib.ticker import NullLocator

    order = list(styles)
    series: dict[str, list[Mapping]] = {}
    for r in sorted(rows, key=lambda r: (order.index(impl_name(r)), sizes[id(r)], r[x])):
        series.setdefault(impl_name(r) + sizes[id(r)], []).append(r)
    for label, line in series.items():
        style = styles[impl_name(line[0])]
        dash = dashes[sizes[id(line[0])]] if len(dashes) > 1 else style["linestyle"]
        look = {"color": style["color"], "marker": style["marker"], "linestyle": dash}
        xs = [r[x] for r in line]
        ys = [_median(r) for r in line]
        intervals = [r.get("run_s_ci") for r in line]
        error = None
        if all(intervals):
            error = [
                [y - ci[0] for y, ci in zip(ys, intervals, strict=True)],
                [ci[1] - y for y, ci in zip(ys, intervals, strict=True)],
            ]
        drawn = time_ax.errorbar(xs, ys, yerr=error, capsize=2, markersize=5, **look)
        drawn.lines[0].set_gid(label)
        busy = [(r[x], _median(r)) for r in line if _busy(r)]
        if busy:
            (ring,) = time_ax.plot(*zip(*busy, strict=True), linestyle="none", marker="o",
                                   markersize=13, mfc="none", mec=_BUSY, mew=1.5)  # fmt: skip
            ring.set_gid("BUSY")
        kept = [(r[x], _saved(r)) for r in line if _saved(r)]
        if kept:
            (drawn,) = memory_ax.plot(*zip(*kept, strict=True), markersize=5, **look)
            drawn.set_gid(label)
    time_ax.set_title(f"{scenario}: time per call", fontsize="medium")
    memory_ax.set_title("memory kept for backward", fontsize="medium")
    time_ax.set_ylabel("seconds per call\n(median; bars: 95% CI)")
    memory_ax.set_ylabel("bytes kept for backward")
    xs = sorted({r[x] for r in rows})
    saved = [_saved(r) for r in rows if _saved(r)]
    unmeasured = [label for label, line in series.items() if not any(_saved(r) for r in line)]
    if saved and unmeasured:  # a batch split over devices
        note = "\n".join(["not measured:", *unmeasured])
        memory_ax.text(0.03, 0.97, note, transform=memory_ax.transAxes, va="top",
                       style="italic", color="0.4", fontsize="small")  # fmt: skip
    for ax, values, label in (
        (time_ax, [_median(r) for r in rows], _seconds),
        (memory_ax, saved, _byte_tick),
    ):
        ax.set_xlabel(_AXIS_NAMES[x])
        if not values:
            if rows:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center",
                        transform=ax.transAxes, style="italic", color="0.4")  # fmt: skip
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{v:g}" for v in xs], minor=False)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.margins(x=0.08)
        _log_ticks(ax.yaxis, min(values), max(values), label, binary=label is _byte_tick)
        ax.grid(True, which="major", alpha=0.3)
    return any(_busy(r) for r in rows)


def _legend(figure: Figure, styles, dashes, bars: bool, busy: bool) -> None:
    """Below the panels: every implementation and the sizes' line styles (lines), or the
    colour families (bars, whose implementations are named beside them)."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, busy_label = [], f"BUSY: other processes kept >= {BUSY_CORES} cores busy"
    if bars:
        jax = tuple(Patch(color=s["color"]) for s in styles.values() if not s["peer"])
        if jax:
            handles.append((jax, "JAX loop kinds (a hue each)"))
        for framework in PEER_COLORS:
            peers = tuple(
                Patch(color=s["color"]) for s in styles.values() if s["family"] == framework
            )
            if peers:
                handles.append((peers, f"{_PEER_NAMES[framework]} peers"))
        if busy:
            busy_patch = Patch(facecolor="white", edgecolor=_BUSY, hatch="///")
            handles.append((busy_patch, f"{busy_label} while it was timed"))
    else:
        # A column per family (a loop kind and its variants; a framework's peers).
        columns: dict[str, list] = {}
        for name, style in styles.items():
            line = Line2D([], [], color=style["color"], marker=style["marker"],
                          linestyle=style["linestyle"])  # fmt: skip
            columns.setdefault(style["family"], []).append((line, name))
        if len(dashes) > 1:
            columns["sizes"] = [
                (Line2D([], [], color="black", linestyle=dash), size.strip())
                for size, dash in dashes.items()
            ]
        if busy:
            ring = Line2D([], [], linestyle="none", marker="o", markersize=11, mfc="none",
                          mec=_BUSY, mew=1.5)  # fmt: skip
            columns["BUSY"] = [(ring, busy_label.replace(" kept", "\nkept"))]
        if len(columns) <= _LEGEND_COLUMNS:
            depth = max(len(column) for column in columns.values())
            blank = (Line2D([], [], linestyle="none"), "")
            for column in columns.values():
                handles += column + [blank] * (depth - len(column))
            ncols = len(columns)
        else:
            handles = [entry for column in columns.values() for entry in column]
            ncols = _LEGEND_COLUMNS
    if handles:
        figure.legend(
            [h for h, _ in handles],
            [text for _, text in handles],
            loc="outside lower center",
            ncols=min(len(handles), 4) if bars else ncols,
            fontsize="small",
            frameon=False,
            handler_map={tuple: HandlerTuple(ndivide=None, pad=0)},
        )
