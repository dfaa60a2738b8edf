"""The PNG: compile time and run time against length, one panel per scenario.

Log-log axes. Each JAX loop kind has one colour: a solid line for the
steady-state run time (median), a dashed one for the compile time. PyTorch
peers have run times only (dotted). Skipped cases leave gaps. Below each time
panel, a memory panel: the compiled executable's bytes against length for each
JAX loop kind (for example scan against remat).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence


def plot_records(records: Sequence[Mapping], path: str | os.PathLike, title: str) -> None:
    """Writes the plot of ``records`` to ``path`` (PNG, matplotlib's Agg backend)."""
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
    loops = list(dict.fromkeys(r["loop"] for r in records if r["framework"] == "jax"))
    peers = list(dict.fromkeys(r["peer"] for r in records if r["framework"] == "torch"))
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        mine = [r for r in records if r["scenario"] == scenario]
        for k, loop in enumerate(loops):
            rows = [r for r in mine if r["framework"] == "jax" and r["loop"] == loop]
            color = colors[k % len(colors)]
            _line(ax, rows, "run_s_median", f"jax {loop}: run", color, "-", "o")
            _line(ax, rows, "compile_s", f"jax {loop}: compile", color, "--", "s")
        for k, peer in enumerate(peers):
            rows = [r for r in mine if r["framework"] == "torch" and r["peer"] == peer]
            shade = ("black", "grey", "brown")[k % 3]
            _line(ax, rows, "run_s_median", f"torch {peer}: run", shade, ":", "^")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(scenario)
        ax.set_xlabel("length T")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    for ax, scenario in zip(memory_axes.flat, scenarios, strict=False):
        for k, loop in enumerate(loops):
            rows = [
                r
                for r in records
                if r["scenario"] == scenario and r["framework"] == "jax" and r["loop"] == loop
            ]
            _line(ax, rows, "memory_bytes", f"jax {loop}: run", colors[k % len(colors)], "-", "o")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{scenario}: compiled memory", fontsize="small")
        ax.set_xlabel("length T")
        ax.set_ylabel("bytes (temp + args + outputs)")
        ax.grid(True, which="both", alpha=0.3)
    legend = {}  # one legend for all panels: label -> handle
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    order = [f"jax {loop}: {what}" for loop in loops for what in ("run", "compile")]
    order += [f"torch {peer}: run" for peer in peers]
    legend = {label: legend[label] for label in order if label in legend}
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


def _line(ax, rows: Sequence[Mapping], key: str, label: str, color, style, marker) -> None:
    points = sorted((r["length"], r[key]) for r in rows if r[key])
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, linestyle=style, marker=marker, color=color, label=label)
