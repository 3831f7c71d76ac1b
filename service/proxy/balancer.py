"""Which account serves a request: a pure function of what this process knows.

Its inputs are plain values made from the two account copies (the cold record and the hot
state) at one instant, the live settings, the thread's pin, the round-robin turn and the clock;
it reads nothing else (no Redis, no HTTP, no module state), so it is tested with plain values and
costs only CPU on the request path. ``import-linter`` holds it to that (``pyproject.toml``,
"balancer is pure").

The work that grows with the pool (who is eligible, their weights, the earliest weekly-reset
bucket) is done once in ``Pool.build`` and kept until the copies change or the clock reaches
the next instant at which some account's eligibility changes by itself (a cooldown ends, a
window resets): ``pick`` itself is a bisection, whatever the pool's size.
"""

from __future__ import annotations

import bisect
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

ACTIVE = "active"
# An account the upstream is holding back for now: a thread pinned to it waits for it (CONTRACT
# §7: "a rate-limited pin is skipped without being moved"); any other status moves the pin.
LIMITED = frozenset({"rate_limited", "quota_exceeded"})
# Weekly resets this close together count as one bucket for prefer_earlier_reset_accounts.
RESET_BUCKET_SECONDS = 24 * 3600
# After a failover: how often a pick draws again before preparing the remaining accounts.
_REDRAWS = 8


@dataclass(frozen=True, slots=True)
class Window:
    """One upstream usage window as last learned: percent used and when it resets."""

    used_percent: float | None = None
    reset_at: float | None = None  # epoch seconds
    window_seconds: int | None = None

    def used(self, now: float) -> float:
        """Percent used now: a window whose reset time has passed is fresh again."""
        if self.used_percent is None or (self.reset_at is not None and self.reset_at <= now):
            return 0.0
        return self.used_percent


