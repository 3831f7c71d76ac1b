"""Pool efficiency: a pool of accounts burning real quota, driven past its capacity.

The fake upstream runs in quota mode (tests/fake_upstream.py): every request it serves spends one
unit of its account's short ("5-hour") window and weekly window, compressed to seconds, and it
answers 429 ``usage_limit_reached`` with the window's end when either is spent. Six accounts
(``--accounts``: 3 to 20, the six sizes in turn) of different sizes (capacities 10..40 units per 30
s window, ``--scale`` times; weekly windows 3x the capacity over 90 s), resets staggered, each
already ``--start-used`` through its current window (a pool in use, not a fresh one). A served
request's first byte, with its usage headers, comes ``--delay`` s after it arrived (and spent its
unit), like a model starting to answer; a 429 comes at once. Usage is learned only from the proxy's
own traffic (the usage poller asks once a minute, not settable from the environment: a run ends
before its second round; the fake's ``/wham/usage`` would answer from the quota anyway).

Each run starts a private redis-server and N ``codex-lb serve`` processes in front of the fake,
imports the accounts, sets the strategy (PUT /api/settings), starts the quota epoch and sends
open-loop load at ``--load`` x the pool's capacity for ``--duration`` s: ``--threads`` conversation
threads, each sending its turns one after another with its ``session_id``, the requests spread
over the processes in turn. The fake's ground truth (every window, every upstream request, who
had room when) then gives five figures per run:

1. No avoidable limit: when the first client-visible 429/503 came, the share of the capacity of
   the windows begun by then that was spent (spent / (spent + still usable + expired unspent),
   the weekly window capping what a short window could give); and the client errors while some
   account had room as far as its last upstream answer said, less the requests sent to it since
   that were still unanswered (known room; target 0), or in truth.
2. Upstream 429s as a share of upstream requests.
3. Upstream requests per client request (failover attempts).
4. Stickiness: turns served by the account of the thread's previous turn, among turns whose
   previous account still had room (truth) when they were sent; a turn that leaves a detour for
   the thread's pin once that recovers counts as kept, since CONTRACT §7 says a rate-limited pin
   "is skipped without being moved and is used again once it recovers" (``sticky/prev`` shows
   the figure both ways: ``prev`` counts such a return as a miss).
5. Honest overload: client 429s while no account had room: their latency and whether their
   ``resets_at`` is the earliest moment an account truly has room again.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.common import (
    BenchError,
    Check,
    cluster,
    expect,
    heading,
    login,
    percentile,
    session_client,
    table,
)
from tests.fake_upstream import SHORT, WEEKLY, FakeUpstream, Quota, running_fake
from tests.proxy_support import (
    IMPORT,
    RESPONSES,
    answered_by,
    body,
    ids_by_name,
    import_files,
    sse_text,
)

NAME = "pool"
SUMMARY = "pool efficiency: quota-burning fake upstream, 1 and 3 processes, each strategy"

WINDOW_SECONDS = 30
WEEKLY_WINDOW_SECONDS = 90
WEEKLY_FACTOR = 3
STRATEGIES = ("usage_weighted", "round_robin")

TARGET_SPENT_PERCENT = 98.0
TARGET_UPSTREAM_429_PERCENT = 2.0
TARGET_ATTEMPTS = 1.05
TARGET_STICKY_PERCENT = 95.0
TARGET_REFUSAL_MS = 50.0
RESETS_AT_SLACK = 1.0  # resets_at is whole seconds
REQUEST_TIMEOUT = 30.0
# An upstream answer reaches the proxy, and the proxy's next request the upstream, within this.
IN_TRANSIT = 0.01
DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class Member:
    name: str
    capacity: int  # units per short window, before --scale
    offset: int  # the short window's reset, seconds after the epoch (mod the window)
    weekly_offset: int


POOL = (
    Member("pool-a", 10, 3, 40),
    Member("pool-b", 15, 8, 70),
    Member("pool-c", 20, 13, 10),
    Member("pool-d", 25, 18, 85),
    Member("pool-e", 30, 23, 25),
    Member("pool-f", 40, 28, 55),
)
POOL_SIZES = range(3, 21)  # the "any pool of 3-20 accounts"


def pool_of(size: int, start_used: float = 0.75) -> tuple[Member, ...]:
    """``size`` accounts: the six sizes in turn, ordered by size with their short windows'
    resets spread evenly from the first to second 28 of the window (``POOL`` itself for six):
    the smallest account resets first, as in ``POOL``.

    The first reset comes no sooner than an equal share of a load at the pool's capacity can
    have spent what the smallest account had left at the epoch (second 3 for six accounts, 5 for
    three). A window that ends sooner is lost under either strategy the contract defines
    (usage_weighted weighs by remaining percent, the same for every account at the epoch;
    round_robin gives equal turns): it would measure the scenario, not the balancer."""
    bases = sorted((POOL[i % len(POOL)] for i in range(size)), key=lambda m: m.capacity)
    share = sum(m.capacity for m in bases) / WINDOW_SECONDS / size  # units/s at load 1
    needed = round((1 - start_used) * bases[0].capacity / share)
    first = min(max(POOL[0].offset, needed), POOL[-1].offset)
    seen: collections.Counter[str] = collections.Counter()
    members = []
    for i, base in enumerate(bases):
        seen[base.name] += 1
        round_ = seen[base.name] - 1
        members.append(
            Member(
                base.name if round_ == 0 else f"{base.name}{round_ + 1}",
                base.capacity,
                first + i * (POOL[-1].offset - first) // (size - 1),
                (base.weekly_offset + 7 * round_) % WEEKLY_WINDOW_SECONDS,
            )
        )
    return tuple(members)


def quota_of(member: Member, scale: int, start_used: float) -> dict[str, int]:
    """The member's quota: its current short window ``start_used`` spent; its weekly window
    spent as far as it has run at that pace (a pool in use)."""
    capacity = member.capacity * scale
    weekly = capacity * WEEKLY_FACTOR
    weekly_elapsed = (WEEKLY_WINDOW_SECONDS - member.weekly_offset) / WEEKLY_WINDOW_SECONDS
    return {
        "capacity": capacity,
        "window_seconds": WINDOW_SECONDS,
        "offset_seconds": member.offset,
        "weekly_capacity": weekly,
        "weekly_window_seconds": WEEKLY_WINDOW_SECONDS,
        "weekly_offset_seconds": member.weekly_offset,
        "spent": round(capacity * start_used),
        "weekly_spent": round(weekly * weekly_elapsed * start_used),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--duration", type=float, default=30.0, help="seconds of load per run (default 30)"
    )
    group.add_argument(
        "--load", type=float, default=1.1, help="request rate / pool capacity (default 1.1)"
    )
    group.add_argument(
        "--pool-processes",
        default="1,3",
        help="serve process counts, one run set each (default 1,3)",
    )
    group.add_argument(
        "--strategies",
        default="usage_weighted,usage_weighted+early,round_robin,round_robin+early",
        help="runs per process count: STRATEGY[+early] (+early: prefer_earlier_reset_accounts)",
    )
    group.add_argument(
        "--sticky",
        choices=("on", "off", "both"),
        default="on",
        help="sticky_threads_enabled in the runs (default on)",
    )
    group.add_argument("--threads", type=int, default=40, help="conversation threads (default 40)")
    group.add_argument(
        "--accounts",
        type=int,
        default=len(POOL),
        help=f"pool size, {POOL_SIZES.start}..{POOL_SIZES.stop - 1} (default {len(POOL)})",
    )
    group.add_argument(
        "--scale", type=int, default=1, help="multiply every capacity by this (default 1)"
    )
    group.add_argument(
        "--start-used",
        type=float,
        default=0.75,
        help="share of each account's current window spent at the start (default 0.75)",
    )
    group.add_argument(
        "--delay",
        type=float,
        default=0.5,
        help="seconds to a served request's first byte (usage headers then; default 0.5)",
    )
    group.add_argument("--stream", action="store_true", help="short streams instead of JSON")
    group.add_argument("--dump", type=Path, help="write each run's raw data (JSON) here")


# --- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    processes: int
    strategy: str
    early: bool
    sticky: bool

    @property
    def label(self) -> str:
        name = {"usage_weighted": "uw", "round_robin": "rr"}.get(self.strategy, self.strategy)
        return (
            f"{self.processes}p {name}{'+early' if self.early else ''}"
            f"{'' if self.sticky else ' nosticky'}"
        )


@dataclass
class Sent:
    """One client request: when it left and came back, and what it got."""

    index: int
    thread: int
    process: int
    sent: float
    done: float = math.nan
    status: int = 0  # 0: no HTTP answer
    account: str | None = None
    code: str | None = None
    resets_at: float | None = None


def _specs(args: argparse.Namespace) -> list[Spec]:
    try:
        counts = [int(p) for p in str(args.pool_processes).split(",") if p.strip()]
    except ValueError:
        raise BenchError("--pool-processes takes counts like 1,3") from None
    stickies = {"on": [True], "off": [False], "both": [True, False]}[args.sticky]
    specs = []
    for count in counts:
        for item in str(args.strategies).split(","):
            strategy, _, early = item.strip().partition("+")
            if strategy not in STRATEGIES or early not in ("", "early"):
                raise BenchError(f"--strategies: {item!r} is not STRATEGY[+early]")
            specs += [Spec(count, strategy, early == "early", s) for s in stickies]
    if not specs or min(counts) < 1:
        raise BenchError("no runs: --pool-processes and --strategies name none")
    return specs


def _wait_applied(client: httpx.Client, version: int, processes: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        workers = expect(client.get("/api/settings/propagation")).json()["workers"]
        if len(workers) >= processes and all(w["applied_version"] >= version for w in workers):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"settings version {version} not applied everywhere: {workers}")
        time.sleep(0.05)


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    record: Sent,
    payload: bytes,
    headers: dict[str, str],
    stream: bool,
) -> None:
    try:
        async with session.post(url + RESPONSES, data=payload, headers=headers) as response:
            raw = await response.read()
            record.done = time.time()
            record.status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        record.done = time.time()
        return
    try:
        if record.status == 200:
            record.account = answered_by(sse_text(raw) if stream else _output_text(raw))
        else:
            error = json.loads(raw).get("error") or {}
            record.code = error.get("code") or error.get("type")
            if isinstance(error.get("resets_at"), int | float):
                record.resets_at = float(error["resets_at"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass


def _output_text(raw: bytes) -> str:
    return str(json.loads(raw)["output"][0]["content"][0]["text"])


async def _drive(
    urls: Sequence[str],
    threads: int,
    rate: float,
    duration: float,
    stream: bool,
    prefix: str,
    start_at: float,
) -> tuple[list[Sent], int]:
    """Open-loop load from ``start_at`` (epoch seconds): a request every 1/rate s, each by the
    thread idle longest (its turns one after another), on the processes in turn. Answers the
    requests and the ticks skipped because every thread was still waiting."""
    payload = json.dumps(body("one more turn", stream=stream)).encode()
    idle = collections.deque(range(threads))
    sent: list[Sent] = []
    skipped = 0
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def turn(record: Sent, headers: dict[str, str]) -> None:
            try:
                await _one(session, urls[record.process], record, payload, headers, stream)
            finally:
                idle.append(record.thread)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.monotonic()
        tick = 0
        while tick / rate < duration:
            wait = started + tick / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not idle:
                skipped += 1
                tick += 1
                continue
            thread = idle.popleft()
            record = Sent(len(sent), thread, len(sent) % len(urls), time.time())
            sent.append(record)
            headers = {
                "content-type": "application/json",
                "session_id": f"{prefix}-thread-{thread}",
                "x-fake-tag": str(record.index),
            }
            task = asyncio.create_task(turn(record, headers))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            tick += 1
        if tasks:
            await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
    return sent, skipped


def _run_one(
    spec: Spec, fake: FakeUpstream, args: argparse.Namespace
) -> tuple[list[Sent], int, dict[str, Any]]:
    fake.reset()
    fake.recording(False)
    members = pool_of(args.accounts, args.start_used)
    for member in members:
        fake.configure(
            member.name,
            quota=quota_of(member, args.scale, args.start_used),
            delay_first_byte=args.delay,
            rate_limits_event=False,
        )
    env = {"CODEX_LB_UPSTREAM_BASE_URL": fake.url, "CODEX_LB_AUTH_BASE_URL": fake.url}
    with cluster(spec.processes, extra_env=env) as c:
        token = login(c.serves[0].url)
        with session_client(c.serves[0].url, token) as admin:
            names = [m.name for m in members]
            reply = expect(admin.post(IMPORT, files=import_files(fake, names)))
            if len(ids_by_name(reply.json())) != len(members):
                raise BenchError(f"import: {reply.text[:300]}")
            wanted = {
                "routing_strategy": spec.strategy,
                "prefer_earlier_reset_accounts": spec.early,
                "sticky_threads_enabled": spec.sticky,
            }
            version = int(expect(admin.put("/api/settings", json=wanted)).json()["version"])
            _wait_applied(admin, version, spec.processes)
        capacity = sum(m.capacity * args.scale for m in members) / WINDOW_SECONDS
        rate = args.load * capacity
        # The quota's epoch is a whole second: the next one, and the load starts on it (the
        # windows in progress at the epoch have their remaining units from then on, not from a
        # moment up to a second before the first request).
        epoch = fake.quota_start(int(time.time()) + 1)
        urls = [s.url for s in c.serves]
        prefix = spec.label.replace(" ", "-")
        sent, skipped = asyncio.run(
            _drive(urls, args.threads, rate, args.duration, args.stream, prefix, epoch)
        )
        truth = fake.quota()
    return sent, skipped, truth


# --- ground truth -------------------------------------------------------------------------------


class Account:
    """One account's truth: its quota, the epoch and the moments it spent a unit."""

    def __init__(self, name: str, snapshot: dict[str, Any], epoch: int, spends: list[float]):
        self.name = name
        self.quota = Quota(**snapshot["quota"])
        self.epoch = epoch
        self.spends = sorted(spends)
        self.first = {
            SHORT: self.quota.bounds(SHORT, epoch, epoch)[0],
            WEEKLY: self.quota.bounds(WEEKLY, epoch, epoch)[0],
        }

    def left(self, kind: str, at: float) -> float:
        """Units left at ``at`` (spends at ``at`` included) in the window of ``kind`` then."""
        index, start, _ = self.quota.bounds(kind, self.epoch, at)
        capacity = self.quota.shape(kind)[2]
        if capacity is None:
            return math.inf
        initial = 0
        if index == self.first[kind]:
            initial = self.quota.spent if kind == SHORT else self.quota.weekly_spent
        count = bisect.bisect_right(self.spends, at) - bisect.bisect_left(self.spends, start)
        return float(capacity - initial - count)

    def usable(self, at: float) -> float:
        return max(0.0, min(self.left(SHORT, at), self.left(WEEKLY, at)))

    def room(self, at: float) -> bool:
        return self.usable(at) > 0

    def wasted(self, until: float) -> float:
        """Units that expired unspent though the weekly window would have allowed them: what
        each short window ended by ``until`` could still have given just before its end."""
        last = self.quota.bounds(SHORT, self.epoch, until)[0]
        length = self.quota.window_seconds
        start = self.epoch + self.quota.offset_seconds
        total = 0.0
        for index in range(self.first[SHORT], last):
            end = start + (index + 1) * length
            if end > self.epoch:
                total += self.usable(end - 1e-6)
        return total

    def spent(self, until: float) -> int:
        return bisect.bisect_right(self.spends, until)

    def regains(self, at: float) -> float:
        """When it has room again (``at`` if it has): the end of each exhausted window."""
        ends = [
            self.quota.bounds(kind, self.epoch, at)[2]
            for kind in (SHORT, WEEKLY)
            if self.left(kind, at) <= 0
        ]
        return max(ends) if ends else at


