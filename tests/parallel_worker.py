"""One process of ``test_parallel.py::test_two_processes_equal_one``.

Usage: ``python parallel_worker.py <coordinator host:port> <process id> <out.json>``.
Joins a two-process JAX runtime (one CPU device each, collectives over gloo), feeds its
half of the batch, and writes what the mesh computed beside what one process computes
with the whole batch.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

address, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 1)
jax.config.update("jax_enable_x64", True)
jax.distributed.initialize(
    coordinator_address=address,
    num_processes=2,
    process_id=process_id,
    initialization_timeout=120,
)

import loopgrad_jax as lg  # noqa: E402 - after the runtime starts

T, B, D, H = 5, 4, 3, 4  # D: the input size
keys = jax.random.split(jax.random.key(0), 3)
params = lg.init_rnn(keys[0], input_size=D, hidden_size=H, dtype=jnp.float64)
x = jax.random.normal(keys[1], (T, B, D), jnp.float64)  # the same whole batch everywhere
y = jax.random.normal(keys[2], (T, B, 1), jnp.float64)

mesh = jax.make_mesh((2,), ("batch",))
mine = slice(process_id * B // 2, (process_id + 1) * B // 2)  # this process's examples
split = NamedSharding(mesh, P(None, "batch"))
x_global = jax.make_array_from_process_local_data(split, np.asarray(x[:, mine]))
y_global = jax.make_array_from_process_local_data(split, np.asarray(y[:, mine]))


def local(a):
    """A replicated result as NumPy (each process holds a whole copy)."""
    return np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a)


compared = {}


def compare(name, actual, expected):
    for k, (a, e) in enumerate(
        zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ):
        compared[f"{name}[{k}]"] = (local(a).tolist(), np.asarray(e).tolist())


grad = jax.jit(
    jax.value_and_grad(lambda p, a, b, m: lg.rnn_loss(p, a, b, mesh=m)), static_argnums=3
)
compare(
    "rnn_loss",
    grad(params, x_global, y_global, mesh),
    jax.value_and_grad(lg.rnn_loss)(params, x, y),
)
runs = {  # both modes (the as-written methods differ from each other only locally)
    "tbptt": {"mode": "tbptt", "window": 2},
    "as_written_forward": {"mode": "as_written", "as_written_method": "forward"},
}
for name, kw in runs.items():
    whole = lg.train_rnn(params, x, y, **kw)
    split_run = lg.train_rnn(params, x_global, y_global, mesh=mesh, **kw)
    compare(name, split_run[:3], whole[:3])  # params, losses, grads
    hidden_local, hidden_whole = local(split_run.hidden), np.asarray(whole.hidden)

with open(out, "w") as f:
    json.dump(
        {
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "compared": compared,
            "hidden_local": hidden_local.tolist(),
            "hidden_whole": hidden_whole.tolist(),
        },
        f,
    )
jax.distributed.shutdown()
