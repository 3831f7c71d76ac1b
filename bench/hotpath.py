"""Redis commands per request on the hot path: reading settings must not touch Redis.

One serve process on a dedicated Redis. ``INFO commandstats`` is read before and after at least
N requests (for at least ``MIN_WINDOW_SECONDS``), and again after an idle window of the same
length as a control for the background traffic (heartbeat, reconcile of every live copy). The
requests' own cost is the difference. Two routes:

* GET /health/ready, served from the live settings copy (it returns ``settings_version``);
* GET /v1/models with a Bearer key while ``api_key_auth_enabled`` is on: the proxy's API-key
  gate reads the setting and checks the key against the live copies, then (no accounts are
  imported) answers 503 ``no_accounts`` without any upstream call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import httpx
import redis

from bench.common import (
    BenchError,
    Check,
    cluster,
    command_delta,
    commandstats,
    expect,
    heading,
    login,
    session_client,
    table,
)

NAME = "hotpath"
SUMMARY = "Redis commands per request on settings-reading routes, vs an idle control"
TARGET_PER_REQUEST = 0.01
SETTLE_SECONDS = 1.5
# Each window lasts at least this long: the background rounds (one reconcile and one heartbeat
# a second) then fall evenly into both windows, give or take one, and that one is spread over
# many requests instead of deciding the figure.
MIN_WINDOW_SECONDS = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="at least this many requests per route, for at least 4 s (default 1000)",
    )


def _enable_keys(base_url: str) -> str:
    """Turn API-key auth on and return a fresh key."""
    with session_client(base_url, login(base_url)) as admin:
        key: str = expect(admin.post("/api/api-keys", json={"name": "bench"}), 201).json()["key"]
        body = {
            "sticky_threads_enabled": True,
            "prefer_earlier_reset_accounts": False,
            "api_key_auth_enabled": True,
        }
        expect(admin.put("/api/settings?wait=true", json=body))
    return key


def _measure(
    route: str, send: Callable[[], httpx.Response], requests: int, stats: redis.Redis
) -> Check:
    send()
    s0 = commandstats(stats)
    started = time.perf_counter()
    sent = 0
    while sent < requests or time.perf_counter() - started < MIN_WINDOW_SECONDS:
        send()
        sent += 1
    requests = sent
    window = time.perf_counter() - started
    s1 = commandstats(stats)
    time.sleep(window)
    s2 = commandstats(stats)

    busy, idle = command_delta(s0, s1), command_delta(s1, s2)
    names = sorted(n for n in set(busy) | set(idle) if busy.get(n, 0) or idle.get(n, 0))
    rows = [
        [n, str(busy.get(n, 0)), str(idle.get(n, 0)), str(busy.get(n, 0) - idle.get(n, 0))]
        for n in names
    ]
    total_busy, total_idle = sum(busy.values()), sum(idle.values())
    rows.append(["total", str(total_busy), str(total_idle), str(total_busy - total_idle)])
    print(f"\n{route}: window {window * 1000:.0f} ms each ({requests / window:.0f} requests/s)")
    print(table(["command (calls)", "with requests", "idle", "difference"], rows))
    per_request = (total_busy - total_idle) / requests
    print(f"Redis commands per request: ({total_busy} - {total_idle}) / {requests}", end="")
    print(f" = {per_request:.4f}")
    check = Check(
        NAME,
        f"Redis commands per {route}",
        f"<= {TARGET_PER_REQUEST:g} (0 expected)",
        f"{per_request:.4f}",
        per_request <= TARGET_PER_REQUEST,
    )
    print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return check


def run(args: argparse.Namespace) -> list[Check]:
    requests: int = args.requests
    if requests < 1:
        raise BenchError("--requests must be at least 1")
    heading(f"{NAME}: Redis commands during {requests} requests per route vs an idle window")
    print("(the benchmark's own INFO calls are left out)")
    with cluster(1) as c:
        key = _enable_keys(c.serves[0].url)
        # Let start-up traffic (first sync, first heartbeat, the settings change) finish.
        time.sleep(SETTLE_SECONDS)
        stats = c.redis.client()
        try:
            stats.ping()
            with httpx.Client(base_url=c.serves[0].url, timeout=10.0) as http:

                def ready() -> httpx.Response:
                    return expect(http.get("/health/ready"))

                def models() -> httpx.Response:
                    headers = {"Authorization": f"Bearer {key}"}
                    response = expect(http.get("/v1/models", headers=headers), 503)
                    if response.json()["error"]["code"] != "no_accounts":
                        raise BenchError(f"/v1/models: {response.text[:200]}")
                    return response

                checks = [
                    _measure("GET /health/ready", ready, requests, stats),
                    _measure("GET /v1/models (API-key gate)", models, requests, stats),
                ]
        finally:
            stats.close()
    return checks