@dataclass
class Known:
    """What an upstream answer said about its account (the timeline's windows after it)."""

    at: float
    short_full: bool
    short_end: float
    weekly_full: bool
    weekly_end: float
    tag: str | None
    # Units left in each window as it said (None: the window's size unknown).
    short_left: int | None = None
    weekly_left: int | None = None

    def room(self, now: float, in_flight: int = 0) -> bool:
        """Room for one more request at ``now``, as this answer said, once the requests sent
        after it and still unanswered have taken theirs: in each window, one that has ended
        since is fresh, one still running has what the answer left of it (the weekly window
        ending does not refill the short one, nor the other way round)."""
        windows = (
            (self.short_full, self.short_end, self.short_left),
            (self.weekly_full, self.weekly_end, self.weekly_left),
        )
        for full, end, left in windows:
            if end <= now:
                continue
            if full or (left is not None and left - in_flight <= 0):
                return False
        return True


class Truth:
    def __init__(self, snapshot: dict[str, Any]):
        self.epoch = int(snapshot["epoch"])
        self.timeline: list[dict[str, Any]] = sorted(snapshot["timeline"], key=lambda e: e["seq"])
        spends: dict[str, list[float]] = collections.defaultdict(list)
        for event in self.timeline:
            if event["spent"]:
                spends[event["account_id"]].append(event["time"])
        self.accounts = [
            Account(name, data, self.epoch, spends[name])
            for name, data in sorted(snapshot["accounts"].items())
        ]
        # Each account's answers in the order they started (what they told, from then on).
        self.answers: dict[str, list[Known]] = collections.defaultdict(list)
        for event in sorted(self.timeline, key=lambda e: e["answered"]):
            short_cap, weekly_cap = event["short_capacity"], event["weekly_capacity"]
            short_left, weekly_left = (
                cap - event[spent] if cap is not None and event[spent] is not None else None
                for cap, spent in ((short_cap, "short_spent"), (weekly_cap, "weekly_spent"))
            )
            self.answers[event["account_id"]].append(
                Known(
                    at=event["answered"],
                    short_full=short_cap is not None and event["short_spent"] >= short_cap,
                    short_end=event["short_end"],
                    weekly_full=weekly_cap is not None and event["weekly_spent"] >= weekly_cap,
                    weekly_end=event["weekly_end"],
                    tag=event["tag"],
                    short_left=short_left,
                    weekly_left=weekly_left,
                )
            )
        self.answer_times = {a: [k.at for k in ks] for a, ks in self.answers.items()}

    def any_room(self, at: float) -> bool:
        return any(a.room(at) for a in self.accounts)

    def last_answer(self, account: str, before: float) -> Known | None:
        """The account's last upstream answer the proxy could have had by ``before``."""
        times = self.answer_times.get(account, [])
        i = bisect.bisect_right(times, before) - 1
        return self.answers[account][i] if i >= 0 else None

    def known_room(self, at: float) -> list[str]:
        """Accounts with room as far as their last answers said (never answered: room), less
        what the requests sent to them since, still unanswered at ``at``, are taking: the proxy
        knows its own requests in flight."""
        out = []
        for account in self.accounts:
            last = self.last_answer(account.name, at)
            if last is None:
                out.append(account.name)
                continue
            in_flight = sum(
                1
                for e in self.timeline
                if e["account_id"] == account.name
                and e["spent"]
                and last.at < e["time"] <= at < e["answered"]
            )
            if last.room(at, in_flight):
                out.append(account.name)
        return out

    def spent_share(self, at: float) -> float:
        spent = sum(a.spent(at) for a in self.accounts)
        usable = sum(a.usable(at) for a in self.accounts)
        wasted = sum(a.wasted(at) for a in self.accounts)
        begun = spent + usable + wasted
        return 100.0 * spent / begun if begun else math.nan

    def earliest_regain(self, at: float) -> float:
        return min(a.regains(at) for a in self.accounts)


