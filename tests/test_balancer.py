"""The balancer is a pure function of plain values; the candidates are made from the two
account copies at one instant."""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable

from service.accounts.domain import AccountState, Cooldown, HotState, Usage
from service.accounts.hot import HotStore, LiveAccountStates
from service.core.connection import Connection, connect
from service.proxy.balancer import Candidate, Choice, Pin, Policy, Pool, Window, needs_turn, pick
from service.proxy.candidates import candidates
from service.proxy.draws import EvenDraws

STICKY = Policy("usage_weighted", prefer_earlier_reset_accounts=False, sticky_threads_enabled=True)
LOOSE = Policy("usage_weighted", prefer_earlier_reset_accounts=False, sticky_threads_enabled=False)
RR = Policy("round_robin", prefer_earlier_reset_accounts=False, sticky_threads_enabled=False)
NOW = 1_800_000_000.0


def const(value: float) -> Callable[[], float]:
    return lambda: value


def choose(
    cands: list[Candidate],
    policy: Policy,
    pin: Pin | None = None,
    *,
    turn: int = 0,
    rand: float = 0.0,
    exclude: frozenset[str] = frozenset(),
) -> Choice | None:
    return pick(Pool.build(cands, NOW), policy, pin, turn=turn, rand=const(rand), exclude=exclude)


def used(account_id: str, primary: float, secondary: float = 0.0, **kw: object) -> Candidate:
    return Candidate(
        account_id,
        "active",
        Window(primary, NOW + 3600, 18000),
        Window(secondary, kw.get("weekly_reset", NOW + 86400 * 3), 604800),  # type: ignore[arg-type]
    )


def test_no_eligible_account_is_no_choice() -> None:
    pool = [Candidate("a", "paused"), Candidate("b", "rate_limited")]
    assert choose(pool, STICKY) is None
    assert choose([], STICKY) is None


def test_only_eligible_accounts_are_picked() -> None:
    pool = [Candidate("a", "quota_exceeded"), Candidate("b", "active")]
    for r in (0.0, 0.5, 0.99):
        assert choose(pool, STICKY, rand=r) == Choice("b", pinned=False, repin=True)


def test_a_pin_decides_while_its_account_is_eligible_and_sticky_threads_are_on() -> None:
    pool = [Candidate("a", "active"), Candidate("b", "active")]
    assert choose(pool, STICKY, Pin("thread", "b")) == Choice("b", pinned=True)
    # Off: routed afresh (rand 0 takes the first by id).
    assert choose(pool, LOOSE, Pin("thread", "b")) == Choice("a", pinned=False, repin=True)


def test_a_limited_pin_is_skipped_but_kept_and_a_paused_or_deleted_one_moves() -> None:
    limited = [Candidate("a", "active"), Candidate("b", "rate_limited")]
    # Skipped, kept, and a to remember as the thread's detour meanwhile.
    detour = Choice("a", pinned=False, repin=False, detour=True)
    assert choose(limited, STICKY, Pin("t", "b")) == detour
    weekly = [Candidate("a", "active"), Candidate("b", "quota_exceeded")]
    assert choose(weekly, STICKY, Pin("t", "b")) == detour
    # A detour already remembered is kept while it can serve.
    three = [*limited, Candidate("c", "active")]
    assert choose(three, STICKY, Pin("t", "b", "c")) == Choice("c", pinned=False)
    assert choose(three, STICKY, Pin("t", "b", "gone")).detour  # type: ignore[union-attr]
    paused = [Candidate("a", "active"), Candidate("b", "paused")]
    assert choose(paused, STICKY, Pin("t", "b")) == Choice("a", pinned=False, repin=True)
    reauth = [Candidate("a", "active"), Candidate("b", "reauth_required")]
    assert choose(reauth, STICKY, Pin("t", "b")) == Choice("a", pinned=False, repin=True)
    deleted = [Candidate("a", "active")]
    assert choose(deleted, STICKY, Pin("t", "b")) == Choice("a", pinned=False, repin=True)
    # A pin this request already failed on is skipped for the retry, not moved.
    both = [Candidate("a", "active"), Candidate("b", "active")]
    failed = choose(both, STICKY, Pin("t", "b"), exclude=frozenset({"b"}))
    assert failed == detour


def test_usage_weighted_shares_follow_remaining_capacity() -> None:
    pool = Pool.build([used("a", 10), used("b", 50, 20), used("c", 30, 90)], NOW)
    counts = {"a": 0, "b": 0, "c": 0}
    steps = 10_000
    for i in range(steps):
        choice = pick(pool, LOOSE, None, turn=0, rand=const((i + 0.5) / steps))
        assert choice is not None
        counts[choice.account_id] += 1
    # Remaining: 90, 50 (the higher window counts), 10.
    assert counts == {"a": 6000, "b": 3333, "c": 667} or (
        abs(counts["a"] - 6000) <= 1 and abs(counts["b"] - 3333) <= 1
    )


