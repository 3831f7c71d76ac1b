"""What traffic teaches about accounts, applied here at once and shared off the request's path.

Every upstream answer says something: its ``x-codex-*`` headers (usage windows), a 429 or a
5xx (a cooldown), a success (last use, and the end of a cooldown). It counts for this process's
next pick at once (merged into the live copy of the hot state); the write to Redis, which the
other processes hear about through the hot state's channel, happens in a background loop that
writes whatever has gathered since its last round, one write per account. Under load the
rounds batch many answers into one write; when Redis is down the newest observation of each
account waits for it, and nothing waits for Redis on a request's path.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgspec

from service.accounts.domain import Cooldown, HotState, Usage
from service.accounts.hot import HotStore, LiveAccountStates
from service.core.errors import ServiceError
from service.core.throttled_log import ThrottledLog
from service.proxy.units import UnitSteps

log = logging.getLogger(__name__)
quiet = ThrottledLog(log)

# A cooldown without a reset time from the upstream: doubling from BASE up to MAX.
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 300.0
# An account's last use is shared at most this often.
LAST_USED_EVERY_SECONDS = 1.0
# After a failed write round, wait this long before trying again.
RETRY_SECONDS = 1.0


@dataclass
class _Pending:
    usage: tuple[float, Usage] | None = None
    cooldown: tuple[float, Cooldown] | None = None
    used_at: float | None = None


def backoff(failures: int) -> float:
    return float(min(BACKOFF_BASE_SECONDS * 2 ** max(0, failures - 1), BACKOFF_MAX_SECONDS))


def _same(a: Usage, b: Usage) -> bool:
    """Nothing a pick could tell apart: the same percents and reset times to the second."""

    def key(u: Usage) -> tuple[object, ...]:
        return (
            u.primary_used_percent,
            None if u.primary_reset_at is None else round(u.primary_reset_at),
            u.primary_window_seconds,
            u.secondary_used_percent,
            None if u.secondary_reset_at is None else round(u.secondary_reset_at),
            u.secondary_window_seconds,
            u.limit_reached,
        )

    return key(a) == key(b)


def same_window(a: float | None, b: float | None) -> bool:
    """Two answers speak of one window: the same reset time (computed from reset-after-seconds,
    it drifts by a second between answers)."""
    return a is not None and b is not None and abs(a - b) < 2


def _no_going_back(known: Usage, new: Usage) -> Usage:
    """Within one window use only grows: answers to concurrent requests arrive out of order,
    and the one that left first (saying less) must not undo what a later one said."""
    primary, secondary = new.primary_used_percent, new.secondary_used_percent
    if same_window(known.primary_reset_at, new.primary_reset_at):
        primary = _higher(known.primary_used_percent, primary)
    if same_window(known.secondary_reset_at, new.secondary_reset_at):
        secondary = _higher(known.secondary_used_percent, secondary)
    if (primary, secondary) == (new.primary_used_percent, new.secondary_used_percent):
        return new
    return msgspec.structs.replace(
        new, primary_used_percent=primary, secondary_used_percent=secondary
    )


def _higher(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class Learner:
    def __init__(self, states: LiveAccountStates, store: HotStore, steps: UnitSteps):
        self.states = states
        self.store = store
        # Every process's answers teach what a request costs, not only this one's.
        states.usage_watchers.append(steps.observe)
        self._pending: dict[str, _Pending] = {}
        self._used_shared: dict[str, float] = {}
        self._wake = asyncio.Event()

    def _queue(self, account_id: str) -> _Pending:
        self._wake.set()
        return self._pending.setdefault(account_id, _Pending())

    def usage(self, account_id: str, usage: Usage, at: float) -> None:
        known = self.states.get(account_id)
        if known.usage_at:
            usage = _no_going_back(known.usage, usage)
            if _same(known.usage, usage):
                return
        self.states.observe(account_id, HotState(usage=usage, usage_at=at))
        self._queue(account_id).usage = (at, usage)

    def failed(
        self, account_id: str, at: float, resets_at: float | None, *, limited: bool = False
    ) -> Cooldown:
        """The account failed a request (``limited``: with a 429): it cools down until
        ``resets_at`` when the upstream said, else for a backoff that doubles with each failure
        in a row."""
        failures = self.states.get(account_id).cooldown.failures + 1
        until = resets_at if resets_at is not None and resets_at > at else at + backoff(failures)
        cooldown = Cooldown(until=until, failures=failures, limited=limited)
        self._set_cooldown(account_id, cooldown, at)
        return cooldown

    def served(self, account_id: str, at: float) -> None:
        """The account answered: its last use, and the end of a failure streak. The last use
        is shown to people, to the second: it is shared at most once a second per account."""
        if self.states.get(account_id).cooldown.failures:
            self._set_cooldown(account_id, Cooldown(), at)
        if at - self._used_shared.get(account_id, 0.0) >= LAST_USED_EVERY_SECONDS:
            self._used_shared[account_id] = at
            self._queue(account_id).used_at = at

    def _set_cooldown(self, account_id: str, cooldown: Cooldown, at: float) -> None:
        self.states.observe(account_id, HotState(cooldown=cooldown, cooldown_at=at))
        self._queue(account_id).cooldown = (at, cooldown)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not await self.flush():
                await asyncio.sleep(RETRY_SECONDS)

    async def flush(self) -> bool:
        """Write what has gathered; False when some write failed (kept for the next round,
        unless something newer about the same part arrived meanwhile)."""
        batch, self._pending = self._pending, {}
        if not batch:
            return True
        results = await asyncio.gather(
            *(
                self.store.learn(i, usage=p.usage, cooldown=p.cooldown, used_at=p.used_at)
                for i, p in batch.items()
            ),
            return_exceptions=True,
        )
        ok = True
        for (account_id, pending), result in zip(batch.items(), results, strict=True):
            if isinstance(result, ServiceError | OSError):
                ok = False
                newer = self._pending.setdefault(account_id, _Pending())
                newer.usage = newer.usage or pending.usage
                newer.cooldown = newer.cooldown or pending.cooldown
                newer.used_at = newer.used_at or pending.used_at
            elif isinstance(result, BaseException):
                raise result
        if not ok:
            quiet.warning("could not share what %s account(s) learned; retrying", len(batch))
            self._wake.set()
        return ok

    async def stop(self, seconds: float) -> None:
        """Write what is still pending (shutdown), within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                await self.flush()
        except TimeoutError:
            log.warning("shutdown: %s account observation(s) not shared", len(self._pending))
