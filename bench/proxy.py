"""The streaming proxy against the fake upstream, all in one run (the machine is noisy: the
proxy is always compared with the direct path measured alongside it).

One ``codex-lb serve --workers 1`` process on a dedicated Redis, its upstream and auth URLs on a
fake upstream process (``tests/fake_upstream.py``, recording off, answering at once with the
default 5 deltas), three accounts imported. The load generator is this process: one aiohttp
session, a closed loop of N workers, each sending ``POST /backend-api/codex/responses`` (no
``session_id`` header, no ``prompt_cache_key``, no API key: keyless from loopback) or the same
body straight to the fake's ``/codex/responses`` with an account's headers ("direct").

1. TTFE (request sent -> first ``event:`` bytes) at concurrency 1, 8, 32: ``--rounds`` rounds
   of direct then proxy, ``--seconds`` each after a short untimed warm-up; p50/p99 of both and
   the added time (proxy minus direct at the same percentile).
2. Throughput at concurrency 32: the requests completed in those c32 runs over their time.
3. The balancer alone (``bench/proxy_pick.py``): ``pick`` and ``Pool.build`` at 10, 100 and
   1,000 accounts, no network.
4. Redis commands per proxied request (``INFO commandstats``): a busy window of at least
   4 s at concurrency 8, then an idle window as long, as the control for the background
   traffic (heartbeats, reconcile); three settings cases. On the request's path: ``getex`` (the
   thread's pin) and ``incr`` (the round-robin turn); the rest (the hot-state learn script and
   what it runs, ``set`` of new pins) is written in the background.
5. The serve worker's VmRSS after ``--warmup`` proxied requests, and again once ``--requests``
   more went through it (those of 1 and 4 count; a c32 run sends the rest).

Over every run the CPU time (user + system, from /proc) of the worker, the fake, redis-server
and this process is taken too: CPU ms per request shows where the machine's time goes, and how
busy the worker was (one worker is one core at most). Other load on the machine shows up as a
worker less than fully busy while the loop is still waiting on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
import uuid
from typing import Any

import aiohttp
import redis

from bench import proxy_pick
from bench.common import (
    BenchError,
    Check,
    Cluster,
    Serve,
    cluster,
    command_delta,
    commandstats,
    expect,
    heading,
    login,
    session_client,
)
from bench.proxy_load import (
    Load,
    Target,
    closed_loop,
    fake_upstream,
    new_session,
    rss_kb,
    serving_pid,
    thin_passthrough,
)
from bench.proxy_report import Figures, RedisCase, report
from tests.fake_upstream import FakeUpstream
from tests.proxy_support import IMPORT, RESPONSES, body, ids_by_name

NAME = "proxy"
SUMMARY = "streaming proxy vs direct: TTFE, req/s, balancer pick, Redis per request, memory"
LEVELS = (1, 8, 32)
ACCOUNTS = ("bench-a", "bench-b", "bench-c")
REDIS_CONCURRENCY = 8
TOPUP_CONCURRENCY = 32
SETTLE_SECONDS = 1.5
MIN_WINDOW_SECONDS = 4.0
READY_TIMEOUT_SECONDS = 10.0
# (label, routing_strategy, a new session_id header on every request)
REDIS_CASES = (
    ("usage_weighted, no thread id", "usage_weighted", False),
    ("round_robin, no thread id", "round_robin", False),
    ("round_robin, new session_id each", "round_robin", True),
)
PART_NAME = "auth_json"  # the multipart field of POST /api/accounts/import
JSON_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="timed seconds per target, round and concurrency level (default 2)",
    )
    group.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of direct then proxy per concurrency level (default 3)",
    )
    group.add_argument(
        "--requests",
        type=int,
        default=100_000,
        help="proxied requests between the two RSS readings (default 100000)",
    )
    group.add_argument(
        "--warmup",
        type=int,
        default=3000,
        help="proxied requests before the first RSS reading (default 3000)",
    )


# --- the network part ---------------------------------------------------------------------------


class Runner:
    """Runs loads on one session, counting every proxied request and every error."""

    def __init__(self, session: aiohttp.ClientSession, figures: Figures, watch: dict[str, int]):
        self.session = session
        self.figures = figures
        self.watch = watch
        self.payload = json.dumps(body("Say hello.")).encode()

    async def load(
        self,
        target: Target,
        concurrency: int,
        *,
        seconds: float = math.inf,
        requests: int | None = None,
    ) -> Load:
        result = await closed_loop(
            self.session,
            target,
            self.payload,
            concurrency,
            seconds=seconds,
            requests=requests,
            watch=self.watch,
        )
        if target.label == "direct":
            self.figures.direct_errors.update(result.errors)
        else:
            self.figures.proxied += result.sent
            self.figures.proxy_errors.update(result.errors)
        return result


def _settings(base_url: str, token: str, strategy: str) -> None:
    with session_client(base_url, token, timeout=30.0) as admin:
        wanted = {
            "sticky_threads_enabled": True,
            "prefer_earlier_reset_accounts": False,
            "routing_strategy": strategy,
        }
        expect(admin.put("/api/settings?wait=true", json=wanted))


async def _until_served(runner: Runner, proxy: Target) -> None:
    """The imported accounts reach the worker's live copy shortly after the import."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        result = await closed_loop(runner.session, proxy, runner.payload, 1, requests=1)
        if result.ok:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the proxy did not serve: {dict(result.errors)}")
        await asyncio.sleep(0.1)


