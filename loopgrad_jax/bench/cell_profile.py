"""Where the time of a cell's full-sequence gradient goes, JAX beside PyTorch's fused module.

``loopgrad-bench`` gives the ratio; this says what it is made of. Two groups of
implementations, each timed interleaved (:func:`loopgrad_jax.bench.timing.time_interleaved`),
on the same weights and inputs as ``loopgrad-bench --cell KIND``'s ``rnn_loss``::

  # the whole computation, its forward part alone and its backward part alone
  jax forward:    lg.rnn_loss(params, inputs, targets, loop=LOOP)
  jax backward:   pullback(1.0), from jax.vjp of the above, made before the timing
  jax gradient:   jax.value_and_grad(lg.rnn_loss)(params, inputs, targets, loop=LOOP)
  (the three again with hoist_input=True: layer by layer, the layer rule's reverse mode)
  torch forward:  with torch.no_grad(): loss of fused(inputs)       # nn.LSTM, nn.GRU, nn.RNN
  torch gradient: loss of fused(inputs), loss.backward()             # the rnn_loss peer

  # the matrix products the recurrence runs at every step (G*H = gates x hidden),
  # each T times in a loop, and the weight gradient's as one product after it
  h @ W_hh^T:       carry h (B, H) -> tanh(sum of the G blocks of h @ W_hh^T)
  dg @ W_hh:        for t: acc += dg[t] @ W_hh                  # dg: (T, B, G*H)
  dW += dg^T h:     for t: dW += dg[t]^T @ h[t]                  # h:  (T, B, H)
  dW in one:        dW = sum over t of dg[t]^T @ h[t], one product of (G*H, T*B) by (T*B, H)

JAX's products run in ``lax.scan``, PyTorch's in a Python loop (``torch.mm``,
``Tensor.addmm_``). Each row's ``gflops`` counts its products only. For the gradients,
one more untimed call each counts the minor page faults and the system time per call
(``resource.getrusage`` of the whole process): buffers the size of the residuals,
allocated afresh and touched for the first time on every call.

``backward`` is timed alone for JAX (PyTorch's is its gradient's time less its
forward's). ``loopgrad-bench --profile`` runs this after its table, at its cell and
sizes (the longest ``--lengths``), and writes the rows into its JSON (``profile``).
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import loopgrad_jax as lg
from loopgrad_jax.bench import cases, flops, report, timing, torch_peers

#: Format of the JSON file.
FORMAT_VERSION = 1


def _jax_parts(sizes: cases.Sizes, data: cases.Data, loop: str) -> dict[str, Callable]:
    """The whole computation and its parts, per step (``rnn_loss``, JAX's rule for the
    loop) and layer by layer (``hoist_input=True``, the layer rule); ``backward`` is the
    pullback alone, called on residuals made once before the timing."""
    args = jax.device_put((data.params, data.inputs, data.targets))
    parts = {}
    for suffix, hoist in (("", False), (", layer rule", True)):

        def loss(p, x, y, hoist=hoist):
            return lg.rnn_loss(p, x, y, loop=loop, hoist_input=hoist)

        forward = jax.jit(loss)
        gradient = jax.jit(jax.value_and_grad(loss))
        _, pullback = jax.jit(lambda p, x, y, loss=loss: jax.vjp(lambda p: loss(p, x, y), p))(*args)
        backward = jax.jit(lambda pullback: pullback(jnp.ones((), args[0].head_weight.dtype)))
        parts[f"jax forward{suffix}"] = lambda f=forward: f(*args)
        parts[f"jax backward{suffix}"] = lambda b=backward, r=pullback: b(r)
        parts[f"jax gradient{suffix}"] = lambda g=gradient: g(*args)
    return parts


def _products(sizes: cases.Sizes, seed: int) -> dict[str, tuple[Callable, Any]]:
    """The per-step products and the one-product weight gradient, JAX's and PyTorch's."""
    import torch

    t, b, h = sizes.length, sizes.batch, sizes.hidden
    g = cases.gates(sizes.cell) * h
    rng = np.random.default_rng(seed)
    w = rng.uniform(-(h**-0.5), h**-0.5, (g, h)).astype(np.float32)
    hs = rng.standard_normal((t, b, h), dtype=np.float32)
    dgs = rng.standard_normal((t, b, g), dtype=np.float32)
    jw, jhs, jdgs = jax.device_put((w, hs, dgs))

    def recurrent(w, h0):
        def body(h, _):
            return jnp.tanh(h @ w.T).reshape(b, -1, h.shape[1]).mean(axis=1), None

        return lax.scan(body, h0, None, length=t)[0]

    def input_side(w, dgs):
        zero = jnp.zeros((b, h), jnp.float32)
        return lax.scan(lambda acc, dg: (acc + dg @ w, None), zero, dgs)[0]

    def accumulate(hs, dgs):
        def body(dw, hg):
            return dw + hg[1].T @ hg[0], None

        return lax.scan(body, jnp.zeros((g, h), jnp.float32), (hs, dgs))[0]

    def in_one(hs, dgs):
        return jnp.einsum("tbg,tbh->gh", dgs, hs)

    tw, ths, tdgs = (torch.from_numpy(a.copy()) for a in (w, hs, dgs))

    def torch_recurrent():
        state = ths[0]
        for _ in range(t):
            state = torch.tanh(state @ tw.T).reshape(b, -1, h).mean(dim=1)
        return state

    def torch_input_side():
        acc = torch.zeros(b, h)
        for step in range(t):
            acc += tdgs[step] @ tw
        return acc

    def torch_accumulate():
        dw = torch.zeros(g, h)
        for step in range(t):
            dw.addmm_(tdgs[step].T, ths[step])
        return dw

    def torch_in_one():
        return tdgs.reshape(t * b, g).T @ ths.reshape(t * b, h)

    jit = {f: jax.jit(f) for f in (recurrent, input_side, accumulate, in_one)}
    return {
        "jax h @ W_hh^T": (lambda: jit[recurrent](jw, jhs[0]), None),
        "jax dg @ W_hh": (lambda: jit[input_side](jw, jdgs), None),
        "jax dW += dg^T h": (lambda: jit[accumulate](jhs, jdgs), None),
        "jax dW in one": (lambda: jit[in_one](jhs, jdgs), None),
        "torch h @ W_hh^T": (torch_recurrent, torch_peers.sync("cpu")),
        "torch dg @ W_hh": (torch_input_side, torch_peers.sync("cpu")),
        "torch dW += dg^T h": (torch_accumulate, torch_peers.sync("cpu")),
        "torch dW in one": (torch_in_one, torch_peers.sync("cpu")),
    }


def faults(call: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, float]:
    """Minor page faults and system seconds of one call (after a warm-up call)."""
    sync(call())
    before = resource.getrusage(resource.RUSAGE_SELF)
    sync(call())
    after = resource.getrusage(resource.RUSAGE_SELF)
    return float(after.ru_minflt - before.ru_minflt), after.ru_stime - before.ru_stime


def profile(
    sizes: cases.Sizes, *, loop: str, repeats: int, min_time: float, seed: int
) -> list[dict[str, Any]]:
    """Every row: the two groups above, each timed interleaved."""
    data = cases.make_data(sizes, seed)
    torch_sync = torch_peers.sync("cpu")
    whole = {
        **{k: (f, None) for k, f in _jax_parts(sizes, data, loop).items()},
        "torch forward": (torch_peers.fused_loss(data, sizes, "cpu"), torch_sync),
        "torch gradient": (
            torch_peers.build_peer(
                "rnn_loss", torch_peers.fused_name(sizes.cell), data, sizes, "cpu"
            ),
            torch_sync,
        ),
    }
    grad_flops = flops.rnn_flops(
        "rnn_loss",
        length=sizes.length,
        batch=sizes.batch,
        input=sizes.input,
        hidden=sizes.hidden,
        cell=sizes.cell,
        layers=sizes.layers,
    )
    product = 2 * sizes.length * sizes.batch * sizes.hidden * cases.gates(sizes.cell) * sizes.hidden
    counts = {"forward": grad_flops // 3, "backward": grad_flops - grad_flops // 3}
    counts["gradient"] = grad_flops
    rows = []
    for group in (whole, _products(sizes, seed)):
        measured = timing.time_interleaved(
            {k: f for k, (f, _) in group.items()},
            warmup=1,
            min_samples=repeats,
            min_time=min_time,
            sync={k: s for k, (_, s) in group.items() if s is not None},
        )
        for name, samples in measured.samples.items():
            stats = timing.spread(samples, measured.number[name])
            framework, part = name.split(" ", 1)
            count = counts.get(part.split(",")[0], product)
            row = {
                "part": part,
                "framework": framework,
                "flops": count,
                "run_s_median": stats.median_s,
                "run_s_ci": list(stats.ci_s),
                "run_samples": stats.samples,
                "gflops": count / stats.median_s / 1e9,
                "other_cores": measured.other_cores,
                "minor_faults": None,
                "system_s": None,
            }
            if part.startswith("gradient"):
                sync = group[name][1] or jax.block_until_ready
                row["minor_faults"], row["system_s"] = faults(group[name][0], sync)
            rows.append(row)
    return rows


def collect_meta(argv: Sequence[str], sizes: cases.Sizes, loop: str) -> dict[str, Any]:
    """The machine, versions and settings of a run."""
    import torch

    return {
        "format_version": FORMAT_VERSION,
        **report.machine_meta(jax.devices()[0]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "command": shlex.join(["python", "-m", "loopgrad_jax.bench.cell_profile", *argv]),
        "sizes": sizes._asdict(),
        "loop": loop,
    }


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table."""
    lines = [f"{'part':24} {'framework':9} {'median':>10} {'95% CI':>21} {'GFLOP/s':>8} faults"]
    for r in rows:
        low, high = r["run_s_ci"]
        fault = ""
        if r["minor_faults"] is not None:
            fault = f"{r['minor_faults']:.0f} ({r['system_s']:.2f} s sys)"
        lines.append(
            f"{r['part']:24} {r['framework']:9} {r['run_s_median'] * 1e3:8.2f}ms "
            f"{low * 1e3:9.2f}-{high * 1e3:9.2f}ms {r['gflops']:8.1f} {fault}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = report.tool_parser("cell_profile", __doc__)
    parser.add_argument("--cell", choices=lg.CELLS[1:], default="lstm")
    for flag, default in (("length", 1000), ("input", 64), ("hidden", 256), ("batch", 32)):
        parser.add_argument(f"--{flag}", type=int, default=default, help=f"(default: {default})")
    parser.add_argument("--loop", default="scan", help="JAX's loop kind (default: scan)")
    parser.add_argument("--repeats", type=int, default=10, help="samples each (default: 10)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write meta and rows as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(report.usable_cores())
    sizes = cases.Sizes(args.length, args.batch, args.input, args.hidden, 1, cell=args.cell)
    rows = profile(
        sizes, loop=args.loop, repeats=args.repeats, min_time=args.min_time, seed=args.seed
    )
    print(format_rows(rows))
    if args.json:
        meta = collect_meta(argv, sizes, args.loop)
        report.write_json(args.json, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