# --- figures ------------------------------------------------------------------------------------


@dataclass
class Figures:
    label: str
    spec: dict[str, Any]
    rate: float
    clients: int = 0
    ok: int = 0
    skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error_s: float | None = None
    spent_at_first: float | None = None
    avoidable_known: int = 0
    avoidable_truth: int = 0
    upstream: int = 0
    upstream_429: int = 0
    upstream_429_causes: dict[str, int] = field(default_factory=dict)
    stale_ms_p50: float | None = None
    attempts_max: int = 0
    sticky_eligible: int = 0
    sticky_kept: int = 0
    # Turns that left a detour for the thread's recovered pin (counted kept by ``sticky_percent``).
    sticky_returns: int = 0
    pool_out_errors: int = 0
    pool_out_429: int = 0
    refusal_ms_p50: float | None = None
    refusal_ms_max: float | None = None
    resets_exact: int = 0
    resets_late: int = 0
    resets_early: int = 0
    resets_late_s_max: float | None = None
    spent_units: int = 0
    wasted_units: float = 0.0
    evidence: list[str] = field(default_factory=list)

    @property
    def upstream_429_percent(self) -> float:
        return 100.0 * self.upstream_429 / self.upstream if self.upstream else 0.0

    @property
    def attempts(self) -> float:
        return self.upstream / self.clients if self.clients else math.nan

    @property
    def sticky_percent(self) -> float | None:
        """Turns on the account of the thread's previous turn, or back on its pin after a
        detour, among turns whose previous account had room: what the contract lets a sticky
        thread do (a rate-limited pin "is used again once it recovers")."""
        if not self.sticky_eligible:
            return None
        return 100.0 * (self.sticky_kept + self.sticky_returns) / self.sticky_eligible

    @property
    def sticky_previous_percent(self) -> float | None:
        """The issue's literal figure: turns on the account of the previous turn only (a
        return to a recovered pin counts as a miss)."""
        if not self.sticky_eligible:
            return None
        return 100.0 * self.sticky_kept / self.sticky_eligible

    @property
    def resets_honest(self) -> float | None:
        if not self.pool_out_errors:
            return None
        return 100.0 * self.resets_exact / self.pool_out_errors

    def passes(self) -> dict[str, bool]:
        sticky = self.sticky_percent
        return {
            "spent": self.spent_at_first is None or self.spent_at_first >= TARGET_SPENT_PERCENT,
            "avoidable": self.avoidable_known == 0,
            "upstream_429": self.upstream_429_percent <= TARGET_UPSTREAM_429_PERCENT,
            "attempts": not self.attempts > TARGET_ATTEMPTS,
            "sticky": not self.spec["sticky"] or sticky is None or sticky >= TARGET_STICKY_PERCENT,
            "refusal_ms": self.refusal_ms_p50 is None or self.refusal_ms_p50 <= TARGET_REFUSAL_MS,
            "resets_at": self.resets_honest is None or self.resets_honest >= 100.0,
        }


