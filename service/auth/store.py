"""Dashboard authentication in Redis: credentials (password hash, sealed TOTP secret, sealed
bootstrap token), failed-attempt counters, TOTP step replay protection and sessions.

Every write that could race is one Lua script: failed-attempt accounting, TOTP step replay
protection, session touch and revocation, setting the first password.
"""

from __future__ import annotations

import time

import msgspec

from service.core.connection import Connection, as_bytes, text


class SessionRecord(msgspec.Struct, kw_only=True, frozen=True):
    created_at: float
    expires_at: float
    totp_pending: bool


_encode = msgspec.json.encode

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


_SET_HASH_ONCE = """
return redis.call('HSETNX', KEYS[1], 'password_hash', ARGV[1])
"""


class AuthStore:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.keys = conn.keys
        self._attempt_begin = conn.script(_ATTEMPT_BEGIN)
        self._attempt_refund = conn.script(_ATTEMPT_REFUND)
        self._totp_step = conn.write_script(_TOTP_USE_STEP)
        self._password_if_absent = conn.write_script(_SET_HASH_ONCE)
        self._session_touch = conn.script(_SESSION_TOUCH)
        self._sessions_revoke = conn.script(_SESSIONS_REVOKE)

    # --- credentials ----------------------------------------------------------------------------

    async def auth_fields(self) -> dict[str, bytes]:
        raw = await self.conn.call(lambda: self.conn.client.hgetall(self.keys.auth))
        return {text(k): as_bytes(v) for k, v in raw.items()}

    async def set_auth_field(self, name: str, value: bytes) -> None:
        await self.conn.call(lambda: self.conn.client.hset(self.keys.auth, name, value))

    async def set_password_if_absent(self, password_hash: str) -> bool:
        # A script, so the client's retry after a lost reply answers "set", not "already set".
        return bool(await self._password_if_absent([self.keys.auth], [password_hash]))

    async def get(self, key: str) -> bytes | None:
        value = await self.conn.call(lambda: self.conn.client.get(key))
        return None if value is None else as_bytes(value)

    async def set(self, key: str, value: bytes, *, nx: bool = False, ex: int | None = None) -> bool:
        return bool(await self.conn.call(lambda: self.conn.client.set(key, value, nx=nx, ex=ex)))

    async def delete(self, *keys: str) -> None:
        await self.conn.call(lambda: self.conn.client.delete(*keys))

    async def use_totp_step(self, step: int) -> bool:
        return bool(await self._totp_step([self.keys.totp_last_step], [step]))

    # --- failed-attempt limits ------------------------------------------------------------------

    def _limit_keys(self, client_ip: str) -> list[str]:
        return [f"{self.keys.failed}ip:{client_ip}", f"{self.keys.failed}all"]

    async def begin_attempt(self, client_ip: str, limits: list[tuple[int, int]]) -> int:
        """Reserve a failed-attempt slot; 0, or the seconds to wait when a limit is reached."""
        args = [v for limit, window in limits for v in (limit, window)]
        keys = self._limit_keys(client_ip)
        return int(await self.conn.call(lambda: self._attempt_begin(keys=keys, args=args)))

    async def refund_attempt(self, client_ip: str) -> None:
        keys = self._limit_keys(client_ip)
        await self.conn.call(lambda: self._attempt_refund(keys=keys, args=[]))

    async def clear_attempts(self) -> int:
        async def op() -> int:
            keys = [k async for k in self.conn.client.scan_iter(match=f"{self.keys.failed}*")]
            return int(await self.conn.client.delete(*keys)) if keys else 0

        return await self.conn.call(op)

    # --- sessions -------------------------------------------------------------------------------

    async def create_session(self, token_hash: str, record: SessionRecord, ttl: float) -> None:
        """Store a session; the index drops sessions that expired on their own meanwhile, so it
        never grows past the sessions that are alive."""

        async def op() -> None:
            members = list(await self.conn.client.smembers(self.keys.sessions))
            if members:
                alive = await self.conn.client.mget([self.keys.session + text(m) for m in members])
                dead = [m for m, v in zip(members, alive, strict=True) if v is None]
                if dead:
                    await self.conn.client.srem(self.keys.sessions, *dead)
            async with self.conn.client.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.session + token_hash, _encode(record), px=int(ttl * 1000))
                pipe.sadd(self.keys.sessions, token_hash)
                await pipe.execute()

        await self.conn.call(op)

    async def touch_session(self, token_hash: str, idle_seconds: int) -> SessionRecord | None:
        key = self.keys.session + token_hash
        raw = await self.conn.call(
            lambda: self._session_touch(keys=[key], args=[time.time(), idle_seconds])
        )
        return None if raw is None else msgspec.json.decode(raw, type=SessionRecord)

    async def delete_session(self, token_hash: str) -> None:
        async def op() -> None:
            async with self.conn.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.session + token_hash)
                pipe.srem(self.keys.sessions, token_hash)
                await pipe.execute()

        await self.conn.call(op)

    async def revoke_sessions(self, keep_token_hash: str = "") -> int:
        args = [self.keys.session, keep_token_hash]
        n = await self.conn.call(
            lambda: self._sessions_revoke(keys=[self.keys.sessions], args=args)
        )
        return int(n)
