"""Binomial checkpointing: Griewank's offline-optimal schedule for reversing a loop.

Reverse mode through a loop of ``T`` steps needs, for every step ``t`` from the last to
the first, the carry that entered it. ``lax.scan`` stores all ``T``; ``remat:chunk=k``
stores one per chunk. Storing at most ``C`` carries (the initial one among them), the
fewest extra body evaluations are Griewank's (revolve, 1992/2000): with ``r`` the
smallest integer such that ``comb(C + r, C) >= T``, reversing ``T > 1`` steps takes

    forward_steps(T, C) = r * T - comb(C + r, r - 1)

evaluations of the body to move carries forward, and ``T`` more inside the ``T``
reverse steps (each evaluates the body once to differentiate it). This module plans
that schedule in plain Python; :mod:`loopgrad_jax._checkpointed` runs it.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from loopgrad_jax import _checks

#: Columns of a schedule row (see :func:`schedule`).
RESTORE, START, ADVANCE, STORE, TURN = range(5)


def forward_steps(length: int, checkpoints: int) -> int:
    """Fewest body evaluations, besides the ``length`` reverse steps, that reverse ``length``
    steps storing at most ``checkpoints`` carries (the initial carry counts as one).

    >>> forward_steps(1000, 8), forward_steps(1000, 32), forward_steps(5, 1)
    (4285, 2405, 10)
    """
    return int(_costs(np.asarray([length], dtype=np.int64), checkpoints)[0])


def checkpointed_evaluations(length: int, checkpoints: int) -> int:
    """Body evaluations of ``jax.grad`` through ``loop="remat:checkpoints=C"``.

    ``length`` steps forward and back, storing at most ``checkpoints`` carries: the
    offline optimum (Griewank's revolve), ``length + forward_steps(length, C)``. For
    comparison, ``scan`` evaluates the body ``length`` times and stores every step's
    residuals; ``remat`` evaluates it ``2 * length`` times (once more inside each
    step's VJP) and stores every carry.

    Examples:
      >>> import loopgrad_jax as lg
      >>> lg.checkpointed_evaluations(1000, 32), lg.checkpointed_evaluations(1000, 1000)
      (3405, 1999)
    """
    length = _checks.static_length("length", length)
    checkpoints = _checks.static_length("checkpoints", checkpoints, minimum=1)
    return length + forward_steps(length, min(checkpoints, length))


def _costs(lengths: np.ndarray, checkpoints: int) -> np.ndarray:
    """:func:`forward_steps` for an array of lengths, one number of checkpoints: with
    ``r`` the smallest integer such that ``comb(C + r, C) >= T``, ``r * T - comb(C + r,
    r - 1)`` for ``T > 1``."""
    lengths = np.maximum(lengths, 0)
    if checkpoints == 1:  # only the initial carry: walk from it to every step
        return lengths * np.maximum(lengths - 1, 0) // 2
    top = int(lengths.max())
    betas = [1]  # betas[r] = comb(checkpoints + r, checkpoints), up to the first >= top
    while betas[-1] < top:
        betas.append(math.comb(checkpoints + len(betas), checkpoints))
    r = np.searchsorted(np.asarray(betas, dtype=np.float64), lengths, side="left")
    below = np.asarray(
        [math.comb(checkpoints + k, k - 1) if k > 0 else 0 for k in range(len(betas))],
        dtype=np.int64,
    )
    return np.where(lengths <= 1, 0, r * lengths - below[r])


@functools.lru_cache(maxsize=4096)
def _split(length: int, checkpoints: int) -> int:
    """Where to place the next checkpoint: ``m`` minimising ``m + cost(length - m, C - 1)
    + cost(m, C)`` (advance ``m`` steps and store; reverse the tail with one checkpoint
    fewer; then the head with all of them)."""
    m = np.arange(1, length, dtype=np.int64)
    total = m + _costs(length - m, checkpoints - 1) + _costs(m, checkpoints)
    return int(m[np.argmin(total)])


@functools.lru_cache(maxsize=64)
def schedule(length: int, checkpoints: int) -> np.ndarray:
    """The optimal reversal of ``length`` steps with ``checkpoints`` slots, as rows.

    Each row is ``(restore, start, advance, store, turn)``, run in order as::

      if restore >= 0: carry = slots[restore]         # the carry entering step `start`
      for k in range(start, start + advance): carry = step(carry, k)
      if store >= 0: slots[store] = carry             # the carry entering step start+advance
      if turn: reverse step start + advance from carry (its VJP)

    Slot 0 holds the initial carry. The rows before the first turn, and that turn's
    advance, walk forward from step 0 to the last step (the first forward sweep); the
    first turn reverses the last step. Every step is turned exactly once, from the last
    to the first; ``rows[:, ADVANCE].sum() == forward_steps(length, checkpoints)``.

    >>> schedule(3, 2).tolist()
    [[-1, 0, 1, 1, 0], [-1, 1, 1, -1, 1], [1, 1, 0, -1, 1], [0, 0, 0, -1, 1]]
    """
    rows: list[tuple[int, int, int, int, int]] = []
    free = list(range(checkpoints - 1, 0, -1))  # slot 0 holds the initial carry
    # Tasks: reverse steps [start, start + n) whose entering carry is in `slot` (and also in
    # hand if `held`), with `c` slots for it; or free a slot once its sub-range is done.
    tasks: list[tuple] = [("reverse", 0, length, checkpoints, 0, True)]
    while tasks:
        task = tasks.pop()
        if task[0] == "free":
            free.append(task[1])
            continue
        _, start, n, c, slot, held = task
        restore = -1 if held else slot
        if n == 1:
            rows.append((restore, start, 0, -1, 1))
        elif c == 1:  # walk from the slot to each step, last first
            for k in range(n - 1, -1, -1):
                rows.append((restore if k == n - 1 else slot, start, k, -1, 1))
        else:
            m = _split(n, c)
            new = free.pop()
            rows.append((restore, start, m, new, 0))
            # Run the tail first (from the carry in hand), then free its slot, then the head.
            tasks += [("reverse", start, m, c, slot, False), ("free", new)]
            tasks.append(("reverse", start + m, n - m, c - 1, new, True))
    table = np.asarray(rows, dtype=np.int32).reshape(-1, 5)
    table.flags.writeable = False
    return table


def first_turn(table: np.ndarray) -> int:
    """The index of the first row that turns (reverses the last step)."""
    return int(np.argmax(table[:, TURN]))
