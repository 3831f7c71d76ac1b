"""Faults between three real ``codex-lb serve`` processes and Redis (each reaching it through its
own ``TcpProxy``), and of Redis itself, against CONTRACT §4:

* settings converge after each fault within ``CODEX_LB_SETTINGS_RECONCILE_SECONDS`` + 1 s of it
  ending (lost pub/sub messages, a pause, a ``kill -9`` and restart);
* proxy traffic keeps flowing on last-known-good while Redis is away (not one request fails);
* a PUT while Redis is away is a 503 ``store_unavailable`` and leaves the record as it was;
* sessions, API keys and thread pins survive a ``kill -9`` of a Redis with append-only
  persistence.

The processes are shared by the module's tests (starting them is most of the cost); each test
ends its own fault, whatever happens, and states only what it set up itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.deployment import Deployment, Traffic, deployment
from tests.proxy_support import answered_by
from tests.support import PASSWORD, wait_until

pytestmark = pytest.mark.timeout(120)

RECONCILE_SECONDS = 0.2
# CONTRACT §4: a process whose message was lost applies the change within this.
BOUND_SECONDS = RECONCILE_SECONDS + 1.0
OUTAGE_SECONDS = 1.5


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir: Path = tmp_path_factory.mktemp("faults")
    with deployment(workdir, reconcile_seconds=RECONCILE_SECONDS) as dep:
        yield dep


def put(d: Deployment, i: int = 0) -> int:
    r = d.toggle(i)
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


def converged(d: Deployment, version: int) -> float:
    """Seconds until every process reports ``version``; fails past the contract's bound."""
    elapsed = d.wait_versions(version, BOUND_SECONDS)
    assert elapsed is not None, f"not every process at {version} within the bound: {d.versions()}"
    return elapsed


# --- (a) settings converge after each fault ----------------------------------------------------


def test_settings_converge_after_their_pubsub_message_is_lost(d: Deployment) -> None:
    before = d.versions()
    others = d.proxies[1:]
    for proxy in others:
        proxy.pause("subscribers")
    try:
        version = put(d, 0)
        # The message is published into the held links; cutting them loses it for good.
        for proxy in others:
            assert proxy.drop("subscribers") >= 1
    finally:
        for proxy in others:
            proxy.resume()
    assert version == max(v or 0 for v in before) + 1
    converged(d, version)
    # Every listener subscribed again (its retry backs off to at most a second).
    for proxy in others:
        assert wait_until(lambda p=proxy: p.connections("subscribers") >= 1, 5)


def test_settings_converge_after_a_pause(d: Deployment) -> None:
    """Two processes' links held longer than their Redis client's timeout; a PUT on the third
    meanwhile. Until the pause ends they cannot know it; after, within the bound."""
    old = d.versions()[1]
    paused = d.proxies[1:]
    for proxy in paused:
        proxy.pause()
    try:
        version = put(d, 0)
        time.sleep(2.5)  # past the 2 s socket timeout: their commands fail and reconnect
        assert d.versions()[1:] == [old, old]  # last-known-good, nothing learned
        assert all(d.ready(i).status_code == 200 for i in (1, 2))
    finally:
        for proxy in paused:
            proxy.resume()
    converged(d, version)


def test_settings_converge_after_redis_is_killed_and_restarted(d: Deployment) -> None:
    version_before = d.versions()[0]
    d.kill_redis()
    try:
        time.sleep(OUTAGE_SECONDS)
        for i in range(3):
            r = d.ready(i)
            assert r.status_code == 200  # degraded on last-known-good, still ready
            assert r.json() == {
                "status": "degraded",
                "settings_version": version_before,
                "redis": "unavailable",
            }
    finally:
        d.start_redis()
    # The PUT comes right after the restart, while the listeners are still backing off: its
    # message reaches only those already subscribed again.
    version = put(d, 0)
    converged(d, version)
    assert wait_until(lambda: all(d.ready(i).json()["redis"] == "ok" for i in range(3)), 5)


