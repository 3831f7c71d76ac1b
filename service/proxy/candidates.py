"""The balancer's view of the pool, made from this process's two account copies at one instant:
the cold record says who the operator lets serve, the hot state what the upstream last said."""

from __future__ import annotations

from collections.abc import Iterable

from service.accounts.domain import AccountState, Usage, status
from service.accounts.hot import LiveAccountStates
from service.proxy.balancer import Candidate, Window


def _windows(usage: Usage) -> tuple[Window, Window]:
    return (
        Window(usage.primary_used_percent, usage.primary_reset_at, usage.primary_window_seconds),
        Window(
            usage.secondary_used_percent, usage.secondary_reset_at, usage.secondary_window_seconds
        ),
    )


def candidates(
    accounts: Iterable[AccountState], states: LiveAccountStates, now: float
) -> list[Candidate]:
    out = []
    for account in accounts:
        hot = states.get(account.id)
        primary, secondary = _windows(hot.usage)
        out.append(Candidate(account.id, status(account, hot, now), primary, secondary))
    return out
