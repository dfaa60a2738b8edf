"""Runs the cases of a benchmark plan, one group of implementations at a time.

A *group* is every implementation of one case: the JAX loop kinds and the
PyTorch peers (for ``rnn_module --bidirectional`` also Flax's ``nnx.Bidirectional``,
:mod:`loopgrad_jax.bench.flax_peers`) of one scenario at one set of sizes (and, for
the as-written loop, one algorithm: JAX's ``forward`` method with the ``rtrl`` peer, its
``reverse`` method with the ``eager`` peer). The order, as plain Python::

  for scenario in scenarios:
    for length in lengths:
      for size in the --sweep sizes (or the one --batch / --hidden):
        for method in the scenario's methods (None but for train_as_written):
          compile every loop kind (or skip it); build every peer
          time them all interleaved (timing.time_interleaved)
          yield one record per loop kind, then per peer

Every record has the keys of :data:`RECORD_KEYS`, ``None`` where a figure does
not apply.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from loopgrad_jax.bench import cases, peers, timing, torch_peers
from loopgrad_jax.bench.flops import case_flops

#: The keys of every record, in order.
RECORD_KEYS: tuple[str, ...] = (
    "scenario",
    "loop",  # a loop kind of lg.LOOPS for JAX, None for PyTorch
    "framework",  # "jax", "torch" or "flax" (a peer written with Flax's own modules)
    "peer",  # "eager", "nn.RNN" / "nn.LSTM" / "nn.GRU", "rtrl"; "nnx.Bidirectional"; None: JAX
    "method",  # train_as_written: the algorithm, "forward" or "reverse"; else None
    "length",
    "batch",
    "input",
    "hidden",
    "cell",  # RNN scenarios: one of lg.CELLS; None for the scalar ones
    "layers",  # RNN scenarios: the cell's layers; None for the scalar ones
    "precision",  # RNN scenarios: precision= ("bf16"), or None (float32 throughout)
    "bidirectional",  # rnn_module: the module's bidirectional=; None for the others
    "lengths_spread",  # rnn_module: --lengths-spread (None: no lengths, not packed)
    "devices",  # JAX: devices the batch splits over (1: no mesh); None for PyTorch
    "window",  # train_tbptt only
    "lower_s",  # trace + lower (JAX)
    "compile_s",  # XLA compile (JAX)
    "run_s_median",  # seconds per call, over the samples
    "run_s_min",
    "run_s_q1",  # first and third quartiles
    "run_s_q3",
    "run_s_ci",  # [low, high]: 95% bootstrap interval of the median
    "run_samples",  # how many samples (rounds)
    "run_number",  # calls averaged into each sample
    "run_s_samples",  # the samples, in round order (4 significant digits)
    "memory_bytes",  # temp + argument + output bytes of the executable (JAX)
    "temp_bytes",  # the temp part alone (JAX)
    "saved_bytes",  # what is kept for backward: JAX residuals, PyTorch saved tensors
    "flops",  # loopgrad_jax.bench.flops.case_flops (RNN scenarios)
    "gflops",  # flops / run_s_median / 1e9
    "seqs_per_s",  # RNN scenarios: sequences per second, batch / run_s_median
    "vs_torch",  # JAX: {peer: [peer time / JAX time, low, high]}, PyTorch's and Flax's peers
    "max_rel_diff",  # PyTorch vs JAX outputs: max |torch - jax| / max |jax|, per output
    "other_cores",  # cores other processes kept busy during the group's timed rounds
    "parallel_iterations",  # parallel kinds, article cell's rnn_loss: Newton iterations run
    "evaluations",  # --evaluations, article cell's rnn_loss: body evaluations of one gradient
    "skipped",  # why the case was not run, or None
)

#: The dimensions ``--sweep`` can vary.
SWEEPS: tuple[str, ...] = ("batch", "hidden")


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
    repeats: int  # at least this many samples per implementation
    compile_repeats: int
    compile_warmup: bool  # compile each scenario and loop kind once, untimed, first
    seed: int
    torch: torch_peers.TorchSetup | None  # None: no PyTorch peers
    min_time: float = 0.5  # seconds each group's timed rounds last at least
    sweep: tuple[str, tuple[int, ...]] | None = None  # ("batch", (1, 8, 32)): vary one size
    interleave: bool = True  # False: time each implementation alone, one after the other
    cell: str = "article"  # the RNN scenarios' cell, one of lg.CELLS
    layers: int = 1  # its layers
    devices: tuple[int, ...] = (1,)  # JAX rows of the RNN scenarios per mesh size
    precisions: tuple[str | None, ...] = (None,)  # JAX rows of the RNN scenarios per precision
    bidirectional: bool = False  # rnn_module: --bidirectional
    spread: float | None = None  # rnn_module: --lengths-spread
    flax: bool = False  # whether to add Flax's rows (flax_peers.module_peers)
    peers: tuple[str, ...] | None = None  # --peers (peers.names()); None: PyTorch's own
    evaluations: bool = False  # --evaluations: count each row's body evaluations


class Task(NamedTuple):
    """One row of the plan: a JAX loop kind or a PyTorch peer, at one set of sizes."""

    scenario: str
    sizes: cases.Sizes
    framework: str
    name: str  # the loop kind or the peer
    method: str | None = None  # the as-written algorithm
    devices: int = 1  # JAX: devices the batch splits over (data-parallel when > 1)

    @property
    def length(self) -> int:
        return self.sizes.length


def tasks(plan: Plan) -> list[Task]:
    """The plan's rows, in the order they run."""
    rows = []
    for scenario in plan.scenarios:
        cell = plan.cell if cases.SCENARIOS[scenario].rnn else "article"
        if plan.peers is None:
            named = [("torch", p) for p in torch_peers.peers(scenario, cell)] if plan.torch else []
        else:
            named = peers.rows(scenario, cell, plan.peers, torch=plan.torch is not None)
        for length in plan.lengths:
            for sizes in _sizes(plan, length, scenario):
                for method in cases.SCENARIOS[scenario].methods:
                    meshes = plan.devices if cases.SCENARIOS[scenario].rnn else (1,)
                    rows += [
                        Task(scenario, sizes, "jax", loop, method, devices)
                        for loop in plan.loops
                        for devices in meshes
                    ]
                    if plan.flax:
                        from loopgrad_jax.bench import flax_peers  # it imports this module

                        rows += [
                            Task(scenario, sizes, "flax", name)
                            for name in flax_peers.module_peers(scenario, sizes)
                        ]
                    rows += [
                        Task(scenario, sizes, framework, peer, method)
                        for framework, peer in named
                        if torch_peers.peer_method(scenario, peer) == method
                    ]
    return rows