def test_an_exhausted_account_gets_nothing_and_a_reset_window_counts_as_fresh() -> None:
    full = Candidate("full", "active", Window(100, NOW + 60))
    stale = Candidate("stale", "active", Window(100, NOW - 1))  # reset already passed
    pool = Pool.build([full, Candidate("half", "active", Window(50, NOW + 60)), stale], NOW)
    seen = set()
    for i in range(100):
        choice = pick(pool, LOOSE, None, turn=0, rand=const(i / 100))
        assert choice is not None
        seen.add(choice.account_id)
    assert seen == {"half", "stale"}


def test_round_robin_takes_the_eligible_accounts_in_turn_by_id() -> None:
    pool = Pool.build([used("c", 99), used("a", 0), Candidate("x", "paused"), used("b", 50)], NOW)
    order = []
    for turn in range(6):
        choice = pick(pool, RR, None, turn=turn, rand=const(0.0))
        assert choice is not None
        order.append(choice.account_id)
    assert order == ["a", "b", "c", "a", "b", "c"]
    assert not needs_turn(LOOSE)
    assert needs_turn(RR)


def test_prefer_earlier_reset_narrows_to_the_earliest_bucket_with_capacity() -> None:
    soon = used("soon", 20, 40, weekly_reset=NOW + 3600)
    same_day = used("same-day", 20, 40, weekly_reset=NOW + 3600 + 20 * 3600)
    later = used("later", 0, 0, weekly_reset=NOW + 5 * 86400)
    spent = used("spent", 0, 100, weekly_reset=NOW + 60)  # earliest, but no capacity
    prefer = Policy("usage_weighted", True, False)
    pool = Pool.build([soon, same_day, later, spent], NOW)
    picked = {pick(pool, prefer, None, turn=0, rand=const(i / 50)).account_id for i in range(50)}  # type: ignore[union-attr]
    assert picked == {"soon", "same-day"}
    # Off: reset times are ignored.
    loose = {pick(pool, LOOSE, None, turn=0, rand=const(i / 50)).account_id for i in range(50)}  # type: ignore[union-attr]
    assert loose == {"soon", "same-day", "later"}
    # With the bucket failed on, the next bucket serves.
    rest = pick(
        pool, prefer, None, turn=0, rand=const(0.0), exclude=frozenset({"soon", "same-day"})
    )
    assert rest == Choice("later", pinned=False, repin=True)


def test_the_pool_is_valid_until_the_first_time_based_change() -> None:
    cooling = Candidate("a", "rate_limited", available_at=NOW + 30, changes_at=NOW + 30)
    resetting = Candidate("b", "active", Window(10, NOW + 90), changes_at=NOW + 90)
    pool = Pool.build([cooling, resetting], NOW)
    assert pool.valid_until == NOW + 30
    assert pool.recovers_at() is None  # b can serve
    weekly = Candidate("c", "quota_exceeded", available_at=NOW + 99, usage_limited=True)
    limited = Pool.build([cooling, weekly], NOW)
    # a cools down after failures: not the pool's usage limit, it will be back in seconds.
    assert not limited.all_limited()
    assert limited.recovers_at() is None
    stated = Candidate("a", "rate_limited", available_at=NOW + 30, usage_limited=True)
    limited = Pool.build([stated, weekly, Candidate("p", "paused")], NOW)
    assert limited.all_limited()
    assert limited.recovers_at() == NOW + 30
    assert Pool.build([Candidate("p", "paused")], NOW).recovers_at() is None


def account(account_id: str, status: str = "active") -> AccountState:
    return AccountState(
        id=account_id,
        chatgpt_account_id=f"c-{account_id}",
        email=f"{account_id}@example.com",
        plan_type="plus",
        status=status,
        created_at=0.0,
        sealed_tokens=b"",
        tokens_version=1,
    )


