"""Redis commands per request on the hot path: reading settings must not touch Redis.

One serve process on a dedicated Redis. ``INFO commandstats`` is read before and after N
requests to GET /health/ready (served from the process's live settings copy: it returns
``settings_version``), and again after an idle window of the same length as a control for the
background traffic (heartbeat, reconcile). The requests' own cost is the difference.
"""

from __future__ import annotations

import argparse
import time

import httpx
import redis

from bench.common import BenchError, Check, cluster, expect, heading, table

NAME = "hotpath"
SUMMARY = "Redis commands per GET /health/ready (live settings copy), vs an idle control"
TARGET_PER_REQUEST = 0.01
SETTLE_SECONDS = 1.5
# Our own INFO calls land in the windows too; they are the measurement, not the service.
OWN_COMMANDS = frozenset({"info"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--requests", type=int, default=1000, help="GET /health/ready requests (default 1000)"
    )


def _commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(entry["calls"])
        for name, entry in stats.items()
        if isinstance(entry, dict)
    }


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    names = set(before) | set(after)
    return {n: after.get(n, 0) - before.get(n, 0) for n in names if n not in OWN_COMMANDS}


def run(args: argparse.Namespace) -> list[Check]:
    requests: int = args.requests
    if requests < 1:
        raise BenchError("--requests must be at least 1")
    heading(f"{NAME}: Redis commands during {requests} GET /health/ready vs an idle window")
    with cluster(1) as c:
        # Let start-up traffic (first sync, first heartbeat, bootstrap token) finish.
        time.sleep(SETTLE_SECONDS)
        stats_client = c.redis.client()
        try:
            stats_client.ping()
            with httpx.Client(base_url=c.serves[0].url, timeout=10.0) as http:
                expect(http.get("/health/ready"))
                s0 = _commandstats(stats_client)
                started = time.perf_counter()
                versions: set[int | None] = set()
                for _ in range(requests):
                    versions.add(expect(http.get("/health/ready")).json()["settings_version"])
                window = time.perf_counter() - started
                s1 = _commandstats(stats_client)
                time.sleep(window)
                s2 = _commandstats(stats_client)
        finally:
            stats_client.close()
    if None in versions:
        raise BenchError("/health/ready reported no settings_version")

    busy, idle = _delta(s0, s1), _delta(s1, s2)
    names = sorted(n for n in set(busy) | set(idle) if busy.get(n, 0) or idle.get(n, 0))
    rows = [
        [n, str(busy.get(n, 0)), str(idle.get(n, 0)), str(busy.get(n, 0) - idle.get(n, 0))]
        for n in names
    ]
    total_busy, total_idle = sum(busy.values()), sum(idle.values())
    rows.append(["total", str(total_busy), str(total_idle), str(total_busy - total_idle)])
    print(
        f"window: {window * 1000:.0f} ms each ({requests / window:.0f} requests/s in the busy one)"
    )
    print(table(["command (calls)", "with requests", "idle", "difference"], rows))
    per_request = (total_busy - total_idle) / requests
    print(f"Redis commands per request: ({total_busy} - {total_idle}) / {requests}", end="")
    print(f" = {per_request:.4f}")
    seen = ", ".join(str(v) for v in versions)
    print(f"(the benchmark's own INFO calls are left out; settings_version seen: {seen})")
    check = Check(
        NAME,
        "Redis commands per GET /health/ready",
        f"<= {TARGET_PER_REQUEST:g} (0 expected)",
        f"{per_request:.4f}",
        per_request <= TARGET_PER_REQUEST,
    )
    print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return [check]
