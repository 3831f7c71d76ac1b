"""Writes to shared state say what happened (CONTRACT §2): a write whose reply was lost and that
the client retried is answered as the write it was, not as a conflict or a second write; Redis
refusing a command is a 500 with the cause logged, never "nothing was written"; and TOTP
changes are one atomic step with the settings."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.core.connection import Connection, WriteScript
from service.core.errors import StoreUnavailable
from tests.conftest import AppHarness, make_config, setup_password
from tests.support import RedisServer

pytestmark = pytest.mark.timeout(30)

AUTH = "/api/dashboard-auth"
REQUIRED = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}


class LostReply:
    """Drops the reply of the next run of one script after Redis has run it, as a connection
    that dies between the server's commit and our read would; redis-py then sends it again."""

    def __init__(self, store: Connection):
        self.client = store.client
        self.sha = ""
        self.dropped = 0
        self._send = store.client._send_command_parse_response

    def arm(self, script: WriteScript) -> None:
        self.sha = script._script.sha

    async def send(self, conn: Any, command_name: Any, *args: Any, **options: Any) -> Any:
        reply = await self._send(conn, command_name, *args, **options)
        if self.sha and command_name == "EVALSHA" and args[1] == self.sha:
            self.sha = ""
            self.dropped += 1
            raise RedisConnectionError("reply lost after the script committed")
        return reply


@pytest.fixture
def lost_reply(harness: AppHarness) -> Iterator[LostReply]:
    client = harness.parts.conn.client
    hook = LostReply(harness.parts.conn)
    client._send_command_parse_response = hook.send  # type: ignore[method-assign]
    yield hook
    del client._send_command_parse_response


async def test_a_settings_write_retried_after_a_lost_reply_is_that_write(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    lost_reply: LostReply,
    raw_redis: redis.Redis,
    prefix: str,
) -> None:
    lost_reply.arm(harness.parts.settings_store._cas)
    r = await admin.put(
        "/api/settings",
        json={**REQUIRED, "routing_strategy": "round_robin"},
        headers={"If-Match": '"1"'},
    )
    assert lost_reply.dropped == 1
    assert r.status_code == 200, r.text  # not 409: the retry found its own write
    assert r.json()["version"] == 2
    assert raw_redis.llen(f"{prefix}settings:history") == 1

    lost_reply.arm(harness.parts.settings_store._cas)
    r = await admin.put("/api/settings", json=REQUIRED)
    assert (r.status_code, r.json()["version"]) == (200, 3)  # one version, not two
    assert raw_redis.llen(f"{prefix}settings:history") == 2


async def test_a_key_delete_retried_after_a_lost_reply_is_204(
    harness: AppHarness, admin: httpx.AsyncClient, lost_reply: LostReply
) -> None:
    made = (await admin.post("/api/api-keys", json={"name": "k"})).json()
    lost_reply.arm(harness.parts.api_keys.store._write)
    r = await admin.delete(f"/api/api-keys/{made['id']}")
    assert lost_reply.dropped == 1
    assert r.status_code == 204, r.text  # not 404: the retry found its own delete
    assert (await admin.get("/api/api-keys")).json()["api_keys"] == []


async def test_redis_refusing_a_write_is_a_500_with_the_cause_logged(
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw_redis.set(f"{prefix}apikeys", "a string where a hash belongs")
    with caplog.at_level(logging.ERROR):
        r = await admin.post("/api/api-keys", json={"name": "k"})
    assert r.status_code == 500, r.text
    assert r.json() == {"error": {"code": "internal_error", "message": "Internal error"}}
    assert "WRONGTYPE" in caplog.text


# --- TOTP: the secret and the settings in one step ---------------------------------------------


def fail_settings_writes(harness: AppHarness) -> None:
    async def unreachable(*args: object, **kwargs: object) -> tuple[bool, int]:
        raise StoreUnavailable()

    harness.parts.settings_store.compare_and_set = unreachable  # type: ignore[method-assign]


def restore_settings_writes(harness: AppHarness) -> None:
    del harness.parts.settings_store.compare_and_set


async def test_totp_confirm_that_fails_writes_neither_secret_nor_setting(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    secret = (await admin.post(f"{AUTH}/totp/setup/start")).json()["secret"]
    fail_settings_writes(harness)
    r = await admin.post(f"{AUTH}/totp/setup/confirm", json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 503, r.text
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is None
    restore_settings_writes(harness)
    settings = (await admin.get("/api/settings")).json()
    assert (settings["totp_configured"], settings["version"]) == (False, 1)


async def test_totp_disable_that_fails_keeps_secret_and_setting(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    secret = (await admin.post(f"{AUTH}/totp/setup/start")).json()["secret"]
    totp = pyotp.TOTP(secret)
    r = await admin.post(f"{AUTH}/totp/setup/confirm", json={"code": totp.now()})
    assert r.status_code == 200, r.text
    r = await admin.put("/api/settings", json={**REQUIRED, "totp_required_on_login": True})
    assert r.status_code == 200, r.text

    fail_settings_writes(harness)
    r = await admin.post(f"{AUTH}/totp/disable", json={"code": totp.at(time.time() + 30)})
    assert r.status_code == 503, r.text
    # Still required, so the secret must still be there: otherwise nobody could log in.
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is not None
    restore_settings_writes(harness)
    settings = (await admin.get("/api/settings")).json()
    assert (settings["totp_configured"], settings["totp_required_on_login"]) == (True, True)


async def test_redis_turning_writes_away_is_a_503(tmp_path: Path) -> None:
    """Out of memory with noeviction (or a read-only replica, a failed save): Redis ran nothing,
    so it is "unavailable, nothing was written", and the live copies still load (reads)."""
    server = RedisServer().start()
    try:
        async with AppHarness(make_config(server.url, "oom:", tmp_path)) as h:
            await setup_password(h.client)
            server.client().config_set("maxmemory", "1")
            try:
                r = await h.client.post("/api/api-keys", json={"name": "k"})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                await h.parts.api_keys.sync()
                await h.parts.accounts.sync()
            finally:
                server.client().config_set("maxmemory", "0")
    finally:
        server.stop()
