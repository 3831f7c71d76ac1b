"""The hub: one pub/sub listener, one reconcile loop and one heartbeat per process, feeding
every live copy registered with it (settings, API keys, accounts and their hot state).

Reads on the request path are plain attribute accesses on the copies: no Redis. The hub keeps
them fresh and makes this process visible:

* listener: a dedicated pub/sub connection on every copy's channel. Each (re)subscribe
  confirmation means messages may have been lost while we were not subscribed, so that copy
  resyncs; each message goes to its copy.
* reconciler: every ``reconcile_seconds`` asks each copy to compare itself with the store
  (``check``), as a safety net for a lost message.
* heartbeat: registers this process with the settings version it applied (``report``), so the
  propagation view and ``PUT ?wait=true`` see every live process; it also wakes at once when
  the settings copy applies a version (``wake``).

Before any copy loads, the deployment's first-contact checks run once (the encryption key must
be the deployment's): a process that fails them must never look ready, not even for a moment.
While Redis is unreachable the copies stay as they were (last-known-good) and the tasks retry.
Each copy is isolated from the others: one that fails (a malformed entry, a bug) is logged with
its channel and never stops the rest.
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

from service.core.connection import Connection
from service.core.errors import StoreUnavailable
from service.core.metrics import redis_error
from service.core.tasks import cancel_and_wait
from service.core.workers import WorkerRecord, WorkerRegistry, hostname

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
RETRY_MIN_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0
STOP_SECONDS = 5.0

# (settings version applied, when) for the heartbeat; None before the first load.
Report = Callable[[], tuple[int, float] | None]


class LiveCopy(Protocol):
    """Shared state a process keeps in memory, fed by the hub."""

    channel: str

    @property
    def loaded(self) -> bool:
        """Loaded at least once: until then nothing in it can be trusted."""

    async def sync(self) -> None:
        """Bring the copy and the store together, reading the store whole."""

    async def check(self) -> None:
        """Compare with the store cheaply, and sync when they differ."""

    def on_message(self, data: bytes) -> None:
        """Apply one published change (or schedule a resync when it cannot)."""


class Hub:
    def __init__(
        self,
        conn: Connection,
        workers: WorkerRegistry,
        *,
        reconcile_seconds: float,
        report: Report,
    ):
        self.conn = conn
        self.workers = workers
        self.reconcile_seconds = reconcile_seconds
        self.report = report
        self.host = hostname()
        self.pid = os.getpid()
        self.worker_id = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self.redis_ok = False
        # Set when shutdown begins, or when the deployment refuses this process.
        self.draining = False
        # Called once after the first successful contact with Redis (deployment set-up).
        self.on_first_contact: list[Callable[[], Awaitable[None]]] = []
        self._copies: dict[str, LiveCopy] = {}
        self._contacted = False
        self._contact_lock = asyncio.Lock()
        self._woken = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def register(self, copy: LiveCopy) -> None:
        """Keep ``copy`` fresh; call before ``start``."""
        self._copies[copy.channel] = copy

    @property
    def ready(self) -> bool:
        """Every copy loaded at least once (CONTRACT §4)."""
        return bool(self._copies) and all(c.loaded for c in self._copies.values())

    def wake(self) -> None:
        """Heartbeat now: the settings copy has applied a version."""
        self._woken.set()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="hub-listener"),
            asyncio.create_task(self._reconcile_loop(), name="hub-reconciler"),
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks, STOP_SECONDS)
        with contextlib.suppress(StoreUnavailable):
            await self.workers.deregister(self.worker_id)

    async def _contact(self) -> None:
        if self._contacted:
            return
        async with self._contact_lock:
            if not self._contacted:
                for hook in self.on_first_contact:
                    await hook()
                self._contacted = True

    # --- listener -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            pubsub = self.conn.pubsub()
            try:
                await pubsub.subscribe(*self._copies)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    copy = self._copies.get(message["channel"].decode())
                    if copy is None:
                        continue
                    if message["type"] == "subscribe":
                        # Subscribed (again): anything published meanwhile was missed.
                        await self._contact()
                        await self._guarded(copy)
                        self.redis_ok = True
                        delay = RETRY_MIN_SECONDS
                    elif message["type"] == "message":
                        self._guarded_message(copy, message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dead connection, or Redis refusing: retry
                self.redis_ok = False
                if not isinstance(exc, StoreUnavailable):  # counted where it was raised
                    redis_error("pubsub")
                log.warning("pub/sub subscription lost (%s); retrying", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    @staticmethod
    async def _guarded(copy: LiveCopy) -> None:
        """Run one copy's sync. Connection trouble goes up (the listener reconnects); anything
        else is that copy's own fault, logged, and must not stop the others."""
        try:
            await copy.sync()
        except (StoreUnavailable, asyncio.CancelledError):
            raise
        except Exception:
            log.warning("live copy %s failed to sync", copy.channel, exc_info=True)

    @staticmethod
    def _guarded_message(copy: LiveCopy, data: bytes) -> None:
        try:
            copy.on_message(data)
        except Exception:
            log.warning("live copy %s failed to apply a message", copy.channel, exc_info=True)

    # --- reconciler ---------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            if await self._isolated("first contact", self._contact):
                reached = [
                    await self._isolated(copy.channel, copy.check) for copy in self._copies.values()
                ]
                self.redis_ok = all(reached)
            await asyncio.sleep(self.reconcile_seconds)

    async def _isolated(self, name: str, check: Callable[[], Awaitable[None]]) -> bool:
        """One reconcile step; False if Redis could not be reached. Any other failure is that
        copy's own, logged, and never stops the others."""
        try:
            await check()
        except asyncio.CancelledError:
            raise
        except StoreUnavailable:
            self.redis_ok = False
            return False
        except Exception:
            log.warning("reconciling %s failed", name, exc_info=True)
        return True

    # --- heartbeat ----------------------------------------------------------------------------

    async def _wait_for_wake(self) -> None:
        """Until ``wake`` or the heartbeat interval, whichever is first."""
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                await self._woken.wait()
        except TimeoutError:
            # On 3.11 a cancel racing the timeout surfaces as TimeoutError; never swallow it.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError() from None
        self._woken.clear()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._wait_for_wake()
            applied = self.report()
            if applied is None:
                continue
            version, applied_at = applied
            worker = WorkerRecord(
                worker_id=self.worker_id,
                host=self.host,
                pid=self.pid,
                applied_version=version,
                applied_at=applied_at,
                last_seen=time.time(),
            )
            try:
                await self.workers.register(worker)
            except StoreUnavailable:
                self.redis_ok = False
