"""What a run reports: ``meta``, the JSON file, the terminal table, a recommendation.

The JSON file is rewritten after every group of records, atomically (a temporary
file in the same folder, then ``os.replace``), so an interrupted or crashed run
leaves a valid file holding every finished record::

  {"meta": {"jax", "jaxlib", "torch", "backend", "device", "cpu_model",
            "cpu_features", "xla_flags", "jax_threads", "torch_threads", "date",
            "command", ..., "status": "running" | "complete" | "interrupted"},
   "records": [{<run.RECORD_KEYS>}, ...]}
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jaxlib
import numpy as np

import loopgrad_jax as lg
from loopgrad_jax.bench import peers, timing
from loopgrad_jax.bench.run import Plan

#: Format of the JSON file; bumped when a key changes meaning. 2: samples and their
#: spread, saved_bytes, methods and the as-written peers, the CPU's features.
FORMAT_VERSION = 2

#: Environment variables that change how either library's threads run or wait; the ones
#: set are recorded (``meta.thread_env``).
THREAD_ENV: tuple[str, ...] = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)

#: The instruction-set flags that decide how fast a CPU multiplies matrices, in the
#: names Linux's ``/proc/cpuinfo`` uses (x86; ``asimd``, ``sve`` on Arm), and every
#: ``avx512*`` and ``amx*`` flag present.
CPU_FEATURES: tuple[str, ...] = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "asimd",
    "sve",
    "sve2",
)

#: A record whose timed calls shared the machine with this many busy cores is flagged.
BUSY_CORES = 0.25


def tool_parser(
    module: str, doc: str, *, epilog: bool = True, prog: str | None = None
) -> argparse.ArgumentParser:
    """The parser of a ``python -m loopgrad_jax.bench.<module>`` tool (or of ``prog``, a
    ``loopgrad-bench`` subcommand), described by its module docstring: the first paragraph
    as description, the rest as epilog."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        prog=prog or f"python -m loopgrad_jax.bench.{module}",
        description=head,
        epilog=rest if epilog else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


#: ``--sizes`` presets of the comparison tools (``checkpoints``, ``flax_peers``):
#: ``(input, hidden, batch)``.
SIZE_PRESETS = {"article": (10, 5, 1), "large": (64, 256, 32)}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The comparison tools' sampling and output options."""
    parser.add_argument("--repeats", type=int, default=20, help="samples each (default: 20)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write meta and rows as JSON")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The comparison tools' common options: length, size presets, sampling, output."""
    parser.add_argument("--length", type=int, default=1000, help="T (default: 1000)")
    parser.add_argument(
        "--sizes",
        default="article,large",
        help="comma-separated presets: article (I=10, H=5, B=1), large (I=64, H=256, B=32)",
    )
    add_sampling_arguments(parser)


def emit(rows: Sequence[Mapping], table: str, path: str | None, meta) -> None:
    """Prints one group's ``table``; rewrites ``path`` (if any) with every row so far,
    under ``meta()``, so that an interrupted run keeps what it measured."""
    print(table, flush=True)
    print()
    if path:
        write_json(path, meta(), rows)