def _sizes(plan: Plan, length: int, scenario: str) -> list[cases.Sizes]:
    base = cases.Sizes(length, plan.batch, plan.input, plan.hidden, plan.window)
    bases = [base]
    if cases.SCENARIOS[scenario].rnn:  # the scalar scenarios have no cell
        base = base._replace(cell=plan.cell, layers=plan.layers)
        if scenario == "rnn_module":
            base = base._replace(bidirectional=plan.bidirectional, spread=plan.spread)
        bases = [base._replace(precision=p) for p in plan.precisions]
    if plan.sweep is None:
        return bases
    dimension, values = plan.sweep
    return [b._replace(**{dimension: value}) for value in values for b in bases]


def _group(task: Task) -> tuple:
    # The precisions of one case run in one group: timed interleaved, on the same data.
    return (task.scenario, task.sizes._replace(precision=None), task.method)


def run(plan: Plan, device: jax.Device) -> Iterator[dict[str, Any]]:
    """Runs the plan on ``device``, yielding each record once its group is measured."""
    data: dict[cases.Sizes, cases.Data] = {}
    reference: dict[tuple, tuple[np.ndarray, ...]] = {}  # (scenario, sizes) -> JAX outputs
    warmed: set[tuple[str, str, str | None]] = set()
    for (_, sizes, _), group in itertools.groupby(tasks(plan), key=_group):
        group = list(group)
        if sizes not in data:
            # One size at a time; a GRU's b_hn zero where a Flax peer runs (peers.adapt).
            data = {sizes: peers.adapt(cases.make_data(sizes, plan.seed), plan.peers)}
        yield from _run_group(group, data[sizes], plan, device, warmed, reference)