def _error_key(record: Sent) -> str:
    return f"{record.status or 'none'} {record.code or '-'}"


def figures(spec: Spec, rate: float, sent: list[Sent], skipped: int, truth: Truth) -> Figures:
    f = Figures(spec.label, asdict(spec), rate, clients=len(sent), skipped=skipped)
    by_tag = {str(r.index): r for r in sent}
    epoch = truth.epoch
    errors = [r for r in sent if r.status != 200]
    f.ok = len(sent) - len(errors)
    f.errors = dict(collections.Counter(_error_key(r) for r in errors).most_common())
    end = max((r.done for r in sent if not math.isnan(r.done)), default=time.time())
    f.spent_units = sum(a.spent(end) for a in truth.accounts)
    f.wasted_units = sum(a.wasted(end) for a in truth.accounts)

    # 1. The first client-visible 429/503, and errors while some account had room.
    limits = [r for r in errors if r.status in (429, 503)]
    if limits:
        first = min(limits, key=lambda r: r.done)
        f.first_error_s = first.done - epoch
        f.spent_at_first = truth.spent_share(first.done)
    for r in errors:
        known = truth.known_room(r.sent)
        if known and truth.known_room(r.done):
            f.avoidable_known += 1
            if len(f.evidence) < 3:
                f.evidence.append(_avoidable_evidence(r, known, truth))
        if truth.any_room(r.sent) and truth.any_room(r.done):
            f.avoidable_truth += 1

    # 2 and 3. Upstream 429s, why the proxy sent them, attempts per client request.
    upstream = [e for e in truth.timeline if e["path"].startswith("/codex/responses")]
    f.upstream = len(upstream)
    f.upstream_429 = sum(1 for e in upstream if e["status"] == 429)
    causes: collections.Counter[str] = collections.Counter()
    stale_ms = []
    for e in upstream:
        if e["status"] != 429:
            continue
        cause, lag = _cause(e, truth, by_tag, spec.processes)
        causes[cause] += 1
        if lag is not None:
            stale_ms.append(lag * 1000)
    f.upstream_429_causes = dict(causes.most_common())
    f.stale_ms_p50 = statistics.median(stale_ms) if stale_ms else None
    per_request = collections.Counter(e["tag"] for e in upstream)
    f.attempts_max = max(per_request.values(), default=0)

    # 4. Stickiness, turn after turn of each thread. Its pin as the client can tell: the account
    # of its first turn, moved by a turn that went elsewhere while the pin had room in truth; a
    # turn that went elsewhere while it had none is a detour, and the pin stays (CONTRACT §7).
    last: dict[int, Sent] = {}
    pins: dict[int, str] = {}
    by_name = {a.name: a for a in truth.accounts}
    for r in sorted(sent, key=lambda r: r.sent):
        if r.status != 200 or r.account is None:
            continue
        previous = last.get(r.thread)
        last[r.thread] = r
        pin = pins.setdefault(r.thread, r.account)
        if r.account != pin and by_name[pin].room(r.sent):
            pins[r.thread] = r.account
        if previous is None or previous.account is None:
            continue
        if by_name[previous.account].room(r.sent):
            f.sticky_eligible += 1
            if r.account == previous.account:
                f.sticky_kept += 1
            elif r.account == pin:
                # Back on its pin after a detour: the contract's "used again once it recovers".
                f.sticky_returns += 1

    # 5. Refusals while no account had room.
    refusal_ms = []
    late = []
    for r in errors:
        if truth.any_room(r.sent) or truth.any_room(r.done):
            continue
        f.pool_out_errors += 1
        if r.status != 429 or r.code != "usage_limit_reached":
            continue
        f.pool_out_429 += 1
        refusal_ms.append((r.done - r.sent) * 1000)
        if r.resets_at is None:
            continue
        real = truth.earliest_regain(r.done)
        if abs(r.resets_at - real) <= RESETS_AT_SLACK:
            f.resets_exact += 1
        elif r.resets_at > real:
            f.resets_late += 1
            late.append(r.resets_at - real)
        else:
            f.resets_early += 1
    if refusal_ms:
        f.refusal_ms_p50 = percentile(refusal_ms, 50)
        f.refusal_ms_max = max(refusal_ms)
    f.resets_late_s_max = max(late) if late else None
    return f


