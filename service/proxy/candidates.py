"""The balancer's view of the pool, made from this process's two account copies at one instant:
the cold record says who the operator lets serve, the hot state what the upstream last said.

``PoolView`` keeps the prepared ``Pool`` until either copy changes or the clock reaches the next
instant at which an account's eligibility changes by itself (a cooldown ends, a window's known
reset time passes): the pool is never stale by a cache lifetime, and an account whose window
just reset is back in selection on the very next pick.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from service.accounts.domain import AccountState, HotState, Usage, status
from service.accounts.hot import LiveAccountStates
from service.accounts.live import LiveAccounts
from service.proxy.balancer import Candidate, Pool, Window
from service.proxy.units import UnitSteps


def _windows(usage: Usage) -> tuple[Window, Window]:
    return (
        Window(usage.primary_used_percent, usage.primary_reset_at, usage.primary_window_seconds),
        Window(
            usage.secondary_used_percent, usage.secondary_reset_at, usage.secondary_window_seconds
        ),
    )


def _available_at(state: str, hot: HotState, now: float) -> float | None:
    """When a limited account serves again, as far as its state says: the last of the things
    that hold it now (a cooldown, a full window); None when nothing says when."""
    if state not in ("rate_limited", "quota_exceeded"):
        return None
    usage = hot.usage
    holds = [
        (hot.cooldown.until, True),
        (usage.primary_reset_at, usage.limit_reached or _full(usage.primary_used_percent)),
        (usage.secondary_reset_at, _full(usage.secondary_used_percent)),
    ]
    times = [t for t, holding in holds if holding and t is not None and t > now]
    return max(times) if times else None


def _usage_limited(state: str, hot: HotState, now: float) -> bool:
    """Held back by its usage: a full window or a limit the upstream stated (not failures)."""
    if state == "quota_exceeded":
        return True
    if state != "rate_limited":
        return False
    usage, cooldown = hot.usage, hot.cooldown
    reset = usage.primary_reset_at
    window_open = reset is None or reset > now
    window = window_open and (usage.limit_reached or _full(usage.primary_used_percent))
    stated = cooldown.limited and cooldown.until is not None and cooldown.until > now
    return window or stated


def _full(percent: float | None) -> bool:
    return percent is not None and percent >= 100


def _changes_at(hot: HotState, now: float) -> float:
    usage = hot.usage
    times = (hot.cooldown.until, usage.primary_reset_at, usage.secondary_reset_at)
    return min((t for t in times if t is not None and t > now), default=math.inf)


def candidate(
    account: AccountState, hot: HotState, now: float, steps: UnitSteps | None = None
) -> Candidate:
    primary, secondary = _windows(hot.usage)
    state = status(account, hot, now)
    units = None if steps is None else steps.remaining(account.id, hot.usage, now)
    return Candidate(
        account.id,
        state,
        primary,
        secondary,
        available_at=_available_at(state, hot, now),
        usage_limited=_usage_limited(state, hot, now),
        remaining_units=units,
        changes_at=_changes_at(hot, now),
    )


def candidates(
    accounts: Iterable[AccountState],
    states: LiveAccountStates,
    now: float,
    steps: UnitSteps | None = None,
) -> list[Candidate]:
    return [candidate(account, states.get(account.id), now, steps) for account in accounts]


class PoolView:
    """The prepared pool of this process, made again only when it may have changed."""

    def __init__(self, accounts: LiveAccounts, states: LiveAccountStates, steps: UnitSteps):
        self.accounts = accounts
        self.states = states
        self.steps = steps
        self._pool: Pool | None = None
        self._made_from: tuple[object, ...] = ()

    def current(self, now: float) -> Pool:
        made_from = (
            self.accounts.epoch,
            self.accounts.version,
            self.states.generation,
            self.steps.generation,
        )
        pool = self._pool
        if pool is None or made_from != self._made_from or now >= pool.valid_until:
            made = candidates(self.accounts.accounts.values(), self.states, now, self.steps)
            pool = Pool.build(made, now)
            self._pool, self._made_from = pool, made_from
        return pool
