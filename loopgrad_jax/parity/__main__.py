"""``python -m loopgrad_jax.parity``: the same as ``loopgrad-parity``."""

from loopgrad_jax.parity.cli import main

raise SystemExit(main())
