"""How many more requests an account's windows can take, as far as its answers tell.

The upstream reports a window's use as a percent, not in requests; but each request moves it by
a step, so the smallest rise seen between two answers within one window is (at most) what one
request costs. From it, the percent left gives the requests left, which lets the proxy keep
requests already on their way from overshooting an account's last units: it sends no more at
once than the account has left. Until a step has been seen nothing is assumed.

Learned by each process from the answers it sees (``Learner``); a step is a property of the
account's plan, so it is kept across windows.
"""

from __future__ import annotations

import math

from service.accounts.domain import Usage

# A rise smaller than this is rounding noise, not a request's cost.
_MIN_STEP = 0.01


class UnitSteps:
    def __init__(self) -> None:
        # account id -> (short window's step, weekly window's step), percent per request
        self._steps: dict[str, tuple[float | None, float | None]] = {}
        # Bumped when a step changes, so a pool view made from them is made again.
        self.generation = 0

    def observe(self, account_id: str, before: Usage | None, after: Usage) -> None:
        if before is None:
            return
        old = self._steps.get(account_id, (None, None))
        new = (
            _step(
                old[0],
                before.primary_used_percent,
                before.primary_reset_at,
                after.primary_used_percent,
                after.primary_reset_at,
            ),
            _step(
                old[1],
                before.secondary_used_percent,
                before.secondary_reset_at,
                after.secondary_used_percent,
                after.secondary_reset_at,
            ),
        )
        if new != old:
            self._steps[account_id] = new
            self.generation += 1

    def remaining(self, account_id: str, usage: Usage, now: float) -> int | None:
        """Requests the account can still take in both windows; None when not known."""
        short, weekly = self._steps.get(account_id, (None, None))
        left = [
            n
            for n in (
                _left(short, usage.primary_used_percent, usage.primary_reset_at, now),
                _left(weekly, usage.secondary_used_percent, usage.secondary_reset_at, now),
            )
            if n is not None
        ]
        return min(left) if left else None


def same_window(a: float | None, b: float | None) -> bool:
    """Two answers speak of one window: the same reset time (computed from reset-after-seconds,
    it drifts by a second between answers)."""
    return a is not None and b is not None and abs(a - b) < 2


def _step(
    known: float | None,
    before: float | None,
    before_reset: float | None,
    after: float | None,
    after_reset: float | None,
) -> float | None:
    if before is None or after is None or not same_window(before_reset, after_reset):
        return known
    rise = after - before
    if rise < _MIN_STEP:
        return known
    return rise if known is None else min(known, rise)


def _left(step: float | None, used: float | None, reset_at: float | None, now: float) -> int | None:
    if step is None or used is None:
        return None
    if reset_at is not None and reset_at <= now:
        return None  # a fresh window: its size is not this one's business
    if used >= 100.0:
        return 0
    # A hair of tolerance: 100 - 97.5 over a step of 2.5 is one request, not 0.9999. A window
    # not full takes at least one more, whatever the step seemed (seen from several processes,
    # a rise can span several requests).
    return max(1, math.floor((100.0 - used) / step + 1e-6))