def _cause(
    event: dict[str, Any], truth: Truth, by_tag: dict[str, Sent], processes: int
) -> tuple[str, float | None]:
    """Why an upstream 429 was sent: nothing known about the account yet (``first``), its last
    answer said room and others spent it meanwhile (``raced``), or its last answer had already
    said it was out (``stale``: on the same process, or learned on ``another`` process). An
    answer counts as known once ``IN_TRANSIT`` s old (it must reach the proxy before a pick)."""
    last = truth.last_answer(event["account_id"], event["time"] - IN_TRANSIT)
    if last is None:
        return "first", None
    if last.room(event["time"]):
        return "raced", None
    mine = by_tag.get(event["tag"] or "")
    theirs = by_tag.get(last.tag or "")
    where = "same" if processes == 1 else "?"
    if mine is not None and theirs is not None:
        where = "same" if mine.process == theirs.process else "another"
    return f"stale:{where}", event["time"] - last.at


def _avoidable_evidence(record: Sent, known: list[str], truth: Truth) -> str:
    """A line on a client error while accounts had room as far as the proxy could know."""
    at = record.done
    parts = []
    for name in known[:3]:
        last = truth.last_answer(name, at)
        account = next(a for a in truth.accounts if a.name == name)
        if last is None:
            said = "never answered"
        else:
            full = []
            if last.short_full:
                full.append(f"short full until {last.short_end - truth.epoch:+.0f}s")
            if last.weekly_full:
                full.append(f"weekly full until {last.weekly_end - truth.epoch:+.0f}s")
            said = f"last answer {1000 * (at - last.at):.0f} ms before: " + (
                ", ".join(full) + " (passed)" if full else "room"
            )
        parts.append(f"{name} ({said}; truly {account.usable(at):.0f} usable)")
    return (
        f"t={at - truth.epoch:.2f}s {record.status} {record.code} after "
        f"{1000 * (record.done - record.sent):.0f} ms; known room: " + "; ".join(parts)
    )


