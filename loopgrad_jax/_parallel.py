"""Data parallelism: the batch split over a mesh's devices, with JAX's own ``shard_map``.

Every example of a batch runs through the same weights independently, and each
step's loss is a mean over the batch. So a mesh of ``n`` devices can each run
``B/n`` examples and combine their results as PyTorch's
``DistributedDataParallel`` does: each device's mean over its own examples,
averaged over the devices, is the mean over the whole batch, and so is each
gradient. That average (one ``psum``, divided by ``n``) happens once per
gradient: once for :func:`~loopgrad_jax.rnn_loss` (in its backward pass), once
per update for :func:`~loopgrad_jax.train_rnn`, never inside a loop's
backward step.

:class:`Shards` is the static description every entry point carries; with
``mesh=None`` it is :data:`LOCAL` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

#: The mesh axis the batch splits over when the mesh has more than one axis.
BATCH_AXIS = "batch"


class Shards(NamedTuple):
    """Where the batch runs: ``mesh`` and its ``axis`` of ``size`` devices, or nowhere.

    Hashable: a static option of the compiled entry points.
    """

    mesh: Mesh | None
    axis: str | None
    size: int

    def vary(self, tree: PyTree) -> PyTree:
        """Marks replicated values as per-device, so their gradients stay per-device.

        Without it JAX sums the gradient of a replicated weight over the devices
        wherever the weight is used: inside every step of a loop's backward pass.
        Every leaf must be replicated (the weights, or zeros made inside the map).
        """
        if self.axis is None:
            return tree
        return jax.lax.pcast(tree, self.axis, to="varying")

    def mean(self, tree: PyTree) -> PyTree:
        """Each leaf averaged over the devices: per-device batch means become global ones."""
        if self.axis is None:
            return tree
        return jax.tree.map(lambda a: jax.lax.psum(a, self.axis) / self.size, tree)

    def run(
        self, fn: Callable[..., PyTree], args: tuple, in_specs: tuple, out_specs: PyTree
    ) -> PyTree:
        """``fn(*args)``, on each device's part of the batch when there is a mesh."""
        if self.axis is None:
            return fn(*args)

        def put(spec: P, subtree: PyTree) -> PyTree:  # a spec covers a subtree of args
            return jax.tree.map(lambda a: _put(a, NamedSharding(self.mesh, spec)), subtree)

        args = jax.tree.map(put, in_specs, args, is_leaf=lambda s: isinstance(s, P))
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
        return mapped(*args)


#: No mesh: everything on one device.
LOCAL = Shards(None, None, 1)


def check_mesh(mesh: object, batch: int) -> Shards:
    """The :class:`Shards` of ``mesh`` for a batch of ``batch`` examples; refuses a bad one.

    The batch splits over the axis named ``"batch"``, or over the mesh's only
    axis; other axes, if any, hold copies. A mesh of either axis type (Auto or
    Explicit) is accepted. Inside ``jax.set_mesh(mesh)`` the mesh is used as it is;
    outside, as an Auto mesh over the same devices, so that no sharding type leaks
    into the results.
    """
    if mesh is None:
        return LOCAL
    if not isinstance(mesh, Mesh):
        raise TypeError(
            "mesh must be a jax.sharding.Mesh (for example jax.make_mesh((2,), ('batch',))), "
            f"got {type(mesh).__name__}."
        )
    names = tuple(mesh.axis_names)
    if BATCH_AXIS in names:
        axis = BATCH_AXIS
    elif len(names) == 1:
        axis = names[0]
    else:
        raise ValueError(
            f"mesh must have an axis named {BATCH_AXIS!r} or only one axis to split the batch "
            f"over, got axes {names}."
        )
    size = int(mesh.shape[axis])
    if batch % size:
        raise ValueError(
            f"the batch (B={batch}, inputs.shape[1]) must split evenly over the mesh's "
            f"{axis!r} axis of {size} devices: give a batch that is a multiple of {size}, or "
            "a smaller mesh."
        )
    context = jax.sharding.get_abstract_mesh()
    if not context.empty:
        if context != mesh.abstract_mesh:
            raise ValueError(
                f"mesh must be the mesh of the enclosing jax.set_mesh, {context}, got "
                f"{mesh.abstract_mesh}."
            )
        return Shards(mesh, axis, size)
    auto = Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names))
    return Shards(auto, axis, size)


def batch_spec(tree: PyTree, batch_dim: int, axis: str | None) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``tree``: dimension ``batch_dim`` split over ``axis``."""
    return jax.tree.map(lambda _: P(*(None,) * batch_dim, axis), tree)


def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` laid out as ``sharding``: as it is if it already spans other processes."""
    if jax.process_count() > 1 and not isinstance(x, jax.core.Tracer):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # a global array
            return x
        host = np.asarray(x)  # the same full value on every process
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.device_put(jnp.asarray(x), sharding)