def test_candidates_read_both_copies_and_the_clock() -> None:
    states = LiveAccountStates(HotStore(Connection(connect("redis://127.0.0.1:9"), "unused:")))
    now = time.time()
    states.states = {
        "full": HotState(
            usage=Usage(primary_used_percent=100, primary_reset_at=now + 60), usage_at=now
        ),
        "cooling": HotState(cooldown=Cooldown(until=now + 30, failures=2), cooldown_at=now),
        "fresh": HotState(
            usage=Usage(primary_used_percent=40, primary_reset_at=now + 600), usage_at=now
        ),
    }
    pool = [account("full"), account("cooling"), account("fresh"), account("off", "paused")]
    made = {c.account_id: c for c in candidates(pool, states, now)}
    assert {i: c.status for i, c in made.items()} == {
        "full": "rate_limited",
        "cooling": "rate_limited",
        "fresh": "active",
        "off": "paused",
    }
    assert made["fresh"].primary.used_percent == 40
    # Once the known reset time passes, the full account serves again: no poll needed.
    later = {c.account_id: c.status for c in candidates(pool, states, now + 61)}
    assert later["full"] == "active"
    assert later["cooling"] == "active"


def test_after_a_failover_the_other_accounts_keep_their_shares() -> None:
    pool = Pool.build([used("a", 10), used("b", 50), used("c", 90)], NOW)
    counts = {"b": 0, "c": 0}
    steps = 6000
    rng = random.Random(7)
    for _ in range(steps):
        choice = pick(pool, LOOSE, None, turn=0, rand=rng.random, exclude=frozenset("a"))
        assert choice is not None
        counts[choice.account_id] += 1
    # b and c alone, 50 : 10.
    assert abs(counts["b"] / steps - 50 / 60) < 0.02, counts
    rr = [pick(pool, RR, None, turn=t, rand=const(0.0), exclude=frozenset("b")) for t in range(4)]
    assert [c.account_id for c in rr if c] == ["a", "c", "c", "a"]


def test_a_thread_whose_pin_waits_keeps_one_detour_and_threads_spread() -> None:
    pool = Pool.build(
        [Candidate("p", "rate_limited"), *(used(n, 20) for n in ("a", "b", "c", "d"))], NOW
    )
    rng = random.Random(3)
    detours = {}
    for thread in (f"t{i}" for i in range(200)):
        picks = {
            pick(pool, STICKY, Pin(thread, "p"), turn=rng.randrange(9), rand=rng.random)
            for _ in range(5)
        }
        assert len(picks) == 1, picks  # every turn (and every process) agrees
        (choice,) = picks
        assert choice is not None
        assert not choice.repin  # the pin waits for p
        detours[thread] = choice.account_id
    shares = {n: list(detours.values()).count(n) for n in "abcd"}
    assert all(30 <= v <= 70 for v in shares.values()), shares


def test_prefer_earlier_reset_counts_an_account_of_unknown_reset_in_the_bucket() -> None:
    known = used("known", 10, 10, weekly_reset=NOW + 3600)
    later = used("later", 10, 10, weekly_reset=NOW + 4 * 86400)
    unknown = Candidate("unknown", "active")
    prefer = Policy("usage_weighted", True, False)
    pool = Pool.build([known, later, unknown], NOW)
    picked = {pick(pool, prefer, None, turn=0, rand=const(i / 40)).account_id for i in range(40)}  # type: ignore[union-attr]
    assert picked == {"known", "unknown"}


def test_usage_weighted_draws_are_uniform_and_spread_evenly_over_a_few_dozen_picks() -> None:
    # Each draw is uniform on [0, 1): over many, every tenth of it gets a tenth of them.
    draws = EvenDraws(0.3)
    tenths = collections.Counter(int(draws() * 10) for _ in range(10_000))
    assert all(990 <= tenths[i] <= 1010 for i in range(10)), tenths
    # And successive ones spread: whatever the start, 40 new threads over six accounts with
    # the same remaining capacity give each 5 to 8 of them, 6.7 on average (independent draws
    # left one with 3 or fewer in about 4 runs of 10), and 50 picks by unequal weights each
    # share within two of its due.
    rng = random.Random(11)
    even = Pool.build([used(name, 75.0) for name in "abcdef"], NOW)
    uneven = Pool.build([used("a", 90.0), used("b", 70.0), used("c", 40.0)], NOW)  # 10:30:60
    for _ in range(200):
        draws = EvenDraws(rng.random())
        spread = collections.Counter(
            pick(even, STICKY, None, turn=0, rand=draws).account_id  # type: ignore[union-attr]
            for _ in range(40)
        )
        assert len(spread) == 6, spread
        assert all(5 <= count <= 8 for count in spread.values()), spread
        shares = collections.Counter(
            pick(uneven, LOOSE, None, turn=0, rand=draws).account_id  # type: ignore[union-attr]
            for _ in range(50)
        )
        expected = {"a": 5, "b": 15, "c": 30}
        assert all(abs(shares[n] - expected[n]) <= 2 for n in expected), shares
