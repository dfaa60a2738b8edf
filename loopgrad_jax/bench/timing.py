"""Timing: compiling a JAX case, then running implementations interleaved.

What :func:`compile_jax` measures, as plain Python::

  t0; lowered = jax.jit(f).lower(*args)    # trace + lower       -> lower_s
  t1; compiled = lowered.compile()         # XLA compile         -> compile_s

What :func:`time_interleaved` measures for a group of implementations of one
case (JAX loop kinds and PyTorch peers alike), as plain Python::

  for name, call in calls.items():          # untimed
    for _ in range(warmup): sync(call())
    number[name] = 1 if the last warm-up call took SAMPLE_MIN_S or more, else
                   timeit's autorange: the first of 1, 2, 5, 10, 20, 50, ... calls
                   that take SAMPLE_MIN_S or more together
  rounds, start = 0, perf_counter()
  while rounds < min_samples or perf_counter() - start < min_time:
    for name in names (in reverse order every other round):
      t = perf_counter()
      for _ in range(number[name]): sync(call())
      samples[name].append((perf_counter() - t) / number[name])
    rounds += 1

Every call ends in ``sync`` (``jax.block_until_ready`` for JAX): without it only
the dispatch would be timed. Each sample is seconds per call; :func:`spread`
summarises the samples (median, min, quartiles, a bootstrap interval of the
median) and :func:`ratio` the ratio of two medians with its interval.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

#: The shortest timed window whose ``other_cores`` is reported: ``/proc/stat`` counts in
#: 10 ms clock ticks, too coarse for a shorter one.
MIN_LOAD_WINDOW_S = 0.25

#: One sample is at least this long (several calls of a fast case, averaged), so that the
#: timer's resolution and one call's overhead do not dominate it.
SAMPLE_MIN_S = 2e-3

#: Bootstrap resamples behind every interval; the generator is seeded, so a file's
#: intervals can be recomputed exactly from its samples.
RESAMPLES = 2000
CONFIDENCE = 0.95


class Spread(NamedTuple):
    """Seconds per call of one implementation, over its samples."""

    median_s: float
    min_s: float
    q1_s: float  # first quartile
    q3_s: float  # third quartile
    ci_s: tuple[float, float]  # 95% bootstrap interval of the median
    samples: int  # how many samples
    number: int  # calls averaged into each sample


class Interleaved(NamedTuple):
    """What :func:`time_interleaved` measured."""

    samples: dict[str, list[float]]  # name -> seconds per call, one per round, in round order
    number: dict[str, int]  # name -> calls per sample
    outputs: dict[str, Any]  # name -> the last call's output
    window_s: float  # wall seconds of the timed rounds
    other_cores: float | None  # cores other processes kept busy meanwhile (Linux)


class JaxCompiled(NamedTuple):
    """What :func:`compile_jax` measures, and the executable it built."""

    lower_s: float  # trace + lower, median over compile_repeats
    compile_s: float  # XLA compile, median over compile_repeats
    compiled: jax.stages.Compiled
    memory_bytes: int | None  # temp + argument + output bytes, if the backend reports them
    temp_bytes: int | None  # the temp part alone: what the loop keeps for reverse mode


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    warmup: int,
    min_samples: int,
    min_time: float,
    sync: Mapping[str, Callable[[Any], Any]] | None = None,
    first: Mapping[str, Callable[[], Any]] | None = None,
) -> Interleaved:
    """Times ``calls`` round-robin until ``min_samples`` rounds and ``min_time`` seconds.

    Args:
      calls: name -> a zero-argument callable running one implementation once.
      warmup: untimed calls of each before calibrating.
      min_samples: at least this many samples (rounds) for each.
      min_time: keep taking rounds until this many seconds have passed.
      sync: name -> what ends a call (default ``jax.block_until_ready``).
      first: name -> a callable run instead of the first warm-up call (for example one
        that also counts memory), even when ``warmup`` is 0; its output is discarded.

    Returns:
      An :class:`Interleaved`. Every implementation's samples come from the same
      rounds, so a ratio of two can pair them round by round.
    """
    if min_samples < 1:
        raise ValueError(f"min_samples must be an int >= 1, got {min_samples}.")
    if not calls:
        raise ValueError("calls must hold at least one callable to time, got none.")
    sync = {name: (sync or {}).get(name, jax.block_until_ready) for name in calls}
    first = first or {}
    outputs: dict[str, Any] = {}
    number: dict[str, int] = {}
    for name, call in calls.items():
        last_s = 0.0
        for k in range(max(warmup, int(name in first))):
            began = time.perf_counter()
            outputs[name] = sync[name]((first[name] if k == 0 and name in first else call)())
            last_s = time.perf_counter() - began
        if last_s >= SAMPLE_MIN_S:  # one call makes a sample: no need to calibrate
            number[name] = 1
        else:
            number[name], outputs[name] = _autorange(call, sync[name])
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    busy_before, own_before = machine_busy_s(), own_cpu_s()
    start = time.perf_counter()
    rounds = 0
    while rounds < min_samples or time.perf_counter() - start < min_time:
        for name in names if rounds % 2 == 0 else reversed(names):
            call, done, n = calls[name], sync[name], number[name]
            began = time.perf_counter()
            for _ in range(n):
                outputs[name] = done(call())
            samples[name].append((time.perf_counter() - began) / n)
        rounds += 1
    window = time.perf_counter() - start
    busy_after, own_after = machine_busy_s(), own_cpu_s()
    others = None
    if busy_before is not None and busy_after is not None and window >= MIN_LOAD_WINDOW_S:
        other_s = (busy_after - busy_before) - (own_after - own_before)
        others = round(max(other_s, 0.0) / window, 2)
    return Interleaved(samples, number, outputs, window, others)


def _autorange(call: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[int, Any]:
    """Calls per sample, the first of 1, 2, 5, 10, 20, ... taking ``SAMPLE_MIN_S`` together.

    Returns it with the last call's output. The calls are untimed warm-up for the rounds.
    """
    output = None
    for n in (base * 10**exponent for exponent in range(9) for base in (1, 2, 5)):
        began = time.perf_counter()
        for _ in range(n):
            output = sync(call())
        if time.perf_counter() - began >= SAMPLE_MIN_S:
            break
    return n, output


def spread(samples: Sequence[float], number: int = 1) -> Spread:
    """Median, minimum, quartiles and the bootstrap interval of the median of ``samples``."""
    if not samples:
        raise ValueError("samples must hold at least one time, got none.")
    a = np.asarray(samples, np.float64)
    q1, q3 = np.percentile(a, [25, 75])
    return Spread(
        median_s=float(np.median(a)),
        min_s=float(a.min()),
        q1_s=float(q1),
        q3_s=float(q3),
        ci_s=median_interval(a),
        samples=len(a),
        number=number,
    )


def median_interval(samples: Sequence[float]) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the median (seeded: reproducible)."""
    a = np.asarray(samples, np.float64)
    picks = np.random.default_rng(0).integers(0, len(a), (RESAMPLES, len(a)))
    return _interval(np.median(a[picks], axis=1))


