"""Which account serves a request: a pure function of what this process knows.

Its inputs are plain values made by the caller from the two account copies (the cold record
and the hot state), the live settings, the thread's pin and the clock; it reads nothing else
(no Redis, no HTTP, no module state), so it is tested with plain values and costs only CPU on
the request path. ``import-linter`` holds it to that (``pyproject.toml``, "balancer is pure").

Until the proxy issue lands, ``pick`` honours a pin whose account is eligible and otherwise
takes the first eligible account; the strategies (``usage_weighted``, ``round_robin``) and
``prefer_earlier_reset_accounts`` come with the proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """One upstream usage window as last learned: percent used and when it resets."""

    used_percent: float | None = None
    reset_at: float | None = None  # epoch seconds
    window_seconds: int | None = None

    def exhausted(self, now: float) -> bool:
        """Full, and not yet reset."""
        if self.used_percent is None or self.used_percent < 100:
            return False
        return self.reset_at is None or self.reset_at > now


@dataclass(frozen=True, slots=True)
class Candidate:
    """An account as the balancer sees it."""

    account_id: str
    # The operator's word (active, paused, reauth_required) from the cold record.
    status: str
    primary: Window = Window()
    secondary: Window = Window()
    # Hot state: no request before this time (a 429, repeated failures).
    cooldown_until: float | None = None
    last_used_at: float | None = None

    def eligible(self, now: float) -> bool:
        """May be given a request now: active, not cooling down, neither window exhausted."""
        if self.status != "active":
            return False
        if self.cooldown_until is not None and self.cooldown_until > now:
            return False
        return not (self.primary.exhausted(now) or self.secondary.exhausted(now))


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings that steer a pick (from the live settings copy)."""

    routing_strategy: str
    prefer_earlier_reset_accounts: bool
    sticky_threads_enabled: bool


@dataclass(frozen=True, slots=True)
class Pin:
    """The account a conversation thread was last served by."""

    thread_id: str
    account_id: str


@dataclass(frozen=True, slots=True)
class Choice:
    account_id: str
    # The thread's pin decided it (for the request log and the sticky-hit metrics).
    pinned: bool


def pick(
    candidates: Sequence[Candidate], policy: Policy, pin: Pin | None, now: float
) -> Choice | None:
    """The account for the next request, or None when no account may serve."""
    eligible = [c for c in candidates if c.eligible(now)]
    if not eligible:
        return None
    if pin is not None and policy.sticky_threads_enabled:
        for c in eligible:
            if c.account_id == pin.account_id:
                return Choice(c.account_id, pinned=True)
    return Choice(eligible[0].account_id, pinned=False)
