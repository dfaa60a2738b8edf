"""The PNG: compile time and run time against length, one panel per scenario.

Log-log axes. Each JAX loop kind has one colour: a solid line for the
steady-state run time (median) with a band from its first to its third quartile
and error bars for the 95% interval of the median, a dashed one for the compile
time (hollow markers). PyTorch peers have run times only (dotted, with the same
band and bars). The as-written loop's methods are separate lines of the loop
kind's colour: ``forward`` with round markers, ``reverse`` with square ones.
Skipped cases leave gaps. Below each time panel, a memory panel: what each
implementation keeps for the backward pass (``saved_bytes``: JAX's residuals,
solid; PyTorch's saved tensors, dotted) and the JAX executable's temp bytes
(dashed). With ``--sweep`` the x axis is the swept size instead of the length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from loopgrad_jax.bench.report import impl_name


def plot_records(
    records: Sequence[Mapping], path: str | os.PathLike, title: str, x: str = "length"
) -> None:
    """Writes the plot of ``records`` to ``path`` (PNG, matplotlib's Agg backend).

    ``x`` is the record key on the horizontal axis: ``"length"``, or the size a
    ``--sweep`` varied (``"batch"``, ``"hidden"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    if not scenarios:
        raise ValueError("records must hold at least one record to plot, got none.")
    ncols = min(len(scenarios), 3)
    nrows = math.ceil(len(scenarios) / ncols)
    fig, grid = plt.subplots(
        2 * nrows,
        ncols,
        figsize=(5.2 * ncols, 7.0 * nrows),
        squeeze=False,
        layout="constrained",
        height_ratios=[1.4, 1.0] * nrows,
    )
    axes, memory_axes = grid[0::2], grid[1::2]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    jax_impls = list(dict.fromkeys(impl_name(r) for r in records if r["framework"] == "jax"))
    peers = list(dict.fromkeys(impl_name(r) for r in records if r["framework"] == "torch"))
    # Against length: one line per implementation. Against a swept size: one per
    # implementation and length.
    lengths = sorted({r["length"] for r in records}) if x != "length" else [None]
    # One colour per loop kind; the as-written loop's reverse method gets square markers.
    loops = list(dict.fromkeys(r["loop"] for r in records if r["framework"] == "jax"))
    style = {}
    for r in records:
        if r["framework"] == "jax":
            color = colors[loops.index(r["loop"]) % len(colors)]
            line = "--" if (r.get("devices") or 1) > 1 else "-"  # data-parallel: dashed
            style[impl_name(r)] = (color, line, "s" if r.get("method") == "reverse" else "o")
    for k, impl in enumerate(peers):
        style[impl] = (("black", "grey", "brown", "purple")[k % 4], ":", "^")

    def label(impl: str, length: int | None, what: str) -> str:
        name = impl if impl.startswith("torch") else f"jax {impl}"
        return f"{name}{f' T={length}' if len(lengths) > 1 else ''}: {what}"

    for ax, memory_ax, scenario in zip(axes.flat, memory_axes.flat, scenarios, strict=False):
        for impl in jax_impls + peers:
            color, line, marker = style[impl]
            for length in lengths:
                rows = [
                    r
                    for r in records
                    if r["scenario"] == scenario
                    and impl_name(r) == impl
                    and length in (None, r["length"])
                ]
                run = label(impl, length, "run")
                _line(ax, rows, x, "run_s_median", run, color, line, marker, spread=True)
                _line(memory_ax, rows, x, "saved_bytes", run, color, line, marker)
                if impl in jax_impls:
                    compile_ = label(impl, length, "compile")
                    _line(ax, rows, x, "compile_s", compile_, color, "--", marker, filled=False)
                    _line(memory_ax, rows, x, "temp_bytes", compile_, color, "--", "x")
        for panel, ylabel, heading in (
            (ax, "seconds (band: quartiles; bars: 95% CI)", scenario),
            (memory_ax, "bytes", f"{scenario}: saved for backward (temp dashed)"),
        ):
            panel.set_xscale("log")
            panel.set_yscale("log")
            panel.set_title(heading, fontsize="medium" if panel is ax else "small")
            panel.set_xlabel({"length": "length T", "batch": "batch B", "hidden": "hidden H"}[x])
            panel.set_ylabel(ylabel, fontsize="small")
            panel.grid(True, which="both", alpha=0.3)
    legend = {}  # one legend for all panels: label -> handle
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(text, handle)
    for ax in list(memory_axes.flat)[len(scenarios) :]:
        ax.axis("off")
    spare = list(axes.flat)[len(scenarios) :]
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].legend(legend.values(), legend.keys(), loc="center", fontsize="small")
    elif legend:
        fig.legend(
            legend.values(),
            legend.keys(),
            loc="outside lower center",
            ncols=2 * ncols,
            fontsize="small",
        )
    fig.suptitle(title, fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(ax, rows, x, key, label, color, style, marker, spread=False, filled=True) -> None:
    rows = sorted((r for r in rows if r.get(key)), key=lambda r: r[x])
    if not rows:
        return
    xs = [r[x] for r in rows]
    ys = [r[key] for r in rows]
    face = color if filled else "none"
    ax.plot(xs, ys, linestyle=style, marker=marker, color=color, mfc=face, label=label)
    if not spread:
        return
    quartiles = [(r.get("run_s_q1"), r.get("run_s_q3")) for r in rows]
    if all(q and q3 for q, q3 in quartiles):
        ax.fill_between(xs, *zip(*quartiles, strict=True), color=color, alpha=0.15, linewidth=0)
    intervals = [r.get("run_s_ci") for r in rows]
    if all(intervals):
        low = [y - ci[0] for y, ci in zip(ys, intervals, strict=True)]
        high = [ci[1] - y for y, ci in zip(ys, intervals, strict=True)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=color, capsize=2, linewidth=1)
