"""The proxy routes in one process (the app in-process, the fake upstream as a real process on
loopback): what is forwarded, what comes back, failover, cooldowns, usage learning, stickiness."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.config import Config
from tests.conftest import AppHarness, make_config, setup_password
from tests.fake_upstream import FakeUpstream
from tests.proxy_support import (
    IMPORT,
    RESPONSES,
    Pool,
    answered_by,
    body,
    event_names,
    import_files,
    sse_text,
)
from tests.support import RedisServer


@pytest.fixture
async def pool(proxy_config: Config, fake: FakeUpstream) -> AsyncIterator[Pool]:
    async with AppHarness(proxy_config) as h:
        await setup_password(h.client)
        yield Pool(h, fake)


# --- what is forwarded and what comes back ----------------------------------------------------


async def test_a_stream_passes_through_with_the_accounts_credentials_only(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a")
    sent = json.dumps(
        {**body(), "tools": [{"type": "brand_new_tool", "x": {"y": [1, 2]}}], "store": True},
        separators=(",", ":"),
    ).encode()
    r = await pool.client.post(
        RESPONSES,
        content=sent,
        headers={
            "content-type": "application/json",
            "authorization": "Bearer sk-client-secret",
            "cookie": "dashboard_session=abc",
            "session_id": "thread-1",
            "originator": "codex_cli_rs",
            "x-forwarded-for": "198.51.100.1",
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert event_names(r.content)[0] == "response.created"
    assert event_names(r.content)[-1] == "response.completed"
    assert answered_by(sse_text(r.content)) == "acct-a"
    # The upstream's headers reach the client, its cookies never do.
    for name in ("x-request-id", "x-codex-primary-used-percent", "x-codex-turn-state"):
        assert name in r.headers, name
    assert any(k.startswith("openai-") for k in r.headers)
    assert "set-cookie" not in r.headers
    (seen,) = fake.requests(path="/codex/responses")
    headers = seen["headers"]
    assert headers["chatgpt-account-id"] == "acct-a"
    assert headers["authorization"].startswith("Bearer ")
    assert "sk-client-secret" not in headers["authorization"]
    assert "cookie" not in headers
    assert "x-forwarded-for" not in headers
    assert headers["session_id"] == "thread-1"
    assert headers["originator"] == "codex_cli_rs"
    # Byte for byte: the unknown tool and store=true reach the upstream as sent.
    assert seen["body_sha256"] == hashlib.sha256(sent).hexdigest()


async def test_json_when_not_streamed_and_the_other_forwarded_routes(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a")
    r = await pool.client.post("/v1/responses", json=body(stream=False))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["output"][0]["content"][0]["text"].startswith("Hello from acct-a")
    for prefix in ("/backend-api/codex", "/v1"):
        r = await pool.client.post(f"{prefix}/responses/compact", json={"model": "m", "input": []})
        assert r.status_code == 200, r.text
    assert len(fake.requests(path="/codex/responses/compact")) == 2
    r = await pool.client.get("/backend-api/codex/models?client_version=1.2.3")
    assert r.status_code == 200, r.text
    assert "gpt-5.1-codex" in [m["slug"] for m in r.json()["models"]]
    assert fake.requests(path="/codex/models")[0]["path"].endswith("client_version=1.2.3")
    audio = bytes(range(256)) * 500
    r = await pool.client.post(
        "/backend-api/transcribe", files={"file": ("a.webm", audio, "audio/webm")}
    )
    assert r.status_code == 200, r.text
    assert hashlib.sha256(audio).hexdigest() in r.text
    r = await pool.client.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "gpt-5.1-codex"


async def test_bad_input(pool: Pool) -> None:
    await pool.add("acct-a")
    r = await pool.client.post(
        RESPONSES, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    r = await pool.client.post(RESPONSES, content=b"[1, 2]")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    r = await pool.client.post(RESPONSES, content=b"{" + b" " * (16 * 1024 * 1024) + b"}")
    assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
    r = await pool.client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = await pool.client.post("/backend-api/codex/nothing", json={})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


# --- failover, cooldowns and the pool's refusals ---------------------------------------------


async def state_of(pool: Pool, name: str) -> dict[bytes, bytes]:
    """The account's hot state as stored in Redis (once the learner wrote it)."""
    parts = pool.h.parts
    key = parts.conn.keys.account_state + pool.ids[name]
    deadline = time.monotonic() + 3
    while True:
        stored: dict[bytes, bytes] = await parts.conn.client.hgetall(key)
        if stored or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.02)


