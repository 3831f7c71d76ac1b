"""The pool's combined rate-limit status, in the upstream's ``wham/usage`` shape
(``GET /api/codex/usage``), answered from this process's copies."""

from __future__ import annotations

from collections import Counter

from service.accounts.domain import (
    ACTIVE,
    PAUSED,
    REAUTH_REQUIRED,
    AccountState,
    HotState,
    Usage,
    status,
)
from service.core.bodies import ResponseBody


class UsageWindow(ResponseBody):
    used_percent: float
    limit_window_seconds: int | None
    reset_after_seconds: int | None
    reset_at: int | None


class RateLimit(ResponseBody):
    allowed: bool
    limit_reached: bool
    primary_window: UsageWindow | None
    secondary_window: UsageWindow | None


class Credits(ResponseBody):
    has_credits: bool = False
    unlimited: bool = False
    balance: str = "0"


class PoolUsage(ResponseBody):
    """The upstream ``wham/usage`` shape, for the whole pool."""

    plan_type: str | None
    rate_limit: RateLimit
    credits: Credits


def _window(usages: list[Usage], which: str, now: float) -> UsageWindow | None:
    """Mean used percent over the accounts that reported it; the earliest reset among them."""
    used = [getattr(u, f"{which}_used_percent") for u in usages]
    known = [p for p in used if p is not None]
    if not known:
        return None
    resets = [r for u in usages if (r := getattr(u, f"{which}_reset_at")) is not None]
    sizes = [s for u in usages if (s := getattr(u, f"{which}_window_seconds")) is not None]
    reset_at = min(resets) if resets else None
    return UsageWindow(
        used_percent=round(sum(known) / len(known), 2),
        limit_window_seconds=max(sizes) if sizes else None,
        reset_after_seconds=None if reset_at is None else max(0, int(reset_at - now)),
        reset_at=None if reset_at is None else int(reset_at),
    )


def pool_usage(accounts: list[tuple[AccountState, HotState]], now: float) -> PoolUsage:
    pool = [(a, hot) for a, hot in accounts if a.status not in (PAUSED, REAUTH_REQUIRED)]
    serving = [a for a, hot in pool if status(a, hot, now) == ACTIVE]
    plans = Counter(a.plan_type for a, _ in pool if a.plan_type)
    usages = [hot.usage for _, hot in pool]
    return PoolUsage(
        plan_type=plans.most_common(1)[0][0] if plans else None,
        rate_limit=RateLimit(
            allowed=bool(serving),
            limit_reached=bool(pool) and not serving,
            primary_window=_window(usages, "primary", now),
            secondary_window=_window(usages, "secondary", now),
        ),
        credits=Credits(),
    )
