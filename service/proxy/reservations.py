"""An account's last units, shared by every process.

Each process already counts its own requests on their way against what an account has left
(``Relay``), but near the end of a window the requests of other processes race for the same
units: the upstream answers 429 to the losers. So a request to an account with only a few
units left (``RESERVE_BELOW``) first takes one of them in Redis: one script that counts the
requests sent since the usage the sender knows was reported, and adds this one only while they
are fewer than the units left. It is given back when the upstream's answer (with the new usage)
arrives. Only those last units cost the extra command; when Redis does not answer in time the
request goes on unreserved (routing degrades, traffic does not stop).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from service.core.connection import REDIS_FAILURES, Connection, ScriptArg
from service.core.metrics import redis_timed_out
from service.core.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
quiet = ThrottledLog(log)

# Accounts with at most this many units left take them through Redis.
RESERVE_BELOW = 10
# A reservation whose release was lost (a process killed mid-request) lapses after this long.
RESERVATION_SECONDS = 60.0
DEADLINE_SECONDS = 0.5
# Well over the time an answer's usage takes to reach every process.
RELEASE_AFTER_SECONDS = 1.0

# KEYS: the account's set. ARGV: member, now, known usage's time, units left, lapse seconds.
# Returns 1 (taken) or 0 (the units left are all spoken for).
_TAKE = """
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[5]))
local since = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[3], '+inf')
if since >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[5]) * 1000))
return 1
"""


class Reservations:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.prefix = conn.keys.reserve
        self._take = conn.script(_TAKE)
        self._releases: set[asyncio.Task[None]] = set()

    async def take(self, account_id: str, units_left: int, known_at: float) -> str | None:
        """A unit of the account's for one request: its id to give back, "" when Redis could
        not say (go on unreserved), None when the units left are all spoken for."""
        member = secrets.token_hex(8)
        keys = [self.prefix + account_id]
        args: list[ScriptArg] = [
            member,
            repr(time.time()),
            repr(known_at),
            units_left,
            RESERVATION_SECONDS,
        ]
        try:
            async with asyncio.timeout(DEADLINE_SECONDS):
                taken = await self.conn.call(lambda: self._take(keys=keys, args=args))
        except REDIS_FAILURES as exc:
            redis_timed_out(exc)
            quiet.warning("unit reservation failed (%s); going on unreserved", type(exc).__name__)
            return ""
        return member if int(taken) else None

    def give_back(self, account_id: str, member: str) -> None:
        """Off the request's path, once the answer's usage (which counts the request) has had
        time to reach every process. Until then the unit stays taken for those that do not know
        that usage yet; those that do no longer count it (it was sent before their usage)."""
        if not member:
            return
        key = self.prefix + account_id

        async def release() -> None:
            await asyncio.sleep(RELEASE_AFTER_SECONDS)
            try:
                await self.conn.call(lambda: self.conn.client.zrem(key, member))
            except REDIS_FAILURES as exc:
                log.debug("unit release failed (%s); it lapses", type(exc).__name__)

        # Not awaited at shutdown: a reservation left behind lapses, and no usage it stood for
        # is lost.

        task = asyncio.create_task(release(), name="release unit")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
