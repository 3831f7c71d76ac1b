"""Which account serves a request: a pure function of what this process knows.

Its inputs are plain values made from the two account copies (the cold record and the hot
state) at the request's time, the live settings, the thread's pin and the clock; it reads
nothing else (no Redis, no HTTP, no module state), so it is tested with plain values and costs
only CPU on the request path. ``import-linter`` holds it to that (``pyproject.toml``,
"balancer is pure").

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


@dataclass(frozen=True, slots=True)
class Candidate:
    """An account as the balancer sees it (``proxy.candidates`` makes them from the copies)."""

    account_id: str
    # What the account may do now: "active" serves; anything else (paused, reauth_required,
    # rate_limited, quota_exceeded) does not. Derived at the request's time by the one rule in
    # ``accounts.domain.status``, so the dashboard and the balancer never disagree.
    status: str
    primary: Window = Window()
    secondary: Window = Window()

    @property
    def eligible(self) -> bool:
        return self.status == "active"


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
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        return None
    if pin is not None and policy.sticky_threads_enabled:
        for c in eligible:
            if c.account_id == pin.account_id:
                return Choice(c.account_id, pinned=True)
    return Choice(eligible[0].account_id, pinned=False)
