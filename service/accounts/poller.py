"""Usage polling: one process of the deployment at a time (a Redis lease) asks the upstream's
``wham/usage`` for every active account and stores its two windows in the hot state.

The windows drive routing (remaining capacity), the accounts list and ``/api/codex/usage``; an
exhausted window shows the account as ``rate_limited`` (5-hour) or ``quota_exceeded`` (weekly)
until it resets (``domain.status``). The operator's status (paused, re-auth needed) is never
touched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

import httpx
import msgspec

from service.accounts.domain import ACTIVE, AccountState, Usage
from service.accounts.hot import HotStore
from service.accounts.live import LiveAccounts
from service.accounts.tokens import ReauthRequired, RefreshFailed, TokenManager
from service.core.errors import StoreUnavailable
from service.core.leases import Leases

log = logging.getLogger(__name__)

LEASE = "usage-poller"
CONCURRENCY = 8


class _Window(msgspec.Struct, kw_only=True):
    used_percent: float | None = None
    limit_window_seconds: int | None = None
    reset_after_seconds: float | None = None
    reset_at: float | None = None


class _RateLimit(msgspec.Struct, kw_only=True):
    allowed: bool = True
    limit_reached: bool = False
    primary_window: _Window | None = None
    secondary_window: _Window | None = None


class _WhamUsage(msgspec.Struct, kw_only=True):
    plan_type: str | None = None
    rate_limit: _RateLimit | None = None


_wham = msgspec.json.Decoder(_WhamUsage)


def usage_from_wham(body: bytes, now: float) -> Usage:
    """The windows as stored, with whether the upstream says the limit is reached."""
    reply = _wham.decode(body)
    limit = reply.rate_limit or _RateLimit()
    p, s = limit.primary_window or _Window(), limit.secondary_window or _Window()

    def reset(w: _Window) -> float | None:
        if w.reset_at is not None:
            return w.reset_at
        return None if w.reset_after_seconds is None else now + w.reset_after_seconds

    return Usage(
        primary_used_percent=p.used_percent,
        primary_reset_at=reset(p),
        primary_window_seconds=p.limit_window_seconds,
        secondary_used_percent=s.used_percent,
        secondary_reset_at=reset(s),
        secondary_window_seconds=s.limit_window_seconds,
        limit_reached=limit.limit_reached,
        updated_at=now,
    )


class UsagePoller:
    def __init__(
        self,
        leases: Leases,
        hot: HotStore,
        live: LiveAccounts,
        tokens: TokenManager,
        http: httpx.AsyncClient,
        upstream_base_url: str,
        interval: float,
    ):
        self.leases = leases
        self.hot = hot
        self.live = live
        self.tokens = tokens
        self.http = http
        self.url = f"{upstream_base_url}/wham/usage"
        self.interval = interval
        self.owner = secrets.token_hex(8)

    async def run(self) -> None:
        """Forever: hold (or wait for) the lease, and poll every ``interval`` while holding it."""
        lease_ttl = self.interval * 3
        while True:
            try:
                held = await self.leases.renew(LEASE, self.owner, lease_ttl)
                if held or await self.leases.acquire(LEASE, self.owner, lease_ttl):
                    await self.poll_all()
            except StoreUnavailable:
                log.debug("usage poll skipped: Redis unavailable")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.leases.release(LEASE, self.owner)

    async def poll_all(self) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(account: AccountState) -> None:
            async with gate:
                await self.poll(account)

        # Paused accounts and those waiting for re-import are the operator's: never polled.
        await asyncio.gather(*(one(a) for a in self.live.accounts.values() if a.status == ACTIVE))

    async def poll(self, account: AccountState) -> None:
        try:
            response = await self.tokens.get_as(account, self.url)
        except (ReauthRequired, RefreshFailed, httpx.HTTPError) as exc:
            log.info("usage of account %s not polled: %s", account.id, type(exc).__name__)
            return
        if response.status_code != 200:
            log.info("usage of account %s: upstream answered %s", account.id, response.status_code)
            return
        now = time.time()
        try:
            usage = usage_from_wham(response.content, now)
        except msgspec.DecodeError:
            log.warning("usage of account %s: unreadable reply", account.id)
            return
        await self.hot.learn(account.id, usage=(now, usage))
