"""How fast a settings change reaches every process of a deployment.

N serve processes share one Redis. Each change is a PUT /api/settings (sent to the processes
in turn) toggling ``prefer_earlier_reset_accounts``; then GET /api/settings/propagation is
polled on one process until every live process reports the new version. Two figures per change:

(a) commit -> all applied: from the version's ``changed_at`` (history) to the latest
    ``applied_at`` of any process (propagation view): the lag the processes themselves record.
(b) PUT response -> all reporting: client wall time from the PUT response to the first poll
    showing every process at the new version (includes the heartbeat write and the poll itself).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import (
    SUMMARY_HEADERS,
    BenchError,
    Check,
    cluster,
    epoch,
    expect,
    heading,
    login,
    ms,
    percentile,
    session_client,
    summary_row,
    table,
)

NAME = "propagation"
SUMMARY = "settings change -> every process applied it (pub/sub), N processes on one Redis"
TARGET_P99_MS = 50.0
HISTORY_BATCH = 500  # fetch history before it could trim versions we still need (keeps 1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--processes", type=int, default=8, help="serve processes (default 8)")
    group.add_argument(
        "--workers", type=int, default=1, help="--workers of each serve process (default 1)"
    )
    group.add_argument("--changes", type=int, default=200, help="settings changes (default 200)")
    group.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        help="seconds to wait for all processes to report a change (default 3)",
    )
    group.add_argument(
        "--poll-interval",
        type=float,
        default=0.0,
        help="sleep between propagation polls in seconds (default 0: poll tightly)",
    )


@dataclass
class Samples:
    commit_to_applied_ms: list[float] = field(default_factory=list)
    put_to_reporting_ms: list[float] = field(default_factory=list)
    per_process_lag_ms: list[float] = field(default_factory=list)
    poll_rtt_ms: list[float] = field(default_factory=list)
    polls_per_change: list[float] = field(default_factory=list)
    put_ms: list[float] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    # version -> applied_at of every process, read from the poll that showed all at it
    applied_at: dict[int, list[float]] = field(default_factory=dict)
    changed_at: dict[int, float] = field(default_factory=dict)


def _fetch_history(client: httpx.Client, samples: Samples) -> None:
    body = expect(client.get("/api/settings/history")).json()
    for change in body["changes"]:
        samples.changed_at[int(change["version"])] = epoch(change["changed_at"])


def _all_at(view: dict[str, Any], version: int, expected: int) -> bool:
    workers = view["workers"]
    for worker in workers:
        if worker["applied_version"] > version:
            raise BenchError(f"a process reports version {worker['applied_version']} > {version}")
    return len(workers) >= expected and all(w["applied_version"] == version for w in workers)


def _wait_workers(client: httpx.Client, expected: int, timeout: float) -> int:
    """Wait until the propagation view lists every process at the current version."""
    deadline = time.monotonic() + timeout
    while True:
        view = expect(client.get("/api/settings/propagation")).json()
        if _all_at(view, int(view["version"]), expected):
            return len(view["workers"])
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(view['workers'])} of {expected} processes registered")
        time.sleep(0.05)


def run(args: argparse.Namespace) -> list[Check]:
    processes: int = args.processes
    changes: int = args.changes
    timeout: float = args.timeout
    if processes < 1 or changes < 1 or args.workers < 1:
        raise BenchError("--processes, --workers and --changes must be at least 1")
    expected = processes * args.workers
    heading(f"{NAME}: {processes} serve processes x {args.workers} worker(s), {changes} changes")
    samples = Samples()
    with cluster(processes, workers=args.workers) as c:
        token = login(c.serves[0].url)
        clients = [session_client(s.url, token) for s in c.serves]
        poller = clients[0]
        try:
            live = _wait_workers(poller, expected, 10.0)
            flag = bool(expect(poller.get("/api/settings")).json()["prefer_earlier_reset_accounts"])
            for i in range(changes):
                flag = not flag
                body = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": flag}
                writer = clients[i % len(clients)]
                sent = time.perf_counter()
                response = expect(writer.put("/api/settings", json=body))
                answered = time.perf_counter()
                samples.put_ms.append((answered - sent) * 1000)
                version = int(response.json()["version"])
                _poll_until_all(poller, version, expected, answered, timeout, args, samples)
                if (i + 1) % HISTORY_BATCH == 0:
                    _fetch_history(poller, samples)
            _fetch_history(poller, samples)
            wait_started = time.perf_counter()
            flag = not flag
            final = expect(
                poller.put(
                    "/api/settings",
                    params={"wait": "true"},
                    json={"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": flag},
                )
            )
            wait_ms = (time.perf_counter() - wait_started) * 1000
        finally:
            for client in clients:
                client.close()

    _compute_lags(samples)
    return _report(samples, live, expected, final, wait_ms)


def _poll_until_all(
    poller: httpx.Client,
    version: int,
    expected: int,
    answered: float,
    timeout: float,
    args: argparse.Namespace,
    samples: Samples,
) -> None:
    polls = 0
    while True:
        before = time.perf_counter()
        view = expect(poller.get("/api/settings/propagation")).json()
        after = time.perf_counter()
        polls += 1
        samples.poll_rtt_ms.append((after - before) * 1000)
        if _all_at(view, version, expected):
            samples.put_to_reporting_ms.append((after - answered) * 1000)
            samples.applied_at[version] = [epoch(w["applied_at"]) for w in view["workers"]]
            break
        if after - answered > timeout:
            samples.timeouts.append(version)
            break
        if args.poll_interval > 0:
            time.sleep(args.poll_interval)
    samples.polls_per_change.append(float(polls))


def _compute_lags(samples: Samples) -> None:
    for version, applied in sorted(samples.applied_at.items()):
        changed = samples.changed_at.get(version)
        if changed is None:
            raise BenchError(f"version {version} is missing from /api/settings/history")
        samples.commit_to_applied_ms.append((max(applied) - changed) * 1000)
        samples.per_process_lag_ms.extend((a - changed) * 1000 for a in applied)


def _report(
    samples: Samples, live: int, expected: int, final: httpx.Response, wait_ms: float
) -> list[Check]:
    rows = [
        summary_row("(a) commit -> all applied", samples.commit_to_applied_ms),
        summary_row("(b) PUT response -> all reporting", samples.put_to_reporting_ms),
        summary_row("    commit -> applied, each process", samples.per_process_lag_ms),
        summary_row("    PUT round trip", samples.put_ms),
        summary_row("    propagation poll round trip", samples.poll_rtt_ms),
    ]
    print(f"live workers in /api/settings/propagation: {live} (expected {expected})")
    print(table(SUMMARY_HEADERS, rows))
    poll_p50 = ms(percentile(samples.poll_rtt_ms, 50))
    polls_p50 = percentile(samples.polls_per_change, 50)
    print(
        f"poll overhead: (b) polls tightly; one poll takes {poll_p50} ms (p50) and a change "
        f"needed {polls_p50:.0f} polls (p50, max {max(samples.polls_per_change):.0f}),"
        " so (b) overstates by up to one poll."
    )
    if samples.timeouts:
        print(f"timed out (not all processes within the timeout): versions {samples.timeouts}")
    print(
        f"final PUT ?wait=true: {final.status_code}, X-Propagation: "
        f"{final.headers.get('x-propagation', '(missing)')}, {wait_ms:.1f} ms"
    )
    p99 = percentile(samples.commit_to_applied_ms, 99)
    passed = not samples.timeouts and p99 <= TARGET_P99_MS
    value = f"{ms(p99)} ms" + (f", {len(samples.timeouts)} timeouts" if samples.timeouts else "")
    check = Check(NAME, "(a) commit -> all applied p99", f"<= {TARGET_P99_MS:g} ms", value, passed)
    print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return [check]
