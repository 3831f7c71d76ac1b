"""Request latency of the settings routes: one serve process, one keep-alive client, loopback.

Sequential GET /api/settings and PUT /api/settings (each after warm-up requests of its own
kind); GET /health/live, which touches neither Redis nor the session, is measured the same way
as the floor of the HTTP stack and the client.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import httpx

from bench.common import (
    SUMMARY_HEADERS,
    BenchError,
    Check,
    cluster,
    expect,
    heading,
    login,
    ms,
    percentile,
    session_client,
    summary_row,
    table,
)

NAME = "latency"
SUMMARY = "GET/PUT /api/settings latency, one process, one keep-alive client"
TARGET_GET_P50_MS = 2.0
TARGET_PUT_P50_MS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--gets", type=int, default=1000, help="timed GETs (default 1000)")
    group.add_argument("--puts", type=int, default=500, help="timed PUTs (default 500)")
    group.add_argument(
        "--warmup", type=int, default=50, help="untimed requests before each series (default 50)"
    )


def _series(send: Callable[[int], httpx.Response], warmup: int, count: int) -> list[float]:
    for i in range(warmup):
        expect(send(i))
    timings: list[float] = []
    for i in range(count):
        started = time.perf_counter()
        response = send(warmup + i)
        timings.append((time.perf_counter() - started) * 1000)
        expect(response)
    return timings


def run(args: argparse.Namespace) -> list[Check]:
    if args.gets < 1 or args.puts < 1 or args.warmup < 0:
        raise BenchError("--gets and --puts must be at least 1, --warmup at least 0")
    heading(
        f"{NAME}: 1 serve process, sequential requests over one keep-alive client "
        f"({args.warmup} warm-up requests before each series)"
    )
    with cluster(1) as c:
        token = login(c.serves[0].url)
        with session_client(c.serves[0].url, token) as client:
            version_before = int(expect(client.get("/api/settings")).json()["version"])
            live = _series(lambda i: client.get("/health/live"), args.warmup, args.gets)
            gets = _series(lambda i: client.get("/api/settings"), args.warmup, args.gets)
            puts = _series(
                lambda i: client.put(
                    "/api/settings",
                    json={
                        "sticky_threads_enabled": True,
                        "prefer_earlier_reset_accounts": i % 2 == 1,
                    },
                ),
                args.warmup,
                args.puts,
            )
            version_after = int(expect(client.get("/api/settings")).json()["version"])
    written = version_after - version_before
    if written != args.warmup + args.puts:
        raise BenchError(f"{args.warmup + args.puts} PUTs but the version moved by {written}")

    print(
        table(
            SUMMARY_HEADERS,
            [
                summary_row("GET /api/settings", gets),
                summary_row("PUT /api/settings", puts),
                summary_row("GET /health/live (floor)", live),
            ],
        )
    )
    floor = percentile(live, 50)
    print(
        f"over the floor (p50): GET {percentile(gets, 50) - floor:+.3f} ms,"
        f" PUT {percentile(puts, 50) - floor:+.3f} ms; the floor itself is HTTP, TCP and client"
    )
    checks = [
        Check(
            NAME,
            "GET /api/settings p50",
            f"<= {TARGET_GET_P50_MS:g} ms",
            f"{ms(percentile(gets, 50))} ms",
            percentile(gets, 50) <= TARGET_GET_P50_MS,
        ),
        Check(
            NAME,
            "PUT /api/settings p50",
            f"<= {TARGET_PUT_P50_MS:g} ms",
            f"{ms(percentile(puts, 50))} ms",
            percentile(puts, 50) <= TARGET_PUT_P50_MS,
        ),
    ]
    for check in checks:
        print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return checks
