"""Accounts' cold records in Redis: one hash per account, an index set, a version counter and a
channel. (What traffic teaches about an account, its hot state, is kept apart: ``hot``.)

Each change is one Lua script that writes, bumps the version and publishes either the
account's whole hash (one account changed) or a resync marker (a bulk import), so a live copy
applies changes in order and reloads everything when it sees a gap; messages carry the
collection's epoch (see ``api_keys.store``) so a reset store is told apart from a stale read.
Tokens are stored sealed (``SecretBox``), never in the clear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from service.core.connection import Connection, ScriptArg, new_epoch, text

# KEYS: index set, version key, epoch key. ARGV: account key prefix, overwrite ('1'|'0'),
# channel, now, a new epoch in case there is none, then five per account: id,
# chatgpt_account_id, email, plan_type, sealed tokens.
_IMPORT = """
redis.call('SET', KEYS[3], ARGV[5], 'NX')
local results, changed = {}, false
local count = (#ARGV - 5) / 5
for i = 0, count - 1 do
  local b = 5 + i * 5
  local id = ARGV[b + 1]
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 1 then
    if ARGV[2] == '1' then
      redis.call('HSET', key, 'tokens', ARGV[b + 5], 'plan_type', ARGV[b + 4])
      redis.call('HINCRBY', key, 'tokens_version', 1)
      if redis.call('HGET', key, 'status') == 'reauth_required' then
        redis.call('HSET', key, 'status', 'active')
      end
      results[#results + 1] = 'updated'
      changed = true
    else
      results[#results + 1] = 'skipped'
    end
  else
    redis.call('HSET', key, 'id', id, 'chatgpt_account_id', ARGV[b + 2], 'email', ARGV[b + 3],
      'plan_type', ARGV[b + 4], 'tokens', ARGV[b + 5], 'tokens_version', '1',
      'status', 'active', 'created_at', ARGV[4])
    redis.call('SADD', KEYS[1], id)
    results[#results + 1] = 'created'
    changed = true
  end
end
if changed then
  local version = redis.call('INCR', KEYS[2])
  local epoch = cjson.encode(redis.call('GET', KEYS[3]))
  redis.call('PUBLISH', ARGV[3],
    '{"version":' .. version .. ',"epoch":' .. epoch .. ',"resync":true}')
end
return results
"""

# KEYS: account key, version key, epoch key. ARGV: channel, id, condition field ('' = none),
# its required value, field to increment ('' = none), a new epoch in case there is none, then
# field/value pairs to set. Returns -1 (no such account), 0 (condition failed) or the version.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], ARGV[3]) ~= ARGV[4] then return 0 end
redis.call('SET', KEYS[3], ARGV[6], 'NX')
if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[5], 1) end
local version = redis.call('INCR', KEYS[2])
local flat = redis.call('HGETALL', KEYS[1])
local fields = {}
for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
local epoch = redis.call('GET', KEYS[3])
redis.call('PUBLISH', ARGV[1],
  cjson.encode({version = version, epoch = epoch, id = ARGV[2], fields = fields}))
return version
"""

# KEYS: account key, version key, index set, epoch key, hot state key. ARGV: channel, id, new
# epoch. The hot state goes with the account.
_DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[5])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'NX')
local version = redis.call('INCR', KEYS[2])
local epoch = cjson.encode(redis.call('GET', KEYS[4]))
redis.call('PUBLISH', ARGV[1],
  '{"version":' .. version .. ',"epoch":' .. epoch .. ',"id":' .. cjson.encode(ARGV[2]) .. '}')
return version
"""

# KEYS: index set, version key, epoch key. ARGV: account key prefix. One consistent read of
# everything: {epoch or '', version, id, hash, id, hash, ...}. Flagged no-writes (Redis 7), so
# it also runs when Redis turns writes away (out of memory, a read-only replica): a live copy
# must load whenever Redis can be read.
_SNAPSHOT = """#!lua flags=no-writes
local out = {redis.call('GET', KEYS[3]) or '', redis.call('GET', KEYS[2]) or '0'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""

Fields = dict[str, str]


class AccountMessage(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    epoch: str = ""
    id: str | None = None
    fields: Fields | None = None
    resync: bool = False


message_decoder = msgspec.json.Decoder(AccountMessage)


class NewAccount(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    chatgpt_account_id: str
    email: str
    plan_type: str
    sealed_tokens: bytes


def fields_of(flat: list[bytes]) -> Fields:
    # Lenient: a stray byte must make one account malformed, not the whole snapshot unreadable.
    return {
        flat[i].decode(errors="replace"): flat[i + 1].decode(errors="replace")
        for i in range(0, len(flat), 2)
    }


class AccountStore:
    def __init__(self, conn: Connection):
        self.conn, self.keys = conn, conn.keys
        self.channel = conn.keys.accounts_channel
        self._import = conn.write_script(_IMPORT)
        self._update = conn.write_script(_UPDATE)
        self._delete = conn.write_script(_DELETE)
        self._snapshot = conn.script(_SNAPSHOT)

    async def import_accounts(
        self, accounts: list[NewAccount], *, overwrite: bool, now: float
    ) -> list[str]:
        """Create or update (or skip) each account in one atomic step; a status per account."""
        args: list[ScriptArg] = [
            self.keys.account,
            "1" if overwrite else "0",
            self.channel,
            now,
            new_epoch(),
        ]
        for a in accounts:
            args += [a.id, a.chatgpt_account_id, a.email, a.plan_type, a.sealed_tokens]
        raw: list[bytes] = await self._import(
            [self.keys.accounts, self.keys.accounts_version, self.keys.accounts_epoch], args
        )
        return [r.decode() for r in raw]

    async def update(
        self,
        account_id: str,
        values: Mapping[str, str | bytes],
        *,
        only_if: tuple[str, str] | None = None,
        increment: str = "",
    ) -> int:
        """Set ``values`` (if ``only_if`` field holds that value); -1 unknown, 0 refused, else
        the new version."""
        args: list[ScriptArg] = [
            self.channel,
            account_id,
            *(only_if or ("", "")),
            increment,
            new_epoch(),
        ]
        for name, value in values.items():
            args += [name, value]
        keys = [
            self.keys.account + account_id,
            self.keys.accounts_version,
            self.keys.accounts_epoch,
        ]
        return int(await self._update(keys, args))

    async def delete(self, account_id: str) -> bool:
        keys = [
            self.keys.account + account_id,
            self.keys.accounts_version,
            self.keys.accounts,
            self.keys.accounts_epoch,
            self.conn.keys.account_state + account_id,
        ]
        return bool(await self._delete(keys, [self.channel, account_id, new_epoch()]))

    async def version(self) -> tuple[str, int]:
        """The epoch and the version, in one round trip."""
        epoch, version = await self.conn.call(
            lambda: self.conn.client.mget([self.keys.accounts_epoch, self.keys.accounts_version])
        )
        return text(epoch or b""), int(version or 0)

    async def snapshot(self) -> tuple[str, int, dict[str, Fields]]:
        """Epoch, version and every account's fields by its key, in one consistent read."""
        keys = [self.keys.accounts, self.keys.accounts_version, self.keys.accounts_epoch]
        raw: list[Any] = await self.conn.call(
            lambda: self._snapshot(keys=keys, args=[self.keys.account])
        )
        rows = {text(i): fields_of(flat) for i, flat in zip(raw[2::2], raw[3::2], strict=True)}
        return text(raw[0]), int(raw[1]), rows

    async def get_many(self, account_ids: list[str]) -> list[Fields]:
        ids = list(dict.fromkeys(account_ids))
        rows = await self.conn.hashes([self.keys.account + i for i in ids])
        return [row for row in rows if row]

    async def get(self, account_id: str) -> Fields | None:
        (row,) = await self.conn.hashes([self.keys.account + account_id])
        return row or None
