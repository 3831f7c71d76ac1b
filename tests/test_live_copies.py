"""CONTRACT §4: a live copy (settings, API keys, accounts) never goes back to an older version,
a malformed stored entry in one copy never stops the others from updating, and a process is
not ready until every copy has loaded once. Real redis-server, the app in-process."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis

from service.api_keys.domain import create_key
from service.api_keys.live import LiveApiKeys
from service.api_keys.schemas import ApiKeyCreate
from service.api_keys.store import ApiKeyStore, StoredKeys
from service.config import Config
from service.core.connection import Connection, connect
from tests.conftest import AppHarness, make_config, setup_password
from tests.factories import auth_json
from tests.test_accounts import import_docs
from tests.test_api_keys import eventually

pytestmark = pytest.mark.timeout(30)

REQUIRED = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}
# Far longer than any assertion waits: only pub/sub can bring a change in time.
NO_RECONCILE = 30.0


def wipe(raw_redis: redis.Redis, prefix: str) -> None:
    """What a FLUSHDB (or a restore of an empty backup) does to this deployment."""
    for key in raw_redis.scan_iter(match=f"{prefix}*"):
        raw_redis.delete(key)


# --- never back -----------------------------------------------------------------------------


@pytest.fixture
async def key_copy(redis_url: str, prefix: str) -> AsyncIterator[tuple[ApiKeyStore, LiveApiKeys]]:
    """An API key store and a live copy of it, outside any app (no listener, no reconcile)."""
    store = Connection(connect(redis_url), prefix)
    keys = ApiKeyStore(store)
    try:
        yield keys, LiveApiKeys(keys)
    finally:
        await store.close()


async def test_a_slow_snapshot_never_reinstalls_a_revoked_key(
    key_copy: tuple[ApiKeyStore, LiveApiKeys],
) -> None:
    """Two overlapping syncs (a resubscribe and a reconcile, say): the first reads before a key
    is deleted and finishes after the second, which read after. The copy must end on the newer
    read, or the deleted key works again until the next reconcile."""
    keys, live = key_copy
    made = await create_key(keys, ApiKeyCreate(name="revoked"))
    await live.sync()
    assert live.check_key(made.key) is not None

    read = keys.snapshot
    first_read = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def slow_first_read() -> StoredKeys:
        nonlocal calls
        calls += 1
        mine = calls
        snapshot = await read()
        if mine == 1:
            first_read.set()
            await release.wait()
        return snapshot

    keys.snapshot = slow_first_read  # type: ignore[method-assign]
    slow = asyncio.create_task(live.sync())
    await first_read.wait()
    assert await keys.delete(made.id)
    fast = asyncio.create_task(live.sync())
    await asyncio.sleep(0.1)  # the newer read, unless it waits its turn, is installed now
    release.set()
    await asyncio.gather(slow, fast)

    assert live.check_key(made.key) is None
    assert live.version == 2


async def test_a_message_ahead_of_a_snapshot_is_kept(
    key_copy: tuple[ApiKeyStore, LiveApiKeys],
) -> None:
    keys, live = key_copy
    made = await create_key(keys, ApiKeyCreate(name="k"))
    await live.sync()
    read = keys.snapshot
    revocation = json.dumps(
        {"version": 2, "epoch": live.epoch, "id": made.id, "record": None}
    ).encode()

    async def read_overtaken_by_a_message() -> StoredKeys:
        stale = await read()
        # The revocation, and its message, land while this read is on its way back.
        assert await keys.delete(made.id)
        live.on_message(revocation)
        return stale

    keys.snapshot = read_overtaken_by_a_message  # type: ignore[method-assign]
    await live.sync()
    assert live.check_key(made.key) is None
    assert live.version == 2


async def test_a_store_that_lost_its_newest_writes_is_followed(
    key_copy: tuple[ApiKeyStore, LiveApiKeys], raw_redis: redis.Redis, prefix: str
) -> None:
    """Redis restarted from an append-only file a second behind (same epoch, lower version):
    the copy follows it, so a key the dashboard can no longer see or revoke stops working, and
    the next write's message is not mistaken for one already applied."""
    keys, live = key_copy
    kept = await create_key(keys, ApiKeyCreate(name="kept"))
    lost = await create_key(keys, ApiKeyCreate(name="lost"))
    await live.sync()
    assert live.version == 2
    raw_redis.hdel(f"{prefix}apikeys", lost.id)
    raw_redis.set(f"{prefix}apikeys:version", 1)

    await live.check()  # the reconcile tick (or the resubscribe after the restart)
    assert live.version == 1
    assert live.check_key(lost.key) is None
    assert live.check_key(kept.key) is not None

    assert await keys.patch(kept.id, {"is_active": False}) is not None  # version 2 again
    await live.check()
    assert live.version == 2
    assert live.check_key(kept.key) is None


async def test_one_unreadable_expiry_skips_only_that_key(
    key_copy: tuple[ApiKeyStore, LiveApiKeys], raw_redis: redis.Redis, prefix: str
) -> None:
    keys, live = key_copy
    made = [await create_key(keys, ApiKeyCreate(name=f"k{i}")) for i in range(5)]
    record = json.loads(raw_redis.hget(f"{prefix}apikeys", made[2].id))  # type: ignore[arg-type]
    record["expires_at"] = "next tuesday"
    raw_redis.hset(f"{prefix}apikeys", made[2].id, json.dumps(record))
    await live.sync()
    assert [live.check_key(m.key) is not None for m in made] == [True, True, False, True, True]