def sweep_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The ``cases.Sizes`` of ``--sizes`` at ``--length``; exits naming a bad option."""
    from loopgrad_jax.bench import cases

    if args.length < 1:
        parser.error(f"--length must be >= 1, got {args.length}")
    presets = [s.strip() for s in args.sizes.split(",")]
    for name in presets:
        if name not in SIZE_PRESETS:
            parser.error(f"--sizes takes {', '.join(SIZE_PRESETS)}; got {name!r}")
    return [cases.Sizes(args.length, b, i, h, 1) for i, h, b in map(SIZE_PRESETS.get, presets)]


def sweep_row(sizes, stats, compiled) -> dict:
    """A comparison tool's row: the sizes, the run time's spread and the compiled figures."""
    return {
        "length": sizes.length,
        "batch": sizes.batch,
        "input": sizes.input,
        "hidden": sizes.hidden,
        "run_s_median": stats.median_s,
        "run_s_q1": stats.q1_s,
        "run_s_q3": stats.q3_s,
        "run_s_ci": list(stats.ci_s),
        "run_samples": stats.samples,
        "compile_s": compiled.compile_s,
        "lower_s": compiled.lower_s,
        "temp_bytes": compiled.temp_bytes,
    }


def tool_meta(module: str, argv: Sequence[str], format_version: int, **versions) -> dict:
    """A comparison tool's ``meta``: the machine, the peers' versions, the command."""
    return {
        "format_version": format_version,
        **machine_meta(jax.devices()[0]),
        **versions,
        "command": shlex.join(["python", "-m", f"loopgrad_jax.bench.{module}", *argv]),
    }


def machine_meta(device: jax.Device) -> dict:
    """What every benchmark file records first: versions, the machine, its load, the date."""
    return {
        "loopgrad_jax": lg.__version__,
        "git": git_revision(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": device.platform,
        "device": describe_device(device),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),  # fewer than cpu_count under taskset or a cgroup
        "cpu": cpu_model(),  # kept for format 1 readers; cpu_model says more
        "cpu_model": cpu_model(detailed=True),
        "cpu_features": cpu_features(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        **dict(zip(("jax_threads", "jax_threads_from"), jax_threads(), strict=True)),
        "load_average": load_average(),  # 1-minute load average at the start
        "nice": os.nice(0) if hasattr(os, "nice") else None,  # this process's priority
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": gpu_info() if device.platform == "gpu" else None,
    }


def gpu_info(smi: str | None = None) -> dict | None:
    """The first NVIDIA GPU's ``{"name", "driver", "memory"}`` from ``nvidia-smi`` (or
    its CSV line ``smi``), and the CUDA and cuDNN versions PyTorch was built with where
    it is installed; ``None`` without ``nvidia-smi``."""
    if smi is None:
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
    fields = [f.strip() for f in smi.strip().splitlines()[0].split(",")] if smi.strip() else []
    if len(fields) != 3:
        return None
    info = dict(zip(("name", "driver", "memory"), fields, strict=True))
    if peers.installed("torch"):
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["torch_cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return info


def collect_meta(plan: Plan, backend: str, device: jax.Device, argv: Sequence[str]) -> dict:
    """The machine, versions and settings of a run."""
    return {
        "format_version": FORMAT_VERSION,
        **machine_meta(device),
        "torch": plan.torch.version if plan.torch else None,
        "torch_threads": plan.torch.threads if plan.torch else None,
        "torch_device": plan.torch.device if plan.torch else None,
        "backend": backend,
        "command": shlex.join(["loopgrad-bench", *argv]),
        "dtype": "float32",
        "seed": plan.seed,
        "warmup": plan.warmup,
        "repeats": plan.repeats,  # at least this many samples per implementation
        "min_time_s": plan.min_time,  # each group timed for at least this long
        "timing": "interleaved" if plan.interleave else "blocks",
        "sample_min_s": timing.SAMPLE_MIN_S,
        "compile_repeats": plan.compile_repeats,
        "compile_warmup": plan.compile_warmup,
        "max_unroll": plan.limits.max_unroll,
        "max_quadratic": plan.limits.max_quadratic,
        "sweep": list(plan.sweep[:1]) + [list(plan.sweep[1])] if plan.sweep else None,
        "cell": plan.cell,  # the RNN scenarios' cell (--cell) and its layers (--layers)
        "layers": plan.layers,
        "devices": list(plan.devices),  # --devices: mesh sizes of the data-parallel rows
        "bidirectional": plan.bidirectional,  # rnn_module's --bidirectional
        "lengths_spread": plan.spread,  # rnn_module's --lengths-spread
        "flax": _version("flax") if plan.flax or _runs("flax", plan) else None,
        "equinox": _version("equinox") if _runs("equinox", plan) else None,
        # A Flax peer with the GRU: every row computes with b_hn = 0 (peers.zero_b_hn).
        "gru_b_hn_zero": peers.zero_b_hn(plan.cell, plan.peers),
        "evaluations": plan.evaluations,  # --evaluations: body evaluations counted
        "status": "running",
    }


def _runs(framework: str, plan: Plan) -> bool:
    """Whether ``--peers`` names a peer of ``framework`` (or ``all``) and it is installed."""
    named = any(peers.framework(p) in (framework, None) for p in plan.peers or ())
    return named and peers.installed(framework)


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def describe_device(device: jax.Device) -> str:
    """E.g. ``"cpu: AMD EPYC (2 cores, AVX2)"`` or ``"gpu: NVIDIA H100 80GB HBM3"``.

    The core count is what this process may run on: ``taskset -c 0`` gives
    ``(1 core of 2, ...)``; then the widest vector instructions the CPU has.
    """
    if device.platform == "cpu":
        usable, total = usable_cores(), os.cpu_count()
        cores = (
            f"{total} cores" if usable == total else f"{usable} core{'s' * (usable > 1)} of {total}"
        )
        width = vector_width(cpu_features())
        return f"cpu: {cpu_model()} ({cores}{', ' + width if width else ''})"
    return f"{device.platform}: {device.device_kind}"


def cpu_features(cpuinfo: str | None = None) -> list[str] | None:
    """The flags of :data:`CPU_FEATURES` (and every ``avx512*``, ``amx*``) the CPU has.

    Read from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm), or on macOS
    from ``sysctl``; ``None`` where neither says.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return _sysctl_features()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            wanted = [f for f in CPU_FEATURES if f in flags]
            extra = sorted(f for f in flags if f.startswith(("avx512", "amx")) and f not in wanted)
            return wanted + extra
    return None


