"""PyTorch optimizers as optax transformations, hyper-parameter for hyper-parameter.

=============================================  ==============================================
PyTorch                                        optax (what :func:`torch_optimizer` returns)
=============================================  ==============================================
``SGD(lr)``                                    ``sgd(lr)``
``SGD(lr, momentum=m)``                        ``sgd(lr, momentum=m)``
``SGD(lr, momentum=m, nesterov=True)``         ``sgd(lr, momentum=m, nesterov=True)``
``SGD(..., weight_decay=wd)`` (L2 on grads)    ``chain(add_decayed_weights(wd), sgd(...))``
``Adam(lr, betas=(b1, b2), eps=e)``            ``adam(lr, b1=b1, b2=b2, eps=e)``
``Adam(..., weight_decay=wd)`` (L2 on grads)   ``chain(add_decayed_weights(wd), adam(...))``
``AdamW(lr, betas, eps, weight_decay=wd)``     ``adamw(lr, b1, b2, eps, weight_decay=wd)``
=============================================  ==============================================

Two defaults differ between the libraries, and the mapping uses PyTorch's:
``AdamW``'s ``weight_decay`` is 0.01 in PyTorch and 1e-4 in ``optax.adamw``, and
``optax.sgd`` has no momentum unless asked (PyTorch's default, 0, agrees). Both
decay the weights AdamW-style as ``p * (1 - lr * wd)`` before the Adam step.
PyTorch's ``dampening`` and ``amsgrad`` have no counterpart here.
"""

from __future__ import annotations

import functools
from typing import Any

import optax

_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
}

#: Names :func:`torch_optimizer` accepts: ``torch.optim.SGD``, ``Adam`` and ``AdamW``.
TORCH_OPTIMIZERS: tuple[str, ...] = tuple(_DEFAULTS)


def torch_optimizer(name: str, lr: float, **hyperparams: Any) -> optax.GradientTransformation:
    """The optax transformation that updates weights as ``torch.optim.<name>`` does.

    Args:
      name: ``"sgd"``, ``"adam"`` or ``"adamw"`` (case-insensitive).
      lr: the learning rate.
      **hyperparams: PyTorch's keyword arguments for that optimizer
        (``momentum``, ``nesterov``, ``weight_decay`` for SGD; ``betas``, ``eps``,
        ``weight_decay`` for Adam and AdamW), with PyTorch's defaults.

    Returns:
      An ``optax.GradientTransformation`` for ``train_rnn(optimizer=...)``. Equal
      arguments give the same object (hashable ones: numbers, tuples), so runs
      given optimizers built separately from one spec share one compiled function.

    Examples:
      >>> import loopgrad_jax as lg
      >>> opt = lg.torch_optimizer("SGD", lr=0.01, momentum=0.9, nesterov=True)
      >>> opt = lg.torch_optimizer("adamw", lr=1e-3)  # weight_decay=0.01, as in PyTorch
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _DEFAULTS:
        raise ValueError(
            f"name must be one of {', '.join(map(repr, TORCH_OPTIMIZERS))} "
            f"(torch.optim.SGD, Adam, AdamW), got {name!r}."
        )
    unknown = sorted(set(hyperparams) - set(_DEFAULTS[key]))
    if unknown:
        raise TypeError(
            f"torch_optimizer({name!r}) takes {', '.join(sorted(_DEFAULTS[key]))}; got "
            f"unsupported {', '.join(unknown)}."
        )
    spec = (key, lr, tuple(sorted({**_DEFAULTS[key], **hyperparams}.items())))
    try:
        hash(spec)
    except TypeError:  # an array lr or list betas: nothing to look it up by
        return _build.__wrapped__(*spec)
    return _build(*spec)


@functools.lru_cache(maxsize=128)
def _build(
    key: str, lr: Any, hyperparams: tuple[tuple[str, Any], ...]
) -> optax.GradientTransformation:
    """:func:`torch_optimizer` after its checks: one object per spec.

    ``train_rnn``'s compiled functions take the optimizer as a static argument,
    compared by its functions, which every new ``optax`` transformation makes anew.
    """
    hp = dict(hyperparams)
    if key == "sgd":
        if hp["nesterov"] and hp["momentum"] <= 0:
            raise ValueError(
                f"nesterov=True needs momentum > 0 (as in PyTorch), got momentum={hp['momentum']}."
            )
        opt = optax.sgd(lr, momentum=hp["momentum"] or None, nesterov=bool(hp["nesterov"]))
    else:
        b1, b2 = hp["betas"]
        if key == "adamw":
            return optax.adamw(lr, b1=b1, b2=b2, eps=hp["eps"], weight_decay=hp["weight_decay"])
        opt = optax.adam(lr, b1=b1, b2=b2, eps=hp["eps"])
    if hp["weight_decay"]:
        return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), opt)
    return opt
