"""The settings record in Redis: one hash (version + record), a history list and a channel.

Every write is one Lua script that compares the version, writes, records history and publishes
the record, so every process's live copy applies it at once. A record kept in Redis tolerates
unknown fields and gives every newer field a default, because old and new pods read each
other's records during a rolling deploy.
"""

from __future__ import annotations

import time

import msgspec

from service.core.connection import Connection, ScriptArg

HISTORY_KEEP = 1000


class SettingsRecord(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    # Epoch seconds at which the write committed.
    changed_at: float
    sticky_threads_enabled: bool = True
    prefer_earlier_reset_accounts: bool = False
    # A plain string, not the enum: a newer pod may know a strategy this one does not.
    routing_strategy: str = "usage_weighted"
    import_without_overwrite: bool = False
    # No defaults for the two that guard access: a stored record that does not say is refused
    # as unreadable, never read as "off".
    totp_required_on_login: bool
    totp_configured: bool = False
    api_key_auth_enabled: bool


# The fields a settings change compares and reports in its history.
SETTINGS_FIELDS: tuple[str, ...] = tuple(
    f for f in SettingsRecord.__struct_fields__ if f not in ("version", "changed_at")
)


def initial_settings() -> SettingsRecord:
    """The record a brand-new deployment starts with (never a fallback for a lost one)."""
    return SettingsRecord(
        version=1, changed_at=time.time(), totp_required_on_login=False, api_key_auth_enabled=False
    )


class HistoryEntry(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    changed_at: float
    changed_fields: list[str] = []


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


class Keep:
    """The value left as it is (``KEEP``), where None already means "remove"."""


KEEP = Keep()


_record_decoder = msgspec.json.Decoder(SettingsRecord)
_history_decoder = msgspec.json.Decoder(HistoryEntry)
_encode = msgspec.json.encode


class SettingsStore:
    def __init__(self, conn: Connection):
        self.conn, self.keys = conn, conn.keys
        self.channel = conn.keys.settings_channel
        self._cas = conn.write_script(_SETTINGS_CAS)
        self._initialise = conn.script(_SETTINGS_INITIALISE)
        self._restore = conn.script(_SETTINGS_RESTORE)

    async def load(self) -> SettingsRecord | None:
        raw = await self.conn.call(lambda: self.conn.client.hget(self.keys.settings, "record"))
        return None if raw is None else _record_decoder.decode(raw)

    async def version(self) -> int | None:
        raw = await self.conn.call(lambda: self.conn.client.hget(self.keys.settings, "version"))
        return None if raw is None else int(raw)

    async def compare_and_set(
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
            self.channel,
            HISTORY_KEEP,
            *(
                ("", "")
                if isinstance(totp_secret, Keep)
                else ("del", "")
                if totp_secret is None
                else ("set", totp_secret)
            ),
        ]
        keys = [
            self.keys.settings,
            self.keys.settings_history,
            self.keys.auth,
            self.keys.totp_pending,
        ]
        written, version = await self._cas(keys, args)
        return bool(written), int(version)

    async def initialise(self, record: SettingsRecord) -> int:
        """Write the defaults if this is a brand-new deployment: 1 written, 0 a record exists,
        -1 the record is gone while the deployment's other state is not (a loss)."""
        keys = [self.keys.settings, *self.conn.keys.deployment_evidence()]
        args: list[ScriptArg] = [_encode(record), self.channel]
        return int(await self.conn.call(lambda: self._initialise(keys=keys, args=args)))

    async def restore(self, record: SettingsRecord) -> bool:
        """Put ``record`` back if the stored one is missing or older. True if it wrote."""
        args: list[ScriptArg] = [record.version, _encode(record), self.channel]
        return bool(
            await self.conn.call(lambda: self._restore(keys=[self.keys.settings], args=args))
        )

    async def history(self, limit: int = HISTORY_KEEP) -> list[HistoryEntry]:
        raws = await self.conn.call(
            lambda: self.conn.client.lrange(self.keys.settings_history, 0, limit - 1)
        )
        return [_history_decoder.decode(r) for r in raws]

    @staticmethod
    def decode(raw: bytes) -> SettingsRecord:
        return _record_decoder.decode(raw)

    async def has_totp_secret(self) -> bool:
        key = self.keys.auth
        return bool(await self.conn.call(lambda: self.conn.client.hexists(key, "totp_secret")))
