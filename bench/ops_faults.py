"""Faults between the processes and Redis: how long settings take to converge after each, and
how many proxy requests fail while Redis is away.

One redis-server (append-only, fsync always), N ``codex-lb serve`` processes each reaching it
through its own TCP proxy (tests/faults/tcp_proxy.py, which can hold, cut or refuse a link), the
fake upstream, three accounts, an API key with API-key auth on. Loopback load runs throughout:
``--threads`` client threads, each a conversation of Responses requests (half streamed) over the
processes in turn. Then, one after another:

1. pub/sub messages lost: the other processes' subscriber links are held, a PUT /api/settings
   on process 0 publishes into them, and the links are cut (the message is gone); measured from
   the cut.
2. pause: every link of the other processes is held for ``--outage`` s (a partition, or a frozen
   Redis as they see it) while process 0 takes a PUT; measured from the end of the pause.
3. ``kill -9`` of redis-server for ``--outage`` s, then a restart on its port and data; a PUT at
   once; measured from the PUT's answer. The proxy requests answered while Redis was dead are
   the outage figure.

Convergence is the time until every process's ``GET /health/ready`` reports the new
``settings_version`` (polled every 10 ms, so up to one poll late); CONTRACT §4 bounds it by
``CODEX_LB_SETTINGS_RECONCILE_SECONDS`` + 1 s. Target for requests failed during the outage: 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, Check, heading, table
from tests.faults.deployment import Deployment, Traffic, deployment

NAME = "ops-faults"
SUMMARY = "settings convergence after pub/sub loss, pause, kill -9; proxy failures in an outage"
WAIT_SECONDS = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--processes", type=int, default=3, help="serve processes (default 3)")
    group.add_argument(
        "--outage", type=float, default=5.0, help="seconds of pause and of Redis down (default 5)"
    )
    group.add_argument(
        "--threads", type=int, default=4, help="client threads of proxy load (default 4)"
    )
    group.add_argument(
        "--reconcile",
        type=float,
        default=1.0,
        help="CODEX_LB_SETTINGS_RECONCILE_SECONDS of the processes (default 1.0, the default)",
    )


@dataclass(frozen=True)
class Convergence:
    fault: str
    seconds: float | None  # None: not within WAIT_SECONDS

    def within(self, bound: float) -> bool:
        return self.seconds is not None and self.seconds <= bound


@dataclass(frozen=True)
class Outage:
    seconds: float
    answered: int  # proxy requests answered while Redis was down
    failed: int  # of those, and of those in flight when it went down, not a 200


def _put(d: Deployment) -> int:
    r = d.toggle(0)
    if r.status_code != 200:
        raise BenchError(f"PUT /api/settings: {r.status_code} {r.text[:200]}")
    return int(r.json()["version"])


def _pubsub_lost(d: Deployment) -> Convergence:
    others = d.proxies[1:]
    for proxy in others:
        proxy.pause("subscribers")
    try:
        version = _put(d)
        for proxy in others:
            proxy.drop("subscribers")
    finally:
        for proxy in others:
            proxy.resume()
    return Convergence("pub/sub messages lost", d.wait_versions(version, WAIT_SECONDS))


def _pause(d: Deployment, seconds: float) -> Convergence:
    others = d.proxies[1:]
    for proxy in others:
        proxy.pause()
    try:
        version = _put(d)
        time.sleep(seconds)
    finally:
        for proxy in others:
            proxy.resume()
    return Convergence(f"pause {seconds:g} s", d.wait_versions(version, WAIT_SECONDS))


def _kill(d: Deployment, seconds: float, traffic: Traffic) -> tuple[Convergence, Outage]:
    failed_before = len(traffic.failures)
    answered_before = traffic.total
    d.kill_redis()
    try:
        time.sleep(seconds)
        answered = traffic.total - answered_before
    finally:
        d.start_redis()
    version = _put(d)
    converged = Convergence(
        f"kill -9, {seconds:g} s down, restart", d.wait_versions(version, WAIT_SECONDS)
    )
    # Requests in flight at the restart count too: let them finish before counting failures.
    traffic.wait_for(traffic.threads)
    outage = Outage(seconds, answered, len(traffic.failures) - failed_before)
    return converged, outage


def run(args: argparse.Namespace) -> list[Check]:
    if args.processes < 2 or args.outage <= 0 or args.threads < 1 or args.reconcile <= 0:
        raise BenchError("--processes >= 2, --threads >= 1, --outage and --reconcile > 0")
    heading(
        f"{NAME}: {args.processes} serve processes, {args.threads} client threads, "
        f"outage {args.outage:g} s, reconcile {args.reconcile:g} s"
    )
    bound = args.reconcile + 1.0
    workdir = Path(tempfile.mkdtemp(prefix="codexlb-bench-faults-"))
    try:
        with (
            deployment(workdir, processes=args.processes, reconcile_seconds=args.reconcile) as d,
            Traffic(d, threads=args.threads) as traffic,
        ):
            if not traffic.wait_for(20, timeout=30):
                raise BenchError(f"the load did not get going: {traffic.statuses}")
            results = [_pubsub_lost(d), _pause(d, args.outage)]
            killed, outage = _kill(d, args.outage, traffic)
            results.append(killed)
        total, failures, statuses = traffic.total, traffic.failures, dict(traffic.statuses)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(results, outage, bound, total, failures, statuses, args)


def _report(
    results: list[Convergence],
    outage: Outage,
    bound: float,
    total: int,
    failures: list[str],
    statuses: dict[str, int],
    args: argparse.Namespace,
) -> list[Check]:
    rows = [
        [
            r.fault,
            "-" if r.seconds is None else f"{r.seconds * 1000:.0f}",
            f"{bound * 1000:.0f}",
            "PASS" if r.within(bound) else "FAIL",
        ]
        for r in results
    ]
    print(table(["fault", "converged ms", "bound ms", "result"], rows))
    print(
        f"proxy requests: {total} in all ({statuses}); {outage.answered} answered during the "
        f"{outage.seconds:g} s Redis outage; {outage.failed} failed around it"
    )
    for failure in failures[:5]:
        print(f"  failed: {failure}")
    payload = {
        "benchmark": NAME,
        "config": {
            "processes": args.processes,
            "threads": args.threads,
            "outage_seconds": args.outage,
            "reconcile_seconds": args.reconcile,
        },
        "convergence_ms": {
            r.fault: None if r.seconds is None else round(r.seconds * 1000, 1) for r in results
        },
        "bound_ms": round(bound * 1000),
        "outage": {"answered": outage.answered, "failed": outage.failed},
        "requests": {"total": total, "failed": len(failures), "statuses": statuses},
    }
    print(json.dumps(payload, separators=(",", ":")))
    checks = [
        Check(
            NAME,
            f"settings converged after {r.fault}",
            f"<= {bound * 1000:.0f} ms",
            "not within 30 s" if r.seconds is None else f"{r.seconds * 1000:.0f} ms",
            r.within(bound),
        )
        for r in results
    ]
    checks.append(
        Check(
            NAME,
            f"proxy requests failed during a {outage.seconds:g} s Redis outage",
            "0",
            f"{outage.failed} of {outage.answered}",
            outage.failed == 0 and outage.answered > 0,
        )
    )
    checks.append(
        Check(NAME, "proxy requests failed in the whole run", "0", str(len(failures)), not failures)
    )
    for check in checks:
        print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return checks
