"""Runs the cases of a benchmark plan, one record at a time.

The order, as plain Python::

  for scenario in scenarios:
    for length in lengths:
      for loop in loops:        yield the JAX record (or a skipped one)
      for peer in PEERS[...]:   yield the PyTorch record (when torch is used)

Every record has the keys of :data:`RECORD_KEYS`, ``None`` where a figure does
not apply.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from loopgrad_jax.bench import cases, timing, torch_peers
from loopgrad_jax.bench.flops import rnn_flops

#: The keys of every record, in order.
RECORD_KEYS: tuple[str, ...] = (
    "scenario",
    "loop",  # a loop kind of lg.LOOPS for JAX, None for PyTorch
    "framework",  # "jax" or "torch"
    "peer",  # "eager" or "nn.RNN" for PyTorch, None for JAX
    "length",
    "batch",
    "input",
    "hidden",
    "window",  # train_tbptt only
    "lower_s",  # trace + lower (JAX)
    "compile_s",  # XLA compile (JAX)
    "run_s_median",
    "run_s_min",
    "memory_bytes",  # temp + argument + output bytes of the executable (JAX)
    "temp_bytes",  # the temp part alone (JAX)
    "flops",  # loopgrad_jax.bench.flops.rnn_flops (RNN scenarios)
    "gflops",  # flops / run_s_median / 1e9
    "max_rel_diff",  # PyTorch vs JAX outputs: max |torch - jax| / max |jax|, per output
    "other_cores",  # cores other processes kept busy during the timed calls (Linux)
    "skipped",  # why the case was not run, or None
)


class Plan(NamedTuple):
    """Everything a benchmark run does."""

    scenarios: Sequence[str]
    loops: Sequence[str]
    lengths: Sequence[int]
    batch: int
    input: int
    hidden: int
    window: int
    limits: cases.Limits
    warmup: int
    repeats: int
    compile_repeats: int
    compile_warmup: bool  # compile each scenario and loop kind once, untimed, first
    seed: int
    torch: torch_peers.TorchSetup | None  # None: no PyTorch peers


class Task(NamedTuple):
    """One row of the plan: a JAX loop kind or a PyTorch peer."""

    scenario: str
    length: int
    framework: str
    name: str  # the loop kind or the peer


def tasks(plan: Plan) -> list[Task]:
    """The plan's rows, in the order they run."""
    rows = []
    for scenario in plan.scenarios:
        peers = torch_peers.PEERS[scenario] if plan.torch is not None else ()
        for length in plan.lengths:
            rows += [Task(scenario, length, "jax", loop) for loop in plan.loops]
            rows += [Task(scenario, length, "torch", peer) for peer in peers]
    return rows


def sizes_of(plan: Plan, length: int) -> cases.Sizes:
    """The sizes of the plan's cases of ``length``."""
    return cases.Sizes(length, plan.batch, plan.input, plan.hidden, plan.window)


def run(plan: Plan, device: jax.Device) -> Iterator[dict[str, Any]]:
    """Runs the plan on ``device``, yielding each record as soon as it is measured."""
    data: dict[int, cases.Data] = {}
    reference: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}  # JAX outputs
    warmed: set[tuple[str, str]] = set()
    for task in tasks(plan):
        sizes = sizes_of(plan, task.length)
        loop = task.name if task.framework == "jax" else None
        reason = cases.skip_reason(task.scenario, loop, sizes, plan.limits)
        record = new_record(task, sizes)
        if reason is not None:
            yield {**record, "skipped": reason}
            continue
        if task.length not in data:
            data = {task.length: cases.make_data(sizes, plan.seed)}  # one length at a time
        if task.framework == "jax":
            try:
                figures, output = _time_jax(task, sizes, data[task.length], plan, device, warmed)
            except (TypeError, ValueError) as error:  # raised while tracing: no such case
                yield {**record, "skipped": f"cannot trace: {_first_line(error)}"}
                continue
            reference.setdefault((task.scenario, task.length), output)
        else:
            figures, output = _time_torch(task, sizes, data[task.length], plan)
            jax_output = reference.get((task.scenario, task.length))
            if jax_output is not None:
                figures["max_rel_diff"] = max_rel_diff(output, jax_output)
        record.update(figures)
        if record["flops"] is not None and record["run_s_median"]:
            record["gflops"] = record["flops"] / record["run_s_median"] / 1e9
        yield record


def new_record(task: Task, sizes: cases.Sizes) -> dict[str, Any]:
    """A record of ``task`` with every figure ``None``."""
    record = dict.fromkeys(RECORD_KEYS)
    record.update(
        scenario=task.scenario,
        loop=task.name if task.framework == "jax" else None,
        framework=task.framework,
        peer=task.name if task.framework == "torch" else None,
        length=sizes.length,
        batch=sizes.batch,
        input=sizes.input,
        hidden=sizes.hidden,
        window=sizes.window if task.scenario == "train_tbptt" else None,
    )
    if cases.SCENARIOS[task.scenario].rnn:
        record["flops"] = rnn_flops(
            task.scenario,
            length=sizes.length,
            batch=sizes.batch,
            input=sizes.input,
            hidden=sizes.hidden,
            output=sizes.output,
        )
    return record


def _time_jax(task, sizes, data, plan, device, warmed) -> tuple[dict[str, Any], tuple]:
    args = jax.device_put(cases.case_args(task.scenario, data), device)

    def build():
        return cases.build_case(task.scenario, task.name, sizes)

    if plan.compile_warmup and (task.scenario, task.name) not in warmed:
        # The first compile of a scenario and loop kind in a process also pays one-time
        # costs (JAX's and XLA's caches of the ops it uses); keep them out of compile_s.
        jax.jit(build()).lower(*args).compile()
        warmed.add((task.scenario, task.name))
    measured = timing.time_jax(
        build,
        args,
        warmup=plan.warmup,
        repeats=plan.repeats,
        compile_repeats=plan.compile_repeats,
    )
    figures = {
        "lower_s": measured.lower_s,
        "compile_s": measured.compile_s,
        "run_s_median": measured.run.median_s,
        "run_s_min": measured.run.min_s,
        "memory_bytes": measured.memory_bytes,
        "temp_bytes": measured.temp_bytes,
        "other_cores": measured.run.other_cores,
    }
    return figures, tuple(np.asarray(leaf) for leaf in jax.tree.leaves(measured.run.output))


def _time_torch(task, sizes, data, plan) -> tuple[dict[str, Any], tuple]:
    device = plan.torch.device
    call = torch_peers.build_peer(task.scenario, task.name, data, sizes, device)
    measured = timing.time_calls(
        call, warmup=plan.warmup, repeats=plan.repeats, sync=torch_peers.sync(device)
    )
    figures = {
        "run_s_median": measured.median_s,
        "run_s_min": measured.min_s,
        "other_cores": measured.other_cores,
    }
    return figures, torch_peers.to_numpy(measured.output)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def max_rel_diff(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """``max over outputs of max|got - want| / max|want|`` (``/ 1`` where ``want`` is 0)."""
    if len(got) != len(want):
        raise ValueError(f"expected {len(want)} outputs to compare, got {len(got)}.")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape:
            raise ValueError(f"outputs must have the same shapes, got {g.shape} and {w.shape}.")
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        diff = float(np.max(np.abs(g - w))) if w.size else 0.0
        worst = max(worst, diff / (scale if scale > 0 else 1.0))
    return worst
