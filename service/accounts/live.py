"""This process's copy of the accounts (tokens still sealed), for routing without Redis reads."""

from __future__ import annotations

from service.accounts.domain import AccountState, parse_account
from service.accounts.store import AccountStore, message_decoder
from service.core.versioned import Delta, Snapshot, VersionedCopy


class LiveAccounts(VersionedCopy):
    def __init__(self, store: AccountStore):
        super().__init__(store.channel)
        self.store = store
        self.accounts: dict[str, AccountState] = {}

    def serving(self) -> list[AccountState]:
        """Accounts that may be given a request now (not paused, not waiting for re-import)."""
        return [a for a in self.accounts.values() if a.status == "active"]

    async def _snapshot(self) -> Snapshot:
        epoch, version, rows = await self.store.snapshot()
        parsed = ((i, parse_account(i, fields)) for i, fields in rows.items())
        accounts = {i: a for i, a in parsed if a is not None}

        def install() -> None:
            self.accounts = accounts

        return Snapshot(epoch, version, install)

    async def _stored_version(self) -> tuple[str, int]:
        return await self.store.version()

    def _delta(self, data: bytes) -> Delta:
        message = message_decoder.decode(data)
        if message.resync or message.id is None:
            return Delta(message.epoch, message.version, None)
        account_id = message.id
        state = parse_account(account_id, message.fields)

        def apply() -> None:
            if state is None:
                self.accounts.pop(account_id, None)
            else:
                self.accounts[account_id] = state

        return Delta(message.epoch, message.version, apply)
