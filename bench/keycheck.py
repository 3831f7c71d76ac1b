"""The proxy gate's API-key check, in process: ``LiveApiKeys.check_key`` over 10,000 keys.

The keys are made the way the service makes them: ``create_key`` through an ``ApiKeyStore``
on a private redis-server (one is then deactivated with ``patch``), and a ``LiveApiKeys`` copy
loads them with ``sync()``. No HTTP: the timed loops call ``check_key`` directly, in batches
timed with ``time.perf_counter_ns``, for a valid key, an unknown well-formed key and the
deactivated key (and, for reference, a string without the key prefix and an empty function,
the loop's own floor). ``INFO commandstats`` before and after the timed loops shows they sent
Redis nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import (
    BenchError,
    Check,
    command_delta,
    commandstats,
    heading,
    percentile,
    table,
)
from service.api_keys.domain import KEY_PREFIX, create_key
from service.api_keys.live import LiveApiKeys
from service.api_keys.schemas import ApiKeyCreate, ApiKeyCreated
from service.api_keys.store import ApiKeyRecord, ApiKeyStore
from service.core.connection import Connection, connect
from tests.support import RedisServer

NAME = "keycheck"
SUMMARY = "LiveApiKeys.check_key over 10,000 keys, in process: ns per check, Redis commands"
TARGET_US = 5.0
CREATE_CONCURRENCY = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--keys", type=int, default=10_000, help="keys in the copy (default 10000)")
    group.add_argument(
        "--checks", type=int, default=200_000, help="timed checks per key kind (default 200000)"
    )
    group.add_argument(
        "--batch", type=int, default=1000, help="checks per timed batch (default 1000)"
    )


@dataclass
class Series:
    label: str
    batch_ns: list[float]  # mean ns per call of each batch
    total_ns: int
    calls: int
    answer: str
    target: bool  # counted against the target (the reference rows are not)

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.calls

    @property
    def p99_ns(self) -> float:
        return percentile(self.batch_ns, 99)


def _time(
    label: str, check: Callable[[str], object], key: str, checks: int, batch: int, target: bool
) -> Series:
    answer = check(key)
    for _ in range(batch):  # one untimed batch first
        check(key)
    batch_ns: list[float] = []
    total = 0
    clock = time.perf_counter_ns
    for _ in range(checks // batch):
        started = clock()
        for _ in range(batch):
            check(key)
        elapsed = clock() - started
        total += elapsed
        batch_ns.append(elapsed / batch)
    shown = answer.id if isinstance(answer, ApiKeyRecord) else repr(answer)
    return Series(label, batch_ns, total, len(batch_ns) * batch, shown, target)


@dataclass
class Setup:
    keys: int
    create_seconds: float
    sync_seconds: float
    version: int | None


async def _create_all(store: ApiKeyStore, count: int) -> list[ApiKeyCreated]:
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one(i: int) -> ApiKeyCreated:
        async with gate:
            return await create_key(store, ApiKeyCreate(name=f"bench-key-{i:05d}"))

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _measure(
    server: RedisServer, args: argparse.Namespace
) -> tuple[Setup, list[Series], dict[str, int]]:
    store = Connection(connect(server.url), f"bench:{uuid.uuid4().hex[:8]}:")
    stats_client = server.client()
    try:
        keys = ApiKeyStore(store)
        started = time.perf_counter()
        created = await _create_all(keys, args.keys)
        if len(created) > 1 and await keys.patch(created[1].id, {"is_active": False}) is None:
            raise BenchError("could not deactivate a key")
        create_seconds = time.perf_counter() - started

        live = LiveApiKeys(keys)
        started = time.perf_counter()
        await live.sync()
        sync_seconds = time.perf_counter() - started
        setup = Setup(len(created), create_seconds, sync_seconds, live.version)

        # Every key the store made is in the copy (and the deactivated one is refused).
        accepted = [c.id for c in created if live.check_key(c.key) is not None]
        expected = [c.id for i, c in enumerate(created) if i != 1]
        if accepted != expected:
            raise BenchError(f"the copy accepts {len(accepted)} of {len(expected)} live keys")

        valid = created[len(created) // 2].key
        unknown = KEY_PREFIX + secrets.token_urlsafe(32)
        check = live.check_key
        before = commandstats(stats_client)
        series = [
            _time("valid key", check, valid, args.checks, args.batch, True),
            _time("unknown key (well-formed)", check, unknown, args.checks, args.batch, True),
        ]
        if len(created) > 1:
            deactivated = created[1].key
            series.append(
                _time("deactivated key", check, deactivated, args.checks, args.batch, True)
            )
        series += [
            _time(
                "no sk-clb- prefix (reference)", check, "Bearer x", args.checks, args.batch, False
            ),
            _time("empty function (loop floor)", _nothing, valid, args.checks, args.batch, False),
        ]
        after = commandstats(stats_client)
        answers = [s.answer for s in series[:3]]
        if answers[0] != created[len(created) // 2].id or set(answers[1:]) != {"None"}:
            raise BenchError(f"check_key answered {answers} (valid, unknown, deactivated)")
    finally:
        stats_client.close()
        await store.close()
    return setup, series, command_delta(before, after)


def _nothing(key: str) -> None:
    return None


def run(args: argparse.Namespace) -> list[Check]:
    if args.keys < 1 or args.batch < 1 or args.checks < args.batch:
        raise BenchError("--keys and --batch must be at least 1, --checks at least --batch")
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server is not installed (scripts/install installs it as root)")
    heading(
        f"{NAME}: LiveApiKeys.check_key in process, {args.keys} keys, "
        f"{args.checks // args.batch * args.batch} timed checks per row in batches of {args.batch}"
    )
    server = RedisServer()
    try:
        server.start()
        setup, series, commands = asyncio.run(_measure(server, args))
    finally:
        server.stop()
    return _report(setup, series, commands)


def _report(setup: Setup, series: list[Series], commands: dict[str, int]) -> list[Check]:
    print(
        f"{setup.keys} keys created through ApiKeyStore in {setup.create_seconds:.2f} s "
        f"({CREATE_CONCURRENCY} at a time), one deactivated; LiveApiKeys.sync() loaded them in "
        f"{setup.sync_seconds * 1000:.1f} ms (version {setup.version})"
    )
    rows = [
        [
            s.label,
            str(s.calls),
            f"{s.mean_ns:.0f}",
            f"{percentile(s.batch_ns, 50):.0f}",
            f"{s.p99_ns:.0f}",
            f"{max(s.batch_ns):.0f}",
            s.answer,
        ]
        for s in series
    ]
    headers = ["check_key(...)", "calls", "mean ns", "p50 ns", "p99 ns", "max ns", "returns"]
    print(table(headers, rows))
    print("(p50/p99/max are over the batches' mean ns per call; the floor is included in all)")
    sent = {n: c for n, c in commands.items() if c}
    total = sum(sent.values())
    detail = ", ".join(f"{n} {c}" for n, c in sorted(sent.items())) or "none"
    print(f"Redis commands during the timed loops (INFO left out): {total} ({detail})")

    checks = [
        Check(
            NAME,
            f"check_key, {s.label}: p99 of batch means",
            f"<= {TARGET_US:g} us",
            f"{s.p99_ns / 1000:.3f} us (mean {s.mean_ns / 1000:.3f})",
            s.p99_ns <= TARGET_US * 1000,
        )
        for s in series
        if s.target
    ]
    checks.append(
        Check(NAME, "Redis commands during the timed checks", "0", str(total), total == 0)
    )
    for check in checks:
        print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return checks
