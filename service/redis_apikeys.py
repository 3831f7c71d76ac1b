"""API keys in Redis: one hash of records, a version counter, and a channel.

Every change is one Lua script that writes, bumps the version and publishes the changed record
(or its deletion) with that version, so a live copy can apply changes one by one and knows it
missed one when a version is skipped. Only the SHA-256 of a key is ever stored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from service.redis_store import Store

# KEYS: records hash, version counter. ARGV: op (create|patch|delete), id, payload json, channel.
# Returns {version, record json or ''}; false when the id does not exist (patch, delete).
_WRITE = """
local op, id = ARGV[1], ARGV[2]
local record = ''
if op == 'create' then
  record = ARGV[3]
elseif op == 'patch' then
  local raw = redis.call('HGET', KEYS[1], id)
  if not raw then return false end
  local rec, patch = cjson.decode(raw), cjson.decode(ARGV[3])
  for k, v in pairs(patch) do rec[k] = v end
  record = cjson.encode(rec)
else
  if redis.call('HDEL', KEYS[1], id) == 0 then return false end
end
if record ~= '' then redis.call('HSET', KEYS[1], id, record) end
local version = redis.call('INCR', KEYS[2])
local body = record
if body == '' then body = 'null' end
redis.call('PUBLISH', ARGV[4],
  '{"version":' .. version .. ',"id":' .. cjson.encode(id) .. ',"record":' .. body .. '}')
return {version, record}
"""


class ApiKeyRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    name: str
    key_hash: str
    key_prefix: str
    created_at: str
    expires_at: str | None = None
    is_active: bool = True


class ApiKeyMessage(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    id: str
    record: ApiKeyRecord | None = None


_record = msgspec.json.Decoder(ApiKeyRecord)
message_decoder = msgspec.json.Decoder(ApiKeyMessage)


class ApiKeyStore:
    def __init__(self, store: Store):
        self.store = store
        self.records_key = f"{store.prefix}apikeys"
        self.version_key = f"{store.prefix}apikeys:version"
        self.channel = f"{store.prefix}ch:apikeys"
        self._write = store.client.register_script(_WRITE)

    async def _run(self, op: str, key_id: str, payload: bytes) -> ApiKeyRecord | None:
        keys = [self.records_key, self.version_key]
        result: Any = await self.store.call(
            lambda: self._write(keys=keys, args=[op, key_id, payload, self.channel])
        )
        if result is None:
            return None
        _, raw = result
        return _record.decode(raw) if raw else None

    async def create(self, record: ApiKeyRecord) -> None:
        await self._run("create", record.id, msgspec.json.encode(record))

    async def patch(self, key_id: str, changes: dict[str, object]) -> ApiKeyRecord | None:
        """The record after the change, or None if there is no such key."""
        return await self._run("patch", key_id, msgspec.json.encode(changes))

    async def delete(self, key_id: str) -> bool:
        keys = [self.records_key, self.version_key]
        result = await self.store.call(
            lambda: self._write(keys=keys, args=["delete", key_id, b"", self.channel])
        )
        return result is not None

    async def version(self) -> int:
        raw = await self.store.get(self.version_key)
        return int(raw) if raw else 0

    async def snapshot(self) -> tuple[int, list[ApiKeyRecord]]:
        """Version and every record, read in one transaction (a consistent pair)."""

        async def op() -> list[Any]:
            async with self.store.client.pipeline(transaction=True) as pipe:
                pipe.get(self.version_key)
                pipe.hvals(self.records_key)
                result: list[Any] = await pipe.execute()
                return result

        raw_version, raws = await self.store.call(op)
        return int(raw_version or 0), [_record.decode(r) for r in raws]
