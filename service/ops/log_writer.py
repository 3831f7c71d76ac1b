"""The request log's writer: traces kept in memory and written in batches, off the request path.

``record`` is all a request pays: an append to a queue. A background task writes what has
gathered every ``INTERVAL`` seconds, or at once when a full batch is waiting. While Redis is
away the batch that failed is kept and sent again, with the same write id, once Redis answers
(so it is stored once); what arrives meanwhile waits in the queue up to ``BACKLOG`` traces, past
which the oldest are dropped and counted. Shutdown writes what is left, within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import prometheus_client

from service.accounts.live import LiveAccounts
from service.core.connection import new_write_id
from service.core.errors import StoreError, StoreUnavailable
from service.core.throttled_log import ThrottledLog
from service.ops.request_log import Entry, RequestLogStore
from service.proxy.trace import Record, Trace

log = logging.getLogger(__name__)
quiet = ThrottledLog(log)

ENTRIES = prometheus_client.Counter(
    "codex_lb_request_log_entries",
    "Request-log entries by outcome: written to Redis, or dropped (the backlog overflowed while "
    "Redis was away, Redis refused the batch, or shutdown came before they could be written)",
    ["outcome"],
)
_WRITTEN, _DROPPED = ENTRIES.labels("written"), ENTRIES.labels("dropped")

BATCH = 500
INTERVAL = 0.2
# Traces waiting while Redis is away: about a minute of heavy traffic, a few tens of MiB.
BACKLOG = 50_000
# After a failed write, the next try waits this long (Redis is away; each try costs a timeout).
RETRY_SECONDS = 1.0


class RequestLogWriter:
    def __init__(self, store: RequestLogStore, accounts: LiveAccounts):
        self.store = store
        self.accounts = accounts
        self._pending: deque[Trace] = deque()
        self._retry: tuple[list[Entry], str] | None = None
        self._wake = asyncio.Event()
        self.written = 0
        self.dropped = 0

    def record(self, trace: Trace) -> None:
        if not self.store.max_entries:
            return  # the log is off (CODEX_LB_REQUEST_LOG_MAX=0), and its counters with it
        if len(self._pending) >= BACKLOG:
            self._pending.popleft()
            self._lost(1)
        self._pending.append(trace)
        if len(self._pending) >= BATCH:
            self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), INTERVAL)
            self._wake.clear()
            if not await self.flush():
                await asyncio.sleep(RETRY_SECONDS)

    async def flush(self) -> bool:
        """Write everything waiting; False when Redis could not take it (it is kept)."""
        while self._retry is not None or self._pending:
            if self._retry is None:
                traces = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
                self._retry = ([self._entry(t) for t in traces], new_write_id())
            entries, write_id = self._retry
            try:
                await self.store.append(entries, write_id)
            except StoreUnavailable:
                quiet.warning("request log: Redis unavailable; entries wait in memory")
                return False
            except StoreError:
                # Redis refused the script itself (logged by the connection): sending the same
                # batch again would fail the same way.
                self._lost(len(entries))
            else:
                self.written += len(entries)
                _WRITTEN.inc(len(entries))
            self._retry = None
        return True

    async def stop(self, seconds: float) -> None:
        """Write what is left, giving up after ``seconds`` (what is not written is counted)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), seconds)
        left = len(self._pending) + (len(self._retry[0]) if self._retry else 0)
        if left:
            self._lost(left)
            log.warning("request log: %d entries could not be written before shutdown", left)

    def _lost(self, count: int) -> None:
        self.dropped += count
        _DROPPED.inc(count)

    def _entry(self, trace: Trace) -> Entry:
        account = self.accounts.accounts.get(trace.account_id) if trace.account_id else None
        fields = {name: getattr(trace, name) for name in Record.__struct_fields__}
        fields["first_event_ms"] = _ms(trace.first_event_ms)
        fields["duration_ms"] = _ms(trace.duration_ms) or 0.0
        return Entry(**fields, account_email=account.email if account is not None else None)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