# --- output -------------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _mark(ok: bool) -> str:
    return "" if ok else " !"


def _rows(results: Iterable[Figures]) -> list[list[str]]:
    rows = []
    for f in results:
        ok = f.passes()
        errors = sum(f.errors.values())
        rows.append(
            [
                f.label,
                str(f.clients),
                str(f.ok),
                str(errors),
                _num(f.first_error_s),
                _num(f.spent_at_first, suffix="%") + _mark(ok["spent"]),
                f"{f.avoidable_known}/{f.avoidable_truth}" + _mark(ok["avoidable"]),
                f"{f.upstream_429_percent:.1f}%" + _mark(ok["upstream_429"]),
                _num(f.attempts, ".3f") + _mark(ok["attempts"]),
                f"{_num(f.sticky_percent, '.1f', '%')}/"
                f"{_num(f.sticky_previous_percent, '.1f', '%')} ({f.sticky_eligible})"
                + _mark(ok["sticky"]),
                f"{_num(f.refusal_ms_p50)}/{_num(f.refusal_ms_max)}" + _mark(ok["refusal_ms"]),
                f"{f.resets_exact}/{f.pool_out_errors}" + _mark(ok["resets_at"]),
                f"{f.spent_units}/{f.wasted_units:.0f}",
            ]
        )
    return rows


