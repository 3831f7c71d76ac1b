"""The pool benchmark's ground truth: what the proxy could have known, and what stickiness counts.

``scripts/bench pool`` quotes these figures against the issue's targets, so they are held to
hand-made timelines here.
"""

from __future__ import annotations

from typing import Any

from bench.pool import POOL, Known, Sent, Spec, Truth, figures, pool_of

EPOCH = 1_000


def _event(seq: int, account: str, at: float, spent_before: int, tag: str) -> dict[str, Any]:
    """One served upstream request: it spent a unit of a 3-unit, 10-second window (no weekly
    limit) and was answered 0.1 s later."""
    window_end = EPOCH + 10 * (int(at - EPOCH) // 10 + 1)
    return {
        "seq": seq,
        "time": at,
        "answered": at + 0.1,
        "status": 200,
        "room": True,
        "spent": True,
        "path": "/codex/responses",
        "session": None,
        "tag": tag,
        "account_id": account,
        "short_spent": spent_before + 1,
        "short_capacity": 3 if account == "a" else 10,
        "short_end": window_end,
        "weekly_spent": None,
        "weekly_capacity": None,
        "weekly_end": EPOCH + 1_000,
    }


def test_a_return_to_a_recovered_pin_is_kept_and_a_move_is_not() -> None:
    # (thread, when, account): thread 0 spends all of a, detours to b while a is out, goes back
    # to a once its window resets (CONTRACT §7); thread 1 leaves b for a while b has room.
    turns = [
        (0, 1001.0, "a"),
        (1, 1001.5, "b"),
        (0, 1002.0, "a"),
        (0, 1002.5, "a"),
        (0, 1003.0, "b"),
        (1, 1004.0, "b"),
        (0, 1011.0, "a"),
        (0, 1012.0, "a"),
        (1, 1013.0, "a"),
    ]
    spent: dict[tuple[str, int], int] = {}
    timeline = []
    sent = []
    for i, (thread, at, account) in enumerate(turns):
        window = (account, int(at - EPOCH) // 10)
        timeline.append(_event(i, account, at, spent.get(window, 0), str(i)))
        spent[window] = spent.get(window, 0) + 1
        sent.append(Sent(i, thread, 0, at, at + 0.1, 200, account))
    accounts = {
        name: {"quota": {"capacity": capacity, "window_seconds": 10}}
        for name, capacity in (("a", 3), ("b", 10))
    }
    truth = Truth({"epoch": EPOCH, "timeline": timeline, "accounts": accounts})

    result = figures(Spec(1, "round_robin", False, True), 1.0, sent, 0, truth)

    # Eligible (the previous account had room): thread 0 at 1002, 1011, 1012; thread 1 at
    # 1004, 1013. Kept: 1002, 1012, 1004; back on the pin: 1011; moved: 1013.
    assert (result.sticky_eligible, result.sticky_kept, result.sticky_returns) == (5, 3, 1)
    assert result.sticky_percent == 80.0
    assert result.sticky_previous_percent == 60.0


def _known(**windows: Any) -> Known:
    fields: dict[str, Any] = {
        "at": 0.0,
        "short_full": False,
        "short_end": 100.0,
        "weekly_full": False,
        "weekly_end": 100.0,
        "tag": None,
        "short_left": None,
        "weekly_left": None,
    }
    return Known(**{**fields, **windows})


def test_known_room_is_counted_in_each_window() -> None:
    # The weekly window ended: the short one still has only what the answer left of it.
    short_last_unit = _known(short_left=1, weekly_left=50, weekly_end=10.0)
    assert short_last_unit.room(12.0)
    assert not short_last_unit.room(12.0, in_flight=1)
    assert short_last_unit.room(101.0, in_flight=1)  # both ended: fresh
    # The short window ended: a full weekly one still holds the account back.
    weekly_full = _known(short_left=0, short_full=True, short_end=10.0, weekly_full=True)
    assert not weekly_full.room(12.0)
    assert weekly_full.room(101.0)
    # Sizes unknown: only a stated full window says no.
    assert _known().room(12.0, in_flight=5)


def test_pools_of_3_to_20_accounts_stagger_their_resets_smallest_first() -> None:
    assert pool_of(6) == POOL
    for size in range(3, 21):
        members = pool_of(size)
        assert len({m.name for m in members}) == size
        assert [m.capacity for m in members] == sorted(m.capacity for m in members)
        offsets = [m.offset for m in members]
        assert offsets == sorted(offsets)
        assert offsets[-1] == POOL[-1].offset
    # Three accounts: an equal share of the load (45 units / 30 s at load 1, a third each) needs
    # 5 s for the 2.5 units the smallest has left at 75 % used.
    assert [m.offset for m in pool_of(3)] == [5, 16, 28]