async def _redis_case(
    runner: Runner, proxy: Target, stats: redis.Redis, label: str, fresh_threads: bool
) -> RedisCase:
    target = proxy
    if fresh_threads:

        def headers(i: int) -> dict[str, str]:
            return {**JSON_HEADERS, "session_id": f"bench-{uuid.uuid4().hex}"}

        target = Target("proxy", proxy.url, headers)
    await runner.load(target, REDIS_CONCURRENCY, requests=4 * REDIS_CONCURRENCY)
    await asyncio.sleep(SETTLE_SECONDS)
    s0 = commandstats(stats)
    busy = await runner.load(target, REDIS_CONCURRENCY, seconds=MIN_WINDOW_SECONDS)
    s1 = commandstats(stats)
    await asyncio.sleep(busy.seconds)
    s2 = commandstats(stats)
    return RedisCase(label, busy.sent, command_delta(s0, s1), command_delta(s1, s2), busy.seconds)


async def _network(
    args: argparse.Namespace,
    c: Cluster,
    token: str,
    fake: FakeUpstream,
    docs: dict[str, dict[str, Any]],
    stats: redis.Redis,
) -> Figures:
    figures = Figures()
    serve = c.serves[0]
    figures.pid = serving_pid(serve.proc.pid)
    if fake.process is None or c.redis.proc is None:
        raise BenchError("the fake upstream or redis-server is not running")
    watch = {
        "worker": figures.pid,
        "fake": fake.process.pid,
        "redis": c.redis.proc.pid,
        "client": os.getpid(),
    }
    # Direct requests carry what the proxy sends for an account: its token and account id.
    direct_headers = [
        {
            **JSON_HEADERS,
            "authorization": f"Bearer {doc['tokens']['access_token']}",
            "chatgpt-account-id": name,
        }
        for name, doc in docs.items()
    ]
    proxy = Target("proxy", serve.url + RESPONSES, lambda i: JSON_HEADERS)
    direct = Target(
        "direct", fake.url + "/codex/responses", lambda i: direct_headers[i % len(direct_headers)]
    )
    with thin_passthrough(fake.url) as (thin_url, thin_pid):
        watch["thin"] = thin_pid
        thin = Target("thin", thin_url + RESPONSES, direct.headers)
        return await _measure(args, c, token, fake, stats, figures, watch, (direct, proxy, thin))


async def _measure(
    args: argparse.Namespace,
    c: Cluster,
    token: str,
    fake: FakeUpstream,
    stats: redis.Redis,
    figures: Figures,
    watch: dict[str, int],
    targets: tuple[Target, Target, Target],
) -> Figures:
    direct, proxy, thin = targets
    serve = c.serves[0]
    async with new_session() as session:
        runner = Runner(session, figures, watch)
        await _until_served(runner, proxy)
        if args.warmup:
            await runner.load(direct, 32, requests=min(args.warmup, 1000))
            await runner.load(proxy, 32, requests=args.warmup)
        figures.rss_before_kb = rss_kb(figures.pid)
        counted_from = figures.proxied

        for level in LEVELS:
            got = {"direct": Load(), "proxy": Load(), "thin": Load()}
            for _ in range(args.rounds):
                for target in (direct, proxy, thin):
                    await runner.load(target, level, requests=4 * level + 20)
                    got[target.label].add(await runner.load(target, level, seconds=args.seconds))
            figures.levels[level] = got

        for label, strategy, fresh in REDIS_CASES:
            _settings(serve.url, token, strategy)
            figures.redis.append(await _redis_case(runner, proxy, stats, label, fresh))
        _settings(serve.url, token, "usage_weighted")

        remaining = args.requests - (figures.proxied - counted_from)
        if remaining > 0:
            await runner.load(proxy, TOPUP_CONCURRENCY, requests=remaining)
        await asyncio.sleep(1.0)  # the learner's last round, the pins' writes
        figures.rss_after_kb = rss_kb(figures.pid)
        figures.counted = figures.proxied - counted_from
    figures.fake_stats = fake.stats()
    return figures


def import_accounts(base_url: str, token: str, fake: FakeUpstream) -> dict[str, dict[str, Any]]:
    """Import the accounts (their refresh tokens made known to the fake); their auth.json."""
    docs = {name: fake.auth_json(name, email=f"{name}@example.com", tag=name) for name in ACCOUNTS}
    files = [
        (PART_NAME, (f"{name}.json", json.dumps(doc).encode(), "application/json"))
        for name, doc in docs.items()
    ]
    with session_client(base_url, token, timeout=30.0) as admin:
        reply = expect(admin.post(IMPORT, files=files)).json()
    if sorted(ids_by_name(reply)) != sorted(ACCOUNTS):
        raise BenchError(f"import: {reply}")
    return docs


def _warnings(serve: Serve) -> list[str]:
    lines = serve.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if " WARNING " in line or " ERROR " in line]


def run(args: argparse.Namespace) -> list[Check]:
    if args.seconds <= 0 or args.rounds < 1 or args.requests < 1 or args.warmup < 0:
        raise BenchError("--seconds, --rounds and --requests must be positive, --warmup >= 0")
    heading(
        f"{NAME}: one serve worker vs the fake upstream direct, {len(ACCOUNTS)} accounts, "
        f"c{'/c'.join(map(str, LEVELS))} x {args.rounds} rounds x {args.seconds:g} s each; "
        f"RSS over {args.requests} proxied requests"
    )
    picks = proxy_pick.measure()
    with fake_upstream() as fake:
        env = {"CODEX_LB_UPSTREAM_BASE_URL": fake.url, "CODEX_LB_AUTH_BASE_URL": fake.url}
        with cluster(1, extra_env=env) as c:
            serve = c.serves[0]
            token = login(serve.url)
            docs = import_accounts(serve.url, token, fake)
            stats = c.redis.client()
            try:
                figures = asyncio.run(_network(args, c, token, fake, docs, stats))
            finally:
                stats.close()
            figures.log_lines = _warnings(serve)
    return report(NAME, figures, picks)
