"""The hot state of accounts, kept apart from the cold record: last writer wins by the time of
observation, no global version, every process's copy merges messages and reads the same way."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import redis

from service.accounts.domain import (
    ACTIVE,
    AccountState,
    Cooldown,
    HotState,
    Usage,
    status,
)
from service.accounts.hot import HotStore, LiveAccountStates
from service.config import Config
from service.core.connection import Connection, connect
from tests.conftest import AppHarness, make_config, setup_password
from tests.factories import auth_json
from tests.test_accounts import account_hash, accounts_version, import_docs


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def one_account(client: httpx.AsyncClient) -> str:
    r = await import_docs(client, auth_json())
    assert r.status_code == 200, r.text
    account_id: str = r.json()["results"][0]["account"]["id"]
    return account_id


def usage(primary: float, *, at: float, reset: float | None = None) -> Usage:
    return Usage(primary_used_percent=primary, primary_reset_at=reset, updated_at=at)


async def listed_account(client: httpx.AsyncClient, account_id: str) -> dict[str, object]:
    r = await client.get("/api/accounts")
    assert r.status_code == 200
    (found,) = [a for a in r.json()["accounts"] if a["id"] == account_id]
    return found  # type: ignore[no-any-return]


async def test_learning_usage_never_touches_the_cold_record(
    admin: httpx.AsyncClient, harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    account_id = await one_account(admin)
    cold_before = account_hash(raw_redis, prefix, account_id)
    version_before = accounts_version(raw_redis, prefix)
    pubsub = raw_redis.pubsub()
    pubsub.subscribe(f"{prefix}ch:accounts")
    pubsub.get_message(timeout=1)  # the subscribe confirmation

    now = time.time()
    assert await harness.parts.hot_store.learn(account_id, usage=(now, usage(42, at=now))) == 1

    assert account_hash(raw_redis, prefix, account_id) == cold_before
    assert accounts_version(raw_redis, prefix) == version_before
    assert pubsub.get_message(timeout=0.2) is None, (
        "a usage change went out on the accounts channel"
    )
    pubsub.close()
    stored = raw_redis.hgetall(f"{prefix}account_state:{account_id}")
    assert json.loads(stored[b"usage"])["primary_used_percent"] == 42
    assert b"tokens" not in stored
    await eventually(lambda: harness.parts.account_states.get(account_id).usage_at == now)
    assert (await listed_account(admin, account_id))["primary_used_percent"] == 42


async def test_an_older_observation_never_overwrites_a_newer_one(
    admin: httpx.AsyncClient, harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    account_id = await one_account(admin)
    hot = harness.parts.hot_store
    now = time.time()
    assert await hot.learn(account_id, usage=(now, usage(80, at=now))) == 1
    # Arrives later, was seen earlier (another process, a slow response): dropped whole.
    assert await hot.learn(account_id, usage=(now - 5, usage(10, at=now - 5))) == 0
    # Parts are judged apart: an older usage with a newer cooldown keeps only the cooldown.
    written = await hot.learn(
        account_id,
        usage=(now - 1, usage(20, at=now - 1)),
        cooldown=(now + 1, Cooldown(until=now + 60, failures=2)),
    )
    assert written == 1
    stored = raw_redis.hgetall(f"{prefix}account_state:{account_id}")
    assert json.loads(stored[b"usage"])["primary_used_percent"] == 80
    assert json.loads(stored[b"cooldown"]) == {"until": now + 60, "failures": 2, "limited": False}
    # A repeat (the client's retry after a lost reply) changes nothing.
    assert await hot.learn(account_id, usage=(now, usage(80, at=now))) == 0
    await eventually(lambda: harness.parts.account_states.get(account_id).cooldown.failures == 2)
    state = harness.parts.account_states.get(account_id)
    assert state.usage.primary_used_percent == 80
    assert (await listed_account(admin, account_id))["status"] == "rate_limited"


def test_copies_merge_out_of_order_messages_to_the_newest_of_each_part() -> None:
    # Messages only: the store is never reached.
    copy = LiveAccountStates(HotStore(Connection(connect("redis://127.0.0.1:9"), "unused:")))

    def message(fields: dict[str, str]) -> bytes:
        return msgspec.json.encode({"id": "acc", "fields": fields})

    newer = {
        "usage": msgspec.json.encode(usage(90, at=20)).decode(),
        "usage_at": "20",
        "last_used": "20",
        "last_used_at": "20",
    }
    older = {
        "usage": msgspec.json.encode(usage(5, at=10)).decode(),
        "usage_at": "10",
        "cooldown": '{"until":99,"failures":1}',
        "cooldown_at": "15",
        "last_used": "10",
        "last_used_at": "10",
    }
    copy.on_message(message(newer))
    copy.on_message(message(older))
    state = copy.get("acc")
    assert (state.usage.primary_used_percent, state.usage_at) == (90, 20)
    assert (state.cooldown.until, state.cooldown_at) == (99, 15)
    assert state.last_used_at == 20
    copy.on_message(b"not json")  # an unreadable message changes nothing
    assert copy.get("acc") == state


async def test_hot_state_reaches_another_process_and_a_lost_message_is_made_up(
    config: Config, raw_redis: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    other_config = make_config(
        config.redis_url or "", prefix, tmp_path / "other", settings_reconcile_seconds=0.3
    )
    async with AppHarness(config) as a, AppHarness(other_config) as b:
        await setup_password(a.client)
        account_id = await one_account(a.client)
        now = time.time()
        await a.parts.hot_store.learn(account_id, usage=(now, usage(55, at=now)))
        await eventually(lambda: b.parts.account_states.get(account_id).usage_at == now, 1.0)

        # Written behind every copy's back (no message): the reconcile loop reads it.
        later = now + 1
        key = f"{prefix}account_state:{account_id}"
        raw_redis.hset(
            key, mapping={"usage": msgspec.json.encode(usage(77, at=later)), "usage_at": later}
        )
        await eventually(
            lambda: b.parts.account_states.get(account_id).usage.primary_used_percent == 77, 2.0
        )


async def test_deleting_an_account_deletes_its_state_and_refuses_late_observations(
    admin: httpx.AsyncClient, harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    account_id = await one_account(admin)
    now = time.time()
    await harness.parts.hot_store.learn(account_id, usage=(now, usage(30, at=now)), used_at=now)
    assert raw_redis.exists(f"{prefix}account_state:{account_id}")
    assert (await admin.delete(f"/api/accounts/{account_id}")).status_code == 204
    assert not raw_redis.exists(f"{prefix}account_state:{account_id}")
    # An observation from a request that was still under way arrives after the delete.
    assert await harness.parts.hot_store.learn(account_id, used_at=now + 1) == -1
    assert not raw_redis.exists(f"{prefix}account_state:{account_id}")


def test_status_follows_the_hot_state_and_its_reset_times() -> None:
    account = AccountState(
        id="acc",
        chatgpt_account_id="c",
        email="e",
        plan_type=None,
        status=ACTIVE,
        created_at=0,
        sealed_tokens=b"",
        tokens_version=1,
    )
    now = 1_000.0

    def state(**u: object) -> HotState:
        return HotState(usage=Usage(**u), usage_at=now)  # type: ignore[arg-type]

    assert status(account, HotState(), now) == "active"
    assert status(account, state(primary_used_percent=100, primary_reset_at=now + 1), now) == (
        "rate_limited"
    )
    # The window's known reset time has passed: it serves again, without waiting for a poll.
    assert status(account, state(primary_used_percent=100, primary_reset_at=now - 1), now) == (
        "active"
    )
    assert status(account, state(secondary_used_percent=100), now) == "quota_exceeded"
    assert status(account, state(limit_reached=True, primary_reset_at=now + 5), now) == (
        "rate_limited"
    )
    cooling = HotState(cooldown=Cooldown(until=now + 10, failures=3), cooldown_at=now)
    assert status(account, cooling, now) == "rate_limited"
    assert status(account, cooling, now + 11) == "active"
    paused = msgspec.structs.replace(account, status="paused")
    assert status(paused, state(primary_used_percent=100), now) == "paused"


def test_a_status_learned_by_an_older_pod_reads_as_active() -> None:
    """Pods from before the split wrote rate_limited/quota_exceeded into the cold record; that
    is the hot state's to say now, so it must not keep an account out for ever."""
    fields = {
        "id": "acc",
        "chatgpt_account_id": "c",
        "email": "e",
        "tokens": "sealed",
        "status": "quota_exceeded",
    }
    assert AccountState.from_fields(fields).status == ACTIVE