HEADERS = [
    "run",
    "client",
    "ok",
    "err",
    "1st err s",
    "spent@1st",
    "avoid kn/tr",
    "up 429",
    "att/req",
    "sticky/prev (n)",
    "out429 p50/max ms",
    "resets ok/out",
    "spent/wasted",
]


Measure = Callable[[Figures], float | None]


def _checks(results: list[Figures]) -> list[Check]:
    """One check per figure: the worst run (among those where it was measured) and how many
    runs missed the target."""

    def worst(name: str, target: str, key: str, value: Measure, lowest: bool) -> Check:
        measured = [(v, f) for f in results if (v := value(f)) is not None]
        failed = [f.label for f in results if not f.passes()[key]]
        if not measured:
            return Check(NAME, name, target, "not measured", not failed)
        chosen = min(measured, key=lambda m: m[0]) if lowest else max(measured, key=lambda m: m[0])
        shown = f"{chosen[0]:.3g} ({chosen[1].label})"
        if failed:
            shown += f"; {len(failed)}/{len(results)} runs miss"
        return Check(NAME, name, target, shown, not failed)

    def sticky(f: Figures) -> float | None:
        return f.sticky_percent if f.spec["sticky"] else None

    return [
        worst(
            "capacity spent when the first 429/503 came, %",
            f">= {TARGET_SPENT_PERCENT:g} %",
            "spent",
            lambda f: f.spent_at_first,
            lowest=True,
        ),
        worst(
            "client errors while an account had known room",
            "0",
            "avoidable",
            lambda f: f.avoidable_known,
            lowest=False,
        ),
        worst(
            "upstream 429s / upstream requests, %",
            f"<= {TARGET_UPSTREAM_429_PERCENT:g} %",
            "upstream_429",
            lambda f: f.upstream_429_percent,
            lowest=False,
        ),
        worst(
            "upstream requests / client request",
            f"<= {TARGET_ATTEMPTS:g}",
            "attempts",
            lambda f: f.attempts,
            lowest=False,
        ),
        worst(
            "sticky turns kept while the account had room (or back on the recovered pin), %",
            f">= {TARGET_STICKY_PERCENT:g} %",
            "sticky",
            sticky,
            lowest=True,
        ),
        worst(
            "pool-out 429 latency p50, ms",
            f"<= {TARGET_REFUSAL_MS:g} ms",
            "refusal_ms",
            lambda f: f.refusal_ms_p50,
            lowest=False,
        ),
        worst(
            "pool-out refusals: 429 with the earliest real resets_at, %",
            "100 %",
            "resets_at",
            lambda f: f.resets_honest,
            lowest=True,
        ),
    ]


