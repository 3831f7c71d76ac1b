"""``GET /metrics`` (CONTRACT §8): in one process, what proxied requests, logins and settings
changes leave in it, and that no secret does; then a real ``serve --workers 2``, whose every
worker reports the replica's totals.

The in-process app shares this test process's metrics with every other test's app, so each
test compares values before and after what it does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from service.config import Config
from tests.conftest import AppHarness, setup_password
from tests.fake_upstream import FakeUpstream
from tests.proxy_support import IMPORT, RESPONSES, body, ids_by_name, import_files
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, base_env, wait_until

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


@pytest.fixture
async def app(proxy_config: Config) -> AsyncIterator[AppHarness]:
    async with AppHarness(proxy_config) as h:
        await setup_password(h.client)
        yield h


async def add_accounts(h: AppHarness, fake: FakeUpstream, *names: str) -> dict[str, str]:
    r = await h.client.post(IMPORT, files=import_files(fake, list(names)))
    assert r.status_code == 200, r.text
    ids = ids_by_name(r.json())

    async def loaded() -> bool:
        return set(ids.values()) <= set(h.parts.accounts.accounts)

    await eventually(loaded)
    return ids


async def put_settings(h: AppHarness, **changes: object) -> int:
    current = (await h.client.get("/api/settings")).json()
    wanted = {k: current[k] for k in ("sticky_threads_enabled", "prefer_earlier_reset_accounts")}
    wanted.update(changes)
    r = await h.client.put("/api/settings", json=wanted)
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]

    async def applied() -> bool:
        record = h.parts.settings.current
        return record is not None and record.version >= version

    await eventually(applied)
    return version


# --- one process --------------------------------------------------------------------------------


async def test_proxied_requests_are_counted_by_route_status_account_and_cause(
    app: AppHarness, fake: FakeUpstream
) -> None:
    ids = await add_accounts(app, fake, "acct-a", "acct-b")
    await put_settings(app, routing_strategy="round_robin", sticky_threads_enabled=False)
    fake.configure("acct-a", fail=429, primary_reset_at=int(time.time()) + 900)
    before = await scrape(app.client)

    for _ in range(4):
        r = await app.client.post(RESPONSES, json=body())
        assert r.status_code == 200, r.text
    r = await app.client.post(RESPONSES, content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400

    after: Samples = {}

    async def streams_ended() -> bool:
        nonlocal after
        after = await scrape(app.client)
        return delta("codex_lb_upstream_duration_seconds_count") >= 4

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    await eventually(streams_ended)
    requests = "codex_lb_proxy_requests_total"
    assert delta(requests, route=RESPONSES, status="200") == 4
    assert delta(requests, route=RESPONSES, status="400") == 1
    # One attempt on the limited account (then it cools down), every request served by the other.
    selections = "codex_lb_account_selections_total"
    assert delta(selections, account_id=ids["acct-a"], strategy="round_robin") == 1
    assert delta(selections, account_id=ids["acct-b"], strategy="round_robin") == 4
    assert delta("codex_lb_failovers_total", cause="rate_limited") == 1
    assert delta("codex_lb_cooldowns_total", cause="rate_limited") == 1
    # Every answer's head is timed (the 429 too); the duration only of what reached the client.
    assert delta("codex_lb_upstream_first_byte_seconds_count") == 5
    assert delta("codex_lb_upstream_duration_seconds_count") == 4
    assert delta("codex_lb_upstream_duration_seconds_bucket", le="+Inf") == 4


async def test_sticky_hits_and_new_pins_are_counted(app: AppHarness, fake: FakeUpstream) -> None:
    await add_accounts(app, fake, "acct-a", "acct-b")
    await put_settings(app, sticky_threads_enabled=True)
    before = await scrape(app.client)
    for _ in range(3):
        r = await app.client.post(RESPONSES, json=body(), headers={"session_id": "thread-m1"})
        assert r.status_code == 200, r.text
    r = await app.client.post(RESPONSES, json=body())  # no thread: not a sticky routing
    assert r.status_code == 200, r.text
    after = await scrape(app.client)
    sticky = "codex_lb_sticky_routings_total"
    assert value(after, sticky, outcome="new") - value(before, sticky, outcome="new") == 1
    assert value(after, sticky, outcome="hit") - value(before, sticky, outcome="hit") == 2
    for outcome in ("moved", "detour"):
        assert value(after, sticky, outcome=outcome) == value(before, sticky, outcome=outcome)


async def test_a_failed_login_is_counted_and_metrics_need_no_session(
    harness: AppHarness,
) -> None:
    client = harness.client
    await setup_password(client)
    await client.post("/api/dashboard-auth/logout")
    before = await scrape(client)  # no session: open, like /health
    r = await client.post("/api/dashboard-auth/password/login", json={"password": "wrong-" * 3})
    assert r.status_code == 401
    r = await client.post("/api/dashboard-auth/password/login", json={"password": PASSWORD})
    assert r.status_code == 200
    after = await scrape(client)
    name = "codex_lb_login_failures_total"
    assert (
        value(after, name, code="invalid_credentials")
        - value(before, name, code="invalid_credentials")
        == 1
    )


async def test_the_settings_version_gauge_is_the_applied_version_and_the_lag_is_observed(
    admin: httpx.AsyncClient, harness: AppHarness
) -> None:
    before = await scrape(admin)
    version = await put_settings(harness, sticky_threads_enabled=False)
    after = await scrape(admin)
    record = harness.parts.settings.current
    assert record is not None
    assert record.version == version
    assert value(after, "codex_lb_settings_version") == version
    # This process's own write reached it through pub/sub: one propagation observed, from the
    # write's commit time, bounded by the time the test took.
    count = "codex_lb_settings_propagation_seconds_count"
    assert value(after, count) - value(before, count) == 1
    lag = "codex_lb_settings_propagation_seconds_sum"
    assert 0 <= value(after, lag) - value(before, lag) < 60


async def test_no_secret_is_ever_in_the_metrics(app: AppHarness, fake: FakeUpstream) -> None:
    documents = [fake.auth_json(name, email=f"{name}@example.com") for name in ("acct-s",)]
    r = await app.client.post(
        IMPORT,
        files=[
            ("auth_json", ("a.json", json.dumps(d).encode(), "application/json")) for d in documents
        ],
    )
    assert r.status_code == 200, r.text
    key = (await app.client.post("/api/api-keys", json={"name": "metrics-test"})).json()["key"]
    await put_settings(app, api_key_auth_enabled=True)
    session = app.client.cookies.get("dashboard_session")
    assert session

    async def served() -> bool:
        r = await app.client.post(
            RESPONSES, json=body(), headers={"authorization": f"Bearer {key}"}
        )
        return r.status_code == 200

    await eventually(served)
    r = await app.client.post(RESPONSES, json=body(), headers={"authorization": "Bearer sk-nope"})
    assert r.status_code == 401
    await app.client.post("/api/dashboard-auth/password/login", json={"password": "x" * 12})

    text = (await app.client.get("/metrics")).text
    secrets = [PASSWORD, BOOTSTRAP_TOKEN, key, session, "sk-nope"]
    for d in documents:
        tokens = d["tokens"]
        secrets += [tokens["access_token"], tokens["refresh_token"], tokens["id_token"]]
    for secret in secrets:
        assert secret not in text
    assert "codex_lb_proxy_requests_total" in text


# --- serve --workers 2 --------------------------------------------------------------------------


def worker_pids(serve_pid: int) -> set[int]:
    """The serve supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    return {int(pid) for pid in children if b"spawn_main" in cmdline(int(pid))}


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except FileNotFoundError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def requests_in(path: Path) -> float:
    """The proxied requests one worker's counter file holds (none before its first count)."""
    if not path.exists():
        return 0.0
    return sum(
        s.value
        for metric in MultiProcessCollector.merge([str(path)])
        for s in metric.samples
        if s.name == "codex_lb_proxy_requests_total"
    )