def _sysctl_features() -> list[str] | None:
    """macOS: x86 feature lists from ``sysctl`` (``AVX1.0`` -> ``avx``); Apple CPUs: ``asimd``."""
    if platform.system() != "Darwin":
        return None
    if platform.machine() == "arm64":
        return ["asimd"]  # every Apple CPU has Advanced SIMD
    try:
        done = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = {f.lower().replace(".", "_").replace("avx1_0", "avx") for f in done.stdout.split()}
    return cpu_features("flags: " + " ".join(sorted(names))) if names else None


def vector_width(features: Sequence[str] | None) -> str | None:
    """The widest vector instructions in ``features``: ``"AVX-512"``, ``"AVX2"``, ..."""
    if not features:
        return None
    for flag, name in (
        ("avx512f", "AVX-512"),
        ("avx2", "AVX2"),
        ("avx", "AVX"),
        ("sse4_2", "SSE4.2"),
        ("sve2", "SVE2"),
        ("sve", "SVE"),
        ("asimd", "NEON"),
    ):
        if flag in features:
            return name + (
                " + AMX" if name == "AVX-512" and any("amx" in f for f in features) else ""
            )
    return None


def jax_threads() -> tuple[int, str]:
    """The threads XLA's CPU client runs a computation's parts on, and how that was found.

    Counted, where the OS names threads (Linux), as the threads of this process whose
    name holds ``XLAEigen``: the client's intra-op pool, started with the client. It is
    sized by the cores the process may use (``os.sched_getaffinity``); elsewhere that
    count is what is reported. ``XLA_FLAGS`` (in ``meta.xla_flags``) can change it.
    """
    jax.devices("cpu")  # starts the CPU client, and its pool, if nothing has yet
    try:
        names = []
        for task in Path("/proc/self/task").iterdir():
            try:
                names.append((task / "comm").read_text())
            except OSError:
                continue
    except OSError:
        names = []
    counted = sum("XLAEigen" in name for name in names)
    if counted:
        return counted, "threads named XLAEigen in this process"
    return usable_cores(), "usable cores (XLA sizes its pool by them; thread names unavailable)"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model(detailed: bool = False, cpuinfo: str | None = None) -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` where there is one.

    ``detailed`` adds its family, model and stepping numbers, which tell CPU
    generations apart where a virtual machine reports a bare name ("AMD EPYC").
    """
    fields: dict[str, str] = {}
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            break  # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [
        f"{label} {fields[key]}"
        for key, label in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
        if key in fields
    ]
    return f"{name} ({', '.join(numbers)})" if detailed and numbers else name


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


def impl_name(record: Mapping) -> str:
    """``"scan"``, ``"scan forward"`` (an as-written method), ``"scan x2 devices"`` (the
    batch split over a mesh of two), ``"torch nn.RNN"``, ``"torch.compile"``."""
    if record["framework"] == "jax":
        devices = record.get("devices") or 1
        mesh = f"x{devices} devices" if devices > 1 else None
        return " ".join(filter(None, (record["loop"], record.get("method"), mesh)))
    peer, framework = record["peer"], record["framework"]
    # "torch.compile", "equinox:checkpoints=8" and "flax_loss:scan" name their framework
    # already; "flax nnx.RNN" and "torch eager" do not.
    return peer if peer.startswith(framework) else f"{framework} {peer}"


def speedups(records: Sequence[Mapping]) -> dict[int, dict[str, list[float]]]:
    """For each JAX record (by index): ``{peer: [torch time / JAX time, low, high]}``.

    The ratios the run measured with their 95% intervals (``vs_torch``); for records
    without (format 1 files), the ratio of medians with no interval (``nan``), against
    the peers of the same case and the same as-written algorithm.
    """
    out = {}
    for index, r in enumerate(records):
        if r["framework"] != "jax" or not r["run_s_median"]:
            continue
        if r.get("vs_torch"):
            out[index] = {peer: list(v) for peer, v in r["vs_torch"].items()}
            continue
        out[index] = {
            t["peer"]: [t["run_s_median"] / r["run_s_median"], math.nan, math.nan]
            for t in records
            if t["framework"] == "torch"
            and t["run_s_median"]
            and _same_case(t, r)
            and t.get("method") == r.get("method")
        }
    return out


def _same_case(a: Mapping, b: Mapping) -> bool:
    keys = ("scenario", "length", "batch", "input", "hidden", "cell", "layers")
    return all(a.get(k) == b.get(k) for k in keys)


def format_ratio(values: Sequence[float]) -> str:
    """``2.23x [1.98-2.41]``, ``948x [758-1304]``; without an interval, ``2.23x``."""
    value, low, high = values
    if math.isnan(low):
        return f"{_figure(value)}x"
    return f"{_figure(value)}x [{_figure(low)}-{_figure(high)}]"


def _varying(records: Sequence[Mapping]) -> list[str]:
    """The sizes that differ between records of one scenario and length (a sweep)."""
    out = []
    for key in ("batch", "input", "hidden"):
        seen: dict[tuple, set] = {}
        for r in records:
            seen.setdefault((r["scenario"], r["length"]), set()).add(r.get(key))
        if any(len(v) > 1 for v in seen.values()):
            out.append(key)
    return out


#: The terminal's width the default table fits (``--wide`` prints every column instead).
TABLE_WIDTH = 120


def format_table(records: Sequence[Mapping], *, wide: bool = False) -> str:
    """The records as an aligned text table, with each JAX row's speedup over its peers.

    By default the table fits :data:`TABLE_WIDTH` columns: scenario, T, impl, the run
    time's median with its 95% interval, the bytes saved for backward, the speedup over
    each peer (one a line) and a note; a long note wraps, and a skipped row's reason fills
    the figures' columns. ``wide`` prints every column on one line each (trace+lower and
    compile time, min, temp bytes, GFLOP/s too); the JSON has all of them either way.
    """
    if wide:
        return _wide_table(records)
    ratios = speedups(records)
    varying = _varying(records)
    named = ("scenario", "T", *(_SIZE_LABELS[k] for k in varying), "impl")
    header = (*named, "run median [95% CI]", "saved", "speedup vs peers", "note")
    # Each row: its named cells, then its figures' cells or, if skipped, the reason.
    rows: list[tuple[list[str], list[list[str]] | str]] = []
    for index, r in enumerate(records):
        names = [r["scenario"], str(r["length"]), *(str(r[k]) for k in varying), impl_name(r)]
        if r["skipped"]:
            rows.append((names, f"skipped: {r['skipped']}"))
            continue
        notes = [] if r["max_rel_diff"] is None else [f"rel diff {r['max_rel_diff']:.1e}"]
        notes += filter(None, [evaluations_note(r), busy_flag(r)])
        figures = [
            [_seconds_ci(r["run_s_median"], r.get("run_s_ci"))],
            [_bytes(r.get("saved_bytes"))],
            [f"{p} {format_ratio(x)}" for p, x in ratios.get(index, {}).items()],
            ["; ".join(notes)],
        ]
        rows.append((names, figures))
    widths = [len(h) for h in header]
    for names, figures in rows:
        cells = [[n] for n in names] + ([] if isinstance(figures, str) else figures)
        for c, cell in enumerate(cells):
            widths[c] = max([widths[c], *map(len, cell)])
    # What may wrap, and down to how narrow: the note and the speedups, then the impl.
    _shrink(widths, [{len(header) - 1: 12, len(header) - 2: 16}, {len(named) - 1: 8}])
    lines = [
        _join_cells([[h] for h in header], widths),
        _join_cells([["-" * w] for w in widths], widths),
    ]
    offset = sum(widths[: len(named)]) + 2 * len(named)
    for names, figures in rows:
        if isinstance(figures, str):  # skipped: the reason where the figures would be
            cells, row_widths = [[n] for n in names] + [[figures]], widths[: len(named)]
            row_widths = [*row_widths, max(TABLE_WIDTH - offset, 20)]
        else:
            cells, row_widths = [[n] for n in names] + figures, widths
        lines.append(_join_cells(cells, row_widths))
    footnote = (
        "run median [95% CI]: seconds per call, the interval's ends in the median's unit. "
        "speedup vs peers = the peer's time / JAX's time (> 1: JAX is faster), against the "
        "peers running the same algorithm; [a-b]: 95% "
        "bootstrap interval. saved = bytes kept for the backward pass (JAX: jax.vjp "
        "residuals; PyTorch: saved tensors). rel diff: a peer's largest relative difference "
        "from JAX's results. BUSY: other processes kept that many cores busy while the row "
        f"was timed (>= {BUSY_CORES:g}). --wide adds trace+lower and compile time, the "
        "fastest sample, temp bytes and GFLOP/s; the JSON has every figure."
    )
    if any(r.get("evaluations") is not None for r in records):
        footnote += (
            " evals/T (--evaluations): body evaluations of one gradient over T, and the "
            "fewest possible with that many checkpoints."
        )
    return "\n".join([*lines, *textwrap.wrap(footnote, TABLE_WIDTH)])


def _shrink(widths: list[int], tiers: Sequence[Mapping[int, int]]) -> None:
    """Narrows columns until the table fits :data:`TABLE_WIDTH`: those of the first tier
    (index: least width), widest first, down to their least; then the next tier's."""
    for shrinkable in tiers:
        while sum(widths) + 2 * (len(widths) - 1) > TABLE_WIDTH:
            room = [c for c, least in shrinkable.items() if widths[c] > least]
            if not room:
                break
            widths[max(room, key=lambda c: widths[c])] -= 1


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width``; ``[""]`` for none."""
    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def _join_cells(cells: Sequence[Sequence[str]], widths: Sequence[int]) -> str:
    """One table row, each cell wrapped to its column's width: as many lines as the
    tallest cell needs."""
    wrapped = [
        [part for line in cell for part in _wrap(line, w)]
        for cell, w in zip(cells, widths, strict=True)
    ]
    lines = []
    for k in range(max(map(len, wrapped))):
        parts = [
            (cell[k] if k < len(cell) else "").ljust(w)
            for cell, w in zip(wrapped, widths, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def evaluations_note(record: Mapping) -> str | None:
    """``"evals/T 5.83 (fewest 5.29)"``: ``--evaluations``' count over T, and for C
    checkpoints the fewest possible (:func:`loopgrad_jax.checkpointed_evaluations`);
    ``None`` where nothing was counted."""
    count, length = record.get("evaluations"), record["length"]
    if count is None:
        return None
    if record["framework"] == "jax":
        checkpoints = lg.Loop.parse(record["loop"]).checkpoints
    else:
        checkpoints = peers.equinox_checkpoints(record["peer"], length)
    fewest = ""
    if checkpoints:
        fewest = f" (fewest {lg.checkpointed_evaluations(length, checkpoints) / length:.2f})"
    return f"evals/T {count / length:.2f}{fewest}"


def busy_flag(record: Mapping) -> str | None:
    """``"BUSY: 1.4 other cores"`` for a record timed while other processes kept at least
    :data:`BUSY_CORES` cores busy; ``None`` otherwise (or where nobody counted)."""
    cores = record.get("other_cores")
    if cores is None or cores < BUSY_CORES:
        return None
    count = f"{cores:.2g}"
    return f"BUSY: {count} other core{'s' * (count != '1')}"


def _seconds_ci(median: float | None, ci: Sequence[float] | None) -> str:
    """``"16.6 us [15.9-22.6]"``: the median, and its interval in the median's unit."""
    if median is None:
        return ""
    text = _seconds(median)
    if not ci:
        return text
    unit = text.split()[1]
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return f"{text} [{_figure(ci[0] / scale)}-{_figure(ci[1] / scale)}]"


def _figure(value: float) -> str:
    """Three significant digits, or the whole number where it has more: ``1840``."""
    text = f"{value:.3g}"
    return f"{value:.0f}" if "e" in text else text


def _wide_table(records: Sequence[Mapping]) -> str:
    """``--wide``: every column, one line per record."""
    ratios = speedups(records)
    varying = _varying(records)
    columns = (
        "scenario",
        "T",
        *(_SIZE_LABELS[k] for k in varying),
        "impl",
        "lower",
        "compile",
        "run (median)",
        "95% CI",
        "min",
        "saved",
        "temp",
        "GFLOP/s",
        "speedup vs peers [95% CI]",
        "note",
    )
    rows = [columns]
    for index, r in enumerate(records):
        vs = ", ".join(f"{p} {format_ratio(x)}" for p, x in ratios.get(index, {}).items())
        if r["skipped"]:
            note = f"skipped: {r['skipped']}"
        else:
            notes = []
            if r["max_rel_diff"] is not None:
                notes.append(f"rel diff vs jax {r['max_rel_diff']:.1e}")
            notes += filter(None, [evaluations_note(r)])
            if (r.get("other_cores") or 0) >= BUSY_CORES:
                notes.append(f"BUSY: other processes used {r['other_cores']:.2g} cores")
            note = "; ".join(notes)
        ci = r.get("run_s_ci")
        rows.append(
            (
                r["scenario"],
                str(r["length"]),
                *(str(r[k]) for k in varying),
                impl_name(r),
                _seconds(r["lower_s"]),
                _seconds(r["compile_s"]),
                _seconds(r["run_s_median"]),
                f"{_seconds(ci[0])}-{_seconds(ci[1])}" if ci else "",
                _seconds(r["run_s_min"]),
                _bytes(r.get("saved_bytes")),
                _bytes(r.get("temp_bytes")),
                "" if r["gflops"] is None else f"{r['gflops']:.3g}",
                vs,
                note,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "speedup vs peers = the peer's time / JAX's time (> 1: JAX is faster), against the "
        "peers running the same algorithm; [a-b]: 95% bootstrap interval."
    )
    lines.append(
        "saved = bytes kept for the backward pass (JAX: jax.vjp residuals; PyTorch: saved "
        "tensors); temp = the executable's temp bytes."
    )
    return "\n".join(line.rstrip() for line in lines)


_SIZE_LABELS = {"batch": "B", "input": "I", "hidden": "H"}


#: A recommendation quoted at a loop shorter than this is smoke-size: there a call's fixed
#: costs (dispatch, handling the arguments) are a large share of its time, so its ranking
#: says nothing about longer loops. In one ``--quick`` run on a busy 2-core CPU, scan's
#: accumulate gradient took 17.7 us at T=10 and 31.3 us at T=1000: a hundred times the
#: steps for 1.8x the time.
SMOKE_LENGTH = 100


def wrap_advice(lines: Sequence[str], width: int = TABLE_WIDTH) -> list[str]:
    """:func:`recommend`'s lines as printed: each wrapped to ``width`` columns, its
    continuation indented two more spaces than the line."""
    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out += textwrap.wrap(line, width, subsequent_indent=indent) or [""]
    return out


def recommend(records: Sequence[Mapping]) -> list[str]:
    """A short recommendation per scenario, from the measured rows.

    For each scenario (and as-written method) at the longest length measured: the
    fastest loop kind (and whether its interval overlaps the next one's), the one
    that keeps the least for backward, how the fastest compares with the PyTorch
    peers, and where compile time plus N calls changes the answer between a python
    loop and scan (the break-even N).

    A time or ratio quoted from a row timed on a busy machine carries that row's
    flag (:func:`busy_flag`); bytes are counted, not timed, and carry none. When a
    scenario's longest length is under :data:`SMOKE_LENGTH`, the first line says the
    run is smoke-size.
    """
    lines: list[str] = []
    smoke: dict[str, int] = {}  # heading -> its length, for those under SMOKE_LENGTH
    jax_rows = [r for r in records if r["framework"] == "jax" and r["run_s_median"]]
    keys = dict.fromkeys(
        (r["scenario"], r.get("method"), r["batch"], r["input"], r["hidden"]) for r in jax_rows
    )
    ratios = speedups(records)
    index = {id(r): k for k, r in enumerate(records)}
    for scenario, method, batch, inp, hidden in keys:
        rows = [
            r
            for r in jax_rows
            if (r["scenario"], r.get("method"), r["batch"], r["input"], r["hidden"])
            == (scenario, method, batch, inp, hidden)
        ]
        length = max(r["length"] for r in rows)
        at = sorted((r for r in rows if r["length"] == length), key=lambda r: r["run_s_median"])
        sizes = f"T={length}, B={batch}, I={inp}, H={hidden}"
        if scenario in ("accumulate", "stack"):
            sizes = f"T={length}, x of shape ({batch}, {inp})"
        cell = at[0].get("cell")
        if cell not in (None, "article"):
            layers = at[0].get("layers") or 1
            sizes = f"{cell}, {layers} layer{'s' * (layers > 1)}, {sizes}"
        heading = f"{scenario}{' ' + method if method else ''}"
        if length < SMOKE_LENGTH:
            smoke[heading] = length
        lines.append(f"{heading} ({sizes}):")
        best = at[0]
        text = _flagged(f"  fastest: {_loop(best)} {_seconds(best['run_s_median'])}", best)
        if len(at) > 1:
            second = at[1]
            if _overlap(best.get("run_s_ci"), second.get("run_s_ci")):
                text += _flagged(f"; {_loop(second)} within its interval (no clear winner)", second)
            else:
                ratio = second["run_s_median"] / best["run_s_median"]
                text += _flagged(f"; next {_loop(second)} {ratio:.3g}x its time", best, second)
        vs = ratios.get(index[id(best)], {})
        if vs:
            text += "; vs peers " + ", ".join(
                _flagged(f"{p} {format_ratio(x)}", best, *_peer_rows(records, best, p))
                for p, x in vs.items()
            )
        lines.append(text)
        saved = [r for r in at if r.get("saved_bytes") is not None]
        if saved:
            small = min(saved, key=lambda r: r["saved_bytes"])
            kept = "between steps" if scenario == "train_as_written" else "for backward"
            text = f"  smallest: {small['loop']} keeps {_bytes(small['saved_bytes'])} {kept}"
            if small is not best:
                kept_by_best = (
                    _bytes(best["saved_bytes"])
                    if best.get("saved_bytes") is not None
                    else "not counted"  # a data-parallel row: the bytes are per device
                )
                ratio = small["run_s_median"] / best["run_s_median"]
                text += _flagged(
                    f" at {ratio:.3g}x the time of {_loop(best)} ({kept_by_best})", small, best
                )
            torch_saved = [
                t
                for t in records
                if t["framework"] == "torch"
                and t.get("saved_bytes") is not None
                and t["length"] == length
                and _same_case(t, best)
                and t.get("method") == method
            ]
            if torch_saved:
                text += "; torch " + ", ".join(
                    f"{t['peer']} {_bytes(t['saved_bytes'])}" for t in torch_saved
                )
            lines.append(text)
        lines += _break_even([r for r in rows if (r.get("devices") or 1) == 1])
    return _smoke_note(smoke, len(keys)) + lines


def _smoke_note(smoke: Mapping[str, int], groups: int) -> list[str]:
    """The lines that say a run (or some of its scenarios) is smoke-size, if it is."""
    if not smoke:
        return []
    lengths = " and ".join(f"T={t}" for t in sorted(set(smoke.values())))
    whose = "" if len(smoke) == groups else f" for {', '.join(smoke)}"
    text = (
        f"smoke-size run: the figures below{whose} come from loops of {lengths}, under "
        f"{SMOKE_LENGTH} steps, where a call's fixed costs (dispatch, handling the "
        "arguments) are a large share of its time; these figures say nothing about which "
        f"loop kind to use for loops of {SMOKE_LENGTH} steps or more, so do not take this "
        "ranking as advice: measure at your own T (loopgrad-bench --quick runs "
        "T=10, 100 and 1000)."
    )
    return textwrap.wrap(text, TABLE_WIDTH)


def _flagged(text: str, *rows: Mapping) -> str:
    """``text``, a figure quoted from ``rows``, then the BUSY flag of the busiest of them
    that was timed on a busy machine, if any was."""
    busy = [r for r in rows if busy_flag(r)]
    if not busy:
        return text
    return f"{text} ({busy_flag(max(busy, key=lambda r: r['other_cores']))})"


def _peer_rows(records: Sequence[Mapping], row: Mapping, peer: str) -> list[Mapping]:
    """The records of ``peer`` timed beside the JAX ``row`` (its case and method)."""
    return [
        t
        for t in records
        if t["framework"] != "jax"
        and t["peer"] == peer
        and t["run_s_median"]
        and _same_case(t, row)
        and t.get("method") == row.get("method")
        and t.get("precision") == row.get("precision")
    ]


def _loop(record: Mapping) -> str:
    """The loop kind, and the mesh size of a data-parallel row."""
    devices = record.get("devices") or 1
    return record["loop"] + (f" on {devices} devices" if devices > 1 else "")


def _overlap(a, b) -> bool:
    return bool(a and b and a[0] <= b[1] and b[0] <= a[1])


def _break_even(rows: Sequence[Mapping]) -> list[str]:
    """Python loop against scan at the longest length both ran: total time of N calls."""
    both = [
        length
        for length in {r["length"] for r in rows}
        if {"python", "scan"} <= {r["loop"] for r in rows if r["length"] == length}
    ]
    if not both:
        return []
    length = max(both)
    py, scan = (
        next(r for r in rows if r["length"] == length and r["loop"] == loop)
        for loop in ("python", "scan")
    )
    setup_py = py["lower_s"] + py["compile_s"]
    setup_scan = scan["lower_s"] + scan["compile_s"]
    d_setup = setup_py - setup_scan  # > 0: python takes longer to trace and compile
    d_run = scan["run_s_median"] - py["run_s_median"]  # > 0: python runs faster
    head = _flagged(
        f"  python vs scan (T={length}): python {_seconds(py['run_s_median'])} per call, "
        f"{_seconds(setup_py)} to trace and compile",
        py,
    ) + _flagged(f"; scan {_seconds(scan['run_s_median'])}, {_seconds(setup_scan)}", scan)
    # python's total minus scan's, over N calls: d_setup - N * d_run.
    if _overlap(py.get("run_s_ci"), scan.get("run_s_ci")):
        cheaper = "scan" if d_setup > 0 else "python"
        tail = (
            f": per-call times within each other's intervals, so {cheaper}, quicker to "
            "compile, costs less in total"
        )
    elif d_setup > 0 and d_run > 0:
        n = math.ceil(d_setup / d_run)
        tail = f": scan costs less in total up to {n:,} calls, python beyond"
    elif d_setup > 0:
        tail = ": scan costs less from the first call"
    elif d_run >= 0:
        tail = ": python costs less at any number of calls"
    else:
        n = math.floor(d_setup / d_run)
        tail = f": python costs less in total up to {n:,} calls, scan beyond"
    return [head + tail]


def throughput_table(records: Sequence[Mapping]) -> str | None:
    """Sequences per second of each implementation across a swept size, or ``None``."""
    varying = [k for k in _varying(records) if k in ("batch", "hidden")]
    rows = [r for r in records if r.get("seqs_per_s")]
    if not varying or not rows:
        return None
    key = varying[0]
    values = sorted({r[key] for r in rows})
    label = _SIZE_LABELS[key]
    table = [("scenario", "T", "impl", *(f"{label}={v}" for v in values))]
    for scenario, length, impl in dict.fromkeys(
        (r["scenario"], r["length"], impl_name(r)) for r in rows
    ):
        cells = {
            r[key]: f"{r['seqs_per_s']:.3g}"
            for r in rows
            if (r["scenario"], r["length"], impl_name(r)) == (scenario, length, impl)
        }
        table.append((scenario, str(length), impl, *(cells.get(v, "") for v in values)))
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"throughput (sequences per second) across {key}:\n" + "\n".join(
        line.rstrip() for line in lines
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{_figure(value / scale)} {unit}"
    return f"{_figure(value / 1e-9)} ns"


def _bytes(value: int | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value} B"
