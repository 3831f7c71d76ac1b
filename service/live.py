"""A process's live copy of the settings record.

Reads on the request path (``LiveSettings.current``) are a plain attribute access: no Redis.
Three background tasks keep the copy fresh and make this process visible:

* listener: a dedicated pub/sub connection. Every (re)subscribe confirmation means messages
  may have been lost while we were not subscribed, so it resyncs from the stored record.
* reconciler: every ``reconcile_seconds`` compares the stored version with ours, as a safety
  net for a lost message, and puts the record back if Redis lost it (flush, restart without
  persistence) instead of ever adopting defaults. Defaults are written only for a brand-new
  deployment; a process that finds the record gone while the deployment's other state is
  still there, and knows no record itself, stays not ready and says so at CRITICAL.
* heartbeat: registers this process with the version it applied, so the propagation view and
  ``PUT ?wait=true`` can see every live process; it also wakes right after each apply.

While Redis is unreachable the copy stays as it was (last-known-good) and the tasks retry. The
other live copies ride on the same listener and reconcile loop, each isolated from the others:
one that fails (a malformed entry, a bug) is logged with its channel and never stops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from service.errors import NotReady, StoreUnavailable
from service.records import SettingsRecord, WorkerRecord, initial_settings
from service.redis_store import Store, hostname

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
RETRY_MIN_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0
STOP_SECONDS = 5.0
STOP_RECANCEL_SECONDS = 0.05


class LiveCopy(Protocol):
    """Another shared collection a process keeps in memory (API keys, accounts).

    It rides on the settings copy's pub/sub connection and reconcile loop: ``sync`` reloads it
    whole, ``check`` compares versions cheaply (and syncs when they differ), ``on_message``
    applies one published change.
    """

    channel: str

    @property
    def loaded(self) -> bool: ...

    async def sync(self) -> None: ...

    async def check(self) -> None: ...

    def on_message(self, data: bytes) -> None: ...


class LiveSettings:
    """The settings copy, which also carries the process's other live copies (``attach``)."""

    def __init__(self, store: Store, *, reconcile_seconds: float):
        self.store = store
        self.reconcile_seconds = reconcile_seconds
        self.host = hostname()
        self.pid = os.getpid()
        self.worker_id = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self.current: SettingsRecord | None = None
        self.applied_at = 0.0
        self.redis_ok = False
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Called once after the first successful contact with Redis (deployment set-up).
        self.on_first_contact: list[Callable[[], Awaitable[None]]] = []
        self._contacted = False
        self._contact_lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        # The record is gone while the deployment is not new: wait for an operator.
        self.settings_lost = False
        self._copies: dict[str, LiveCopy] = {}

    def attach(self, copy: LiveCopy) -> None:
        """Keep ``copy`` fresh along with the settings; call before ``start``."""
        self._copies[copy.channel] = copy

    # --- the hot path -----------------------------------------------------------------------

    def get(self) -> SettingsRecord:
        """The record this process serves with; a process that never loaded one is not ready."""
        record = self.current
        if record is None:
            raise NotReady("Settings are not loaded yet")
        return record

    @property
    def ready(self) -> bool:
        """Settings and every other live copy loaded at least once (CONTRACT §4)."""
        return self.current is not None and all(c.loaded for c in self._copies.values())

    def apply(self, record: SettingsRecord) -> bool:
        """Adopt ``record`` if it is newer than ours. True if it was applied."""
        current = self.current
        if current is not None and record.version <= current.version:
            return False
        self.current = record
        self.settings_lost = False
        self.applied_at = time.time()
        self._changed.set()
        log.debug("applied settings version %s", record.version)
        return True

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="settings-listener"),
            asyncio.create_task(self._reconcile_loop(), name="settings-reconciler"),
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        # Cancel again until they end: on 3.11 asyncio.wait_for (which redis-py uses for socket
        # writes) swallows a cancel that lands as its inner operation completes, and the task
        # would carry on with its loop.
        pending = set(tasks)
        deadline = time.monotonic() + STOP_SECONDS
        while pending and time.monotonic() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=STOP_RECANCEL_SECONDS)
        with contextlib.suppress(StoreUnavailable):
            await self.store.deregister_worker(self.worker_id)

    # --- syncing ----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring the copy and the stored record together, whichever side is behind."""
        # Serialised: two overlapping syncs (resubscribe, reconcile) would each decide from
        # their own read.
        async with self._sync_lock:
            # Deployment checks (e.g. the encryption key) first: a process that fails them
            # must never look ready, not even for a moment.
            await self._contact()
            await self._sync()
        self.redis_ok = True

    async def _sync(self) -> None:
        stored = await self.store.load_settings()
        known = self.current
        if stored is None and known is not None:
            await self._restore(known)
            return
        if stored is None:
            outcome = await self.store.initialise_settings(initial_settings())
            if outcome < 0:
                self._lost()
                return
            if outcome > 0:
                log.info("new deployment: initialised the settings at version 1")
            stored = await self.store.load_settings()
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
        if await self.store.restore_settings(known):
            log.warning(
                "settings record was missing or older in Redis; restored version %s", known.version
            )

    async def _contact(self) -> None:
        if self._contacted:
            return
        async with self._contact_lock:
            if not self._contacted:
                for hook in self.on_first_contact:
                    await hook()
                self._contacted = True

    async def _check_version(self) -> None:
        stored = await self.store.settings_version()
        known = self.current
        if stored is None or known is None or stored != known.version:
            await self.sync()
        else:
            await self._contact()
            self.redis_ok = True

    def _on_message(self, data: bytes) -> None:
        try:
            record = self.store.decode_settings(data)
        except msgspec.DecodeError:
            log.warning("ignored an undecodable settings message")
            return
        known = self.current
        if known is not None and record.version < known.version:
            # Someone put an older record back (e.g. a cold process after a flush): ours wins.
            self._spawn(self._restore(known))
        else:
            self.apply(record)

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):
                await work

        task = asyncio.create_task(run())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # --- background tasks -------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            pubsub = self.store.pubsub()
            try:
                await pubsub.subscribe(self.store.settings_channel, *self._copies)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = message["channel"].decode()
                    copy = self._copies.get(channel)
                    if message["type"] == "subscribe":
                        # Subscribed (again): anything published meanwhile was missed.
                        await self._guarded(channel, self.sync if copy is None else copy.sync)
                        delay = RETRY_MIN_SECONDS
                    elif message["type"] == "message":
                        if copy is None:
                            self._on_message(message["data"])
                        else:
                            self._guarded_message(copy, message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dead connection, or Redis refusing: retry
                self.redis_ok = False
                log.warning("settings subscription lost (%s); retrying", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _guarded(self, channel: str, sync: Callable[[], Awaitable[None]]) -> None:
        """Run one copy's sync. Connection trouble goes up (the listener reconnects); anything
        else is that copy's own fault, logged, and must not stop the others."""
        try:
            await sync()
        except (StoreUnavailable, asyncio.CancelledError):
            raise
        except Exception:
            log.warning("live copy %s failed to sync", channel, exc_info=True)

    @staticmethod
    def _guarded_message(copy: LiveCopy, data: bytes) -> None:
        try:
            copy.on_message(data)
        except Exception:
            log.warning("live copy %s failed to apply a message", copy.channel, exc_info=True)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._isolated("settings", self._check_version)
            for copy in self._copies.values():
                await self._isolated(copy.channel, copy.check)
            await asyncio.sleep(self.reconcile_seconds)

    async def _isolated(self, name: str, check: Callable[[], Awaitable[None]]) -> None:
        """One reconcile step: an unreachable Redis is reported as such; any other failure is
        that copy's own, logged, and never stops the others."""
        try:
            await check()
        except asyncio.CancelledError:
            raise
        except StoreUnavailable:
            self.redis_ok = False
        except Exception:
            log.warning("reconciling %s failed", name, exc_info=True)

    async def _wait_for_change(self) -> None:
        """Until an apply or the heartbeat interval, whichever is first."""
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                await self._changed.wait()
        except TimeoutError:
            # On 3.11 a cancel racing the timeout surfaces as TimeoutError; never swallow it.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError() from None
        self._changed.clear()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._wait_for_change()
            record = self.current
            if record is None:
                continue
            worker = WorkerRecord(
                worker_id=self.worker_id,
                host=self.host,
                pid=self.pid,
                applied_version=record.version,
                applied_at=self.applied_at,
                last_seen=time.time(),
            )
            try:
                await self.store.register_worker(worker)
            except StoreUnavailable:
                self.redis_ok = False
