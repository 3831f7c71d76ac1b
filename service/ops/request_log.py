"""The request log and the usage counters in Redis (CONTRACT §8), shared by every replica.

The log is one stream, capped at ``CODEX_LB_REQUEST_LOG_MAX`` entries (the oldest leave first);
its entry ids are the stream's, so they order entries across processes and page the log. The
usage summary is kept as rolling counters, one hash per hour per deployment, summed over the 24
or 168 hours a window covers: reading it never scans the log. A batch of entries and the
counters they add are written by one idempotent script, so a batch sent again after an outage
(its first reply lost) is not counted twice.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import Any

import msgspec

from service.core.connection import Connection, ScriptArg, text
from service.proxy.trace import Record

# An hour's counters outlive the longest window by a day.
HOUR_TTL_SECONDS = 8 * 24 * 3600
WINDOW_HOURS = {"24h": 24, "7d": 7 * 24}
# How many entries one page may read past while looking for filter matches; a page that stops
# short says where to go on (``next_before``).
SCAN_BUDGET = 20_000
ENTRY_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
STREAM_ID = re.compile(ENTRY_ID_PATTERN)
# The usage metrics of one key or account, by their field suffix in an hour's hash.
METRICS = ("requests", "errors", "input_tokens", "cached_input_tokens", "output_tokens")
KEYLESS = "-"  # the key "id" of requests that came without an API key
CLIENT_LEFT = "client_disconnected"


class Entry(Record, kw_only=True, omit_defaults=True):
    """One proxied request as stored (the id is the stream's): what its trace gathered, and the
    account's email as it was then."""

    account_email: str | None = None

    @property
    def error(self) -> bool:
        # A client that leaves mid-stream is its own choice, not a failure of the service.
        return self.status >= 400 or self.error_code not in (None, CLIENT_LEFT)


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    api_key_id: str | None = None
    account_id: str | None = None
    # An HTTP status, or "error" (an error of any kind) / "ok" (none).
    status: int | str | None = None

    def matches(self, entry: Entry) -> bool:
        if self.api_key_id is not None and entry.api_key_id != self.api_key_id:
            return False
        if self.account_id is not None and entry.account_id != self.account_id:
            return False
        if isinstance(self.status, int):
            return entry.status == self.status
        if self.status is not None:
            return entry.error == (self.status == "error")
        return True


class Totals(msgspec.Struct, kw_only=True):
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0


class Summary(msgspec.Struct, frozen=True):
    api_keys: dict[str | None, Totals]  # None: requests without a key
    accounts: dict[str, Totals]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Entry)

# KEYS: the stream, then the hour hashes, (then the write id, added by write_script).
# ARGV: maxlen, entry count, hash ttl, the entries, then (hash index, field, increment) triples.
_APPEND = """
local maxlen = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
for i = 1, n do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[3 + i])
end
-- One trim for the batch: trimming on every XADD costs Redis a call per entry.
if n > 0 then
  redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
end
local i = 4 + n
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
for k = 2, #KEYS - 1 do
  redis.call('EXPIRE', KEYS[k], ttl)
end
return n
"""


class RequestLogStore:
    def __init__(self, conn: Connection, max_entries: int):
        self.conn = conn
        self.max_entries = max_entries
        self._append = conn.write_script(_APPEND)

    async def append(self, entries: list[Entry], write_id: str) -> None:
        """Store ``entries`` and count them, all or nothing; ``write_id`` makes a repeat of the
        same batch a no-op."""
        keys = self.conn.keys
        hours: dict[str, int] = {}  # hash key -> its index in KEYS
        counts: dict[tuple[int, str], int] = defaultdict(int)
        for entry in entries:
            hour_key = f"{keys.usage_hour}{int(entry.at // 3600)}"
            index = hours.setdefault(hour_key, len(hours) + 2)
            for field, value in _counted(entry):
                counts[(index, field)] += value
        args: list[ScriptArg] = [self.max_entries, len(entries), HOUR_TTL_SECONDS]
        args += [_encoder.encode(e) for e in entries]
        for (index, field), value in counts.items():
            args += [index, field, value]
        await self._append([keys.request_log, *hours], args, write_id)

    async def page(
        self, limit: int, before: str | None, where: Filter
    ) -> tuple[list[tuple[str, Entry]], str | None]:
        """Up to ``limit`` entries older than ``before`` that match, newest first, and where the
        next page starts (None: there is no more)."""
        client = self.conn.client
        key = self.conn.keys.request_log
        found: list[tuple[str, Entry]] = []
        if before is not None and before.strip("0") == "-":
            return found, None  # nothing is older than the first possible id
        upper = f"({before}" if before else "+"
        scanned = 0
        chunk = max(limit, 100) if where == Filter() else 500
        while True:
            read = partial(_newest, client, key, upper, chunk)
            rows = await self.conn.call(read)
            for raw_id, fields in rows:
                entry_id = text(raw_id)
                scanned += 1
                raw = fields.get(b"e")
                if raw is None:
                    continue
                try:
                    entry = _decoder.decode(raw)
                except msgspec.DecodeError:
                    continue  # written by a newer version in a shape this one cannot read
                if where.matches(entry):
                    found.append((entry_id, entry))
                    if len(found) == limit:
                        return found, entry_id
            if len(rows) < chunk:
                return found, None  # the oldest entry has been read
            last = text(rows[-1][0])
            if scanned >= SCAN_BUDGET:
                return found, last
            upper = f"({last}"

    async def summary(self, window: str, now: float | None = None) -> Summary:
        hours = WINDOW_HOURS[window]
        current = int((time.time() if now is None else now) // 3600)
        prefix = self.conn.keys.usage_hour
        rows = await self.conn.hashes(
            [f"{prefix}{h}" for h in range(current - hours + 1, current + 1)]
        )
        keys: dict[str | None, Totals] = {}
        accounts: dict[str, Totals] = {}
        for row in rows:
            for field, value in row.items():
                kind, _, rest = field.partition(":")
                owner, _, metric = rest.rpartition(":")
                if metric not in METRICS or not owner:
                    continue
                if kind == "k":
                    totals = keys.setdefault(None if owner == KEYLESS else owner, Totals())
                elif kind == "a":
                    totals = accounts.setdefault(owner, Totals())
                else:
                    continue
                setattr(totals, metric, getattr(totals, metric) + int(value))
        return Summary(keys, accounts)


async def _newest(client: Any, key: str, upper: str, count: int) -> list[Any]:
    """Up to ``count`` stream entries at or below ``upper``, newest first."""
    rows: list[Any] | None = await client.xrevrange(key, upper, "-", count=count)
    return rows or []


def _counted(entry: Entry) -> Iterable[tuple[str, int]]:
    """The counter fields ``entry`` adds to: its key's, and its account's when one served."""
    owners = [f"k:{entry.api_key_id or KEYLESS}"]
    if entry.account_id:
        owners.append(f"a:{entry.account_id}")
    values = {
        "requests": 1,
        "errors": int(entry.error),
        "input_tokens": entry.input_tokens or 0,
        "cached_input_tokens": entry.cached_input_tokens or 0,
        "output_tokens": entry.output_tokens or 0,
    }
    for owner in owners:
        for metric, value in values.items():
            if value:
                yield f"{owner}:{metric}", value


def valid_entry_id(value: str) -> bool:
    """A stream entry id Redis accepts: two unsigned 64-bit numbers."""
    if not STREAM_ID.fullmatch(value):
        return False
    ms, seq = value.split("-")
    return int(ms) < 2**64 and int(seq) < 2**64
