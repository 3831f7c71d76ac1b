"""The one Redis connection of a process, shared by every feature's store.

Every write that could race with another process is one Lua script, so it is atomic on the
server. Connection failures surface as ``StoreUnavailable``; callers decide whether that is a
503 (writes) or a reason to keep serving the last-known-good copy (reads on the hot path). Redis
refusing a command (a script error, a key of the wrong type) is a ``StoreError`` (500): Redis
does not roll a failed script back, so "nothing was written" would not be true.

Writes are idempotent (``Connection.write_script``): the client retries a command once after a
connection error, and a script whose reply was lost may already have committed, so each write
carries a write id that the script remembers for a minute and answers again. Each write also
carries a deadline: a script held up on the way (a frozen link that heals later) must not commit
after its caller was told 503, so one that starts past the deadline (by Redis's clock, just
before the client gives up waiting) does nothing and answers ``LATE``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    DataError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.core.errors import StoreError, StoreUnavailable
from service.core.keyspace import Keyspace
from service.core.metrics import redis_error

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a call through ``Connection`` may raise when Redis is slow, away or refuses: the failures a
# best-effort use on the request's path (a pin, a turn, a reservation) degrades on. TimeoutError
# is the caller's own deadline running out.
REDIS_FAILURES = (StoreUnavailable, StoreError, RedisError, OSError, TimeoutError)
UNKNOWN_OUTCOME = "Storage did not answer in time; the change may not have been applied"
ScriptArg = bytes | str | int | float

# How long a write's id is remembered: far longer than the one immediate retry can take.
WRITE_ID_SECONDS = 60
# How long the client waits for a reply; a write script must start within a little less, so its
# reply can still arrive in time (hosts' clocks are assumed to agree within that margin).
SOCKET_TIMEOUT_SECONDS = 2.0
WRITE_DEADLINE_SECONDS = SOCKET_TIMEOUT_SECONDS - 0.25


def _refused_before_running(exc: ResponseError) -> bool:
    """Redis turned the command away whole (out of memory, a read-only replica, a failed
    persistence, still loading): nothing ran, and trying again later may work."""
    if isinstance(exc, OutOfMemoryError | ReadOnlyError):
        return True
    return str(exc).startswith(("MISCONF", "OOM", "READONLY", "LOADING", "MASTERDOWN", "LATE"))


def _raise_lost_cancel(task: asyncio.Task[Any] | None, cancels_before: int) -> None:
    """A cancel was asked for while the operation ran, and did not come out of it."""
    if task is not None and task.cancelling() > cancels_before:
        raise asyncio.CancelledError()


def connect(url: str) -> aioredis.Redis:
    """A client that fails fast: a dead Redis must turn into a quick 503, not a hang.

    It retries a command once, at once, on a fresh connection after a connection error: after
    Redis restarts every pooled connection is dead without knowing it, and that retry turns each
    into a reconnect instead of a failed request. Not after a timeout, when the command may
    have run. (It must be the asyncio ``Retry``: the sync one wraps the coroutine's creation,
    not its execution, and never retries.)
    """
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=15,
    )


class Connection:
    """The client and the deployment's keyspace; what every feature store is made from."""

    def __init__(self, client: aioredis.Redis, prefix: str):
        self.client = client
        self.keys = Keyspace(prefix)

    async def close(self) -> None:
        await self.client.aclose()

    @staticmethod
    async def call(op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation: connection trouble, or Redis turning the command away
        before running it, is ``StoreUnavailable`` (503); Redis failing it (a script error, a
        wrong type) is ``StoreError`` (500, the cause logged, never shown).

        A cancel of the calling task during the operation ends in CancelledError, even where
        redis-py lost it: on 3.11 its socket write (``asyncio.wait_for``) can return the result
        instead, and a cancel landing mid-command can come out as a ConnectionError that its
        retry then hides. Measured with redis-py 8.2: most cancels of a task looping on PING
        were lost that way, and a loop that carries on after StoreUnavailable never ended.
        """
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            result = await op()
        except (ResponseError, DataError) as exc:
            _raise_lost_cancel(task, cancels)
            if isinstance(exc, ResponseError) and _refused_before_running(exc):
                redis_error("unavailable")
                raise StoreUnavailable() from exc
            redis_error("error")
            log.error("redis refused a command: %s", exc)
            raise StoreError() from exc
        except (RedisError, OSError) as exc:
            _raise_lost_cancel(task, cancels)
            redis_error("unavailable")
            raise StoreUnavailable() from exc
        _raise_lost_cancel(task, cancels)
        return result

    def script(self, body: str) -> AsyncScript:
        """A script that only reads, or whose repeat is harmless."""
        return self.client.register_script(body)

    def write_script(self, body: str) -> WriteScript:
        """``body`` made idempotent: called with one more key, a fresh write id, it runs once
        however often the client sends it, and a repeat answers what the first run answered."""
        return WriteScript(self, self.client.register_script(_IDEMPOTENT.replace("__BODY__", body)))

    def pubsub(self) -> PubSub:
        return self.client.pubsub(ignore_subscribe_messages=False)

    async def hashes(self, keys: list[str]) -> list[dict[str, str]]:
        """Several hashes in one round trip (a pipeline, not a transaction), in the order of
        ``keys``; a missing one is empty."""

        async def op() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                result: list[Any] = await pipe.execute()
                return result

        rows = await self.call(op)
        return [{text(k): text(v) for k, v in row.items()} for row in rows]

    async def ping(self) -> None:
        await self.call(self.client.ping)


# Wraps a write script (see ``Connection.write_script``). The body runs as a function, so its own
# ``return``s come back here; its reply is kept under the write id (the last key) for a minute.
# The last argument, the deadline in epoch milliseconds, is taken off before the body runs.
_IDEMPOTENT = """
local function body()
__BODY__
end
local deadline = tonumber(table.remove(ARGV))
local id = KEYS[#KEYS]
local done = redis.call('GET', id)
if done then return cmsgpack.unpack(done) end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > deadline then
  return redis.error_reply('LATE the write arrived after its deadline; nothing was written')
end
local reply = body()
redis.call('SET', id, cmsgpack.pack(reply), 'EX', __TTL__)
return reply
""".replace("__TTL__", str(WRITE_ID_SECONDS))


class WriteScript:
    def __init__(self, conn: Connection, script: AsyncScript):
        self._conn = conn
        self._script = script

    async def __call__(
        self, keys: list[str], args: list[ScriptArg], write_id: str | None = None
    ) -> Any:
        """Run the write; a caller that sends the same write again later (after an outage)
        passes the id it used the first time (``new_write_id``)."""
        # One id per logical write, shared by the client's own retry of this very call.
        write_key = f"{self._conn.keys.write_id}{write_id or new_write_id()}"
        deadline = int((time.time() + WRITE_DEADLINE_SECONDS) * 1000)
        try:
            return await self._conn.call(
                lambda: self._script(keys=[*keys, write_key], args=[*args, deadline])
            )
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, RedisTimeoutError):
                # The script went out and no reply came: it may have run just before its
                # deadline, so "nothing was written" cannot be promised.
                raise StoreUnavailable(UNKNOWN_OUTCOME) from exc.__cause__
            raise


@asynccontextmanager
async def open_connection(url: str, prefix: str) -> AsyncIterator[Connection]:
    conn = Connection(connect(url), prefix)
    try:
        yield conn
    finally:
        await conn.close()


def text(value: bytes | str) -> str:
    # The client is made without decode_responses, so replies are bytes; the stubs allow str.
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def new_write_id() -> str:
    return secrets.token_hex(12)


def new_epoch() -> str:
    """A fresh id for a collection's history; see ``core.versioned``."""
    return secrets.token_hex(8)
