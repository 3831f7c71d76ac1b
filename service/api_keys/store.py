"""API keys in Redis: one hash of records, a version counter, and a channel.

Every change is one Lua script that writes, bumps the version and publishes the changed record
(or its deletion) with that version, so a live copy can apply changes one by one and knows it
missed one when a version is skipped. An epoch (a random id made by the first write after the
store began, or after it was flushed) stands beside the version: a flush or a restore from a
backup gives a new epoch, so a live copy tells "the store was reset" from "this snapshot is
stale" without guessing from version numbers. Only the SHA-256 of a key is ever stored.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import msgspec

from service.core.connection import Connection, new_epoch, text

log = logging.getLogger(__name__)

# KEYS: records hash, version counter, epoch. ARGV: op (create|patch|delete), id, payload json,
# channel, a new epoch in case there is none yet.
# Returns {version, record json or ''}; false when the id does not exist (patch, delete).
_WRITE = """
redis.call('SET', KEYS[3], ARGV[5], 'NX')
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
local epoch = redis.call('GET', KEYS[3])
redis.call('PUBLISH', ARGV[4], '{"version":' .. version .. ',"epoch":' .. cjson.encode(epoch) ..
  ',"id":' .. cjson.encode(id) .. ',"record":' .. body .. '}')
return {version, record}
"""


# KEYS: epoch, version, records. One consistent read: {epoch or '', version, flat records}.
# Flagged no-writes (Redis 7), so it also runs when Redis turns writes away (out of memory, a
# read-only replica): a live copy must load whenever Redis can be read.
_SNAPSHOT = """#!lua flags=no-writes
return {redis.call('GET', KEYS[1]) or '', redis.call('GET', KEYS[2]) or '0',
  redis.call('HGETALL', KEYS[3])}
"""


class ApiKeyRecord(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    name: str
    key_hash: str
    key_prefix: str
    created_at: str
    expires_at: str | None = None
    # A record that does not say it is active is not: a missing field never grants access.
    is_active: bool = False


class ApiKeyMessage(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    id: str
    epoch: str = ""
    # Raw, so one malformed record is skipped by the copy instead of failing the message;
    # ``null`` when the key was deleted.
    record: msgspec.Raw = msgspec.Raw(b"null")


record_decoder = msgspec.json.Decoder(ApiKeyRecord)
message_decoder = msgspec.json.Decoder(ApiKeyMessage)


class StoredKeys(msgspec.Struct, frozen=True):
    epoch: str
    version: int
    # Raw records, decoded one by one by the copy so that one bad entry is skipped alone.
    records: dict[str, bytes]


class ApiKeyStore:
    def __init__(self, conn: Connection):
        self.conn, self.keys = conn, conn.keys
        self.channel = conn.keys.apikeys_channel
        self._write = conn.write_script(_WRITE)
        self._snapshot = conn.script(_SNAPSHOT)

    async def _run(self, op: str, key_id: str, payload: bytes) -> Any:
        keys = [self.keys.apikeys, self.keys.apikeys_version, self.keys.apikeys_epoch]
        return await self._write(keys, [op, key_id, payload, self.channel, new_epoch()])

    async def create(self, record: ApiKeyRecord) -> None:
        await self._run("create", record.id, msgspec.json.encode(record))

    async def patch(self, key_id: str, changes: dict[str, object]) -> ApiKeyRecord | None:
        """The record after the change, or None if there is no such key."""
        result = await self._run("patch", key_id, msgspec.json.encode(changes))
        return None if result is None else record_decoder.decode(result[1])

    async def delete(self, key_id: str) -> bool:
        return await self._run("delete", key_id, b"") is not None

    async def version(self) -> tuple[str, int]:
        """The epoch and the version, in one round trip."""
        epoch, version = await self.conn.call(
            lambda: self.conn.client.mget([self.keys.apikeys_epoch, self.keys.apikeys_version])
        )
        return text(epoch or b""), int(version or 0)

    async def snapshot(self) -> StoredKeys:
        """Epoch, version and every record, in one consistent read."""
        keys = [self.keys.apikeys_epoch, self.keys.apikeys_version, self.keys.apikeys]
        epoch, version, flat = await self.conn.call(lambda: self._snapshot(keys=keys))
        # No epoch yet (nothing written since the store began): "" until the first write makes
        # one, whose message then differs from it and makes copies reload. Reads never write.
        records = {text(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}
        return StoredKeys(text(epoch), int(version), records)

    async def records(self) -> list[ApiKeyRecord]:
        """Every record that can be read, for the dashboard (a malformed one is left out)."""
        stored = await self.snapshot()
        return [r for k, v in stored.records.items() if (r := decode_record(k, v)) is not None]


def decode_record(key_id: str, raw: bytes | msgspec.Raw) -> ApiKeyRecord | None:
    """The record, or None for a deleted one (``null``) or one that cannot be read (skipped with
    a warning naming it, so it cannot stop the other keys from loading)."""
    if bytes(raw) == b"null":
        return None
    try:
        record = record_decoder.decode(raw)
        if record.expires_at is not None:
            datetime.fromisoformat(record.expires_at)  # the copy compares it on every request
    except (msgspec.DecodeError, ValueError) as exc:
        log.warning("skipped the malformed API key record %r: %s", key_id, exc)
        return None
    return record
