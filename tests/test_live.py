"""Each process's live copy of the settings record, driven in-process against real redis-servers.

Two ``AppHarness`` on one prefix stand for two processes of one deployment. Tests that kill,
flush or restart Redis get a private ``RedisServer`` so the rest of the run is not disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from service.app import Parts, create_app
from service.auth.store import AuthStore
from service.config import Config
from service.core.connection import Connection, connect
from service.core.errors import NotReady, StoreUnavailable
from service.core.hub import Hub
from service.core.workers import WorkerRegistry
from service.settings.domain import read_settings, write_settings
from service.settings.live import LiveSettings
from service.settings.store import SettingsRecord, SettingsStore, initial_settings
from tests.conftest import AppHarness, make_config, setup_password
from tests.support import PASSWORD, RedisServer

PREFIX = "live:"
RECONCILE = 1.0
# Contract: a lost message is made up for within the reconcile interval + 1 s.
LOST_MESSAGE_DEADLINE = RECONCILE + 1.0
# Issue: after Redis comes back, every process converges within 5 s.
RECOVERY_DEADLINE = 5.0

CHANGE = {
    "sticky_threads_enabled": False,
    "prefer_earlier_reset_accounts": True,
    "routing_strategy": "round_robin",
    "import_without_overwrite": True,
}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server this test may kill, flush or restart."""
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def raw(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    try:
        yield client
    finally:
        client.close()


def config_for(server: RedisServer, tmp_path: Path, reconcile: float = RECONCILE) -> Config:
    return make_config(server.url, PREFIX, tmp_path, settings_reconcile_seconds=reconcile)


def live(h: AppHarness) -> LiveSettings:
    return h.parts.settings


def settings_with_hub(conn: Connection) -> tuple[LiveSettings, Hub]:
    """A settings copy fed by a hub of its own, outside any app."""
    settings = LiveSettings(SettingsStore(conn))
    hub = Hub(conn, WorkerRegistry(conn), reconcile_seconds=RECONCILE, report=settings.applied)
    settings.on_apply.append(hub.wake)
    hub.register(settings)
    return settings, hub


def version(h: AppHarness) -> int | None:
    record = live(h).current
    return None if record is None else record.version


def stored(raw: redis.Redis) -> SettingsRecord | None:
    data = raw.hget(f"{PREFIX}settings", "record")
    return None if data is None else msgspec.json.decode(data, type=SettingsRecord)


def stored_version(raw: redis.Redis) -> int | None:
    value = raw.hget(f"{PREFIX}settings", "version")
    return None if value is None else int(value)


def subscribers(raw: redis.Redis) -> int:
    [(_, count)] = raw.pubsub_numsub(f"{PREFIX}ch:settings")
    return int(count)


def fields(record: SettingsRecord | None) -> dict[str, object]:
    assert record is not None
    return {k: getattr(record, k) for k in CHANGE}


async def eventually(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"not true within {timeout} s"
        await asyncio.sleep(step)
    return time.monotonic() - start


async def login(h: AppHarness) -> None:
    r = await h.client.post("/api/dashboard-auth/password/login", json={"password": PASSWORD})
    assert r.status_code == 200, r.text


async def put(h: AppHarness, body: dict[str, object], **params: str) -> httpx.Response:
    return await h.client.put("/api/settings", json=body, params=params)


@contextlib.asynccontextmanager
async def two_processes(config: Config) -> AsyncIterator[tuple[AppHarness, AppHarness]]:
    """Two logged-in processes of one deployment, both listening on the settings channel."""
    async with AppHarness(config) as a, AppHarness(config) as b:
        await setup_password(a.client)
        await login(b)
        raw = redis.Redis.from_url(config.redis_url or "")
        try:
            await eventually(lambda: subscribers(raw) == 2, 5.0)
        finally:
            raw.close()
        yield a, b


async def changed(a: AppHarness, b: AppHarness) -> int:
    """PUT the non-default ``CHANGE`` on ``a``; the new version once both have it."""
    r = await put(a, CHANGE)
    assert r.status_code == 200, r.text
    new = int(r.json()["version"])
    await eventually(lambda: version(b) == new, LOST_MESSAGE_DEADLINE)
    return new


def next_record(raw: redis.Redis, **changes: object) -> SettingsRecord:
    current = stored(raw)
    assert current is not None
    return msgspec.structs.replace(
        current, version=current.version + 1, changed_at=time.time(), **changes
    )


# --- propagation ----------------------------------------------------------------------------


async def test_put_on_one_process_reaches_the_other_by_pubsub(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    # With a 30 s reconcile interval only the pub/sub message can bring the change in time.
    async with two_processes(config_for(server, tmp_path, reconcile=30.0)) as (a, b):
        assert version(a) == version(b) == 1

        r = await put(a, CHANGE)
        # The answering process applied the record before it answered.
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2
        assert version(a) == 2
        assert fields(live(a).current) == CHANGE

        lag = await eventually(lambda: version(b) == 2, 1.0, step=0.001)
        assert lag < 0.5
        assert live(b).current == live(a).current
        assert live(b).current == stored(raw)

        # Both processes registered themselves; ?wait=true sees both apply the next change.
        r = await put(a, {**CHANGE, "routing_strategy": "usage_weighted"}, wait="true")
        assert r.status_code == 200, r.text
        assert r.headers["x-propagation"] == "2/2"
        assert version(b) == 3
        r = await b.client.get("/api/settings/propagation")
        assert r.status_code == 200
        workers = r.json()["workers"]
        assert {w["worker_id"] for w in workers} == {a.parts.hub.worker_id, b.parts.hub.worker_id}
        assert all(w["applied_version"] == 3 for w in workers)


async def test_a_message_lost_while_subscribed_is_made_up_by_reconcile(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    async with two_processes(config_for(server, tmp_path)) as (a, b):
        # A newer record stored without its PUBLISH: only the reconcile loop can notice it.
        newer = next_record(raw, routing_strategy="round_robin")
        raw.hset(
            f"{PREFIX}settings",
            mapping={"version": newer.version, "record": msgspec.json.encode(newer)},
        )
        await eventually(lambda: version(a) == version(b) == newer.version, LOST_MESSAGE_DEADLINE)
        assert live(a).current == live(b).current == newer


async def test_pubsub_connections_killed_then_a_write_through_the_other_process(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    async with two_processes(config_for(server, tmp_path)) as (a, b):
        killed = raw.client_kill_filter(_type="pubsub")
        assert killed == 2
        record = await write_settings(
            a.parts.settings_store,
            live(a),
            lambda current: msgspec.structs.replace(current, routing_strategy="round_robin"),
        )
        assert version(a) == record.version == 2
        await eventually(lambda: version(b) == 2, LOST_MESSAGE_DEADLINE)
        assert live(b).current == record == stored(raw)
        # Both listeners came back, so the next change travels by pub/sub again.
        await eventually(lambda: subscribers(raw) == 2, LOST_MESSAGE_DEADLINE)
        r = await put(a, CHANGE)
        assert r.status_code == 200, r.text
        await eventually(lambda: version(b) == 3, 0.5, step=0.001)


async def test_a_write_published_while_the_listeners_are_disconnected_is_picked_up(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    async with two_processes(config_for(server, tmp_path)) as (a, b):
        newer = next_record(raw, prefer_earlier_reset_accounts=True)
        data = msgspec.json.encode(newer)
        # One atomic step: cut the subscribers, then store and publish the change.
        with raw.pipeline(transaction=True) as pipe:
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            pipe.hset(f"{PREFIX}settings", mapping={"version": newer.version, "record": data})
            pipe.publish(f"{PREFIX}ch:settings", data)
            killed, _, receivers = pipe.execute()
        assert killed == 2
        assert receivers == 0  # the message itself reached nobody
        await eventually(lambda: version(a) == version(b) == newer.version, LOST_MESSAGE_DEADLINE)
        assert live(a).current == live(b).current == newer


# --- the record vanishing or going back -----------------------------------------------------


@pytest.mark.parametrize(
    "wipe",
    [
        pytest.param(lambda raw: raw.delete(f"{PREFIX}settings"), id="del"),
        pytest.param(lambda raw: raw.flushall(), id="flushall"),
    ],
)
async def test_a_lost_record_is_restored_not_defaulted(
    server: RedisServer,
    raw: redis.Redis,
    tmp_path: Path,
    wipe: Callable[[redis.Redis], object],
) -> None:
    async with two_processes(config_for(server, tmp_path)) as (a, b):
        new = await changed(a, b)
        known = live(a).current
        wipe(raw)
        assert stored(raw) is None

        await eventually(lambda: stored_version(raw) == new, LOST_MESSAGE_DEADLINE)
        assert stored(raw) == known  # same version, same fields, same changed_at
        assert fields(stored(raw)) == CHANGE
        # Neither process ever took up defaults.
        assert live(a).current == live(b).current == known
        await asyncio.sleep(RECONCILE + 0.2)
        assert stored(raw) == known
        assert live(a).current == live(b).current == known


async def test_an_older_record_put_back_is_overwritten_with_the_newer_one(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    async with two_processes(config_for(server, tmp_path)) as (a, b):
        await changed(a, b)
        r = await put(a, {**CHANGE, "api_key_auth_enabled": True})
        assert r.status_code == 200
        new = r.json()["version"]
        await eventually(lambda: version(b) == new, LOST_MESSAGE_DEADLINE)
        known = live(a).current
        assert known is not None

        # Someone writes the version-1 defaults back by hand, and announces them.
        older = msgspec.structs.replace(initial_settings(), changed_at=time.time())
        data = msgspec.json.encode(older)
        raw.hset(f"{PREFIX}settings", mapping={"version": 1, "record": data})
        raw.publish(f"{PREFIX}ch:settings", data)

        seen: set[int | None] = set()

        def restored() -> bool:
            seen.update({version(a), version(b)})
            return stored(raw) == known

        await eventually(restored, LOST_MESSAGE_DEADLINE)
        assert seen == {new}, "a live copy went back to an older version"
        assert live(a).current == live(b).current == known
        r = await b.client.get("/api/settings")
        assert r.status_code == 200
        assert r.json()["version"] == new
        assert r.json()["api_key_auth_enabled"] is True


# --- Redis down and back --------------------------------------------------------------------


async def test_requests_right_after_a_redis_restart_reconnect(server: RedisServer) -> None:
    """Every pooled connection dies with a restart; the first use of each must reconnect, not
    fail the request."""
    conn = Connection(connect(server.url), PREFIX)
    store = AuthStore(conn)
    try:
        await asyncio.gather(*(conn.ping() for _ in range(5)))  # five pooled connections
        server.kill()
        server.start()
        results = await asyncio.gather(*(store.auth_fields() for _ in range(5)))
        assert results == [{}] * 5
    finally:
        await conn.close()


async def test_redis_down_serves_last_known_good_then_recovers(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    async with two_processes(config_for(server, tmp_path)) as (a, b):
        new = await changed(a, b)
        known = live(a).current
        server.kill()

        for h in (a, b):
            await eventually(lambda h=h: not h.parts.hub.redis_ok, 3.0)
            r = await h.client.get("/health/ready")
            assert r.status_code == 200
            assert r.json() == {
                "status": "degraded",
                "settings_version": new,
                "redis": "unavailable",
            }
            # The request path still has the last record it knew.
            assert live(h).get() == known
            # So does the settings read behind GET /api/settings.
            assert await read_settings(h.parts.settings_store, live(h)) == known

        # A write cannot be stored: 503 store_unavailable, and the live copy did not move.
        r = await put(a, {**CHANGE, "routing_strategy": "usage_weighted"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        with pytest.raises(StoreUnavailable):
            await write_settings(a.parts.settings_store, live(a), lambda current: current)
        assert live(a).current == live(b).current == known

        # Back on the same port, empty and without persistence: the processes put their record
        # back and converge, and writes work again.
        server.start()
        start = time.monotonic()
        await eventually(lambda: stored(raw) == known, RECOVERY_DEADLINE)
        await eventually(
            lambda: a.parts.hub.redis_ok and b.parts.hub.redis_ok,
            RECOVERY_DEADLINE - (time.monotonic() - start),
        )
        for h in (a, b):
            r = await h.client.get("/health/ready")
            assert r.status_code == 200
            assert r.json() == {"status": "ready", "settings_version": new, "redis": "ok"}
        assert live(a).current == live(b).current == known

        # Sessions and the password went with the data: set up again, then write.
        await setup_password(a.client)
        r = await put(a, {**CHANGE, "routing_strategy": "usage_weighted"})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == new + 1
        assert stored_version(raw) == new + 1
        await eventually(lambda: version(b) == new + 1, LOST_MESSAGE_DEADLINE)


async def test_redis_down_dashboard_reads_fail_closed(server: RedisServer, tmp_path: Path) -> None:
    """A session cannot be checked without Redis: never granted on an error."""
    async with two_processes(config_for(server, tmp_path)) as (a, _):
        server.kill()
        r = await a.client.get("/api/settings")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Parts, httpx.AsyncClient]]:
    """The app inside its lifespan without waiting for a record (unlike AppHarness)."""
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app.state.parts, client


async def test_cold_start_without_redis_is_not_ready_until_redis_comes(tmp_path: Path) -> None:
    srv = RedisServer()  # a reserved port with nothing listening yet
    try:
        async with running(config_for(srv, tmp_path)) as (svc, client):
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                r = await client.get("/health/ready")
                assert r.status_code == 503
                assert r.json() == {
                    "status": "starting",
                    "settings_version": None,
                    "redis": "unavailable",
                }
                assert (await client.get("/health/live")).status_code == 200
                # No record, no defaults: the proxy path refuses rather than guess.
                with pytest.raises(NotReady):
                    svc.settings.get()
                await asyncio.sleep(0.1)

            srv.start()
            # Ready once the record and every other live copy have loaded.
            await eventually(lambda: svc.hub.ready and svc.hub.redis_ok, RECOVERY_DEADLINE)
            r = await client.get("/health/ready")
            assert r.status_code == 200
            assert r.json() == {"status": "ready", "settings_version": 1, "redis": "ok"}
            assert svc.settings.get().version == 1
            assert stored_version(srv.client()) == 1
    finally:
        srv.stop()


# --- the hot path ---------------------------------------------------------------------------


def commands_served(raw: redis.Redis) -> int:
    stats = raw.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def test_reading_settings_costs_no_redis_round_trip(
    server: RedisServer, raw: redis.Redis, tmp_path: Path
) -> None:
    async with AppHarness(config_for(server, tmp_path)) as h:
        await eventually(lambda: subscribers(raw) == 1, 5.0)
        reads = 1000 + 200
        before = commands_served(raw)
        start = time.monotonic()
        for _ in range(1000):
            assert h.parts.settings.get().version == 1
        for _ in range(200):
            r = await h.client.get("/health/ready")
            assert r.status_code == 200
        elapsed = time.monotonic() - start
        delta = commands_served(raw) - before

        # Only the background tasks talk to Redis meanwhile: a heartbeat (MULTI, SET, ZADD,
        # EXEC) and a version check per second, about 5 commands a second. Reads that went to
        # Redis would add at least one command each.
        background_budget = 10 + 10 * elapsed
        assert background_budget < reads / 4, f"reads took too long ({elapsed:.1f} s) to judge"
        assert delta <= background_budget, f"{delta} commands for {reads} reads in {elapsed:.2f} s"


# --- shutdown -------------------------------------------------------------------------------


async def test_stop_is_prompt_even_right_after_an_apply(server: RedisServer) -> None:
    """A cancel landing just as the heartbeat wakes for an apply must not be swallowed.

    (``asyncio.wait_for`` on Python 3.11 returns the inner result instead of raising when the
    cancel and the inner completion meet, which left ``stop()`` waiting for ever.)
    """
    conn = Connection(connect(server.url), PREFIX)
    try:
        for turns in range(8):
            settings, hub = settings_with_hub(conn)
            await hub.start()
            await eventually(lambda s=settings: s.current is not None, 5.0)
            await asyncio.sleep(0.05)  # the heartbeat has registered and waits again
            base = settings.get()
            settings.apply(msgspec.structs.replace(base, version=base.version + 1))
            for _ in range(turns):
                await asyncio.sleep(0)
            await asyncio.wait_for(hub.stop(), 3.0)
            assert all(t.done() for t in asyncio.all_tasks() if t.get_name() == "worker-heartbeat")
    finally:
        await conn.close()


async def test_stop_cancels_again_a_task_that_swallowed_the_cancel(
    server: RedisServer,
) -> None:
    """Inside redis-py, 3.11's ``asyncio.wait_for`` can eat a cancel; stop() must still end."""
    conn = Connection(connect(server.url), PREFIX)
    settings, hub = settings_with_hub(conn)
    try:
        await hub.start()
        await eventually(lambda: settings.current is not None, 5.0)

        async def swallows_one_cancel() -> None:
            # What the swallowing wait_for amounts to, seen from the task's own loop.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            await asyncio.sleep(30)

        stubborn = asyncio.create_task(swallows_one_cancel())
        hub._tasks.append(stubborn)
        await asyncio.sleep(0)
        start = time.monotonic()
        await hub.stop()
        assert time.monotonic() - start < 1.0
        assert stubborn.cancelled()
    finally:
        await conn.close()
