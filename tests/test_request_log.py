"""The request log and the usage summary (CONTRACT §8): one entry per proxied request, whatever
became of it, written off the request's path; paging, filters, the cap, the counters; nothing
secret stored; entries kept through a Redis outage and stored once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.config import Config
from service.core.connection import Connection, connect, new_write_id
from service.ops.request_log import Entry, RequestLogStore
from tests.conftest import PASSWORD, AppHarness, make_config, setup_password
from tests.fake_upstream import FakeUpstream
from tests.proxy_support import RESPONSES, Pool, body, event_names
from tests.support import RedisServer

LOGS = "/api/request-logs"
SUMMARY = "/api/usage/summary"
PROMPT = "a-prompt-that-must-never-be-stored"


def config_for(
    redis_url: str, prefix: str, tmp_path: Path, fake: FakeUpstream, **extra: Any
) -> Config:
    return make_config(
        redis_url, prefix, tmp_path, upstream_base_url=fake.url, auth_base_url=fake.url, **extra
    )


@pytest.fixture
async def pool(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis, fake: FakeUpstream
) -> AsyncIterator[Pool]:
    async with AppHarness(config_for(redis_url, prefix, tmp_path, fake)) as h:
        await setup_password(h.client)
        yield Pool(h, fake)


async def new_key(pool: Pool, name: str) -> tuple[str, str]:
    """A new key, once this process's live copy knows it."""
    r = await pool.client.post("/api/api-keys", json={"name": name})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    deadline = time.monotonic() + 3
    while pool.h.parts.api_keys.check_key(key) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return r.json()["id"], key


async def entries(client: httpx.AsyncClient, count: int, **params: Any) -> list[dict[str, Any]]:
    """The newest entries once ``count`` of them (matching ``params``) have been written."""
    deadline = time.monotonic() + 5
    while True:
        r = await client.get(LOGS, params={"limit": 500, **params})
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["requests"]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, found
            return found
        await asyncio.sleep(0.05)


def completed_usage(raw: bytes) -> dict[str, Any]:
    for block in raw.split(b"\n\n"):
        if b"event: response.completed" in block:
            data = block.split(b"data: ", 1)[1]
            usage: dict[str, Any] = json.loads(data)["response"]["usage"]
            return usage
    raise AssertionError("no response.completed event")


async def test_a_served_request_leaves_one_full_entry(pool: Pool, fake: FakeUpstream) -> None:
    await pool.add("acct-a")
    key_id, key = await new_key(pool, "laptop")
    r = await pool.client.post(
        RESPONSES,
        json=body(PROMPT),
        headers={"authorization": f"Bearer {key}", "session_id": "thread-7"},
    )
    assert r.status_code == 200
    usage = completed_usage(r.content)
    (entry,) = await entries(pool.client, 1)
    assert entry["status"] == 200
    assert entry["error_code"] is None
    assert (entry["method"], entry["path"]) == ("POST", RESPONSES)
    assert (entry["model"], entry["stream"]) == ("gpt-5.1-codex", True)
    assert (entry["api_key_id"], entry["api_key_name"]) == (key_id, "laptop")
    assert entry["account_id"] == pool.ids["acct-a"]
    assert entry["account_email"] == "acct-a@example.com"
    assert entry["attempts"] == 1
    assert entry["thread_sticky"] is False  # a new thread: routed, then pinned
    assert 0 < entry["first_event_ms"] <= entry["duration_ms"]
    assert entry["input_tokens"] == usage["input_tokens"] > 0
    assert entry["cached_input_tokens"] == usage["input_tokens_details"]["cached_tokens"]
    assert entry["output_tokens"] == usage["output_tokens"] > 0
    assert entry["reasoning_tokens"] == 0
    assert entry["upstream_request_id"] == r.headers["x-request-id"]
    assert entry["request_id"] == r.headers["x-codex-lb-request-id"]
    assert entry["at"].endswith("Z")
    assert entry["settings_version"] == pool.h.parts.settings.current.version  # type: ignore[union-attr]
    # The thread's next turn was decided by its pin.
    r = await pool.client.post(
        RESPONSES, json=body(), headers={"authorization": f"Bearer {key}", "session_id": "thread-7"}
    )
    newest = (await entries(pool.client, 2))[0]
    assert newest["thread_sticky"] is True
    # Nothing of the request's content or credentials is kept.
    rows = await _stream(pool)
    raw = b"".join(v for _, fields in rows for v in fields.values())
    for secret in (PROMPT, "Hello from", key, "Bearer", "thread-7", PASSWORD):
        assert secret.encode() not in raw, secret


async def _stream(pool: Pool) -> list[tuple[bytes, dict[bytes, bytes]]]:
    parts = pool.h.parts
    rows: list[tuple[bytes, dict[bytes, bytes]]] = await parts.conn.client.xrange(
        parts.conn.keys.request_log
    )
    return rows


