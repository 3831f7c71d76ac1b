"""The live copy of a versioned collection (API keys, cold account records).

The store bumps one version counter per change and publishes the change with its version and
the collection's epoch. A copy applies a message only when it is exactly the next version of
the epoch it holds; a gap means a message was lost, so it reloads a consistent snapshot. The
reconcile loop's ``check`` catches a lost last message.

A copy never goes back (CONTRACT §4): syncs are serialised, and a snapshot older than the copy
only because messages were applied while it was being read is dropped. A different epoch means
the store was reset (a flush, a restore from a backup), and a snapshot older than the copy was
before the read means the store lost its newest writes: either way the copy follows the store,
which is what the dashboard shows and edits.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple

import msgspec

from service.core.errors import StoreUnavailable

log = logging.getLogger(__name__)


class Delta(NamedTuple):
    """One published change, decoded: its place in the history and how to apply it."""

    epoch: str
    version: int
    # None: the message only says "reload everything".
    apply: Callable[[], None] | None


class Snapshot(NamedTuple):
    epoch: str
    version: int
    install: Callable[[], None]


class VersionedCopy(abc.ABC):
    """A ``LiveCopy`` (see ``hub``) of a collection with one version counter and an epoch."""

    channel: str

    def __init__(self, channel: str):
        self.channel = channel
        self.version: int | None = None  # None: never loaded, nothing in it can be trusted
        self.epoch = ""
        self._lock = asyncio.Lock()
        self._resync: asyncio.Task[None] | None = None
        self._resync_again = False

    @property
    def loaded(self) -> bool:
        return self.version is not None

    @abc.abstractmethod
    async def _snapshot(self) -> Snapshot:
        """The stored epoch and version and a function that installs the matching contents."""

    @abc.abstractmethod
    async def _stored_version(self) -> tuple[str, int]:
        """The stored epoch and version."""

    @abc.abstractmethod
    def _delta(self, data: bytes) -> Delta:
        """Decode one published message."""

    async def sync(self) -> None:
        async with self._lock:
            before = self.version
            snapshot = await self._snapshot()
            same_epoch = snapshot.epoch == self.epoch
            if (
                same_epoch
                and before is not None
                and self.version is not None
                and before <= snapshot.version < self.version
            ):
                return  # messages got ahead of this read while it was under way: keep them
            if same_epoch and before is not None and snapshot.version < before:
                # Older than what we had before reading: the store lost writes (a restart from
                # an older append-only file or snapshot). The store is the truth.
                log.warning(
                    "%s: the store went back from version %s to %s; following it",
                    self.channel,
                    before,
                    snapshot.version,
                )
            if not same_epoch and self.epoch:
                log.warning(
                    "%s: the store was reset (epoch %s -> %s); following it at version %s",
                    self.channel,
                    self.epoch,
                    snapshot.epoch,
                    snapshot.version,
                )
            snapshot.install()
            self.epoch, self.version = snapshot.epoch, snapshot.version

    async def check(self) -> None:
        if self.version is None or await self._stored_version() != (self.epoch, self.version):
            await self.sync()

    def on_message(self, data: bytes) -> None:
        if self.version is None:
            return  # the first sync reads everything anyway
        try:
            change = self._delta(data)
        except (msgspec.DecodeError, ValueError):
            # We cannot tell what changed, so we cannot trust the copy: reload it.
            log.warning("%s: undecodable message; reloading", self.channel)
            self._schedule_resync()
            return
        if change.epoch != self.epoch:
            self._schedule_resync()
            return
        if change.version <= self.version:
            return
        if change.apply is None or change.version != self.version + 1:
            self._schedule_resync()
            return
        change.apply()
        self.version = change.version

    def _schedule_resync(self) -> None:
        # A resync already under way may have read its snapshot before this change: run once
        # more after it rather than wait for the reconcile loop.
        self._resync_again = True
        if self._resync is not None and not self._resync.done():
            return

        async def resync() -> None:
            while self._resync_again:
                self._resync_again = False
                try:
                    await self.sync()
                except StoreUnavailable:
                    return  # the reconcile loop tries again
                except Exception:
                    log.warning("%s: reload failed", self.channel, exc_info=True)
                    return

        self._resync = asyncio.create_task(resync(), name=f"resync {self.channel}")
