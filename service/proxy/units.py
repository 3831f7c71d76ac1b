"""How many more requests an account's windows can take, as far as its answers tell.

The upstream reports a window's use as a percent, not in requests; but each request moves it by
a step, so every percent it reports is a whole number of steps (spent / capacity · 100). The
step is then the largest one that every percent seen is a multiple of (Euclid's algorithm,
rounding noise counted as none), learned from the first two percents that differ: 80 and 87.5
teach 2.5. (The rise between two answers would say less: answers seen by several processes, or
written in batches, span several requests, and 7.5 there would cut the requests left to a
third.) From the step, the percent left gives the requests left, which keeps requests already on
their way from overshooting an account's last units: the proxy sends no more at once than the
account has left. Until two percents have differed nothing is assumed.

Learned by each process from the answers it hears (``Learner``); a step is a property of the
account's plan, so it is kept across windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.accounts.domain import Usage

# A percent or a remainder smaller than this is rounding noise, not a request's cost.
_MIN_STEP = 0.01


@dataclass(frozen=True)
class _Step:
    """A window's step so far: the common divisor of its percents, and whether two have
    differed (one percent alone is no step: 80 could be 32 requests of 2.5 or one of 80)."""

    size: float
    known: bool = False

    def seen(self, percent: float) -> _Step:
        size = common_step(self.size, percent)
        return _Step(size, self.known or abs(percent - self.size) >= _MIN_STEP)


class UnitSteps:
    def __init__(self) -> None:
        # account id -> (short window's step, weekly window's step)
        self._steps: dict[str, tuple[_Step | None, _Step | None]] = {}
        # Bumped when a step changes, so a pool view made from them is made again.
        self.generation = 0

    def observe(self, account_id: str, before: Usage | None, after: Usage) -> None:
        old = self._steps.get(account_id, (None, None))
        short = [u.primary_used_percent for u in (before, after) if u is not None]
        weekly = [u.secondary_used_percent for u in (before, after) if u is not None]
        new = (_seen(old[0], short), _seen(old[1], weekly))
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


def common_step(a: float, b: float) -> float:
    """The largest step both percents are whole multiples of, give or take rounding noise.

    If the upstream rounded its percents coarsely (or a request's cost varies), the noise can
    leave a step smaller than a request's cost: the requests left are then overestimated, which
    spares nothing in flight but never turns a request away."""
    a, b = max(a, b), min(a, b)
    while True:
        rest = math.fmod(a, b)
        if rest < _MIN_STEP or b - rest < _MIN_STEP:
            return b
        # The step at least halves every other round: this ends within ~30 rounds.
        a, b = b, rest


def _seen(step: _Step | None, percents: list[float | None]) -> _Step | None:
    for percent in percents:
        if percent is None or percent < _MIN_STEP:
            continue
        step = _Step(percent) if step is None else step.seen(percent)
    return step


def _left(step: _Step | None, used: float | None, reset_at: float | None, now: float) -> int | None:
    if step is None or not step.known or used is None:
        return None
    if reset_at is not None and reset_at <= now:
        return None  # a fresh window: its size is not this one's business
    if used >= 100.0:
        return 0
    # A hair of tolerance: 100 - 97.5 over a step of 2.5 is one request, not 0.9999. A window
    # not full takes at least one more.
    return max(1, math.floor((100.0 - used) / step.size + 1e-6))
