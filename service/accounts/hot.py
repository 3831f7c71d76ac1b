"""The hot state of accounts in Redis, and this process's live copy of it.

One hash per account that has learned something (``account_state:<id>``), one field per part
(``usage``, ``cooldown``, ``last_used``) beside its observation time (``<part>_at``). A write is
one Lua script that keeps each part only if it is newer than the stored one (last writer wins
by observation time, not by arrival), then publishes the account's whole merged state. There
is no version counter: a copy merges every message and every read the same way, so a lost,
late or repeated message can never take it back in time, and a resync is one cheap read.

A write for an account that no longer exists is refused, so a late observation cannot bring a
deleted account's state back; deleting the account deletes its state (``store``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from service.accounts.domain import (
    NO_STATE,
    Cooldown,
    HotState,
    MalformedAccount,
    Usage,
    parse_state,
)
from service.accounts.store import Fields, fields_of
from service.core.connection import Connection, ScriptArg, text
from service.core.errors import StoreUnavailable

log = logging.getLogger(__name__)

# KEYS: state hash, the account's cold hash. ARGV: channel, id, then triples: part, observed at,
# value. Returns -1 (no such account), 0 (nothing newer) or 1 (written and published).
_LEARN = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local changed = false
for i = 3, #ARGV, 3 do
  local part, at = ARGV[i], tonumber(ARGV[i + 1])
  local stored = tonumber(redis.call('HGET', KEYS[1], part .. '_at') or '-1')
  if at > stored then
    redis.call('HSET', KEYS[1], part, ARGV[i + 2], part .. '_at', ARGV[i + 1])
    changed = true
  end
end
if not changed then return 0 end
local flat = redis.call('HGETALL', KEYS[1])
local fields = {}
for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
redis.call('PUBLISH', ARGV[1], cjson.encode({id = ARGV[2], fields = fields}))
return 1
"""

# KEYS: accounts index. ARGV: state key prefix. {id, hash, id, hash, ...} of every account.
# Flagged no-writes (Redis 7): it runs whenever Redis can be read.
_SNAPSHOT = """#!lua flags=no-writes
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
"""


class StateMessage(msgspec.Struct, frozen=True):
    id: str
    # Lua's cjson encodes an empty table as an object, a hash never is empty here; lenient anyway.
    fields: dict[str, str] | list[Any]


_message_decoder = msgspec.json.Decoder(StateMessage)
_encode = msgspec.json.encode


class HotStore:
    def __init__(self, conn: Connection):
        self.conn, self.keys = conn, conn.keys
        self.channel = conn.keys.account_state_channel
        self._learn = conn.script(_LEARN)
        self._snapshot = conn.script(_SNAPSHOT)

    async def learn(
        self,
        account_id: str,
        *,
        usage: tuple[float, Usage] | None = None,
        cooldown: tuple[float, Cooldown] | None = None,
        used_at: float | None = None,
    ) -> int:
        """Store what was observed, each part with the time it was observed at; a part older
        than the stored one is dropped. -1 no such account, 0 nothing newer, 1 written."""
        args: list[ScriptArg] = [self.channel, account_id]
        if usage is not None:
            args += ["usage", repr(usage[0]), _encode(usage[1])]
        if cooldown is not None:
            args += ["cooldown", repr(cooldown[0]), _encode(cooldown[1])]
        if used_at is not None:
            args += ["last_used", repr(used_at), repr(used_at)]
        keys = [self.keys.account_state + account_id, self.keys.account + account_id]
        # Idempotent as it is (a repeat is never newer), so the client's retry is harmless.
        return int(await self.conn.call(lambda: self._learn(keys=keys, args=args)))

    async def snapshot(self) -> dict[str, Fields]:
        """Every account's stored state (empty for one that learned nothing yet)."""
        keys, args = [self.keys.accounts], [self.keys.account_state]
        raw: list[Any] = await self.conn.call(lambda: self._snapshot(keys=keys, args=args))
        return {text(i): fields_of(flat) for i, flat in zip(raw[::2], raw[1::2], strict=True)}

    async def get_many(self, account_ids: list[str]) -> dict[str, Fields]:
        """The stored state of each account (empty for one that learned nothing yet)."""
        rows = await self.conn.hashes([self.keys.account_state + i for i in account_ids])
        return dict(zip(account_ids, rows, strict=True))

    async def get(self, account_id: str) -> Fields:
        return (await self.get_many([account_id]))[account_id]


def read_state(account_id: str, fields: Fields) -> HotState:
    """The state, or none for one that cannot be read (skipped with a warning naming it)."""
    try:
        return parse_state(fields)
    except MalformedAccount as exc:
        log.warning("skipped the malformed state of account %r: %s", account_id, exc)
        return NO_STATE


class LiveAccountStates:
    """This process's copy of every account's hot state (a ``LiveCopy``, fed by the hub)."""

    def __init__(self, store: HotStore):
        self.store = store
        self.channel = store.channel
        self.states: dict[str, HotState] = {}
        # Bumped on every change, so a view made from the states knows when to be made again.
        self.generation = 0
        # Told of every new usage, whichever process learned it: (account, before, after).
        self.usage_watchers: list[Callable[[str, Usage | None, Usage], None]] = []
        self._loaded = False
        self._resyncs: set[asyncio.Task[None]] = set()

    @property
    def loaded(self) -> bool:
        return self._loaded

    def get(self, account_id: str) -> HotState:
        return self.states.get(account_id, NO_STATE)

    async def sync(self) -> None:
        stored = await self.store.snapshot()
        # Merged, never replaced: a message applied while this read was under way is newer.
        # Accounts no longer in the store are dropped.
        states = {}
        for account_id, fields in stored.items():
            state = read_state(account_id, fields)
            states[account_id] = self.get(account_id).merged(state)
        self.states = states
        self.generation += 1
        self._loaded = True

    async def check(self) -> None:
        # No version to compare: reading everything is the check, and merging it is harmless.
        await self.sync()

    def on_message(self, data: bytes) -> None:
        try:
            message = _message_decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("%s: undecodable message; the reconcile loop reloads", self.channel)
            return
        if not isinstance(message.fields, dict):
            return
        try:
            state = parse_state(message.fields)
        except MalformedAccount:
            self._resync_one(message.id)
            return
        self.observe(message.id, state)

    def observe(self, account_id: str, state: HotState) -> None:
        """Merge what this process just learned (or was told): it counts at once, here, before
        any write to Redis returns (the proxy learns from every response)."""
        before = self.get(account_id)
        after = before.merged(state)
        self.states[account_id] = after
        # Only what routing reads counts as a change (a new last use does not), so a view made
        # from the states is not made again for every answer's echo.
        if (after.usage, after.cooldown) != (before.usage, before.cooldown):
            self.generation += 1
        if after.usage_at != before.usage_at:
            for watch in self.usage_watchers:
                watch(account_id, before.usage if before.usage_at else None, after.usage)

    def _resync_one(self, account_id: str) -> None:
        """Read one account's state again (a message we could not read)."""

        async def resync() -> None:
            try:
                fields = await self.store.get(account_id)
            except StoreUnavailable:
                return  # the reconcile loop reads everything again
            self.observe(account_id, read_state(account_id, fields))

        task = asyncio.create_task(resync(), name=f"resync state {account_id}")
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)