@dataclass(frozen=True, slots=True)
class Candidate:
    """An account as the balancer sees it (``proxy.candidates`` makes them from the copies)."""

    account_id: str
    # What the account may do now: "active" serves; anything else (paused, reauth_required,
    # rate_limited, quota_exceeded) does not. Derived at the candidate's time by the one rule in
    # ``accounts.domain.status``, so the dashboard and the balancer never disagree.
    status: str
    primary: Window = Window()
    secondary: Window = Window()
    # For a limited account: when it is expected to serve again (epoch seconds), if known.
    available_at: float | None = None
    # Held back by its usage limit (a full window, a 429), not by failures alone.
    usage_limited: bool = False
    # Requests its windows can still take, when the answers have told (``proxy.units``).
    remaining_units: int | None = None
    # The next instant at which this candidate's status or weight changes by the clock alone.
    changes_at: float = math.inf

    @property
    def eligible(self) -> bool:
        return self.status == ACTIVE

    def remaining(self, now: float) -> float:
        """Capacity left: 100 minus the higher of the two windows' used percent."""
        return max(0.0, 100.0 - max(self.primary.used(now), self.secondary.used(now)))


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings that steer a pick (from the live settings copy)."""

    routing_strategy: str
    prefer_earlier_reset_accounts: bool
    sticky_threads_enabled: bool


@dataclass(frozen=True, slots=True)
class Pin:
    """The account a conversation thread is pinned to, and where its turns go while that
    account waits for its limit to lift (``detour``)."""

    thread_id: str
    account_id: str
    detour: str | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    account_id: str
    # The thread's pin decided it (for the request log and the sticky-hit metrics).
    pinned: bool
    # The thread's pin should now name this account: the thread had none, or its account was
    # paused or deleted. False when the pin decided, or when its account is only limited.
    repin: bool = False
    # The thread's pin waits and this is a new detour for it, to remember.
    detour: bool = False


@dataclass(frozen=True, slots=True)
class _Group:
    """Eligible accounts in a fixed order (by id, so every process counts turns alike) and the
    running sum of their weights, for weighted choice by bisection."""

    members: tuple[Candidate, ...]
    cumulative: tuple[float, ...]

    @classmethod
    def of(cls, members: Iterable[Candidate], now: float) -> _Group:
        ordered = tuple(sorted(members, key=lambda c: c.account_id))
        weights = (c.remaining(now) for c in ordered)
        return cls(ordered, tuple(itertools.accumulate(weights)))

    def weighted(self, rand: float) -> Candidate:
        total = self.cumulative[-1]
        if total <= 0:
            # Every window says full yet the accounts are eligible (a stale percent): share
            # equally rather than refuse traffic the upstream may well accept.
            return self.members[min(int(rand * len(self.members)), len(self.members) - 1)]
        i = bisect.bisect_right(self.cumulative, rand * total)
        return self.members[min(i, len(self.members) - 1)]

    def turn(self, turn: int) -> Candidate:
        return self.members[turn % len(self.members)]

    def rendezvous(self, key: str, exclude: frozenset[str]) -> Candidate | None:
        """The member ``key`` hashes highest with, excluded ones left out: the same member for
        as long as it stays in the group, whatever else joins or leaves (weights would move it
        with every answer), and the same on every process (crc32, not Python's salted hash)."""
        scored = (
            (zlib.crc32(f"{key}\x00{c.account_id}".encode()), c)
            for c in self.members
            if c.account_id not in exclude
        )
        best = max(scored, key=lambda sc: sc[0], default=None)
        return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Pool:
    """The pool at one instant, prepared for picks (see the module's docstring)."""

    by_id: dict[str, Candidate]
    eligible: _Group
    # The eligible accounts whose weekly window resets in the earliest 24 h bucket that still
    # has capacity (all of them when no reset time is known).
    earliest: _Group
    built_at: float
    # The first instant at which the pool must be built again though nothing was learned.
    valid_until: float
    candidates: tuple[Candidate, ...] = field(default=())

    @classmethod
    def build(cls, candidates: Sequence[Candidate], now: float) -> Pool:
        eligible = [c for c in candidates if c.eligible]
        return cls(
            by_id={c.account_id: c for c in candidates},
            eligible=_Group.of(eligible, now),
            earliest=_Group.of(_earliest_bucket(eligible, now), now),
            built_at=now,
            valid_until=min((c.changes_at for c in candidates), default=math.inf),
            candidates=tuple(candidates),
        )

    def all_limited(self) -> bool:
        """No account may serve, and every one the operator lets serve is held back by its
        usage limit (the pool's 429). An account only cooling down after failures makes it
        "no account" instead: it will be back in seconds, and clients retry a 503."""
        held = [c for c in self.candidates if c.status in LIMITED]
        return bool(held) and not self.eligible.members and all(c.usage_limited for c in held)

    def recovers_at(self) -> float | None:
        """When the earliest limited account serves again, if ``all_limited`` and it is known."""
        if not self.all_limited():
            return None
        known = [c.available_at for c in self.candidates if c.available_at is not None]
        return min(known) if known else None


def _earliest_bucket(eligible: list[Candidate], now: float) -> list[Candidate]:
    """The eligible accounts with capacity whose weekly window resets within a day of the
    earliest such reset; an account whose reset is not known yet counts as one of them (it may
    well be the earliest, and only traffic to it can tell)."""
    with_capacity = [c for c in eligible if c.remaining(now) > 0]

    def reset(c: Candidate) -> float | None:
        at = c.secondary.reset_at
        return at if at is not None and at > now else None

    resets = [at for c in with_capacity if (at := reset(c)) is not None]
    if not resets:
        return eligible
    last = min(resets) + RESET_BUCKET_SECONDS
    return [c for c in with_capacity if (at := reset(c)) is None or at < last]


def pin_decides(
    pool: Pool, policy: Policy, pin: Pin | None, exclude: frozenset[str] = frozenset()
) -> bool:
    """Whether the thread's pin picks the account (so no round-robin turn is taken)."""
    if pin is None or not policy.sticky_threads_enabled or pin.account_id in exclude:
        return False
    pinned = pool.by_id.get(pin.account_id)
    return pinned is not None and pinned.eligible


def saturated(pool: Pool, account_id: str, inflight: int) -> bool:
    """The account already has as many requests on their way as it has units left: one more
    would overshoot its window (the upstream would answer 429)."""
    c = pool.by_id.get(account_id)
    return c is not None and c.remaining_units is not None and inflight >= c.remaining_units


def needs_turn(policy: Policy) -> bool:
    return policy.routing_strategy == "round_robin"


def pick(
    pool: Pool,
    policy: Policy,
    pin: Pin | None,
    *,
    turn: int,
    rand: Callable[[], float],
    exclude: frozenset[str] = frozenset(),
) -> Choice | None:
    """The account for the next request, or None when no account may serve.

    ``turn`` is the next round-robin turn (from a counter shared by every process, taken only
    when ``needs_turn`` and not ``pin_decides``); ``rand`` draws uniformly from [0, 1) (called
    once per draw: the caller owns the randomness); ``exclude`` holds the accounts this request
    already failed on.
    """
    repin = True
    if pin is not None and policy.sticky_threads_enabled:
        if pin_decides(pool, policy, pin, exclude):
            return Choice(pin.account_id, pinned=True)
        pinned = pool.by_id.get(pin.account_id)
        # Limited, or failed on by this very request: skipped, but the pin stays put.
        repin = pinned is None or not (pinned.status in LIMITED or pinned.account_id in exclude)
    group = pool.earliest if policy.prefer_earlier_reset_accounts else pool.eligible
    rr = policy.routing_strategy == "round_robin"
    if pin is not None and not repin:
        # The pin waits for its account; meanwhile the thread's turns go to one account too:
        # its detour while that can serve, else a new one, the same on every process
        # (rendezvous hashing on the thread id), remembered beside the pin.
        if pin.detour is not None and pin.detour not in exclude:
            kept = pool.by_id.get(pin.detour)
            if kept is not None and kept.eligible:
                return Choice(kept.account_id, pinned=False)
        detour = group.rendezvous(pin.thread_id, exclude)
        if detour is None and policy.prefer_earlier_reset_accounts:
            detour = pool.eligible.rendezvous(pin.thread_id, exclude)
        return None if detour is None else Choice(detour.account_id, pinned=False, detour=True)
    if exclude and group.members:
        # Drawing again until the account is not excluded picks from exactly the remaining
        # accounts' shares, without preparing a group for them (a few tries, then we do).
        for k in range(_REDRAWS):
            again = group.turn(turn + k) if rr else group.weighted(rand())
            if again.account_id not in exclude:
                return Choice(again.account_id, pinned=False, repin=repin)
    if exclude:
        now = pool.built_at
        group = _Group.of((c for c in group.members if c.account_id not in exclude), now)
        if not group.members and policy.prefer_earlier_reset_accounts:
            rest = (c for c in pool.eligible.members if c.account_id not in exclude)
            group = _Group.of(_earliest_bucket(list(rest), now), now)
    if not group.members:
        return None
    chosen = group.turn(turn) if rr else group.weighted(rand())
    return Choice(chosen.account_id, pinned=False, repin=repin)
