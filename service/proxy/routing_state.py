"""The routing state every process shares through Redis: thread pins and the round-robin turn.

Both sit on the request's path, so each is one plain command with a short deadline: a pin is
read with ``GETEX`` (which also slides its lifetime), a turn is one ``INCR``. Writing a pin is
off the path (the request goes out at once; the write follows). When Redis does not answer in
time, routing goes on without it: an unpinned pick, a turn from this process's own counter
(traffic keeps flowing; only stickiness and exact turns degrade).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from typing import NamedTuple

from service.core.connection import REDIS_FAILURES, Connection, text
from service.core.metrics import redis_timed_out
from service.core.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
quiet = ThrottledLog(log)

# A thread idle this long loses its pin (each use slides it): Codex conversations are resumed
# days later, and a pin is a few dozen bytes.
PIN_TTL_SECONDS = 7 * 24 * 3600
# How long a request waits for the shared routing state before routing without it.
LOOKUP_SECONDS = 0.5


# A pin is stored as the account id, or the account id and the detour's, tab-separated.
_DETOUR = "\t"


class Pinned(NamedTuple):
    account_id: str
    # Where the thread's turns go while its pinned account waits for its limit to lift.
    detour: str | None


def thread_key(thread_id: str) -> str:
    # Hashed: a thread id is client-chosen text of any length (a prompt_cache_key), and the key
    # must stay short and say nothing about the conversation.
    return hashlib.sha256(thread_id.encode()).hexdigest()


class RoutingState:
    def __init__(self, conn: Connection, *, ttl_seconds: int = PIN_TTL_SECONDS):
        self.conn = conn
        self.client = conn.client
        self.keys = conn.keys
        self.ttl = ttl_seconds
        self._local_turns = itertools.count()
        self._writes: set[asyncio.Task[None]] = set()
        # Pins written off the path and not yet confirmed, by key: the thread's next turn may
        # come before the write lands, and must find its pin all the same.
        self._unconfirmed: dict[str, str] = {}

    async def pinned(self, thread_id: str) -> Pinned | None:
        """The thread's pin (and its detour), sliding the pin's lifetime; None when unknown
        (or Redis is slow to say)."""
        key = self.keys.pin + thread_key(thread_id)
        unconfirmed = self._unconfirmed.get(key)
        if unconfirmed is None:
            try:
                async with asyncio.timeout(LOOKUP_SECONDS):
                    value = await self.conn.call(lambda: self.client.getex(key, ex=self.ttl))
            except REDIS_FAILURES as exc:
                redis_timed_out(exc)
                quiet.warning(
                    "thread pin lookup failed (%s); routing without it", type(exc).__name__
                )
                return None
            if value is None:
                return None
            unconfirmed = text(value)
        account_id, _, detour = unconfirmed.partition(_DETOUR)
        return Pinned(account_id, detour or None)

    async def next_turn(self) -> int:
        """The next round-robin turn, counted across every process."""
        try:
            async with asyncio.timeout(LOOKUP_SECONDS):
                return int(await self.conn.call(lambda: self.client.incr(self.keys.round_robin)))
        except REDIS_FAILURES as exc:
            redis_timed_out(exc)
            quiet.warning("round-robin counter failed (%s); counting locally", type(exc).__name__)
            return next(self._local_turns)

    def pin(
        self, thread_id: str, account_id: str, *, replace: bool, detour: str | None = None
    ) -> None:
        """Pin the thread to the account (and, while that account waits for its limit to lift,
        to a ``detour``), off the request's path. A new pin does not overwrite one another
        process wrote meanwhile (first turn wins); a moved pin, or a detour, does."""
        key = self.keys.pin + thread_key(thread_id)
        value = account_id if detour is None else f"{account_id}{_DETOUR}{detour}"
        self._unconfirmed[key] = value

        async def write() -> None:
            try:
                await self.conn.call(
                    lambda: self.client.set(key, value, ex=self.ttl, nx=not replace)
                )
            except REDIS_FAILURES as exc:
                quiet.warning("thread pin write failed (%s)", type(exc).__name__)
            finally:
                if self._unconfirmed.get(key) == value:
                    del self._unconfirmed[key]

        task = asyncio.create_task(write(), name="pin thread")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def drain(self, seconds: float) -> None:
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=seconds)
