"""Timing a JAX case (trace+lower, compile, steady state) and any Python callable.

What :func:`time_jax` measures, as plain Python::

  t0; lowered = jax.jit(f).lower(*args)    # trace + lower       -> lower_s
  t1; compiled = lowered.compile()         # XLA compile         -> compile_s
  for _ in range(warmup): jax.block_until_ready(compiled(*args))
  for _ in range(repeats):                 # steady state        -> run_s_median, run_s_min
    t = perf_counter(); jax.block_until_ready(compiled(*args)); times.append(perf_counter() - t)

Every timed call ends in ``jax.block_until_ready``: without it only the
dispatch would be timed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

#: The shortest timed window whose :attr:`RunTimes.other_cores` is reported.
MIN_LOAD_WINDOW_S = 0.25


class RunTimes(NamedTuple):
    """Steady-state seconds per call, and the last call's output."""

    median_s: float
    min_s: float
    output: Any
    other_cores: float | None = None  # cores other processes kept busy meanwhile (Linux)


class JaxTiming(NamedTuple):
    """What :func:`time_jax` measures."""

    lower_s: float  # trace + lower, median over compile_repeats
    compile_s: float  # XLA compile, median over compile_repeats
    run: RunTimes
    memory_bytes: int | None  # temp + argument + output bytes, if the backend reports them
    temp_bytes: int | None  # the temp part alone: what the loop keeps for reverse mode


def time_calls(
    call: Callable[[], Any],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> RunTimes:
    """Median and minimum seconds of ``sync(call())`` over ``repeats`` calls after ``warmup``."""
    if repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats}.")
    output = None
    for _ in range(warmup):
        output = sync(call())
    times = []
    busy_before, own_before, wall_before = machine_busy_s(), own_cpu_s(), time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        output = sync(call())
        times.append(time.perf_counter() - start)
    busy_after, own_after, wall = machine_busy_s(), own_cpu_s(), time.perf_counter() - wall_before
    others = None
    # /proc/stat counts in clock ticks (10 ms): too coarse for a shorter window.
    if busy_before is not None and busy_after is not None and wall >= MIN_LOAD_WINDOW_S:
        other_s = (busy_after - busy_before) - (own_after - own_before)
        others = round(max(other_s, 0.0) / wall, 2)
    return RunTimes(statistics.median(times), min(times), output, others)


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (``/proc/stat``), or ``None``.

    With :func:`own_cpu_s` it tells how busy *other* processes kept the machine
    while a case was timed: a benchmark on a shared machine should say so.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def time_jax(
    build: Callable[[], Callable[..., Any]],
    args: Sequence[Any],
    *,
    warmup: int,
    repeats: int,
    compile_repeats: int = 1,
) -> JaxTiming:
    """Times tracing+lowering, compiling and running ``build()`` on ``args``.

    Args:
      build: returns a new function object on every call, so that each of the
        ``compile_repeats`` lowerings traces and compiles afresh instead of hitting
        JAX's caches (they are keyed on the function).
      args: the arguments, already on the device to run on.
      warmup: untimed calls before the timed ones.
      repeats: timed calls.
      compile_repeats: lowerings and compilations; the median of each is kept.

    Returns:
      A :class:`JaxTiming`.
    """
    lower_times, compile_times = [], []
    compiled = None
    for _ in range(max(compile_repeats, 1)):
        start = time.perf_counter()
        lowered = jax.jit(build()).lower(*args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
        lower_times.append(lowered_at - start)
        compile_times.append(compiled_at - lowered_at)
    run = time_calls(lambda: compiled(*args), warmup=warmup, repeats=repeats)
    return JaxTiming(
        lower_s=statistics.median(lower_times),
        compile_s=statistics.median(compile_times),
        run=run,
        memory_bytes=memory_bytes(compiled),
        temp_bytes=memory_bytes(compiled, parts=("temp",)),
    )


def memory_bytes(
    compiled: jax.stages.Compiled, parts: tuple[str, ...] = ("temp", "argument", "output")
) -> int | None:
    """The executable's bytes of ``parts`` (summed), or ``None`` if not reported."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        return None
    if stats is None:
        return None
    sizes = [getattr(stats, f"{part}_size_in_bytes", None) for part in parts]
    if any(s is None or s < 0 for s in sizes):
        return None
    return int(sum(sizes))
