"""Leases: one process of the deployment at a time does a thing (polls usage, refreshes one
account's token). A lease is a key holding its owner's random token with an expiry; only the
owner may extend or release it, so a holder whose lease lapsed frees nobody else's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from service.core.connection import Connection, ScriptArg
from service.core.errors import StoreUnavailable
from service.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Take a lease that is free, or already ours (a retried call must not find itself in the way).
# KEYS: lease key. ARGV: owner, ttl ms.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease key. ARGV: owner, ttl ms ('0' = release).
_OWNED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class Leases:
    def __init__(self, conn: Connection):
        self.conn = conn
        self._acquire = conn.script(_ACQUIRE)
        self._owned = conn.script(_OWNED)

    def key(self, name: str) -> str:
        return f"{self.conn.keys.lease}{name}"

    async def acquire(self, name: str, owner: str, ttl: float) -> bool:
        keys = [self.key(name)]
        args: list[ScriptArg] = [owner, max(1, int(ttl * 1000))]
        return bool(await self.conn.call(lambda: self._acquire(keys=keys, args=args)))

    async def renew(self, name: str, owner: str, ttl: float) -> bool:
        """Extend a lease we hold; False if it is not (or no longer) ours."""
        keys, args = [self.key(name)], [owner, str(max(1, int(ttl * 1000)))]
        return bool(await self.conn.call(lambda: self._owned(keys=keys, args=args)))

    async def release(self, name: str, owner: str) -> None:
        keys, args = [self.key(name)], [owner, "0"]
        await self.conn.call(lambda: self._owned(keys=keys, args=args))


class HeldLease:
    """A lease renewed in the background while held, released only if still ours."""

    def __init__(self, leases: Leases, name: str, seconds: float):
        self.leases = leases
        self.name = name
        self.owner = secrets.token_hex(8)
        self.seconds = seconds
        # Until when the lease is surely ours (monotonic): the last grant we know of, counted
        # from before we asked for it. 0 while not held, or once lost.
        self.held_until = 0.0
        self._renewal: asyncio.Task[None] | None = None

    async def acquire(self) -> bool:
        asked = time.monotonic()
        if not await self.leases.acquire(self.name, self.owner, self.seconds):
            return False
        self.held_until = asked + self.seconds
        self._renewal = asyncio.create_task(self._renew(), name=f"renew lease:{self.name}")
        return True

    async def _renew(self) -> None:
        # Each turn checks that it is still the lease's renewal: a release whose cancel was lost
        # (service/core/tasks.py) must not be undone by a renewal going on.
        while True:
            await asyncio.sleep(self.seconds / 3)
            if self._renewal is not asyncio.current_task():
                return
            asked = time.monotonic()
            try:
                ours = await self.leases.renew(self.name, self.owner, self.seconds)
            except StoreUnavailable:
                # Not lost yet: the last grant still runs, and the next renewal may get through.
                log.warning("could not renew the lease %s: the store is unavailable", self.name)
                continue
            if self._renewal is not asyncio.current_task():
                return
            if not ours:
                log.warning("lost the lease %s while holding it", self.name)
                self.held_until = 0.0
                return
            self.held_until = asked + self.seconds

    async def release(self) -> None:
        # The renewal is cancelled again until it ends (service/core/tasks.py: a cancel can be
        # lost inside redis-py; the renewal then held the lease, and our caller, for ever).
        # Bounded by the lease's length; a renewal left running ends at its next turn, seeing
        # itself no longer the lease's, and the lease simply expires.
        renewal, self._renewal = self._renewal, None
        if renewal is not None and await cancel_and_wait([renewal], self.seconds):
            log.warning("the renewal of the lease %s did not stop at once", self.name)
        self.held_until = 0.0
        # If the store is down the lease simply expires; the holder's outcome stands.
        with contextlib.suppress(StoreUnavailable):
            await self.leases.release(self.name, self.owner)
