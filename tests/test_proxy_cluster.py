"""Routing across real processes: three ``codex-lb serve`` processes on one Redis in front of
the fake upstream (a process too), driven over loopback HTTP. Each setting is shown changing
which account serves which request, on every process."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.fake_upstream import FakeUpstream
from tests.proxy_support import IMPORT, RESPONSES, answered_by, body, ids_by_name, import_files
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, base_env, serve_cluster

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 10.0


class Cluster:
    def __init__(self, procs: list[ServeProcess], fake: FakeUpstream):
        self.procs = procs
        self.fake = fake
        self.clients = [httpx.Client(base_url=p.url, timeout=TIMEOUT) for p in procs]
        self.admin = self.clients[0]
        r = self.admin.post(
            "/api/dashboard-auth/password/setup",
            json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
        )
        assert r.status_code == 200, r.text
        self.ids: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(12)

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.clients:
            c.close()

    def add(self, *names: str) -> None:
        r = self.admin.post(IMPORT, files=import_files(self.fake, list(names)))
        assert r.status_code == 200, r.text
        self.ids.update(ids_by_name(r.json()))
        time.sleep(0.3)  # well over the propagation bound

    def settings(self, **changes: Any) -> None:
        current = self.admin.get("/api/settings").json()
        wanted = {
            k: current[k] for k in ("sticky_threads_enabled", "prefer_earlier_reset_accounts")
        }
        wanted.update(changes)
        r = self.admin.put("/api/settings", json=wanted)
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        deadline = time.monotonic() + 3
        while True:
            views = self.admin.get("/api/settings/propagation").json()
            workers = views["workers"]
            applied = all(w["applied_version"] >= version for w in workers)
            if applied and len(workers) >= len(self.procs):
                return
            assert time.monotonic() < deadline, views
            time.sleep(0.02)

    def ask(self, i: int, **kw: Any) -> str:
        """One request on process ``i % 3``; the fake account name that answered."""
        headers = kw.pop("headers", {})
        client = self.clients[i % len(self.clients)]
        r = client.post(RESPONSES, json=body(stream=False, **kw), headers=headers)
        assert r.status_code == 200, r.text
        return answered_by(r.json()["output"][0]["content"][0]["text"])

    def spread(self, count: int, **kw: Any) -> Counter[str]:
        return Counter(self.pool.map(lambda i: self.ask(i, **kw), range(count)))


@pytest.fixture
def cluster(
    redis_url: str, prefix: str, raw_redis: redis.Redis, tmp_path: Path, fake_process: FakeUpstream
) -> Iterator[Cluster]:
    fake_process.reset()
    env = base_env(
        redis_url,
        prefix,
        tmp_path,
        CODEX_LB_UPSTREAM_BASE_URL=fake_process.url,
        CODEX_LB_AUTH_BASE_URL=fake_process.url,
    )
    with serve_cluster(env, tmp_path) as procs:
        c = Cluster(procs, fake_process)
        try:
            yield c
        finally:
            c.close()


def test_usage_weighted_shares_follow_remaining_capacity_across_processes(
    cluster: Cluster,
) -> None:
    names = ["acct-a", "acct-b", "acct-c"]
    for name, used in zip(names, (10, 50, 90), strict=True):
        cluster.fake.configure(name, primary_used_percent=used, secondary_used_percent=used / 2)
    cluster.add(*names)
    cluster.settings(routing_strategy="usage_weighted", sticky_threads_enabled=False)
    cluster.spread(30)  # every account answers at least once: its usage is learned
    time.sleep(0.2)
    shares = cluster.spread(3000)
    total = sum(shares.values())
    percent = {n: 100 * shares[n] / total for n in names}
    expected = {"acct-a": 90 / 1.5, "acct-b": 50 / 1.5, "acct-c": 10 / 1.5}
    for name in names:
        assert abs(percent[name] - expected[name]) <= 3, percent


def test_round_robin_gives_equal_turns_across_all_processes(cluster: Cluster) -> None:
    names = ["acct-a", "acct-b", "acct-c", "acct-d"]
    # Very different usage: round robin ignores it (usage_weighted would not).
    for name, used in zip(names, (5, 30, 60, 85), strict=True):
        cluster.fake.configure(name, primary_used_percent=used)
    cluster.add(*names)
    cluster.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    shares = cluster.spread(400)
    assert sum(shares.values()) == 400
    for name in names:
        assert abs(shares[name] - 100) <= 1, shares
    # Flipped to usage_weighted, the traffic follows remaining capacity instead.
    cluster.settings(routing_strategy="usage_weighted")
    weighted = cluster.spread(800)
    remaining = dict(zip(names, (95, 70, 40, 15), strict=True))
    for name in names:
        expected = remaining[name] / sum(remaining.values())
        # About 4 standard deviations at 800 requests; round robin's 25 % each is far outside
        # for a and d.
        assert abs(weighted[name] / 800 - expected) <= 0.065, (weighted, name)


def test_a_thread_keeps_its_account_on_every_process_and_off_routes_afresh(
    cluster: Cluster,
) -> None:
    cluster.add("acct-a", "acct-b", "acct-c")
    cluster.settings(routing_strategy="round_robin", sticky_threads_enabled=True)
    threads = [f"thread-{i}" for i in range(6)]
    first = {t: cluster.ask(i, headers={"session_id": t}) for i, t in enumerate(threads)}
    assert len(set(first.values())) == 3  # new threads are spread by the strategy
    for i, t in itertools.product(range(3), threads):
        assert cluster.ask(i, headers={"session_id": t}) == first[t]
    cluster.settings(sticky_threads_enabled=False)
    moved = {cluster.ask(i, headers={"session_id": "thread-0"}) for i in range(6)}
    assert len(moved) == 3


def test_a_limit_seen_on_one_process_keeps_every_process_off_the_account(
    cluster: Cluster,
) -> None:
    cluster.add("acct-a", "acct-b")
    cluster.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    cluster.fake.configure("acct-a", fail=429, primary_reset_at=int(time.time()) + 600)
    # Until some process meets the 429, a is tried; once one has, no process tries it again.
    served = [cluster.ask(0) for _ in range(2)]
    assert served == ["acct-b", "acct-b"]
    time.sleep(0.2)  # the cooldown reaches the other processes
    served = [cluster.ask(i) for i in range(1, 13)]
    assert served == ["acct-b"] * 12
    assert cluster.fake.stats()["accounts"]["acct-a"]["statuses"] == {"429": 1}


def test_prefer_earlier_reset_accounts_narrows_to_the_earliest_weekly_bucket(
    cluster: Cluster,
) -> None:
    now = int(time.time())
    cluster.fake.configure("acct-a", secondary_reset_at=now + 3600, secondary_used_percent=70)
    cluster.fake.configure("acct-b", secondary_reset_at=now + 5 * 86400)
    cluster.fake.configure("acct-c", secondary_reset_at=now + 6 * 86400)
    cluster.add("acct-a", "acct-b", "acct-c")
    cluster.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    cluster.spread(12)  # learn every account's weekly reset
    time.sleep(0.2)
    cluster.settings(prefer_earlier_reset_accounts=True)
    assert cluster.spread(60) == Counter({"acct-a": 60})
    # Its weekly window full: the next bucket serves.
    cluster.fake.configure("acct-a", secondary_used_percent=100)
    cluster.ask(0)  # a answers once more and says it is full
    time.sleep(0.2)
    assert set(cluster.spread(30)) == {"acct-b"}
    cluster.settings(prefer_earlier_reset_accounts=False)
    assert set(cluster.spread(30)) == {"acct-b", "acct-c"}


def test_a_full_window_seen_on_one_process_takes_the_account_out_everywhere(
    cluster: Cluster,
) -> None:
    cluster.add("acct-a", "acct-b")
    cluster.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    reset = int(time.time()) + 600
    cluster.fake.configure("acct-a", primary_used_percent=100, primary_reset_at=reset)
    served = []
    while "acct-a" not in served:  # process 0 alone, until a answers "100 %"
        served.append(cluster.ask(0))
        assert len(served) < 4
    time.sleep(0.1)  # within the propagation bound
    assert {cluster.ask(i) for i in range(1, 25)} == {"acct-b"}
    assert cluster.fake.stats()["accounts"]["acct-a"]["requests"] == 1


def test_an_accounts_last_units_are_not_overshot_by_requests_from_several_processes(
    cluster: Cluster,
) -> None:
    cluster.add("acct-a")
    cluster.fake.configure(
        "acct-a",
        quota={"capacity": 8, "window_seconds": 600, "weekly_capacity": 1000},
        delay_first_byte=0.3,
    )
    cluster.fake.quota_start()
    for i in range(2):  # two answers, seen by every process: one request costs 12.5 %
        cluster.ask(i)
    time.sleep(0.2)

    def one(i: int) -> int:
        r = cluster.clients[i % 3].post(RESPONSES, json=body(stream=False))
        return r.status_code

    statuses = sorted(cluster.pool.map(one, range(12)))
    assert statuses == [200] * 6 + [429] * 6, statuses
    timeline = cluster.fake.quota()["timeline"]
    assert [t["status"] for t in timeline].count(429) == 0  # the upstream never had to refuse
