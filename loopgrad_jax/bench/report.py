"""What a run reports: ``meta``, the JSON file, the terminal table.

The JSON file is rewritten after every record, atomically (a temporary file in
the same folder, then ``os.replace``), so an interrupted or crashed run leaves a
valid file holding every finished record::

  {"meta": {"jax", "jaxlib", "torch", "backend", "device", "cpu_count", "date",
            "command", ..., "status": "running" | "complete" | "interrupted"},
   "records": [{<run.RECORD_KEYS>}, ...]}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jaxlib
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.bench.run import Plan

#: Format of the JSON file; bumped when a key changes meaning.
FORMAT_VERSION = 1

#: A record whose timed calls shared the machine with this many busy cores is flagged.
BUSY_CORES = 0.25


def collect_meta(plan: Plan, backend: str, device: jax.Device, argv: Sequence[str]) -> dict:
    """The machine, versions and settings of a run."""
    return {
        "format_version": FORMAT_VERSION,
        "loopgrad_jax": lg.__version__,
        "git": git_revision(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": plan.torch.version if plan.torch else None,
        "torch_threads": plan.torch.threads if plan.torch else None,
        "torch_device": plan.torch.device if plan.torch else None,
        "backend": backend,
        "device": describe_device(device),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),  # fewer than cpu_count under taskset or a cgroup
        "cpu": cpu_model(),
        "load_average": load_average(),  # 1-minute load average at the start
        "nice": os.nice(0) if hasattr(os, "nice") else None,  # this process's priority
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["loopgrad-bench", *argv]),
        "dtype": "float32",
        "seed": plan.seed,
        "warmup": plan.warmup,
        "repeats": plan.repeats,
        "compile_repeats": plan.compile_repeats,
        "compile_warmup": plan.compile_warmup,
        "max_unroll": plan.limits.max_unroll,
        "max_quadratic": plan.limits.max_quadratic,
        "status": "running",
    }


def describe_device(device: jax.Device) -> str:
    """E.g. ``"cpu: AMD EPYC (2 cores)"`` or ``"gpu: NVIDIA H100 80GB HBM3"``.

    The core count is what this process may run on: ``taskset -c 0`` gives ``(1 core of 2)``.
    """
    if device.platform == "cpu":
        usable, total = usable_cores(), os.cpu_count()
        cores = (
            f"{total} cores" if usable == total else f"{usable} core{'s' * (usable > 1)} of {total}"
        )
        return f"cpu: {cpu_model()} ({cores})"
    return f"{device.platform}: {device.device_kind}"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> dict | None:
    """``{"commit", "modified"}`` of the checkout the package runs from, if it is one.

    Read-only: ``GIT_OPTIONAL_LOCKS=0`` keeps ``git status`` from rewriting the index.
    """
    folder = Path(lg.__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            env=env,
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        modified = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": modified}


def load_average() -> float | None:
    """The 1-minute load average, where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def write_json(path: str | os.PathLike, meta: Mapping, records: Sequence[Mapping]) -> None:
    """Writes ``{"meta", "records"}`` to ``path`` atomically."""
    path = Path(path)
    text = json.dumps({"meta": dict(meta), "records": list(records)}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def speedups(records: Sequence[Mapping]) -> dict[int, dict[str, float]]:
    """For each JAX record (by index): ``{peer: torch time / JAX time}`` at the same case."""
    torch_times = {
        (r["scenario"], r["length"], r["peer"]): r["run_s_median"]
        for r in records
        if r["framework"] == "torch" and r["run_s_median"]
    }
    out = {}
    for index, r in enumerate(records):
        if r["framework"] != "jax" or not r["run_s_median"]:
            continue
        out[index] = {
            peer: seconds / r["run_s_median"]
            for (scenario, length, peer), seconds in torch_times.items()
            if (scenario, length) == (r["scenario"], r["length"])
        }
    return out


_COLUMNS = (
    "scenario",
    "T",
    "impl",
    "lower",
    "compile",
    "run (median)",
    "run (min)",
    "memory",
    "GFLOP/s",
    "speedup vs torch",
    "note",
)


def format_table(records: Sequence[Mapping]) -> str:
    """The records as an aligned text table, with each JAX row's speedup over PyTorch."""
    ratios = speedups(records)
    rows = [_COLUMNS]
    for index, r in enumerate(records):
        impl = r["loop"] if r["framework"] == "jax" else f"torch {r['peer']}"
        vs = ", ".join(f"{p} {x:.3g}x" for p, x in ratios.get(index, {}).items())
        if r["skipped"]:
            note = f"skipped: {r['skipped']}"
        else:
            notes = []
            if r["max_rel_diff"] is not None:
                notes.append(f"rel diff vs jax {r['max_rel_diff']:.1e}")
            if (r.get("other_cores") or 0) >= BUSY_CORES:
                notes.append(f"BUSY: other processes used {r['other_cores']:.2g} cores")
            note = "; ".join(notes)
        rows.append(
            (
                r["scenario"],
                str(r["length"]),
                impl,
                _seconds(r["lower_s"]),
                _seconds(r["compile_s"]),
                _seconds(r["run_s_median"]),
                _seconds(r["run_s_min"]),
                _bytes(r["memory_bytes"]),
                "" if r["gflops"] is None else f"{r['gflops']:.3g}",
                vs,
                note,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("speedup vs torch = PyTorch time / JAX time (> 1: JAX is faster).")
    return "\n".join(line.rstrip() for line in lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def _bytes(value: int | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value} B"