def _run_group(group, data, plan, device, warmed, reference) -> list[dict[str, Any]]:
    records = {task: new_record(task) for task in group}
    calls, sync, first, extra, comparable = {}, {}, {}, {}, {}
    for task in group:
        loop = task.name if task.framework == "jax" else None
        reason = cases.skip_reason(task.scenario, loop, task.sizes, plan.limits, task.method)
        if reason is not None:
            records[task]["skipped"] = reason
            continue
        if task.framework == "jax":
            try:
                compiled, args = _compile_jax(task, data, plan, device, warmed)
            except (TypeError, ValueError) as error:  # raised while tracing: no such case
                records[task]["skipped"] = f"cannot trace: {_first_line(error)}"
                continue
            calls[task] = _bind(compiled.compiled, args)
            records[task].update(
                **_compile_fields(compiled),
                saved_bytes=(
                    cases.saved_bytes(task.scenario, task.name, task.sizes, data, task.method)
                    if task.devices == 1
                    else None  # residuals split over devices: not one figure to compare
                ),
                parallel_iterations=cases.parallel_iterations(task.scenario, task.name, data),
                evaluations=_evaluations(plan, task, data, device),
            )
        elif plan.peers is not None and (
            reason := peers.skip_reason(
                task.name,
                task.scenario,
                task.sizes,
                plan.limits.max_unroll,
                plan.torch.device if plan.torch is not None else None,
            )
        ):
            records[task]["skipped"] = reason
        elif peers.base(task.name) in peers.EXTRAS:
            built = peers.build(task.name, data, task.sizes, device)
            calls[task] = built.call
            records[task]["compile_s"] = built.compile_s
            if built.compiled is not None:
                records[task].update(**_compile_fields(built.compiled))
            records[task].update(
                saved_bytes=built.saved_bytes, evaluations=_evaluations(plan, task, data, device)
            )
            if built.sync is not None:
                sync[task] = built.sync
            if built.comparable is not None:
                comparable[task] = built.comparable
        elif task.framework == "flax":
            from loopgrad_jax.bench import flax_peers

            build, args = flax_peers.bidirectional_case(data)
            args = jax.device_put(args, device)
            compiled = timing.compile_jax(build, args, compile_repeats=plan.compile_repeats)
            calls[task] = _bind(compiled.compiled, args)
            records[task].update(**_compile_fields(compiled))
        else:
            setup = plan.torch
            args = (task.scenario, task.name, data, task.sizes, setup.device)
            calls[task] = torch_peers.build_peer(*args)
            first[task], extra[task] = torch_peers.saved_bytes(*args)
            sync[task] = torch_peers.sync(setup.device)
    if calls:
        blocks = [calls] if plan.interleave else [{task: call} for task, call in calls.items()]
        for block in blocks:
            measured = timing.time_interleaved(
                block,
                warmup=plan.warmup,
                min_samples=plan.repeats,
                min_time=plan.min_time,
                sync={task: sync[task] for task in block if task in sync},
                first={task: first[task] for task in block if task in first},
            )
            _fill(records, measured, extra, reference)
        _compare(records, reference, comparable, paired=plan.interleave)
    return [records[task] for task in group]


def _bind(compiled, args):
    return lambda: compiled(*args)


def _evaluations(plan: Plan, task: Task, data, device) -> int | None:
    """``--evaluations``: the body evaluations of one gradient of the article's
    ``rnn_loss`` for a JAX loop kind or equinox's scan; ``None`` where not counted."""
    from loopgrad_jax.bench import checkpoints

    name = task.name
    if task.framework == "equinox":
        name = f"equinox:checkpoints={peers.equinox_checkpoints(name, task.length)}"
    countable = (
        plan.evaluations
        and task.scenario == "rnn_loss"
        and task.sizes.cell == "article"
        and task.devices == 1
        and task.framework in ("jax", "equinox")
    )
    if not countable or not checkpoints.counts(name):
        return None
    args = jax.device_put((data.params, data.inputs, data.targets), device)
    return checkpoints.evaluations(name, args)


def _compile_jax(task: Task, data, plan: Plan, device, warmed):
    mesh = None
    if task.devices == 1:
        args = jax.device_put(cases.case_args(task.scenario, data), device)
    else:
        devices = jax.devices(device.platform)
        if len(devices) < task.devices:
            raise ValueError(f"{task.devices} devices asked for, {len(devices)} available")
        mesh = cases.batch_mesh(devices[: task.devices])
        args = cases.mesh_args(task.scenario, data, mesh)

    def build():
        return cases.build_case(task.scenario, task.name, task.sizes, task.method, mesh)

    key = (task.scenario, task.name, task.method, task.devices)
    if plan.compile_warmup and key not in warmed:
        # The first compile of a scenario and loop kind in a process also pays one-time
        # costs (JAX's and XLA's caches of the ops it uses); keep them out of compile_s.
        jax.jit(build()).lower(*args).compile()
        warmed.add(key)
    return timing.compile_jax(build, args, compile_repeats=plan.compile_repeats), args