def ratio(
    numerator: Sequence[float], denominator: Sequence[float], *, paired: bool = True
) -> tuple[float, float, float]:
    """``(median(numerator) / median(denominator), low, high)`` with a 95% bootstrap interval.

    ``paired`` samples of equal count come from the same rounds of
    :func:`time_interleaved` and are resampled in pairs, so the interval keeps what the
    two shared (a slow round slows both); otherwise each side is resampled alone.

    Examples:
      >>> ratio([4.0, 4.0, 4.0], [2.0, 2.0, 2.0])
      (2.0, 2.0, 2.0)
    """
    a, b = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if not len(a) or not len(b):
        raise ValueError(f"both sides need samples, got {len(a)} and {len(b)}.")
    rng = np.random.default_rng(0)
    picks_a = rng.integers(0, len(a), (RESAMPLES, len(a)))
    if paired and len(a) == len(b):
        picks_b = picks_a
    else:
        picks_b = rng.integers(0, len(b), (RESAMPLES, len(b)))
    ratios = np.median(a[picks_a], axis=1) / np.median(b[picks_b], axis=1)
    low, high = _interval(ratios)
    return float(np.median(a) / np.median(b)), low, high


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def round_samples(samples: Sequence[float], digits: int = 4) -> list[float]:
    """``samples`` to ``digits`` significant digits, for the JSON file."""
    out = []
    for s in samples:
        if s <= 0 or not math.isfinite(s):
            out.append(float(s))
            continue
        out.append(round(s, digits - 1 - math.floor(math.log10(s))))
    return out


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (``/proc/stat``), or ``None``.

    With :func:`own_cpu_s` it tells how busy *other* processes kept the machine
    while a case was timed: a benchmark on a shared machine should say so. On a
    virtual machine the hypervisor's *steal* time counts too: CPU time this machine
    wanted and another guest got, which slows a timing as another process would.
    """
    try:
        with open("/proc/stat") as f:
            line = f.readline()
    except OSError:
        return None
    return busy_ticks(line) / os.sysconf("SC_CLK_TCK")


def busy_ticks(line: str) -> int:
    """User, nice, system and steal clock ticks of ``/proc/stat``'s ``cpu`` line.

    Examples:
      >>> busy_ticks("cpu  100 20 30 999 5 0 7 40 0 0")  # steal: the 8th number
      190
      >>> busy_ticks("cpu 1 2 3 4")  # a kernel that reports no steal
      6
    """
    fields = [int(v) for v in line.split()[1:]]
    user, nice, system = fields[:3]
    steal = fields[7] if len(fields) > 7 else 0
    return user + nice + system + steal


def own_cpu_s() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def compile_jax(
    build: Callable[[], Callable[..., Any]],
    args: Sequence[Any],
    *,
    compile_repeats: int = 1,
) -> JaxCompiled:
    """Times tracing+lowering and compiling ``build()`` on ``args``.

    Args:
      build: returns a new function object on every call, so that each of the
        ``compile_repeats`` lowerings traces and compiles afresh instead of hitting
        JAX's caches (they are keyed on the function).
      args: the arguments, already on the device to run on.
      compile_repeats: lowerings and compilations; the median of each is kept.

    Returns:
      A :class:`JaxCompiled`, holding the last executable.
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
    return JaxCompiled(
        lower_s=statistics.median(lower_times),
        compile_s=statistics.median(compile_times),
        compiled=compiled,
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