# --- the benchmark ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Check]:
    specs = _specs(args)
    if args.duration <= 0 or args.load <= 0 or args.threads < 1 or args.scale < 1:
        raise BenchError("--duration, --load, --threads and --scale must be positive")
    if not 0 <= args.start_used <= 1:
        raise BenchError("--start-used is a share, 0..1")
    if args.accounts not in POOL_SIZES:
        raise BenchError(f"--accounts: {POOL_SIZES.start}..{POOL_SIZES.stop - 1}")
    members = pool_of(args.accounts, args.start_used)
    capacity = sum(m.capacity * args.scale for m in members)
    rate = args.load * capacity / WINDOW_SECONDS
    heading(
        f"{NAME}: {len(members)} accounts "
        f"({', '.join(str(m.capacity * args.scale) for m in members)} "
        f"units / {WINDOW_SECONDS} s window, weekly x{WEEKLY_FACTOR} / {WEEKLY_WINDOW_SECONDS} s, "
        f"{args.start_used:.0%} used at the start), {rate:.2f} req/s = {args.load:g} x capacity, "
        f"{args.threads} threads, {args.duration:g} s a run, {len(specs)} runs"
    )
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    results: list[Figures] = []
    with running_fake() as fake:
        for spec in specs:
            started = time.monotonic()
            sent, skipped, snapshot = _run_one(spec, fake, args)
            truth = Truth(snapshot)
            result = figures(spec, rate, sent, skipped, truth)
            results.append(result)
            print(
                f"  {spec.label}: {result.clients} requests, {result.ok} ok, "
                f"{time.monotonic() - started:.1f} s",
                flush=True,
            )
            if args.dump is not None:
                name = spec.label.replace(" ", "_").replace("+", "-")
                (args.dump / f"{name}.json").write_text(
                    json.dumps({"sent": [asdict(r) for r in sent], "truth": snapshot})
                )
    print(table(HEADERS, _rows(results)))
    print(
        "avoid kn/tr: client errors while an account had room as its last answer said / in "
        "truth; sticky/prev: kept turns, a return to a recovered pin counted kept / a miss; "
        "out429: 429s while no account had room; resets ok/out: those with the earliest "
        "real resets_at / all errors while none had room; spent/wasted: units spent, units that "
        "expired unspent (weekly room permitting); ! misses its target"
    )
    print("errors and upstream 429 causes (first: account never answered yet; raced: its last")
    print("answer said room, concurrent requests spent it; stale: its last answer said out):")
    for f in results:
        causes = ", ".join(f"{k} {v}" for k, v in f.upstream_429_causes.items()) or "-"
        errors = ", ".join(f"{k}: {v}" for k, v in f.errors.items()) or "-"
        stale = _num(f.stale_ms_p50, ".0f", " ms")
        print(
            f"  {f.label}: errors {errors}; upstream {f.upstream} ({f.upstream_429} 429: {causes}; "
            f"stale by p50 {stale}); max attempts {f.attempts_max}; ticks skipped {f.skipped}; "
            f"turns back on a recovered pin {f.sticky_returns}"
        )
        for line in f.evidence:
            print(f"    avoidable: {line}")
    payload = {
        "benchmark": NAME,
        "config": {
            "accounts": [asdict(m) for m in members],
            "scale": args.scale,
            "start_used": args.start_used,
            "load": args.load,
            "rate": rate,
            "duration": args.duration,
            "threads": args.threads,
            "delay": args.delay,
            "stream": args.stream,
        },
        "runs": [
            {
                **{k: v for k, v in asdict(f).items() if k != "evidence"},
                "upstream_429_percent": f.upstream_429_percent,
                "attempts": f.attempts,
                "sticky_percent": f.sticky_percent,
                "sticky_previous_percent": f.sticky_previous_percent,
                "resets_honest_percent": f.resets_honest,
                "passes": f.passes(),
            }
            for f in results
        ],
    }
    print(json.dumps(payload, separators=(",", ":")))
    checks = _checks(results)
    for check in checks:
        print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return checks
