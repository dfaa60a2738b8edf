"""``loopgrad-parity --module FILE``: your own ``torch.save``-d module checked by
:func:`loopgrad_jax.check_against_torch` (:mod:`loopgrad_jax.check_torch`) on random
inputs, instead of the fixtures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopgrad_jax.parity.grid import SCENARIOS


def _check_module(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--module FILE``: :func:`loopgrad_jax.check_against_torch` on random inputs."""
    from loopgrad_jax import check_torch

    given = [
        name
        for name, value in (("--live", args.live), ("--fixtures", args.fixtures))
        + (("--scenario", args.scenario is not SCENARIOS), ("--cell", args.cell))
        if value
    ]
    if given:
        parser.error(f"argument --module: not allowed with {', '.join(given)}")
    if args.lengths and args.unbatched:
        parser.error("argument --lengths: not allowed with --unbatched (one example)")
    try:
        module = check_torch.load_module(args.module)
        x, h0, lengths = check_torch.random_call(
            module, args.steps, args.batch, lengths=args.lengths,
            unbatched=args.unbatched, seed=args.seed,
        )  # fmt: skip
        results = [
            check_torch.check_against_torch(
                module,
                x,
                lengths=lengths,
                hidden0=h0,
                dtype=dtype,
                seed=args.seed,
                loops=args.loop or check_torch.DEFAULT_LOOPS,
            )  # fmt: skip
            for dtype in args.dtype
        ]
    except (ImportError, TypeError, ValueError) as err:
        parser.error(f"argument --module: {err}")
    shape = "x".join(map(str, x.shape))
    print(f"{args.module}: random inputs {shape}, lengths {lengths}, seed {args.seed}\n")
    print("\n\n".join(map(str, results)))
    if args.json:
        doc = {"module": args.module, "passed": all(r.passed for r in results)}
        doc["results"] = [r.as_json() for r in results]
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return 0 if all(r.passed for r in results) else 1