async def test_every_kind_of_outcome_leaves_an_entry(pool: Pool, fake: FakeUpstream) -> None:
    await pool.add("acct-a", "acct-b")
    await pool.settings(sticky_threads_enabled=True)
    # Failed over: the thread's account answers 503 once, the other serves.
    _, name = await pool.ask(headers={"session_id": "t-1"})
    fake.configure(name, fail=503, fail_times=1)
    r = await pool.client.post(RESPONSES, json=body(), headers={"session_id": "t-1"})
    assert r.status_code == 200
    failover = (await entries(pool.client, 2))[0]
    assert failover["attempts"] == 2
    assert failover["status"] == 200
    assert failover["account_id"] != pool.ids[name]
    # Rejected for bad input.
    r = await pool.client.post(RESPONSES, content=b"{nope", headers={"content-type": "x"})
    assert r.status_code == 400
    # Not streamed: JSON, its usage read all the same.
    r = await pool.client.post("/v1/responses", json=body(stream=False))
    assert r.status_code == 200
    json_usage = r.json()["usage"]
    # Chat completions, and the models list (off the fast lane).
    r = await pool.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-5.1-codex", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    r = await pool.client.get("/v1/models")
    assert r.status_code == 200
    # Every upstream failing.
    fake.configure("acct-a", fail=500)
    fake.configure("acct-b", fail=500)
    r = await pool.client.post(RESPONSES, json=body())
    assert r.status_code == 502
    # Refused by the gate: key auth on, no key.
    await pool.settings(api_key_auth_enabled=True)
    await new_key(pool, "needed")
    r = await pool.client.post(RESPONSES, json=body())
    assert r.status_code == 401
    found = (await entries(pool.client, 8))[:7]
    got = [(e["path"], e["status"], e["error_code"], e["model"], e["stream"]) for e in found]
    assert got == [
        (RESPONSES, 401, "invalid_api_key", None, False),
        (RESPONSES, 502, "upstream_unavailable", "gpt-5.1-codex", True),
        ("/v1/models", 200, None, None, False),
        ("/v1/chat/completions", 200, None, "gpt-5.1-codex", False),
        ("/v1/responses", 200, None, "gpt-5.1-codex", False),
        (RESPONSES, 400, "invalid_json", None, False),
        (RESPONSES, 200, None, "gpt-5.1-codex", True),
    ]
    assert found[1]["attempts"] == 1  # the other account still cools down from its 503
    assert found[1]["account_id"] is None
    assert found[4]["input_tokens"] == json_usage["input_tokens"]
    assert found[4]["output_tokens"] == json_usage["output_tokens"]
    assert found[3]["output_tokens"] is not None  # the chat answer's usage
    assert found[0]["api_key_id"] is None
    assert found[0]["attempts"] == 0


async def test_paging_and_filters(pool: Pool, fake: FakeUpstream) -> None:
    await pool.add("acct-a", "acct-b")
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    key_id, key = await new_key(pool, "one")
    for i in range(6):
        auth = {"authorization": f"Bearer {key}"} if i % 2 else {}
        await pool.client.post(RESPONSES, json=body(), headers=auth)
    await pool.client.post(RESPONSES, content=b"[", headers={"content-type": "x"})
    every = await entries(pool.client, 7)
    # Pages of 3, newest first, each starting where the last stopped.
    seen: list[str] = []
    before: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"before": before} if before else {})}
        page = (await pool.client.get(LOGS, params=params)).json()
        seen += [e["id"] for e in page["requests"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == [e["id"] for e in every]
    nothing = (await pool.client.get(LOGS, params={"before": "0-0"})).json()
    assert nothing == {"requests": [], "next_before": None}
    assert len(set(seen)) == 7
    by_key = (await pool.client.get(LOGS, params={"api_key_id": key_id})).json()["requests"]
    assert len(by_key) == 3
    assert {e["api_key_id"] for e in by_key} == {key_id}
    a = pool.ids["acct-a"]
    by_account = (await pool.client.get(LOGS, params={"account_id": a})).json()["requests"]
    assert len(by_account) == 3
    assert {e["account_id"] for e in by_account} == {a}
    errors = (await pool.client.get(LOGS, params={"status": "error"})).json()["requests"]
    assert [e["status"] for e in errors] == [400]
    assert len((await pool.client.get(LOGS, params={"status": 200})).json()["requests"]) == 6
    assert len((await pool.client.get(LOGS, params={"status": "ok"})).json()["requests"]) == 6


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        (LOGS, {"limit": "0"}, "limit"),
        (LOGS, {"limit": "501"}, "limit"),
        (LOGS, {"limit": "ten"}, "limit"),
        (LOGS, {"limit": ""}, "limit"),
        (LOGS, {"before": "99999999999999999999-0"}, "before"),
        (LOGS, {"before": ""}, "before"),
        (LOGS, {"before": "yesterday"}, "before"),
        (LOGS, {"status": "bad"}, "status"),
        (LOGS, {"status": "99"}, "status"),
        (LOGS, {"account_id": "x" * 201}, "account_id"),
        (SUMMARY, {"window": "1h"}, "window"),
        (SUMMARY, {"window": ""}, "window"),
    ],
)
async def test_bad_query_is_422_naming_the_field(
    pool: Pool, path: str, params: dict[str, str], field: str
) -> None:
    r = await pool.client.get(path, params=params)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    assert f"`{field}`" in error["message"]


