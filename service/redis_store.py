"""The only module that speaks Redis: key names, Lua scripts, encoding of records.

Every write that could race with another process is one Lua script, so it is atomic on the
server: settings compare-and-set (+ version bump + history + PUBLISH), restoring a lost record,
failed-attempt accounting, TOTP step replay protection, session touch and revocation.

Connection failures surface as ``StoreUnavailable``; callers decide whether that is a 503
(writes) or a reason to keep serving the last-known-good copy (reads on the hot path). Redis
refusing a command (a script error, a key of the wrong type) is a ``StoreError`` (500): Redis
does not roll a failed script back, so "nothing was written" would not be true.

Writes are idempotent (``Store.write_script``): the client retries a command once after a
connection error, and a script whose reply was lost may already have committed, so each write
carries a write id that the script remembers for a minute and answers again.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
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

from service.errors import StoreError, StoreUnavailable
from service.records import HistoryEntry, SessionRecord, SettingsRecord, WorkerRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
ScriptArg = bytes | str | int | float

HISTORY_KEEP = 1000
WORKER_TTL_SECONDS = 5.0
# How long a write's id is remembered: far longer than the one immediate retry can take.
WRITE_ID_SECONDS = 60

_settings_decoder = msgspec.json.Decoder(SettingsRecord)
_history_decoder = msgspec.json.Decoder(HistoryEntry)
_worker_decoder = msgspec.json.Decoder(WorkerRecord)
_encode = msgspec.json.encode

# KEYS: settings hash, history list, auth hash, pending TOTP key. ARGV: expected version (0 =
# must be absent), new version, record json, history json, channel, history length kept, TOTP
# secret op ('' | 'set' | 'del'), sealed secret. The secret and the record change in one step,
# so a failure can never leave the TOTP requirement on without a secret (or the reverse).
_SETTINGS_CAS = """
local cur = redis.call('HGET', KEYS[1], 'version')
local current = 0
if cur then current = tonumber(cur) end
if current ~= tonumber(ARGV[1]) then return {0, current} end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'record', ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[6]) - 1)
if ARGV[7] == 'set' then
  redis.call('HSET', KEYS[3], 'totp_secret', ARGV[8])
  redis.call('DEL', KEYS[4])
elseif ARGV[7] == 'del' then
  redis.call('HDEL', KEYS[3], 'totp_secret')
  redis.call('DEL', KEYS[4])
end
redis.call('PUBLISH', ARGV[5], ARGV[3])
return {1, tonumber(ARGV[2])}
"""

# The defaults, for a brand-new deployment only: no record and no other state (history,
# credentials, API keys, accounts: KEYS[3..]). Returns 1 written, 0 a record exists, -1 the
# record was lost while the rest of the deployment is still there.
# KEYS: settings hash, then the keys that prove an existing deployment. ARGV: record, channel.
_SETTINGS_INITIALISE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return -1 end
end
redis.call('HSET', KEYS[1], 'version', '1', 'record', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"""

# Put a record back when it is missing or older than the one we know (a flush, a restart
# without persistence, or an older copy restored first by another process). Versions only
# grow, so "older than ours" can only mean "lost".
_SETTINGS_RESTORE = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'record', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""

# Reserve one failed-attempt slot before checking a secret, so concurrent guesses cannot
# overshoot the limit; a success gives the slot back. Returns 0 or the seconds to wait.
_ATTEMPT_BEGIN = """
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used >= tonumber(ARGV[i * 2 - 1]) then
    local ttl = redis.call('TTL', KEYS[i])
    if ttl < 1 then ttl = 1 end
    return ttl
  end
end
for i = 1, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[i * 2]) end
end
return 0
"""

_ATTEMPT_REFUND = """
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 1
"""

# A TOTP time step is accepted once, ever: only a step newer than the last accepted one passes.
_TOTP_USE_STEP = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# Validate a session and slide its idle timeout, never past its absolute expiry.
# ARGV: now (epoch seconds), idle seconds. Returns the record json or false.
_SESSION_TOUCH = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local rec = cjson.decode(raw)
local now = tonumber(ARGV[1])
if now >= rec['expires_at'] then redis.call('DEL', KEYS[1]) return false end
local ttl = math.min(tonumber(ARGV[2]), rec['expires_at'] - now)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return raw
"""

# End every session except ARGV[2] (a key suffix, or ''). KEYS[1] is the index set; session
# keys are ARGV[1] .. member. (Not cluster-safe by design: one Redis holds one deployment.)
_SESSIONS_REVOKE = """
local members = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, m in ipairs(members) do
  if m ~= ARGV[2] then
    redis.call('DEL', ARGV[1] .. m)
    redis.call('SREM', KEYS[1], m)
    n = n + 1
  end