async def test_a_reset_store_is_followed_even_at_the_same_version(
    key_copy: tuple[ApiKeyStore, LiveApiKeys], raw_redis: redis.Redis, prefix: str
) -> None:
    """A flush followed by as many writes as before leaves the same version number: only the
    epoch tells the copy that its keys are gone."""
    keys, live = key_copy
    old = await create_key(keys, ApiKeyCreate(name="before the flush"))
    await live.sync()
    assert (live.version, live.check_key(old.key) is not None) == (1, True)

    wipe(raw_redis, prefix)
    new = await create_key(keys, ApiKeyCreate(name="after the flush"))
    epoch, version = await keys.version()
    assert (version, epoch != live.epoch) == (1, True)

    await live.check()  # the reconcile loop's tick
    assert live.check_key(old.key) is None
    assert live.check_key(new.key) is not None
    assert live.version == 1


# --- one bad entry ----------------------------------------------------------------------------


@pytest.fixture
def slow_reconcile_config(config: Config, tmp_path: Path) -> Config:
    return make_config(
        config.redis_url, config.redis_prefix, tmp_path, settings_reconcile_seconds=NO_RECONCILE
    )


async def test_a_malformed_account_never_blinds_the_other_copies(
    slow_reconcile_config: Config,
    raw_redis: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with AppHarness(slow_reconcile_config) as h:
        admin = h.client
        await setup_password(admin)
        r = await import_docs(admin, auth_json(account_id="acct-good", email="good@example.com"))
        assert r.status_code == 200, r.text
        accounts = h.parts.accounts
        await eventually(lambda: len(accounts.accounts) == 1)

        # A hash without an email or tokens, announced as the next change of the collection.
        bad = f"{prefix}account:acct-bad"
        raw_redis.hset(bad, mapping={"id": "acct-bad", "status": "active"})
        raw_redis.sadd(f"{prefix}accounts", "acct-bad")
        version = raw_redis.incr(f"{prefix}accounts:version")
        epoch = raw_redis.get(f"{prefix}accounts:epoch").decode()  # type: ignore[union-attr]
        message = {
            "version": version,
            "epoch": epoch,
            "id": "acct-bad",
            "fields": {"id": "acct-bad", "status": "active"},
        }
        with caplog.at_level(logging.WARNING):
            raw_redis.publish(f"{prefix}ch:accounts", json.dumps(message))
            await eventually(lambda: accounts.version == version)
        assert "acct-bad" in caplog.text
        assert [a.email for a in accounts.serving()] == ["good@example.com"]

        # The shared subscription still carries settings and keys, well inside the reconcile
        # interval.
        r = await admin.put("/api/settings", json={**REQUIRED, "routing_strategy": "round_robin"})
        assert r.status_code == 200, r.text
        r = await admin.post("/api/api-keys", json={"name": "after"})
        assert r.status_code == 201, r.text
        await eventually(lambda: h.parts.api_keys.check_key(r.json()["key"]) is not None)

        # A full reload (a gap in the versions) skips the bad entry and keeps the good one.
        gap = {"version": version + 5, "epoch": epoch, "resync": True}
        raw_redis.set(f"{prefix}accounts:version", version + 5)
        raw_redis.publish(f"{prefix}ch:accounts", json.dumps(gap))
        await eventually(lambda: accounts.version == version + 5)
        assert [a.email for a in accounts.serving()] == ["good@example.com"]
        listed = (await admin.get("/api/accounts")).json()["accounts"]
        assert [a["email"] for a in listed] == ["good@example.com"]
        assert (await h.client.get("/health/ready")).status_code == 200


async def test_missing_fields_never_grant_anything(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    """A key record without ``is_active`` is inactive; an account without ``status`` does not
    serve (a record from a half-finished write, or an older or newer pod's shape)."""
    made = (await admin.post("/api/api-keys", json={"name": "k"})).json()
    r = await import_docs(admin, auth_json())
    assert r.status_code == 200, r.text
    account_id = r.json()["results"][0]["account"]["id"]

    record = json.loads(raw_redis.hget(f"{prefix}apikeys", made["id"]))  # type: ignore[arg-type]
    del record["is_active"]
    raw_redis.hset(f"{prefix}apikeys", made["id"], json.dumps(record))
    raw_redis.hdel(f"{prefix}account:{account_id}", "status")
    # Make both copies reload from the store.
    keys, accounts = harness.parts.api_keys, harness.parts.accounts
    await keys.sync()
    await accounts.sync()

    assert keys.check_key(made["key"]) is None
    assert accounts.serving() == []
    assert accounts.accounts[account_id].status == "unknown"


async def test_not_ready_until_every_copy_has_loaded(
    config: Config, raw_redis: redis.Redis, prefix: str
) -> None:
    async with AppHarness(config) as h:
        await setup_password(h.client)
    # The accounts index holds the wrong type: that copy cannot load, the others can.
    raw_redis.set(f"{prefix}accounts", "not a set")
    async with AppHarness(config) as h:
        await eventually(lambda: h.parts.api_keys.loaded)
        assert h.parts.settings.current is not None
        assert not h.parts.accounts.loaded
        r = await h.client.get("/health/ready")
        assert r.status_code == 503
        assert r.json()["status"] == "starting"
        assert (await h.client.get("/v1/models")).status_code == 503

        raw_redis.delete(f"{prefix}accounts")
        # Both copies that read the index (the accounts, their hot states) load in the same
        # reconcile round, one after the other.
        await eventually(
            lambda: h.parts.accounts.loaded and h.parts.account_states.loaded,
            timeout=config.settings_reconcile_seconds + 1,
        )
        assert (await h.client.get("/health/ready")).status_code == 200