def test_every_worker_reports_the_whole_replica(
    redis_url: str, prefix: str, raw_redis: redis.Redis, tmp_path: Path, fake: FakeUpstream
) -> None:
    env = base_env(
        redis_url,
        prefix,
        tmp_path,
        CODEX_LB_UPSTREAM_BASE_URL=fake.url,
        CODEX_LB_AUTH_BASE_URL=fake.url,
    )
    proc = ServeProcess(env, workers=2, log_dir=tmp_path)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=10) as admin:
            r = admin.post(
                "/api/dashboard-auth/password/setup",
                json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
            )
            assert r.status_code == 200, r.text
            r = admin.post(IMPORT, files=import_files(fake, ["acct-w"]))
            assert r.status_code == 200, r.text
        assert wait_until(lambda: len(worker_pids(proc.proc.pid)) == 2, timeout=10)
        pids = worker_pids(proc.proc.pid)
        metrics_dir = Path(environ(next(iter(pids)))["PROMETHEUS_MULTIPROC_DIR"])
        assert (metrics_dir.stat().st_mode & 0o777) == 0o700  # the replica's own

        def ask(_: int) -> int:
            # A connection of its own each time, so the kernel hands it to either worker.
            return httpx.post(
                f"{proc.url}{RESPONSES}", json=body(stream=False), timeout=10
            ).status_code

        def per_worker() -> dict[int, float]:
            return {pid: requests_in(metrics_dir / f"counter_{pid}.db") for pid in pids}

        sent = 0
        with ThreadPoolExecutor(4) as pool:
            # Until both workers have served some (each one's own count is in its own file).
            while sent < 400 and not all(n > 0 for n in per_worker().values()):
                statuses = list(pool.map(ask, range(20)))
                assert statuses == [200] * 20
                sent += 20
        counts = per_worker()
        assert all(n > 0 for n in counts.values()), counts
        assert sum(counts.values()) == sent

        def total() -> float:
            r = httpx.get(f"{proc.url}/metrics", timeout=10)
            assert r.status_code == 200
            return value(
                parse(r.text), "codex_lb_proxy_requests_total", route=RESPONSES, status="200"
            )

        # Whichever worker answers the scrape (a new connection each time) says the same.
        assert [total() for _ in range(6)] == [sent] * 6

        # A worker that dies takes its gauges along, never its counts: the restarted one
        # starts from zero and the replica's totals stay.
        dead = min(pids)
        assert (metrics_dir / f"gauge_livemin_{dead}.db").exists()  # its settings version
        os.kill(dead, signal.SIGKILL)
        assert wait_until(lambda: dead not in worker_pids(proc.proc.pid), timeout=10)
        assert wait_until(lambda: len(worker_pids(proc.proc.pid)) == 2, timeout=20)
        assert wait_until(lambda: not list(metrics_dir.glob(f"gauge_live*_{dead}.db")), timeout=5)
        proc.wait_ready()
        assert [total() for _ in range(4)] == [sent] * 4
    finally:
        assert proc.terminate() == 0
    assert not metrics_dir.exists()  # removed with the replica
