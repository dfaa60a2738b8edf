"""``python -m loopgrad_jax.bench``: the same as ``loopgrad-bench``."""

from loopgrad_jax.bench.cli import main

raise SystemExit(main())