async def test_a_429_cools_the_account_until_its_reset_and_the_request_fails_over(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    resets = int(time.time()) + 900
    # The 429 body's resets_at is the first window's reset (the percent headers say nothing).
    fake.configure("acct-a", fail=429, primary_reset_at=resets)
    served = [(await pool.ask())[1] for _ in range(4)]
    assert served == ["acct-b"] * 4
    # One attempt on a, then never again: it cools down for every process, until the reset.
    assert fake.stats()["accounts"]["acct-a"]["statuses"] == {"429": 1}
    cooldown = json.loads((await state_of(pool, "acct-a"))[b"cooldown"])
    assert cooldown["until"] == resets  # from the 429 body
    accounts = (await pool.client.get("/api/accounts")).json()["accounts"]
    assert {a["chatgpt_account_id"]: a["status"] for a in accounts}["acct-a"] == "rate_limited"


async def test_5xx_and_dropped_connections_fail_over_and_back_off(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b", "acct-c")
    fake.configure("acct-a", fail=503)
    fake.configure("acct-b", fail="drop")
    for _ in range(5):
        _, name = await pool.ask()
        assert name == "acct-c"
    for name in ("acct-a", "acct-b"):
        cooldown = json.loads((await state_of(pool, name))[b"cooldown"])
        assert cooldown["failures"] == 1
        assert cooldown["until"] > time.time()


async def test_every_upstream_failing_is_502_and_every_account_limited_is_429(
    pool: Pool, fake: FakeUpstream
) -> None:
    r = await pool.client.post(RESPONSES, json=body())
    assert (r.status_code, r.json()["error"]["code"]) == (503, "no_accounts")
    await pool.add("acct-a", "acct-b")
    fake.configure("acct-a", fail=500)
    fake.configure("acct-b", fail="drop")
    r = await pool.client.post(RESPONSES, json=body())
    assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_unavailable")
    # Both cool down now (failures, not limits): the next request is refused at once with a
    # 503 the clients retry, not the "usage limit" 429.
    before = fake.stats()["total"]
    r = await pool.client.post(RESPONSES, json=body())
    assert (r.status_code, r.json()["error"]["code"]) == (503, "no_accounts")
    assert fake.stats()["total"] == before


async def test_all_limited_is_429_usage_limit_reached_with_the_earliest_reset(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    now = int(time.time())
    fake.configure("acct-a", fail=429, primary_used_percent=100, primary_reset_at=now + 600)
    fake.configure("acct-b", fail=429, primary_used_percent=100, primary_reset_at=now + 300)
    r = await pool.client.post(RESPONSES, json=body())
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == error["code"] == "usage_limit_reached"
    assert abs(error["resets_at"] - (now + 300)) <= 2
    assert int(r.headers["retry-after"]) > 200
    before = fake.stats()["total"]
    # Known limited: answered at once (no hold, no keep-alives), nothing sent upstream.
    fake.configure("acct-a", delay_first_byte=5)
    fake.configure("acct-b", delay_first_byte=5)
    started = time.monotonic()
    r = await pool.client.post(RESPONSES, json=body())
    assert time.monotonic() - started < 0.5
    assert r.status_code == 429
    assert fake.stats()["total"] == before
    assert abs(r.json()["error"]["resets_at"] - (now + 300)) <= 2


async def test_a_stream_broken_after_bytes_were_sent_ends_with_response_failed(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    fake.configure("acct-a", fail="mid_stream")
    fake.configure("acct-b", fail="mid_stream")
    r = await pool.client.post(RESPONSES, json=body())
    assert r.status_code == 200
    names = event_names(r.content)
    assert names[0] == "response.created"
    assert names[-1] == "response.failed"
    assert "response.completed" not in names
    assert fake.stats()["total"] == 1  # no retry once bytes reached the client


async def test_a_401_refreshes_the_token_once_and_retries(pool: Pool, fake: FakeUpstream) -> None:
    await pool.add("acct-a")
    first = fake.requests(path="/codex/responses")
    await pool.ask()
    token = fake.requests(path="/codex/responses")[len(first)]["headers"]["authorization"][7:]
    fake.revoke(token)
    _, name = await pool.ask()
    assert name == "acct-a"
    tokens = [r["headers"]["authorization"][7:] for r in fake.requests(path="/codex/responses")]
    assert tokens[-2] == token
    assert tokens[-1] != token
    assert len(fake.requests(path="/oauth/token")) == 1


# --- usage learning ---------------------------------------------------------------------------


async def test_usage_headers_and_events_are_learned_for_every_process(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    fake.configure("acct-a", primary_used_percent=42, secondary_used_percent=7)
    fake.configure("acct-b", single_window=True, secondary_used_percent=64)
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    for _ in range(2):
        await pool.ask()
    usage = json.loads((await state_of(pool, "acct-a"))[b"usage"])
    assert (usage["primary_used_percent"], usage["secondary_used_percent"]) == (42, 7)
    assert usage["primary_window_seconds"] == 18000
    lone = json.loads((await state_of(pool, "acct-b"))[b"usage"])
    # A weekly window sent as "primary" is the weekly one.
    assert lone["primary_used_percent"] is None
    assert lone["secondary_used_percent"] == 64
    # A codex.rate_limits event in the stream counts too (the headers said less).
    fake.configure("acct-a", rate_limits_event=True, primary_used_percent=43)
    fake.configure("acct-b", fail=503)
    await pool.ask()
    deadline = time.monotonic() + 3
    while json.loads((await state_of(pool, "acct-a"))[b"usage"])["primary_used_percent"] != 43:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_a_full_window_takes_the_account_out_at_once_and_its_reset_brings_it_back(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    soon = int(time.time()) + 2
    fake.configure("acct-a", primary_used_percent=100, primary_reset_at=soon)
    names = [(await pool.ask())[1] for _ in range(6)]
    # a answered once (saying 100 %), then b alone until a's window resets.
    assert names.count("acct-a") == 1
    assert names[names.index("acct-a") + 1 :] == ["acct-b"] * (5 - names.index("acct-a"))
    fake.configure("acct-a", primary_used_percent=0, primary_reset_at=None)
    while time.time() < soon + 0.1:
        await asyncio.sleep(0.05)
    names = [(await pool.ask())[1] for _ in range(4)]
    assert "acct-a" in names


# --- stickiness -------------------------------------------------------------------------------


async def test_sticky_threads_keep_their_account_and_limited_pins_are_kept(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b", "acct-c")
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=True)
    first = {t: (await pool.ask(headers={"session_id": t}))[1] for t in ("t1", "t2", "t3")}
    for _ in range(3):
        for t, name in first.items():
            assert (await pool.ask(headers={"session_id": t}))[1] == name
    # prompt_cache_key is a thread id too (no header).
    keyed = (await pool.ask(prompt_cache_key="pk-1"))[1]
    for _ in range(3):
        assert (await pool.ask(prompt_cache_key="pk-1"))[1] == keyed
    # A rate-limited pin is skipped, not moved: the thread comes back when it recovers.
    pinned = first["t1"]
    fake.configure(pinned, fail=429, fail_times=1)
    elsewhere = (await pool.ask(headers={"session_id": "t1"}))[1]
    assert elsewhere != pinned
    account_id = pool.ids[pinned]
    stored = await pool.h.parts.routing.pinned("t1")
    assert stored is not None
    assert stored.account_id == account_id
    # Meanwhile the thread stays on one detour, remembered beside the pin.
    assert stored.detour == pool.ids[elsewhere]
    for _ in range(3):
        assert (await pool.ask(headers={"session_id": "t1"}))[1] == elsewhere
    # Recovered (the cooldown ends): back on its account.
    from service.accounts.domain import Cooldown, HotState

    pool.h.parts.account_states.observe(
        account_id, HotState(cooldown=Cooldown(until=None, failures=0), cooldown_at=time.time())
    )
    assert (await pool.ask(headers={"session_id": "t1"}))[1] == pinned


async def test_new_threads_spread_over_the_pool_by_its_weights_within_a_few(pool: Pool) -> None:
    # Six accounts with the same remaining capacity: each of 42 new threads is a weighted random
    # choice, and successive choices spread evenly (proxy/draws), so none gets a share far off
    # its due 7; a share it did not get is quota its window may end with unspent.
    names = [f"acct-{c}" for c in "abcdef"]
    await pool.add(*names)
    await pool.settings(routing_strategy="usage_weighted", sticky_threads_enabled=True)
    spread = Counter([(await pool.ask(headers={"session_id": f"t{i}"}))[1] for i in range(42)])
    assert sorted(spread) == names, spread
    assert all(5 <= count <= 9 for count in spread.values()), spread


async def test_a_paused_or_deleted_pin_moves_and_sticky_off_routes_afresh(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=True)
    pinned = (await pool.ask(headers={"session_id": "t"}))[1]
    other = ({"acct-a", "acct-b"} - {pinned}).pop()
    r = await pool.client.post(f"/api/accounts/{pool.ids[pinned]}/pause")
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 3
    while pool.h.parts.accounts.accounts[pool.ids[pinned]].status != "paused":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert (await pool.ask(headers={"session_id": "t"}))[1] == other
    deadline = time.monotonic() + 3
    while (await pool.h.parts.routing.pinned("t") or (None,))[0] != pool.ids[other]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await pool.client.post(f"/api/accounts/{pool.ids[pinned]}/resume")
    for _ in range(4):
        assert (await pool.ask(headers={"session_id": "t"}))[1] == other
    # Off: every request is routed afresh (round robin alternates).
    await pool.settings(sticky_threads_enabled=False)
    names = {(await pool.ask(headers={"session_id": "t"}))[1] for _ in range(4)}
    assert names == {"acct-a", "acct-b"}


# --- a client that leaves mid-stream ----------------------------------------------------------


async def test_a_client_leaving_mid_stream_cancels_the_upstream_and_leaves_nothing_behind(
    proxy_config: Config, fake: FakeUpstream
) -> None:
    import uvicorn

    from service.app import create_app
    from tests.support import free_port

    app = create_app(proxy_config)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as admin:
            while not server.started:
                await asyncio.sleep(0.02)
            await setup_password(admin)
            parts = app.state.parts
            r = await admin.post(IMPORT, files=import_files(fake, ["acct-a"]))
            assert r.status_code == 200, r.text
            while not parts.accounts.accounts:
                await asyncio.sleep(0.01)
        fake.configure("acct-a", deltas=40, delta_delay=0.25)  # a 10 s stream
        baseline = len(asyncio.all_tasks())
        payload = json.dumps(body()).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST " + RESPONSES.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        await writer.drain()
        head = await reader.readuntil(b"response.created")
        assert b" 200 " in head.split(b"\r\n")[0]
        left = time.monotonic()
        writer.transport.abort()  # the client is gone, mid-stream
        deadline = time.monotonic() + 3
        while fake.stats()["accounts"]["acct-a"]["aborted"] < 1:
            assert time.monotonic() < deadline, "the upstream stream was not cancelled"
            await asyncio.sleep(0.05)
        assert time.monotonic() - left < 2  # not left to run its 10 s
        connector = parts.relay.session.connector
        while len(asyncio.all_tasks()) > baseline or connector._acquired:
            assert time.monotonic() < deadline, (asyncio.all_tasks(), connector._acquired)
            await asyncio.sleep(0.05)
    finally:
        server.should_exit = True
        await serving


# --- timeouts and accounts that cannot serve ----------------------------------------------------


@pytest.fixture
def short_idle(monkeypatch: pytest.MonkeyPatch) -> float:
    """The upstream idle timeout cut from 300 s to 0.6 s (read when the session is made)."""
    from service.proxy import upstream

    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.6)
    return 0.6


async def test_streams_have_an_idle_timeout_and_no_total_one(
    short_idle: float, pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a")
    # 2 s in all, never silent for long: it completes.
    fake.configure("acct-a", deltas=10, delta_delay=0.2)
    r = await pool.client.post(RESPONSES, json=body())
    assert event_names(r.content)[-1] == "response.completed"
    # Silent for longer than the idle timeout after the first bytes: it fails, saying so.
    fake.configure("acct-a", deltas=3, delta_delay=1.5)
    r = await pool.client.post(RESPONSES, json=body())
    assert event_names(r.content)[-1] == "response.failed"
    assert b"silent" in r.content


async def test_an_account_whose_tokens_are_dead_gets_no_more_traffic(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a", "acct-b")
    await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
    for _ in range(2):
        await pool.ask()
    dead = fake.requests(path="/codex/responses")
    access = {r["account_id"]: r["headers"]["authorization"][7:] for r in dead}
    fake.revoke(access["acct-a"])
    # Its refresh token refused too: the account needs re-import.
    from service.accounts.tokens import open_tokens

    account = pool.h.parts.accounts.accounts[pool.ids["acct-a"]]
    fake.revoke(open_tokens(pool.h.parts.box, account.sealed_tokens).refresh_token)
    names = [(await pool.ask())[1] for _ in range(6)]
    assert names == ["acct-b"] * 6
    assert len(fake.requests(path="/oauth/token")) == 1  # tried once, refused
    deadline = time.monotonic() + 3
    while pool.h.parts.accounts.accounts[pool.ids["acct-a"]].status != "reauth_required":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    before = fake.stats()["accounts"]["acct-a"]["requests"]
    names = [(await pool.ask())[1] for _ in range(6)]
    assert names == ["acct-b"] * 6
    assert fake.stats()["accounts"]["acct-a"]["requests"] == before
    # With b dead too, the pool has nobody: 503 no_accounts, not an upstream failure.
    account = pool.h.parts.accounts.accounts[pool.ids["acct-b"]]
    fake.revoke(access["acct-b"])
    fake.revoke(open_tokens(pool.h.parts.box, account.sealed_tokens).refresh_token)
    r = await pool.client.post(RESPONSES, json=body())
    assert (r.status_code, r.json()["error"]["code"]) == (503, "no_accounts")


# --- an account's last units ------------------------------------------------------------------


async def test_requests_in_flight_never_overshoot_an_accounts_last_units(
    pool: Pool, fake: FakeUpstream
) -> None:
    await pool.add("acct-a")
    # 8 units a (long) window: each request shows as 12.5 % more in the next answer's headers.
    fake.configure(
        "acct-a",
        quota={"capacity": 8, "window_seconds": 600, "weekly_capacity": 1000},
        delay_first_byte=0.3,
    )
    fake.quota_start()
    for _ in range(2):  # two answers in a row: the proxy learns what one request costs
        await pool.ask()
    # 6 units left; 12 requests at once.
    replies = await asyncio.gather(*(pool.client.post(RESPONSES, json=body()) for _ in range(12)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * 6 + [429] * 6, statuses
    refused = [r.json()["error"] for r in replies if r.status_code == 429]
    window_end = fake.quota()["accounts"]["acct-a"]["windows"][-1]["end"]
    assert all(e["code"] == "usage_limit_reached" for e in refused)
    assert all(abs(e["resets_at"] - window_end) <= 1 for e in refused), (refused, window_end)
    # The upstream never had to refuse one: no request was sent beyond the last unit.
    timeline = fake.quota()["timeline"]
    assert [t["status"] for t in timeline].count(429) == 0
    assert [t["status"] for t in timeline].count(200) == 8


async def test_an_account_whose_token_needs_a_refresh_is_skipped_while_redis_is_away(
    fake: FakeUpstream, tmp_path: Path, prefix: str
) -> None:
    """A refresh spends a single-use refresh token, so it takes a Redis lease; with Redis away
    the account waits, and the others, whose tokens are good, serve every request."""
    server = RedisServer(appendonly=True).start()
    try:
        config = make_config(
            server.url, prefix, tmp_path, upstream_base_url=fake.url, auth_base_url=fake.url
        )
        async with AppHarness(config) as h:
            await setup_password(h.client)
            pool = Pool(h, fake)
            stale = fake.auth_json("acct-a", email="a@example.com", access_exp=time.time() + 5)
            r = await h.client.post(
                IMPORT, files=[("auth_json", ("a.json", json.dumps(stale).encode(), "x"))]
            )
            assert r.status_code == 200, r.text
            await pool.add("acct-b")
            await pool.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
            while len(h.parts.accounts.accounts) < 2:
                await asyncio.sleep(0.01)
            server.kill()
            served = [(await pool.ask())[1] for _ in range(6)]
            assert served == ["acct-b"] * 6
            assert not fake.requests(path="/oauth/token")
    finally:
        server.stop()
