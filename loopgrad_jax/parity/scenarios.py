"""What each scenario runs on a fixture case: ``accumulate_loss`` and ``stack_loss``,
``rnn_loss`` (the article's cell and PyTorch's), ``train_rnn`` as written and by
tbptt, and ``lg.rnn`` on PyTorch's modules; each returns the fields its fixture records.
:data:`_RUNNERS` maps a scenario to its runner."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

import loopgrad_jax as lg
from loopgrad_jax import _sequence
from loopgrad_jax.parity.grid import Check, _is_sgd, has_reverse_mode


def value_and_grad(fn: Callable, loop: str) -> Callable:
    """``jax.value_and_grad(fn)``; forward mode (``jax.jacfwd``) for loops without reverse mode.

    A ``while`` loop cannot be reverse-differentiated; forward mode gives the same gradient.
    """
    if has_reverse_mode(loop):
        return jax.value_and_grad(fn)

    def forward(*args):
        return fn(*args), jax.jacfwd(fn)(*args)

    return forward


def _maybe_jit(fn: Callable, jit: bool) -> Callable:
    return jax.jit(fn) if jit else fn


def _optimizer(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Plain SGD through ``lr=`` (the default path); the rest through ``torch_optimizer``."""
    if _is_sgd(spec):
        return {"lr": spec["lr"]}
    return {"optimizer": lg.torch_optimizer(**spec)}


def _promotion(spec: Mapping[str, Any]):
    # optax's Adam bias correction raises a Python float to an int32 step count, which a
    # strict promotion mode (the test suite's) refuses; our own code passes strict mode.
    if spec["name"] == "sgd":
        return contextlib.nullcontext()
    return jax.numpy_dtype_promotion("standard")


def _hidden0(case: Mapping[str, Any]) -> Any:
    h0 = case["hidden0"]
    return tuple(h0) if isinstance(h0, list) else h0


def _stored(hidden: Any) -> Any:
    """A result's state as a fixture holds it: an LSTM's ``(h, c)`` as a list."""
    return list(hidden) if isinstance(hidden, tuple) else hidden


