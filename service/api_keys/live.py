"""This process's live copy of the API keys (a ``VersionedCopy``), indexed by key hash for the
check the gate makes on every request: answered without Redis."""

from __future__ import annotations

import time
from datetime import datetime

from service.api_keys.domain import KEY_PREFIX, key_hash
from service.api_keys.store import ApiKeyRecord, ApiKeyStore, decode_record, message_decoder
from service.core.versioned import Delta, Snapshot, VersionedCopy


def _epoch(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


class LiveApiKeys(VersionedCopy):
    """This process's copy of the keys, indexed by hash for the per-request check."""

    def __init__(self, store: ApiKeyStore):
        super().__init__(store.channel)
        self.store = store
        self._by_hash: dict[str, tuple[ApiKeyRecord, float | None]] = {}
        self._hash_of: dict[str, str] = {}

    def check_key(self, presented: str, now: float | None = None) -> ApiKeyRecord | None:
        """The live key ``presented`` is, or None (unknown, deactivated, expired)."""
        if not presented.startswith(KEY_PREFIX):
            return None
        entry = self._by_hash.get(key_hash(presented))
        if entry is None:
            return None
        record, expires = entry
        if not record.is_active:
            return None
        if expires is not None and (time.time() if now is None else now) >= expires:
            return None
        return record

    def _put(self, record: ApiKeyRecord) -> None:
        self._drop(record.id)
        self._by_hash[record.key_hash] = (record, _epoch(record.expires_at))
        self._hash_of[record.id] = record.key_hash

    def _drop(self, key_id: str) -> None:
        old = self._hash_of.pop(key_id, None)
        if old is not None:
            self._by_hash.pop(old, None)

    async def _snapshot(self) -> Snapshot:
        stored = await self.store.snapshot()
        records = [r for k, v in stored.records.items() if (r := decode_record(k, v)) is not None]

        def install() -> None:
            self._by_hash, self._hash_of = {}, {}
            for record in records:
                self._put(record)

        return Snapshot(stored.epoch, stored.version, install)

    async def _stored_version(self) -> tuple[str, int]:
        return await self.store.version()

    def _delta(self, data: bytes) -> Delta:
        message = message_decoder.decode(data)
        key_id = message.id
        record = decode_record(key_id, message.record)
        if record is None:
            # Deleted, or a record we cannot read: either way the key must not work here.
            return Delta(message.epoch, message.version, lambda: self._drop(key_id))
        return Delta(message.epoch, message.version, lambda: self._put(record))