async def test_the_log_needs_a_dashboard_session(pool: Pool) -> None:
    anonymous = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=pool.h.app), base_url="http://testserver"
    )
    async with anonymous:
        for path in (LOGS, SUMMARY):
            assert (await anonymous.get(path)).status_code == 401


async def test_usage_summary_per_key_and_per_account(pool: Pool, fake: FakeUpstream) -> None:
    await pool.add("acct-a")
    key_id, key = await new_key(pool, "ci")
    outputs = 0
    for _ in range(3):
        r = await pool.client.post(
            RESPONSES, json=body(), headers={"authorization": f"Bearer {key}"}
        )
        outputs += completed_usage(r.content)["output_tokens"]
    await pool.client.post(RESPONSES, json=body())  # keyless, from this machine
    await pool.client.post(
        RESPONSES, content=b"[", headers={"content-type": "x", "authorization": f"Bearer {key}"}
    )
    await entries(pool.client, 5)
    for window in ("24h", "7d"):
        summary = (await pool.client.get(SUMMARY, params={"window": window})).json()
        assert summary["window"] == window
        keys = {k["api_key_id"]: k for k in summary["api_keys"]}
        assert keys[key_id]["name"] == "ci"
        assert (keys[key_id]["requests"], keys[key_id]["errors"]) == (4, 1)
        assert keys[key_id]["output_tokens"] == outputs
        assert (keys[None]["requests"], keys[None]["errors"]) == (1, 0)
        (account,) = summary["accounts"]
        assert account["account_id"] == pool.ids["acct-a"]
        assert account["email"] == "acct-a@example.com"
        assert (account["requests"], account["errors"]) == (4, 0)
        assert account["input_tokens"] > 0
    assert (await pool.client.get(SUMMARY)).json()["window"] == "24h"


async def test_the_log_is_capped_and_zero_turns_it_off(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis, fake: FakeUpstream
) -> None:
    for cap, kept in ((3, 3), (0, 0)):
        raw_redis.delete(f"{prefix}request_log")
        config = config_for(redis_url, prefix, tmp_path, fake, request_log_max=cap)
        async with AppHarness(config) as h:
            pool = Pool(h, fake)
            if cap:
                await setup_password(h.client)
            else:
                r = await h.client.post(
                    "/api/dashboard-auth/password/login", json={"password": PASSWORD}
                )
                assert r.status_code == 200, r.text
            await pool.add("acct-a")
            for _ in range(5):
                assert (await pool.client.post(RESPONSES, json=body())).status_code == 200
            writer = h.parts.log_writer
            deadline = time.monotonic() + 5
            while writer.written < (5 if cap else 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a writer that should not write has had its chance
            assert writer.written == (5 if cap else 0)
            assert raw_redis.xlen(f"{prefix}request_log") == kept
            # Off means off: no counting either.
            summary = (await pool.client.get(SUMMARY)).json()
            assert summary["accounts"][0]["requests"] == 5


async def test_a_batch_sent_again_is_stored_once(redis_url: str, prefix: str) -> None:
    conn = Connection(connect(redis_url), prefix)
    try:
        store = RequestLogStore(conn, 100)
        batch = [Entry(at=time.time(), method="POST", path=RESPONSES, status=200)] * 3
        write_id = new_write_id()
        await store.append(batch, write_id)
        await store.append(batch, write_id)  # its reply was lost: sent again
        assert await conn.client.xlen(conn.keys.request_log) == 3
        summary = await store.summary("24h")
        assert summary.api_keys[None].requests == 3
    finally:
        await conn.close()


async def test_entries_made_while_redis_is_away_are_written_once_it_returns(
    fake: FakeUpstream, tmp_path: Path, prefix: str
) -> None:
    server = RedisServer(appendonly=True).start()
    try:
        config = config_for(server.url, prefix, tmp_path, fake)
        async with AppHarness(config) as h:
            await setup_password(h.client)
            pool = Pool(h, fake)
            await pool.add("acct-a")
            port = server.port
            server.kill()
            # The proxy serves on its live copies; the entries wait in memory.
            for _ in range(4):
                r = await pool.client.post(RESPONSES, json=body())
                assert r.status_code == 200
                assert event_names(r.content)[-1] == "response.completed"
            await asyncio.sleep(0.5)
            assert h.parts.log_writer.written == 0
            server.port = port
            server.start()
            deadline = time.monotonic() + 10
            while h.parts.log_writer.written < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert h.parts.log_writer.written == 4
            assert h.parts.log_writer.dropped == 0
            assert server.client().xlen(f"{prefix}request_log") == 4
    finally:
        server.stop()