def _scalar(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    fn = {"accumulate": lg.accumulate_loss, "stack": lg.stack_loss}[check.scenario]

    def loss_of(x):
        return fn(x, c["n"], loop=check.loop)

    loss, grad = _maybe_jit(value_and_grad(loss_of, check.loop), check.jit)(jnp.asarray(c["x"]))
    return {"loss": loss, "grad": grad}


def _final_hidden(params, c: Mapping[str, Any], loop: str, hoist_input: bool) -> Any:
    """The state after the whole sequence: the forward pass ``rnn_loss`` sums the losses of.

    ``rnn_loss`` returns only the summed loss; this runs the same checks and the same
    forward pass (:func:`loopgrad_jax._sequence.rnn_forward`, with the same cell, loop
    kind and hoisting) and keeps its final carry, in the API's layout. A forward pass
    costs a fraction of ``train_rnn(mode="tbptt", window=T, lr=0)``, which would
    differentiate it too (12 s of CPU for the 200-step case with a Python loop).
    """
    bound = _sequence.bind(params, c["inputs"], c["targets"], _hidden0(c), None)
    carry, _ = _sequence.rnn_forward(
        bound.cell,
        bound.params,
        bound.inputs,
        bound.targets,
        _sequence.to_carry(bound.kind, bound.hidden0),
        loop=lg.Loop.parse(loop),
        hoist_input=hoist_input,
    )
    return _sequence.to_public(bound.kind, carry)


def _loss(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    """``rnn_loss`` and its gradient (full BPTT), and the final state."""
    cell = check.scenario == "cell_loss"
    params = _cell_params(c) if cell else lg.RNNParams(**c["params"])

    def loss_of(params):
        return lg.rnn_loss(
            params,
            c["inputs"],
            c["targets"],
            hidden0=_hidden0(c),
            loop=check.loop,
            hoist_input=check.method == "hoisted",
        )

    def run(params):
        loss, grads = value_and_grad(loss_of, check.loop)(params)
        return loss, grads, _final_hidden(params, c, check.loop, check.method == "hoisted")

    loss, grads, hidden = _maybe_jit(run, check.jit)(params)
    if not cell:
        return {"loss": loss, "grads": grads._asdict(), "hidden": hidden}
    grads_rnn, grads_head = lg.to_torch(grads)
    return {
        "loss": loss,
        "grads_rnn": grads_rnn,
        "grads_head": grads_head,
        "hidden": _stored(hidden),
    }


def _cell_params(c: Mapping[str, Any]) -> lg.CellParams:
    params = lg.from_torch(c["rnn_state"], c["head_state"], kind=c["kind"])
    if params.num_layers != c["num_layers"]:
        raise ValueError(f"the case has {c['num_layers']} layers, its state {params.num_layers}.")
    return params


def _train(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    """``train_rnn`` on the case with its optimizer; a resumed case in two calls."""
    cell = check.scenario.startswith("cell_")
    params = _cell_params(c) if cell else lg.RNNParams(**c["params"])
    kwargs: dict[str, Any] = {"loop": check.loop, **_optimizer(c["optimizer"])}
    if check.scenario.endswith("tbptt"):
        kwargs.update(mode="tbptt", window=c["window"], hoist_input=check.method == "hoisted")
    else:
        kwargs.update(mode="as_written", as_written_method=check.method)

    def train(params, inputs, targets, hidden0):
        return lg.train_rnn(params, inputs, targets, hidden0=hidden0, **kwargs)

    def resumed(params, inputs, targets, hidden0):
        # PyTorch ran the loop for `resume_at` steps, then went on from hidden.detach()
        # with the same model and optimizer: a new graph, which is what a second call is.
        cut = c["resume_at"]
        first = train(params, inputs[:cut], targets[:cut], hidden0)
        second = lg.train_rnn(
            first.params,
            inputs[cut:],
            targets[cut:],
            hidden0=first.hidden,
            opt_state=first.opt_state,
            **kwargs,
        )
        return second._replace(
            losses=jnp.concatenate([first.losses, second.losses]),
            grads=jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first.grads, second.grads),
        )

    fn = _maybe_jit(resumed if "resume_at" in c else train, check.jit)
    with _promotion(c["optimizer"]):
        result = fn(params, c["inputs"], c["targets"], _hidden0(c))
    if not cell:
        return {
            "losses": result.losses,
            "grads": result.grads._asdict(),
            "final_params": result.params._asdict(),
            "hidden": result.hidden,
        }
    grads_rnn, grads_head = lg.to_torch(result.grads)
    final_rnn, final_head = lg.to_torch(result.params)
    return {
        "losses": result.losses,
        "grads_rnn": grads_rnn,
        "grads_head": grads_head,
        "final_rnn_state": final_rnn,
        "final_head_state": final_head,
        "hidden": _stored(result.hidden),
    }


def _module_params(c: Mapping[str, Any]) -> lg.CellParams:
    """The case's module from its state dict: the structure from the keys, batch_first
    (which a state dict does not hold) from the case; checked against the case's options."""
    params = lg.from_torch(c["rnn_state"], kind=c["kind"], batch_first=c.get("batch_first", False))
    if params.cell_module != bool(c.get("cell_module")):
        raise ValueError(f"the case's cell_module is {c.get('cell_module')}, not its state's.")
    if not params.cell_module:
        first = params.layers[0]
        found = (params.num_layers, params.bidirectional, first.weight_hr is not None)
        found += (first.bias_ih is not None,)
        told = (c["num_layers"], c["bidirectional"], c["proj_size"] > 0, c["bias"])
        if found != told:
            raise ValueError(
                f"the case's (num_layers, bidirectional, projection, bias) are {told}, "
                f"its state dict's {found}."
            )
    return params


def _module(check: Check, c: Mapping[str, Any]) -> dict[str, Any]:
    """``lg.rnn`` on PyTorch's module call, and the gradients of the fixture's probe
    ``sum(outputs * r_out) + sum(h_n * r_h)`` (``+ sum(c_n * r_c)``) w.r.t. the weights,
    the inputs and ``hidden0``; a cell module's state gains (and loses) the layer axis."""
    params, cell = _module_params(c), c.get("cell_module", False)
    lengths = None if c.get("lengths") is None else jnp.asarray(c["lengths"])
    r_final = [c[r] for r in ("r_h", "r_c") if r in c]
    hidden0 = None if c["hidden0"] is None else jax.tree.map(jnp.asarray, _hidden0(c))
    if cell and hidden0 is not None:
        hidden0 = jax.tree.map(lambda a: a[None], hidden0)

    def probe(params, inputs, hidden0):
        outputs, final = lg.rnn(params, inputs, hidden0, lengths=lengths, loop=check.loop)
        finals = final if isinstance(final, tuple) else (final,)
        finals = tuple(f[0] for f in finals) if cell else finals  # a cell's (B, H)
        total = jnp.sum(outputs * c["r_out"])
        for f, r in zip(finals, r_final, strict=True):
            total = total + jnp.sum(f * r)
        return total, (outputs, _stored(finals) if len(finals) == 2 else finals[0])

    argnums = (0, 1) if hidden0 is None else (0, 1, 2)
    run = _maybe_jit(jax.value_and_grad(probe, argnums=argnums, has_aux=True), check.jit)
    (value, (outputs, hidden)), grads = run(params, jnp.asarray(c["inputs"]), hidden0)
    grads_rnn, grads_head = lg.to_torch(grads[0])
    if grads_head is not None:
        raise ValueError("a module without a head has a head's gradient.")
    out = {"value": value, "outputs": outputs, "hidden": hidden, "grads_rnn": grads_rnn}
    out |= {"grad_inputs": grads[1], "grad_hidden0": None}
    if hidden0 is not None:
        g = jax.tree.map(lambda a: a[0], grads[2]) if cell else grads[2]
        out["grad_hidden0"] = _stored(g)
    return out


_RUNNERS: dict[str, Callable[[Check, Mapping[str, Any]], dict[str, Any]]] = {
    "accumulate": _scalar,
    "stack": _scalar,
    "rnn_loss": _loss,
    "cell_loss": _loss,
    "train_as_written": _train,
    "train_tbptt": _train,
    "cell_as_written": _train,
    "cell_tbptt": _train,
    "module": _module,
}