def _fill(records, measured: timing.Interleaved, counters, reference) -> None:
    """Writes the timings and the last outputs of ``measured`` into their records."""
    for task, samples in measured.samples.items():
        record = records[task]
        record.update(
            **timing_fields(samples, measured.number[task]), other_cores=measured.other_cores
        )
        median = record["run_s_median"]
        if task in counters:
            record["saved_bytes"] = counters[task].peak
        if record["flops"] is not None:
            record["gflops"] = record["flops"] / median / 1e9
        if cases.SCENARIOS[task.scenario].rnn:
            record["seqs_per_s"] = task.sizes.batch / median
        output = measured.outputs[task]
        if task.framework != "torch":
            output = tuple(np.asarray(leaf) for leaf in jax.tree.leaves(output))
            if task.framework == "jax" and task.devices == 1:
                reference.setdefault((task.scenario, task.sizes), output)
        else:
            output = torch_peers.to_numpy(output)
        record["_samples"], record["_output"] = samples, output


def timing_fields(samples: Sequence[float], number: int) -> dict[str, Any]:
    """A record's ``run_s_*`` fields from its ``samples`` (seconds per call, each the mean
    of ``number`` calls): :func:`timing.spread`'s figures and the samples as written."""
    stats = timing.spread(samples, number)
    return {
        "run_s_median": stats.median_s,
        "run_s_min": stats.min_s,
        "run_s_q1": stats.q1_s,
        "run_s_q3": stats.q3_s,
        "run_s_ci": list(stats.ci_s),
        "run_samples": stats.samples,
        "run_number": stats.number,
        "run_s_samples": timing.round_samples(samples),
    }


def _compare(records, reference, comparable, *, paired: bool) -> None:
    """Checks each peer's outputs against JAX's (the parts ``comparable[peer]`` keeps,
    where given); each JAX row's ratio to each peer."""
    timed = [task for task, r in records.items() if "_samples" in r]
    jax_tasks = [task for task in timed if task.framework == "jax"]
    peers = [task for task in timed if task.framework != "jax"]
    one_device = [task for task in jax_tasks if task.devices == 1]
    for peer in peers:
        want = (
            records[one_device[0]]["_output"]
            if one_device
            else reference.get((peer.scenario, peer.sizes))
        )
        if want is not None:
            keep = comparable.get(peer, lambda output: output)
            records[peer]["max_rel_diff"] = max_rel_diff(keep(records[peer]["_output"]), keep(want))
    for task in jax_tasks:  # a data-parallel row against one device's result
        want = reference.get((task.scenario, task.sizes))
        if task.devices > 1 and want is not None:
            records[task]["max_rel_diff"] = max_rel_diff(records[task]["_output"], want)
    for task in jax_tasks:
        records[task]["vs_torch"] = {
            peer.name: list(
                timing.ratio(records[peer]["_samples"], records[task]["_samples"], paired=paired)
            )
            for peer in peers
        } or None
    for task in timed:
        del records[task]["_samples"], records[task]["_output"]


def new_record(task: Task) -> dict[str, Any]:
    """A record of ``task`` with every figure ``None``."""
    sizes = task.sizes
    record = dict.fromkeys(RECORD_KEYS)
    jax_side = task.framework == "jax"
    rnn = cases.SCENARIOS[task.scenario].rnn
    record.update(
        scenario=task.scenario,
        loop=task.name if jax_side else None,
        framework=task.framework,
        peer=None if jax_side else task.name,
        method=task.method,
        length=sizes.length,
        batch=sizes.batch,
        input=sizes.input,
        hidden=sizes.hidden,
        cell=sizes.cell if rnn else None,
        layers=sizes.layers if rnn else None,
        precision=sizes.precision if rnn else None,
        bidirectional=sizes.bidirectional if task.scenario == "rnn_module" else None,
        lengths_spread=sizes.spread,
        devices=task.devices if jax_side else None,
        window=sizes.window if task.scenario == "train_tbptt" else None,
        flops=case_flops(
            task.scenario,
            length=sizes.length,
            batch=sizes.batch,
            input=sizes.input,
            hidden=sizes.hidden,
            output=sizes.output,
            method=task.method,
            peer=None if jax_side else task.name,
            cell=sizes.cell,
            layers=sizes.layers,
            directions=2 if sizes.bidirectional else 1,
        ),
    )
    return record


def _compile_fields(compiled) -> dict[str, Any]:
    """A compiled JAX row's record fields: its lowering and compile times, its memory."""
    return {
        "lower_s": compiled.lower_s,
        "compile_s": compiled.compile_s,
        "memory_bytes": compiled.memory_bytes,
        "temp_bytes": compiled.temp_bytes,
    }


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
