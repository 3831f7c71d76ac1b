"""A process's live copy of the settings record (a ``LiveCopy``, fed by the hub).

Reads on the request path (``current``, ``get``) are a plain attribute access: no Redis. The
copy never adopts defaults for a record that Redis lost: it puts the record it knows back
(flush, restart without persistence) instead. Defaults are written only for a brand-new
deployment; a process that finds the record gone while the deployment's other state is still
there, and knows no record itself, stays not ready and says so at CRITICAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from service.core.errors import NotReady, StoreUnavailable
from service.settings import metrics
from service.settings.store import SettingsRecord, SettingsStore, initial_settings

log = logging.getLogger(__name__)


class LiveSettings:
    def __init__(self, store: SettingsStore):
        self.store = store
        self.channel = store.channel
        self.current: SettingsRecord | None = None
        self.applied_at = 0.0
        # The record is gone while the deployment is not new: wait for an operator.
        self.settings_lost = False
        # Called after each version is applied (the hub's heartbeat reports it at once).
        self.on_apply: list[Callable[[], None]] = []
        self._sync_lock = asyncio.Lock()
        self._restoring: set[asyncio.Task[None]] = set()

    # --- the hot path -----------------------------------------------------------------------

    def get(self) -> SettingsRecord:
        """The record this process serves with; a process that never loaded one is not ready."""
        record = self.current
        if record is None:
            raise NotReady("Settings are not loaded yet")
        return record

    @property
    def loaded(self) -> bool:
        return self.current is not None

    def applied(self) -> tuple[int, float] | None:
        """The version applied and when, for the heartbeat."""
        record = self.current
        return None if record is None else (record.version, self.applied_at)

    def apply(self, record: SettingsRecord) -> bool:
        """Adopt ``record`` if it is newer than ours. True if it was applied."""
        current = self.current
        if current is not None and record.version <= current.version:
            return False
        self.current = record
        self.settings_lost = False
        self.applied_at = time.time()
        # A change that reached a running process: how long it took (not the first load).
        metrics.applied(
            record.version, None if current is None else self.applied_at - record.changed_at
        )
        for listener in self.on_apply:
            listener()
        log.debug("applied settings version %s", record.version)
        return True

    # --- syncing ----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring the copy and the stored record together, whichever side is behind."""
        # Serialised: two overlapping syncs (resubscribe, reconcile) would each decide from
        # their own read.
        async with self._sync_lock:
            await self._sync()

    async def _sync(self) -> None:
        stored = await self.store.load()
        known = self.current
        if stored is None and known is not None:
            await self._restore(known)
            return
        if stored is None:
            outcome = await self.store.initialise(initial_settings())
            if outcome < 0:
                self._lost()
                return
            if outcome > 0:
                log.info("new deployment: initialised the settings at version 1")
            stored = await self.store.load()
            if stored is None:
                return
        if known is not None and stored.version < known.version:
            await self._restore(known)
        else:
            self.apply(stored)

    def _lost(self) -> None:
        if not self.settings_lost:
            log.critical(
                "the settings record is missing from Redis while this deployment still has "
                "other state (password, API keys or accounts), and no running process knows "
                "it: not serving until an operator runs `codex-lb admin reset-settings`, which "
                "restores the default settings as a new version"
            )
        self.settings_lost = True

    async def _restore(self, known: SettingsRecord) -> None:
        if await self.store.restore(known):
            log.warning(
                "settings record was missing or older in Redis; restored version %s", known.version
            )

    async def check(self) -> None:
        stored = await self.store.version()
        known = self.current
        if stored is None or known is None or stored != known.version:
            await self.sync()

    def on_message(self, data: bytes) -> None:
        try:
            record = self.store.decode(data)
        except msgspec.DecodeError:
            log.warning("ignored an undecodable settings message")
            return
        known = self.current
        if known is not None and record.version < known.version:
            # Someone put an older record back (e.g. a cold process after a flush): ours wins.
            self._spawn_restore(known)
        else:
            self.apply(record)

    def _spawn_restore(self, known: SettingsRecord) -> None:
        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self._restore(known)

        task = asyncio.create_task(run(), name="restore settings")
        # Held until done, so the loop does not drop it half-way.
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)
