"""The shape shared by live copies of versioned collections (API keys, accounts).

The store bumps one version counter per change and publishes the change with its version. A
copy applies a message only when it is exactly the next version; a gap means a message was
lost, so it reloads a consistent snapshot. The reconcile loop's ``check`` catches a lost last
message. A snapshot that lost a race with a newer message is dropped, but a snapshot older
than the copy with no message in between means the store was reset, and the copy follows it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import NamedTuple

import msgspec

from service.errors import StoreUnavailable

log = logging.getLogger(__name__)


class Change(NamedTuple):
    version: int
    # None: the message only says "reload everything".
    apply: Callable[[], None] | None


class VersionedCopy(abc.ABC):
    channel: str

    def __init__(self, channel: str):
        self.channel = channel
        self.version: int | None = None  # None: never loaded, nothing in it can be trusted
        self._applied = 0
        self._resync: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return self.version is not None

    @abc.abstractmethod
    async def _snapshot(self) -> tuple[int, Callable[[], None]]:
        """The stored version and a function that installs the matching contents."""

    @abc.abstractmethod
    async def _stored_version(self) -> int: ...

    @abc.abstractmethod
    def _change(self, data: bytes) -> Change:
        """Decode one published message."""

    async def sync(self) -> None:
        applied_before = self._applied
        version, install = await self._snapshot()
        if self._applied != applied_before and self.version is not None and version < self.version:
            return
        install()
        self.version = version

    async def check(self) -> None:
        if self.version is None or await self._stored_version() != self.version:
            await self.sync()

    def on_message(self, data: bytes) -> None:
        try:
            change = self._change(data)
        except (msgspec.DecodeError, ValueError):
            log.warning("ignored an undecodable message on %s", self.channel)
            return
        if self.version is None or change.version <= self.version:
            return
        if change.apply is None or change.version != self.version + 1:
            self._schedule_resync()
            return
        change.apply()
        self.version = change.version
        self._applied += 1

    def _schedule_resync(self) -> None:
        if self._resync is not None and not self._resync.done():
            return

        async def resync() -> None:
            with contextlib.suppress(StoreUnavailable):  # the reconcile loop tries again
                await self.sync()

        self._resync = asyncio.create_task(resync())