# --- (b) proxy traffic on last-known-good ------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "pause", "kill"])
def test_proxy_traffic_keeps_flowing_while_redis_is_away(d: Deployment, fault: str) -> None:
    time.sleep(0.5)  # earlier requests' entries are written (batches leave every 0.2 s)
    logged_before = d.raw().xlen(f"{d.prefix}request_log")
    with Traffic(d, threads=3) as traffic:
        assert traffic.wait_for(6)
        before = traffic.total
        if fault == "cut":
            d.cut()
        elif fault == "pause":
            for proxy in d.proxies:
                proxy.pause()
        else:
            d.kill_redis()
        try:
            time.sleep(OUTAGE_SECONDS)
            during = traffic.total - before
        finally:
            if fault == "kill":
                d.start_redis()
            else:
                d.mend()
        assert traffic.wait_for(6)
    assert traffic.failures == [], traffic.failures[:5]
    # Requests were answered during the outage itself, not only held until it ended (a pause
    # costs each request the routing state's short deadlines, so fewer get through).
    assert during >= 1, traffic.statuses
    assert set(traffic.statuses) == {"200"}
    # The request log's entries made while Redis was away waited in the processes and were
    # written once it came back: one per request, none lost, none twice.
    assert wait_until(
        lambda: d.raw().xlen(f"{d.prefix}request_log") - logged_before >= traffic.total, 10
    )
    time.sleep(0.5)
    assert d.raw().xlen(f"{d.prefix}request_log") - logged_before == traffic.total


# --- (c) a PUT while Redis is away --------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "kill"])
def test_a_put_while_redis_is_away_is_refused_and_stores_nothing(d: Deployment, fault: str) -> None:
    raw = d.raw()
    record_before = raw.hgetall(f"{d.prefix}settings")
    history_before = raw.lrange(f"{d.prefix}settings:history", 0, -1)
    versions_before = d.versions()
    if fault == "cut":
        d.cut()
    else:
        d.kill_redis()
    try:
        for i in range(3):
            r = d.toggle(i)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
        assert d.versions() == versions_before
    finally:
        if fault == "cut":
            d.mend()
        else:
            d.start_redis()
    raw = d.raw()
    # Give a late write every chance to show up: a reconcile round on every process.
    time.sleep(BOUND_SECONDS)
    assert raw.hgetall(f"{d.prefix}settings") == record_before
    assert raw.lrange(f"{d.prefix}settings:history", 0, -1) == history_before
    assert d.versions() == versions_before
    r = d.admin("GET", "/api/settings", 1)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == versions_before[1]


# --- (d) a Redis restart with append-only persistence ------------------------------------------


def test_sessions_keys_and_pins_survive_a_kill_and_restart_with_aof(d: Deployment) -> None:
    thread = "aof-survivor"
    r = d.ask(0, thread)
    assert r.status_code == 200, r.text
    pinned_to = answered_by(r.json()["output"][0]["content"][0]["text"])
    pin = f"{d.prefix}pin:{hashlib.sha256(thread.encode()).hexdigest()}"
    raw = d.raw()
    deadline = time.monotonic() + 5
    while not raw.exists(pin):  # the pin is written off the request's path
        assert time.monotonic() < deadline, "the thread's pin was never written"
        time.sleep(0.01)

    d.kill_redis()
    d.start_redis()

    assert d.raw().exists(pin)
    for i in range(3):
        # The dashboard session cookie still works on every process.
        r = d.admin("GET", "/api/settings", i)
        assert r.status_code == 200, r.text
    for turn in range(6):
        # The key still admits, and round robin would move an unpinned thread every turn.
        r = d.ask(turn, thread)
        assert r.status_code == 200, r.text
        assert answered_by(r.json()["output"][0]["content"][0]["text"]) == pinned_to
    r = d.clients[2].post("/api/dashboard-auth/password/login", json={"password": PASSWORD})
    assert r.status_code == 200, r.text
