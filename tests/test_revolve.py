"""The binomial checkpoint schedule, against the dynamic program it solves."""

import functools

import pytest

import loopgrad_jax as lg
from loopgrad_jax import _revolve


@functools.cache
def fewest(length: int, slots: int) -> int:
    """Fewest forward steps that reverse ``length`` steps with ``slots`` stored carries,
    by exhaustive search over where the next checkpoint goes (the recursion revolve solves).
    """
    if length == 1:
        return 0
    if slots == 1:  # only the entering carry: walk from it to each step
        return length * (length - 1) // 2
    return min(m + fewest(length - m, slots - 1) + fewest(m, slots) for m in range(1, length))


def test_closed_form_is_the_optimum():
    for length in range(1, 80):
        for slots in range(1, 9):
            assert _revolve.forward_steps(length, slots) == fewest(length, slots), (length, slots)


def test_the_optima_the_issue_quotes():
    # T=1000: 5.29T body evaluations with 8 checkpoints, 3.41T with 32.
    assert lg.checkpointed_evaluations(1000, 8) / 1000 == pytest.approx(5.285)
    assert lg.checkpointed_evaluations(1000, 32) / 1000 == pytest.approx(3.405)
    # Enough slots for every carry: the forward sweep, then each step once more.
    assert lg.checkpointed_evaluations(1000, 1000) == 1999
    assert lg.checkpointed_evaluations(1000, 5000) == 1999
    assert lg.checkpointed_evaluations(0, 3) == 0


def run(table, length: int, slots: int) -> tuple[list[int], int]:
    """Runs a schedule on step numbers: the steps turned, in order, and the advances."""
    stored, hand, turned, advances = {0: 0}, 0, [], 0
    for restore, start, advance, store, turn in table.tolist():
        if restore >= 0:
            hand = stored[restore]
        assert hand == start, "a row starts from a carry it does not hold"
        hand += advance
        advances += advance
        if store >= 0:
            assert 0 <= store < slots
            stored[store] = hand
        if turn:
            turned.append(hand)
            hand = None  # a turn consumes the carry
    return turned, advances


@pytest.mark.parametrize(
    ("length", "slots"),
    [(1, 1), (2, 1), (7, 1), (3, 2), (10, 3), (57, 4), (100, 8), (1000, 8), (1000, 45), (40, 60)],
)
def test_schedule_turns_every_step_once_last_first_at_the_optimal_cost(length, slots):
    table = _revolve.schedule(length, min(slots, length))
    turned, advances = run(table, length, slots)
    assert turned == list(range(length - 1, -1, -1))
    assert advances == _revolve.forward_steps(length, min(slots, length))
    first = _revolve.first_turn(table)
    assert turned[0] == length - 1 and table[: first + 1, 1:3].sum(axis=1).max() == length - 1


def test_schedule_reuses_a_slot_only_once_its_carry_is_spent():
    # Every restore reads the step it was stored at: no slot was overwritten while needed.
    table = _revolve.schedule(200, 5)
    stored = {0: 0}
    for restore, start, advance, store, _ in table.tolist():
        if restore >= 0:
            assert stored[restore] == start
        if store >= 0:
            stored[store] = start + advance
    assert set(stored) <= set(range(5))


@pytest.mark.parametrize(
    ("length", "checkpoints", "match"),
    [
        (-1, 3, r"length must be an int >= 0, got -1"),
        (10, 0, r"checkpoints must be an int >= 1, got 0"),
        (10, 2.5, r"checkpoints must be a Python int, got float 2.5"),
    ],
)
def test_checkpointed_evaluations_bad_input(length, checkpoints, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lg.checkpointed_evaluations(length, checkpoints)