end
return n
"""


# Take a lease that is free, or already ours (a retried call must not find itself in the way).
# KEYS: lease key. ARGV: owner, ttl ms.
_LEASE_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_SET_HASH_ONCE = """
return redis.call('HSETNX', KEYS[1], 'password_hash', ARGV[1])
"""

# A lease is a key holding its owner's token; only the owner may extend or release it.
# KEYS: lease key. ARGV: owner, ttl ms ('0' = release).
_LEASE_OWNED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


def _refused_before_running(exc: ResponseError) -> bool:
    """Redis turned the command away whole (out of memory, a read-only replica, a failed
    persistence, still loading): nothing ran, and trying again later may work."""
    if isinstance(exc, OutOfMemoryError | ReadOnlyError):
        return True
    return str(exc).startswith(("MISCONF", "OOM", "READONLY", "LOADING", "MASTERDOWN"))


class Keep:
    """The value left as it is (``KEEP``), where None already means "remove"."""


KEEP = Keep()


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
        socket_timeout=2.0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=15,
    )


class Store:
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix
        self.settings_key = f"{prefix}settings"
        self.history_key = f"{prefix}settings:history"
        self.settings_channel = f"{prefix}ch:settings"
        self.workers_key = f"{prefix}workers"
        self.auth_key = f"{prefix}auth"
        self.totp_pending_key = f"{prefix}auth:totp_pending"
        self.totp_step_key = f"{prefix}auth:totp_last_step"
        self.bootstrap_key = f"{prefix}auth:bootstrap"
        self.fingerprint_key = f"{prefix}meta:key_fingerprint"
        self.sessions_key = f"{prefix}sessions"
        self.session_prefix = f"{prefix}session:"
        self.failed_prefix = f"{prefix}failed:"
        # Owned by their features' stores, named here so a settings loss can be told apart
        # from a brand-new deployment.
        self.apikeys_key = f"{prefix}apikeys"
        self.accounts_index_key = f"{prefix}accounts"
        self._cas = self.write_script(_SETTINGS_CAS)
        self._initialise = client.register_script(_SETTINGS_INITIALISE)
        self._restore = client.register_script(_SETTINGS_RESTORE)
        self._attempt_begin = client.register_script(_ATTEMPT_BEGIN)
        self._attempt_refund = client.register_script(_ATTEMPT_REFUND)
        self._totp_step = self.write_script(_TOTP_USE_STEP)
        self._password_if_absent = self.write_script(_SET_HASH_ONCE)
        self._lease_acquire = client.register_script(_LEASE_ACQUIRE)
        self._session_touch = client.register_script(_SESSION_TOUCH)
        self._sessions_revoke = client.register_script(_SESSIONS_REVOKE)
        self._lease_owned = client.register_script(_LEASE_OWNED)

    async def close(self) -> None:
        await self.client.aclose()

    @staticmethod
    async def call(op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation: connection trouble, or Redis turning the command away
        before running it, is ``StoreUnavailable`` (503); Redis failing it (a script error, a
        wrong type) is ``StoreError`` (500, the cause logged, never shown)."""
        try:
            return await op()
        except (ResponseError, DataError) as exc:
            if isinstance(exc, ResponseError) and _refused_before_running(exc):
                raise StoreUnavailable() from exc
            log.error("redis refused a command: %s", exc)
            raise StoreError() from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable() from exc

    def write_script(self, body: str) -> WriteScript:
        """``body`` made idempotent: called with one more key, a fresh write id, it runs once
        however often the client sends it, and a repeat answers what the first run answered."""
        return WriteScript(self, self.client.register_script(_IDEMPOTENT.replace("__BODY__", body)))

    def pubsub(self) -> PubSub:
        return self.client.pubsub(ignore_subscribe_messages=False)

    async def ping(self) -> None:
        await self.call(self.client.ping)

    # --- settings ---------------------------------------------------------------------------

    async def load_settings(self) -> SettingsRecord | None:
        raw = await self.call(lambda: self.client.hget(self.settings_key, "record"))
        return None if raw is None else _settings_decoder.decode(raw)

    async def settings_version(self) -> int | None:
        raw = await self.call(lambda: self.client.hget(self.settings_key, "version"))
        return None if raw is None else int(raw)

    async def compare_and_set_settings(
        self,
        expected_version: int,
        record: SettingsRecord,
        changed_fields: list[str],
        *,
        totp_secret: bytes | Keep | None = KEEP,
    ) -> tuple[bool, int]:
        """Write ``record`` if the stored version is still ``expected_version``; with
        ``totp_secret``, set (bytes) or remove (None) the sealed TOTP secret in the same step.

        Returns (written, the version now stored).
        """
        entry = HistoryEntry(
            version=record.version, changed_at=record.changed_at, changed_fields=changed_fields
        )
        args: list[ScriptArg] = [
            expected_version,
            record.version,
            _encode(record),
            _encode(entry),
            self.settings_channel,
            HISTORY_KEEP,
            *(
                ("", "")
                if isinstance(totp_secret, Keep)
                else ("del", "")
                if totp_secret is None
                else ("set", totp_secret)
            ),
        ]
        keys = [self.settings_key, self.history_key, self.auth_key, self.totp_pending_key]
        written, version = await self._cas(keys, args)
        return bool(written), int(version)

    async def initialise_settings(self, record: SettingsRecord) -> int:
        """Write the defaults if this is a brand-new deployment: 1 written, 0 a record exists,
        -1 the record is gone while the deployment's other state is not (a loss)."""
        keys = [
            self.settings_key,
            self.history_key,
            self.auth_key,
            self.apikeys_key,
            self.accounts_index_key,
        ]
        args: list[ScriptArg] = [_encode(record), self.settings_channel]
        return int(await self.call(lambda: self._initialise(keys=keys, args=args)))

    async def restore_settings(self, record: SettingsRecord) -> bool:
        """Put ``record`` back if the stored one is missing or older. True if it wrote."""
        args: list[ScriptArg] = [record.version, _encode(record), self.settings_channel]
        return bool(await self.call(lambda: self._restore(keys=[self.settings_key], args=args)))

    async def settings_history(self, limit: int = HISTORY_KEEP) -> list[HistoryEntry]:
        raws = await self.call(lambda: self.client.lrange(self.history_key, 0, limit - 1))
        return [_history_decoder.decode(r) for r in raws]

    @staticmethod
    def decode_settings(raw: bytes) -> SettingsRecord:
        return _settings_decoder.decode(raw)

    # --- live processes ---------------------------------------------------------------------

    async def register_worker(self, worker: WorkerRecord) -> None:
        key = f"{self.workers_key}:{worker.worker_id}"

        async def op() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, _encode(worker), px=int(WORKER_TTL_SECONDS * 1000))
                pipe.zadd(self.workers_key, {worker.worker_id: worker.last_seen})
                await pipe.execute()

        await self.call(op)

    async def deregister_worker(self, worker_id: str) -> None:
        async def op() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(f"{self.workers_key}:{worker_id}")
                pipe.zrem(self.workers_key, worker_id)
                await pipe.execute()

        await self.call(op)

    async def live_workers(self) -> list[WorkerRecord]:
        cutoff = time.time() - WORKER_TTL_SECONDS

        async def op() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(self.workers_key, "-inf", cutoff)
                pipe.zrange(self.workers_key, 0, -1)
                _, ids = await pipe.execute()
            if not ids:
                return []
            keys = [f"{self.workers_key}:{i.decode()}" for i in ids]
            return list(await self.client.mget(keys))

        raws = await self.call(op)
        return sorted(
            (_worker_decoder.decode(r) for r in raws if r is not None),
            key=lambda w: w.worker_id,
        )

    # --- dashboard credentials ----------------------------------------------------------------

    async def auth_fields(self) -> dict[str, bytes]:
        raw = await self.call(lambda: self.client.hgetall(self.auth_key))
        return {text(k): _bytes(v) for k, v in raw.items()}

    async def set_auth_field(self, name: str, value: bytes) -> None:
        await self.call(lambda: self.client.hset(self.auth_key, name, value))

    async def has_totp_secret(self) -> bool:
        return bool(await self.call(lambda: self.client.hexists(self.auth_key, "totp_secret")))

    async def set_password_if_absent(self, password_hash: str) -> bool:
        # A script, so the client's retry after a lost reply answers "set", not "already set".
        return bool(await self._password_if_absent([self.auth_key], [password_hash]))

    async def get(self, key: str) -> bytes | None:
        value = await self.call(lambda: self.client.get(key))
        return None if value is None else _bytes(value)

    async def set(self, key: str, value: bytes, *, nx: bool = False, ex: int | None = None) -> bool:
        return bool(await self.call(lambda: self.client.set(key, value, nx=nx, ex=ex)))

    async def delete(self, *keys: str) -> None:
        await self.call(lambda: self.client.delete(*keys))

    async def use_totp_step(self, step: int) -> bool:
        return bool(await self._totp_step([self.totp_step_key], [step]))

    # --- failed-attempt limits ------------------------------------------------------------------

    def _limit_keys(self, client_ip: str) -> list[str]:
        return [f"{self.failed_prefix}ip:{client_ip}", f"{self.failed_prefix}all"]

    async def begin_attempt(self, client_ip: str, limits: list[tuple[int, int]]) -> int:
        """Reserve a failed-attempt slot; 0, or the seconds to wait when a limit is reached."""
        args = [v for limit, window in limits for v in (limit, window)]
        keys = self._limit_keys(client_ip)
        return int(await self.call(lambda: self._attempt_begin(keys=keys, args=args)))

    async def refund_attempt(self, client_ip: str) -> None:
        keys = self._limit_keys(client_ip)
        await self.call(lambda: self._attempt_refund(keys=keys, args=[]))

    async def clear_attempts(self) -> int:
        async def op() -> int:
            keys = [k async for k in self.client.scan_iter(match=f"{self.failed_prefix}*")]
            return int(await self.client.delete(*keys)) if keys else 0

        return await self.call(op)

    # --- leases (one process at a time does a thing) ------------------------------------------

    def lease_key(self, name: str) -> str:
        return f"{self.prefix}lease:{name}"

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        keys = [self.lease_key(name)]
        args: list[ScriptArg] = [owner, max(1, int(ttl * 1000))]
        return bool(await self.call(lambda: self._lease_acquire(keys=keys, args=args)))

    async def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Extend a lease we hold; False if it is not (or no longer) ours."""
        keys, args = [self.lease_key(name)], [owner, str(max(1, int(ttl * 1000)))]
        return bool(await self.call(lambda: self._lease_owned(keys=keys, args=args)))

    async def release_lease(self, name: str, owner: str) -> None:
        keys, args = [self.lease_key(name)], [owner, "0"]
        await self.call(lambda: self._lease_owned(keys=keys, args=args))

    # --- sessions -------------------------------------------------------------------------------

    async def create_session(self, token_hash: str, record: SessionRecord, ttl: float) -> None:
        """Store a session; the index drops sessions that expired on their own meanwhile, so it
        never grows past the sessions that are alive."""

        async def op() -> None:
            members = list(await self.client.smembers(self.sessions_key))
            if members:
                alive = await self.client.mget([self.session_prefix + text(m) for m in members])
                dead = [m for m, v in zip(members, alive, strict=True) if v is None]
                if dead:
                    await self.client.srem(self.sessions_key, *dead)
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.session_prefix + token_hash, _encode(record), px=int(ttl * 1000))
                pipe.sadd(self.sessions_key, token_hash)
                await pipe.execute()

        await self.call(op)

    async def touch_session(self, token_hash: str, idle_seconds: int) -> SessionRecord | None:
        key = self.session_prefix + token_hash
        raw = await self.call(
            lambda: self._session_touch(keys=[key], args=[time.time(), idle_seconds])
        )
        return None if raw is None else msgspec.json.decode(raw, type=SessionRecord)

    async def delete_session(self, token_hash: str) -> None:
        async def op() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.session_prefix + token_hash)
                pipe.srem(self.sessions_key, token_hash)
                await pipe.execute()

        await self.call(op)

    async def revoke_sessions(self, keep_token_hash: str = "") -> int:
        args = [self.session_prefix, keep_token_hash]
        n = await self.call(lambda: self._sessions_revoke(keys=[self.sessions_key], args=args))
        return int(n)


# Wraps a write script (see ``Store.write_script``). The body runs as a function, so its own
# ``return``s come back here; its reply is kept under the write id (the last key) for a minute.
_IDEMPOTENT = """
local function body()
__BODY__
end
local id = KEYS[#KEYS]
local done = redis.call('GET', id)
if done then return cmsgpack.unpack(done) end
local reply = body()
redis.call('SET', id, cmsgpack.pack(reply), 'EX', __TTL__)
return reply
""".replace("__TTL__", str(WRITE_ID_SECONDS))


class WriteScript:
    def __init__(self, store: Store, script: AsyncScript):
        self._store = store
        self._script = script

    async def __call__(self, keys: list[str], args: list[ScriptArg]) -> Any:
        # One id per logical write, shared by the client's own retry of this very call.
        write_key = f"{self._store.prefix}write:{secrets.token_hex(12)}"
        return await self._store.call(lambda: self._script(keys=[*keys, write_key], args=args))


@asynccontextmanager
async def open_store(url: str, prefix: str) -> AsyncIterator[Store]:
    store = Store(connect(url), prefix)
    try:
        yield store
    finally:
        await store.close()


def text(value: bytes | str) -> str:
    # The client is made without decode_responses, so replies are bytes; the stubs allow str.
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def new_epoch() -> str:
    """A fresh id for a collection's history; see ``live_collection``."""
    return secrets.token_hex(8)


def hostname() -> str:
    return socket.gethostname()
