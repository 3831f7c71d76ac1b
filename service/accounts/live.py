"""This process's copy of the accounts (tokens still sealed), for routing without Redis reads."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from service.live_collection import Change, VersionedCopy
from service.redis_accounts import AccountStore, Fields, message_decoder


class Usage(msgspec.Struct, kw_only=True, frozen=True):
    """The two upstream windows as last polled (tolerant: stored JSON may be older or newer)."""

    primary_used_percent: float | None = None
    primary_reset_at: float | None = None
    primary_window_seconds: int | None = None
    secondary_used_percent: float | None = None
    secondary_reset_at: float | None = None
    secondary_window_seconds: int | None = None
    updated_at: float | None = None


_usage = msgspec.json.Decoder(Usage)


class AccountState(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    chatgpt_account_id: str
    email: str
    plan_type: str | None
    status: str
    created_at: float
    sealed_tokens: bytes
    tokens_version: int
    usage: Usage
    last_used_at: float | None

    @classmethod
    def from_fields(cls, f: Fields) -> AccountState:
        return cls(
            id=f["id"],
            chatgpt_account_id=f["chatgpt_account_id"],
            email=f["email"],
            plan_type=f.get("plan_type") or None,
            status=f.get("status", "active"),
            created_at=float(f.get("created_at") or 0),
            sealed_tokens=f["tokens"].encode(),
            tokens_version=int(f.get("tokens_version") or 0),
            usage=_usage.decode(f.get("usage") or "{}"),
            last_used_at=float(f["last_used_at"]) if f.get("last_used_at") else None,
        )


class LiveAccounts(VersionedCopy):
    def __init__(self, store: AccountStore):
        super().__init__(store.channel)
        self.store = store
        self.accounts: dict[str, AccountState] = {}

    def serving(self) -> list[AccountState]:
        """Accounts that may be given a request now (not paused, not waiting for re-import)."""
        return [a for a in self.accounts.values() if a.status == "active"]

    async def _snapshot(self) -> tuple[int, Callable[[], None]]:
        version, rows = await self.store.snapshot()
        accounts = {a.id: a for a in map(AccountState.from_fields, rows)}

        def install() -> None:
            self.accounts = accounts

        return version, install

    async def _stored_version(self) -> int:
        return await self.store.version()

    def _change(self, data: bytes) -> Change:
        message = message_decoder.decode(data)
        if message.resync or message.id is None:
            return Change(message.version, None)
        account_id, fields = message.id, message.fields
        state = None if fields is None else AccountState.from_fields(fields)

        def apply() -> None:
            if state is None:
                self.accounts.pop(account_id, None)
            else:
                self.accounts[account_id] = state

        return Change(message.version, apply)
