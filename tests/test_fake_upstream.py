"""The fake upstream (tests/fake_upstream.py) itself: shapes, scripts, control routes, process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.fake_upstream import (
    ANONYMOUS,
    ROOT,
    SHORT,
    WEEKLY,
    FakeState,
    Ledger,
    Quota,
    _free_port,
    make_app,
    running_fake,
)

AUTH = {"Authorization": "Bearer at-1", "chatgpt-account-id": "acct-a"}
USER_MESSAGE = {
    "type": "message",
    "role": "user",
    "content": [{"type": "input_text", "text": "hi"}],
}
BODY: dict[str, Any] = {
    "model": "gpt-5.1-codex",
    "stream": True,
    "input": [USER_MESSAGE],
    "prompt_cache_key": "thread-1",
}
TOOLS = [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
async def client(state: FakeState) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(make_app(state))) as client:
        yield client


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ")
        assert data.startswith("data: ")
        payload = json.loads(data[len("data: ") :])
        assert payload["type"] == name[len("event: ") :]
        events.append((payload["type"], payload))
    return events


async def stream(client: TestClient[Any, Any], **extra: Any) -> list[tuple[str, dict[str, Any]]]:
    response = await client.post("/codex/responses", json={**BODY, **extra}, headers=AUTH)
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    return parse_sse(await response.text())


async def configure(client: TestClient[Any, Any], account: str, **behaviour: Any) -> Any:
    response = await client.post(f"/_fake/accounts/{account}", json=behaviour)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_stream_shape_and_headers(client: TestClient[Any, Any]) -> None:
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.status == 200
    headers = response.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["set-cookie"] == "__cf_bm=abc; Path=/"
    assert headers["x-request-id"].startswith("req_")
    assert "openai-processing-ms" in headers
    assert headers["x-codex-turn-state"]
    assert headers["x-codex-primary-window-minutes"] == "300"
    assert headers["x-codex-secondary-window-minutes"] == "10080"
    assert headers["x-codex-primary-used-percent"] == "0"
    reset_after = int(headers["x-codex-primary-reset-after-seconds"])
    assert int(headers["x-codex-primary-reset-at"]) == pytest.approx(time.time() + reset_after, 5)
    events = parse_sse(await response.text())
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    assert text == "Hello from acct-a."
    assert events[-2][1]["item"]["content"][0]["text"] == text
    completed = events[-1][1]["response"]
    assert completed["id"] == events[0][1]["response"]["id"]
    assert completed["status"] == "completed"
    assert completed["model"] == "gpt-5.1-codex"
    usage = completed["usage"]
    assert set(usage) == {
        "input_tokens",
        "input_tokens_details",
        "output_tokens",
        "output_tokens_details",
        "total_tokens",
    }
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))

    again = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert again.headers["x-request-id"] != headers["x-request-id"]
    # The same prompt_cache_key on the same account: part of the input counts as cached.
    usage = parse_sse(await again.text())[-1][1]["response"]["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] > 0


async def test_non_streamed_answer(client: TestClient[Any, Any]) -> None:
    await configure(client, "acct-a", text="Plain answer.")
    response = await client.post("/codex/responses", json={**BODY, "stream": False}, headers=AUTH)
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["output"][0]["type"] == "message"
    assert body["output"][0]["role"] == "assistant"
    assert body["output"][0]["content"] == [
        {"type": "output_text", "text": "Plain answer.", "annotations": []}
    ]
    assert body["usage"]["output_tokens"] == 5


async def test_deltas_and_rate_limits_event(client: TestClient[Any, Any]) -> None:
    await configure(
        client,
        "acct-a",
        deltas=2,
        text="abcd",
        rate_limits_event=True,
        primary_used_percent=12.5,
        secondary_used_percent=40,
        primary_reset_at=2_000_000_000,
    )
    events = await stream(client)
    assert [data["delta"] for name, data in events if name.endswith(".delta")] == ["ab", "cd"]
    assert events[1][0] == "codex.rate_limits"
    limits = events[1][1]["rate_limits"]
    assert limits["primary"] == {"used_percent": 12.5, "window_minutes": 300, "resets_at": 2e9}
    assert limits["secondary"]["used_percent"] == 40
    assert limits["secondary"]["window_minutes"] == 10080


async def test_single_window_sends_the_weekly_one_as_primary(client: TestClient[Any, Any]) -> None:
    await configure(client, "acct-a", single_window=True, secondary_used_percent=7)
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.headers["x-codex-primary-window-minutes"] == "10080"
    assert response.headers["x-codex-primary-used-percent"] == "7"
    assert not any(name.lower().startswith("x-codex-secondary") for name in response.headers)
    usage = await (await client.get("/wham/usage", headers=AUTH)).json()
    assert usage["rate_limit"]["primary_window"]["limit_window_seconds"] == 604800
    assert usage["rate_limit"]["secondary_window"] is None


async def test_scripted_429_then_success(client: TestClient[Any, Any]) -> None:
    behaviour = await configure(client, "acct-a", fail=429, fail_times=2, primary_used_percent=100)
    assert behaviour["fail"] == 429
    for _ in range(2):
        response = await client.post("/codex/responses", json=BODY, headers=AUTH)
        assert response.status == 429
        assert response.headers["x-codex-primary-used-percent"] == "100"
        error = (await response.json())["error"]
        assert error["type"] == "usage_limit_reached"
        assert error["plan_type"] == "plus"
        assert error["resets_in_seconds"] == 3600
        assert error["resets_at"] == pytest.approx(time.time() + 3600, abs=5)
    events = await stream(client)
    assert events[-1][0] == "response.completed"
    stats = await (await client.get("/_fake/stats")).json()
    assert stats["accounts"]["acct-a"] == {
        "requests": 3,
        "statuses": {"429": 2, "200": 1},
        "aborted": 0,
    }
    assert (await configure(client, "acct-a"))["fail"] is None


async def test_failures_always_until_cleared(client: TestClient[Any, Any]) -> None:
    await configure(client, "acct-a", fail=503)
    for _ in range(3):
        response = await client.post("/codex/responses", json=BODY, headers=AUTH)
        assert response.status == 503
        assert (await response.json())["error"]["type"] == "server_error"
    await configure(client, "acct-a", fail=401, fail_times=1)
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "token_expired"
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.status == 200
    bad = await client.post("/_fake/accounts/acct-a", json={"fail": "explode"})
    assert bad.status == 400
    bad = await client.post("/_fake/accounts/acct-a", json={"no_such_field": 1})
    assert bad.status == 400


async def test_drop_and_mid_stream(client: TestClient[Any, Any], state: FakeState) -> None:
    await configure(client, "acct-a", fail="drop", fail_times=1)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/codex/responses", json=BODY, headers=AUTH)
    await configure(client, "acct-a", fail_mid_stream=True, fail_times=1, mid_stream_events=3)
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.status == 200
    chunks: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_into(response, chunks)
    received = b"".join(chunks).decode()
    assert "response.created" in received
    assert "response.completed" not in received
    assert state.accounts["acct-a"].aborted == 2
    assert [entry["completed"] for entry in state.records][-1] is False
    # Nothing to cut in a non-streamed answer: mid_stream drops it.
    await configure(client, "acct-a", fail="mid_stream", fail_times=1)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/codex/responses", json={**BODY, "stream": False}, headers=AUTH)
    assert (await stream(client))[-1][0] == "response.completed"


async def read_into(response: aiohttp.ClientResponse, chunks: list[bytes]) -> None:
    async for chunk in response.content.iter_any():
        chunks.append(chunk)


async def test_client_leaving_a_slow_stream_counts_as_aborted(
    client: TestClient[Any, Any], state: FakeState
) -> None:
    await configure(client, "acct-a", delta_delay=0.2, deltas=10)
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert b"response.created" in await response.content.readuntil(b"\n\n")
    response.close()
    for _ in range(100):
        if state.accounts["acct-a"].aborted:
            break
        await asyncio.sleep(0.05)
    assert state.accounts["acct-a"].aborted == 1


async def test_delay_first_byte(client: TestClient[Any, Any]) -> None:
    await configure(client, "acct-a", delay_first_byte=0.3)
    started = time.monotonic()
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert time.monotonic() - started >= 0.3
    assert response.status == 200


async def test_tool_call_script(client: TestClient[Any, Any]) -> None:
    events = await stream(client, tools=TOOLS)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[1][1]["item"]
    assert added["type"] == "function_call"
    assert (added["id"], added["call_id"], added["name"], added["arguments"]) == (
        "fc_1",
        "call_1",
        "shell",
        "",
    )
    arguments = "".join(data["delta"] for name, data in events if name.endswith(".delta"))
    assert json.loads(arguments) == {"x": 1}
    assert events[-2][1]["item"]["arguments"] == arguments
    assert events[-1][1]["response"]["output"] == [events[-2][1]["item"]]

    follow_up = [
        USER_MESSAGE,
        events[-2][1]["item"],
        {"type": "function_call_output", "call_id": "call_1", "output": "42 files"},
    ]
    events = await stream(client, tools=TOOLS, input=follow_up)
    text = "".join(data["delta"] for name, data in events if name.endswith(".delta"))
    assert text == "Tool said: 42 files"

    await configure(client, "acct-a", tool_calls=False)
    events = await stream(client, tools=TOOLS)
    assert events[1][1]["item"]["type"] == "message"


async def test_compact_models_wham_transcribe(client: TestClient[Any, Any]) -> None:
    compact = await client.post(
        "/codex/responses/compact",
        json={"model": "gpt-5.1-codex", "input": [{"type": "message"}] * 3},
        headers=AUTH,
    )
    assert compact.status == 200
    assert compact.headers["set-cookie"] == "__cf_bm=abc; Path=/"
    body = await compact.json()
    assert body["input_items"] == 3
    assert body["output"][0]["content"][0]["text"] == "Compacted 3 items."
    assert body["usage"]["total_tokens"] > 0

    models = await (await client.get("/codex/models", headers=AUTH)).json()
    assert [model["slug"] for model in models["models"]] == [
        "gpt-5.1-codex",
        "gpt-5.1-codex-mini",
    ]

    await configure(client, "acct-a", primary_used_percent=12, plan_type="pro")
    usage = await (await client.get("/wham/usage", headers=AUTH)).json()
    assert usage["plan_type"] == "pro"
    primary = usage["rate_limit"]["primary_window"]
    assert primary["used_percent"] == 12
    assert primary["limit_window_seconds"] == 18000
    assert primary["reset_after_seconds"] == 3600
    assert usage["rate_limit"]["secondary_window"]["limit_window_seconds"] == 604800
    assert usage["rate_limit"]["allowed"] is True
    assert usage["credits"] == {"has_credits": False, "unlimited": False, "balance": "0"}

    audio = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n\r\n"
    form = aiohttp.FormData()
    form.add_field("model", "gpt-4o-transcribe")
    form.add_field("file", audio, filename="a.wav", content_type="audio/wav")
    reply = await (await client.post("/transcribe", data=form, headers=AUTH)).json()
    assert reply["text"] == f"transcribed {len(audio)} bytes"
    assert reply["sha256"] == hashlib.sha256(audio).hexdigest()
    assert reply["filename"] == "a.wav"
    assert reply["content_type"] == "audio/wav"
    assert reply["fields"] == {"model": "gpt-4o-transcribe"}


async def test_credentials(client: TestClient[Any, Any], state: FakeState) -> None:
    response = await client.post("/codex/responses", json=BODY, headers={"chatgpt-account-id": "a"})
    assert response.status == 401
    response = await client.post(
        "/codex/responses", json=BODY, headers={"Authorization": "Bearer x"}
    )
    assert response.status == 400
    revoke = await client.post("/_fake/revoke", json={"token": "at-1"})
    assert revoke.status == 200
    for path in ("/codex/responses", "/wham/usage"):
        method = client.post if path == "/codex/responses" else client.get
        response = await method(path, json=BODY, headers=AUTH)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "token_expired"
    assert state.accounts["acct-a"].statuses[401] == 2
    settings = await client.post("/_fake/settings", json={"require_account_id": False})
    assert (await settings.json())["require_account_id"] is False
    events = await stream_as(client, {"Authorization": "Bearer x"})
    assert "".join(d["delta"] for n, d in events if n.endswith(".delta")) == "Hello from anonymous."
    assert ANONYMOUS in state.accounts


async def stream_as(
    client: TestClient[Any, Any], headers: dict[str, str]
) -> list[tuple[str, dict[str, Any]]]:
    response = await client.post("/codex/responses", json=BODY, headers=headers)
    assert response.status == 200
    return parse_sse(await response.text())


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def test_oauth_refresh_tokens_are_single_use(client: TestClient[Any, Any]) -> None:
    registered = await client.post(
        "/_fake/refresh_tokens",
        json={"refresh_token": "rt-1", "account_id": "acct-a", "email": "a@example.com"},
    )
    assert registered.status == 200
    grant = {
        "grant_type": "refresh_token",
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
        "refresh_token": "rt-1",
        "scope": "openid profile email",
    }
    first = await client.post("/oauth/token", json=grant)
    assert first.status == 200
    tokens = await first.json()
    assert tokens["expires_in"] == 3600
    assert claims(tokens["access_token"])["exp"] == pytest.approx(time.time() + 3600, abs=5)
    identity = claims(tokens["id_token"])
    assert identity["email"] == "a@example.com"
    assert identity["https://api.openai.com/auth"]["chatgpt_account_id"] == "acct-a"
    assert tokens["refresh_token"] != "rt-1"

    reused = await client.post("/oauth/token", json=grant)
    assert reused.status == 400
    assert await reused.json() == {
        "error": "invalid_grant",
        "error_description": "refresh_token_reused",
    }
    # The new refresh token works once (as a form post too) and keeps the account.
    form = {**grant, "refresh_token": tokens["refresh_token"]}
    second = await client.post("/oauth/token", data=form)
    assert second.status == 200
    newer = await second.json()
    assert (
        claims(newer["id_token"])["https://api.openai.com/auth"]["chatgpt_account_id"] == "acct-a"
    )

    await client.post("/_fake/revoke", json={"token": newer["refresh_token"]})
    revoked = await client.post(
        "/oauth/token", json={**grant, "refresh_token": newer["refresh_token"]}
    )
    assert (await revoked.json())["error_description"] == "refresh_token_invalidated"

    await client.post("/_fake/settings", json={"oauth_fail": 503, "oauth_fail_times": 1})
    failed = await client.post("/oauth/token", json={**grant, "refresh_token": "rt-other"})
    assert failed.status == 503
    assert (await client.post("/oauth/token", json={**grant, "refresh_token": "rt-other"})).ok


async def test_records_stats_recording_and_reset(
    client: TestClient[Any, Any], state: FakeState
) -> None:
    await stream(client)
    records = (await (await client.get("/_fake/requests")).json())["requests"]
    assert len(records) == 1
    record = records[0]
    assert record["seq"] == 1
    assert record["path"] == "/codex/responses"
    assert record["account_id"] == "acct-a"
    assert record["status"] == 200
    assert record["completed"] is True
    assert record["headers"]["authorization"] == "Bearer at-1"
    assert record["headers"]["chatgpt-account-id"] == "acct-a"
    assert record["json"] == BODY
    assert json.loads(record["body"]) == BODY

    await stream(client)
    later = await (await client.get("/_fake/requests", params={"since": "1"})).json()
    assert [r["seq"] for r in later["requests"]] == [2]
    assert later["last_seq"] == 2

    missing = await client.get("/backend-api/elsewhere")
    assert missing.status == 404
    assert state.records[-1]["path"] == "/backend-api/elsewhere"

    await client.post("/_fake/recording", json={"on": False})
    await stream(client)
    assert len(state.records) == 3
    stats = await (await client.get("/_fake/stats")).json()
    assert stats["total"] == 4
    assert stats["accounts"]["acct-a"]["requests"] == 3

    await client.post("/_fake/reset")
    assert (await (await client.get("/_fake/stats")).json()) == {"total": 0, "accounts": {}}
    assert state.recording is True


def test_process_prints_nothing_and_stops_cleanly_on_sigint() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_fake/stats").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout == b""
    assert b"listening" in stderr


def test_running_fake_helpers() -> None:
    with running_fake() as fake:
        assert fake.url == f"http://127.0.0.1:{fake.port}"
        behaviour = fake.configure("acct-b", text="From B.", deltas=1)
        assert behaviour["text"] == "From B."
        assert fake.behaviour("acct-b")["deltas"] == 1
        document = fake.auth_json("acct-b")
        headers = {"Authorization": f"Bearer {document['tokens']['access_token']}"}
        headers["chatgpt-account-id"] = "acct-b"
        with httpx.stream("POST", f"{fake.url}/codex/responses", json=BODY, headers=headers) as r:
            chunks = list(r.iter_raw())
        assert len(chunks) >= 3  # one event per write, not one buffered body
        assert b'"delta":"From B."' in b"".join(chunks)
        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": document["tokens"]["refresh_token"],
        }
        tokens = httpx.post(f"{fake.url}/oauth/token", json=refresh).json()
        assert claims(tokens["id_token"])["https://api.openai.com/auth"]["chatgpt_account_id"] == (
            "acct-b"
        )
        assert [r["path"] for r in fake.requests()] == ["/codex/responses", "/oauth/token"]
        assert fake.requests(since=1, path="/oauth/token")[0]["json"] == refresh
        assert fake.last_seq() == 2
        assert fake.stats()["accounts"]["acct-b"]["requests"] == 1
        fake.revoke(document["tokens"]["access_token"])
        denied = httpx.post(f"{fake.url}/codex/responses", json=BODY, headers=headers)
        assert denied.status_code == 401
        fake.recording(False)
        fake.settings(require_account_id=False)
        fake.reset()
        assert fake.stats() == {"total": 0, "accounts": {}}
        process = fake.process
    assert process is not None
    assert process.returncode == 0


# --- quota mode ---------------------------------------------------------------------------------


def test_quota_ledger_windows_reset_and_stagger() -> None:
    quota = Quota(
        capacity=2,
        window_seconds=30,
        offset_seconds=7,
        weekly_capacity=3,
        weekly_window_seconds=90,
        spent=1,
    )
    epoch = 1_000_000
    ledger = Ledger(quota, epoch)
    # At the epoch the short window in progress began 23 s before (offset 7): [E-23, E+7).
    assert quota.bounds(SHORT, epoch, epoch) == (-1, epoch - 23, epoch + 7)
    assert quota.bounds(WEEKLY, epoch, epoch + 89.9) == (0, epoch, epoch + 90)
    assert ledger.window(SHORT, epoch + 1)["spent"] == 1  # spent before the epoch
    ledger.spend(epoch + 1)
    assert not ledger.room(epoch + 6.9)
    assert ledger.limit(epoch + 6.5) == (epoch + 7, 1)
    # The short window resets at E+7 exactly: room again, one weekly unit spent.
    assert ledger.room(epoch + 7)
    assert ledger.windows(epoch + 7) == [
        (0.0, 300, epoch + 37, 30),
        (100 / 3, 10080, epoch + 90, 83),
    ]
    ledger.spend(epoch + 8)
    ledger.spend(epoch + 9)
    # The weekly window is out (3 of 3) though the short one has room: 429 until E+90.
    assert ledger.left(SHORT, epoch + 10) == 0
    assert ledger.left(WEEKLY, epoch + 10) == 0
    assert ledger.limit(epoch + 10) == (epoch + 90, 80)  # both out: the later end
    assert ledger.left(SHORT, epoch + 37) == 2
    assert not ledger.room(epoch + 37)
    assert ledger.limit(epoch + 37) == (epoch + 90, 53)
    assert ledger.room(epoch + 90)
    snapshot = ledger.snapshot(epoch + 40)
    assert [(w["index"], w["initial"], w["spent"]) for w in snapshot["windows"]] == [
        (-1, 1, 2),
        (0, 0, 2),
        (1, 0, 0),
    ]
    assert snapshot["weekly_windows"] == [
        {"index": 0, "start": epoch, "end": epoch + 90, "capacity": 3, "initial": 0, "spent": 3}
    ]
    unlimited = Ledger(Quota(capacity=1, window_seconds=10), epoch)
    for _ in range(1000):
        unlimited.spend(epoch + 5 + 10 * _)
    assert unlimited.room(epoch + 20_000)
    assert unlimited.windows(epoch)[1][:3] == (0.0, 10080, epoch + 30)


async def test_quota_mode_spends_one_unit_per_request_then_429(
    client: TestClient[Any, Any], state: FakeState
) -> None:
    quota = {
        "capacity": 3,
        "window_seconds": 600,
        "weekly_capacity": 30,
        "weekly_window_seconds": 1800,
        "weekly_offset_seconds": 100,
    }
    behaviour = await configure(client, "acct-a", quota=quota, delay_first_byte=0.2)
    assert behaviour["quota"]["capacity"] == 3
    epoch = int(time.time()) - 10
    started = await client.post("/_fake/quota/start", json={"epoch": epoch})
    assert await started.json() == {"epoch": epoch}
    headers = {**AUTH, "session_id": "thread-1", "x-fake-tag": "t1"}
    used = []
    for _ in range(3):
        response = await client.post(
            "/codex/responses", json={**BODY, "stream": False}, headers=headers
        )
        assert response.status == 200
        used.append(response.headers["x-codex-primary-used-percent"])
        assert response.headers["x-codex-primary-window-minutes"] == "300"
        assert response.headers["x-codex-primary-reset-at"] == str(epoch + 600)
        assert int(response.headers["x-codex-primary-reset-after-seconds"]) in range(585, 592)
        assert response.headers["x-codex-secondary-window-minutes"] == "10080"
        assert response.headers["x-codex-secondary-reset-at"] == str(epoch + 100)
    assert used == [repr(100 / 3), repr(200 / 3), "100"]
    assert response.headers["x-codex-secondary-used-percent"] == "10"
    began = time.monotonic()
    refused = await client.post("/codex/responses/compact", json=BODY, headers=headers)
    assert time.monotonic() - began < 0.15  # a quota 429 does not wait for delay_first_byte
    assert refused.status == 429
    assert refused.headers["x-codex-primary-used-percent"] == "100"
    error = (await refused.json())["error"]
    assert error["type"] == "usage_limit_reached"
    assert error["resets_at"] == epoch + 600
    assert error["resets_in_seconds"] == pytest.approx(epoch + 600 - time.time(), abs=2)
    # /wham/usage tells the same and spends nothing.
    usage = await (await client.get("/wham/usage", headers=AUTH)).json()
    limit = usage["rate_limit"]
    assert limit["limit_reached"] is True
    assert limit["primary_window"]["used_percent"] == 100
    assert limit["primary_window"]["reset_at"] == epoch + 600
    assert limit["secondary_window"]["used_percent"] == 10
    # The stream's rate-limits event too, for another account.
    await configure(client, "acct-b", quota={"capacity": 4, "window_seconds": 60})
    await configure(client, "acct-b", rate_limits_event=True)
    events = await stream_as(client, {**AUTH, "chatgpt-account-id": "acct-b"})
    assert events[1][0] == "codex.rate_limits"
    assert events[1][1]["rate_limits"]["primary"] == {
        "used_percent": 25,
        "window_minutes": 300,
        "resets_at": epoch + 60,
    }

    truth = await (await client.get("/_fake/quota")).json()
    assert truth["epoch"] == epoch
    a = truth["accounts"]["acct-a"]
    assert a["room"] is False
    assert a["windows"] == [
        {"index": 0, "start": epoch, "end": epoch + 600, "capacity": 3, "initial": 0, "spent": 3}
    ]
    assert [w["spent"] for w in a["weekly_windows"]] == [3]
    assert a["weekly_windows"][0]["start"] == epoch + 100 - 1800
    timeline = truth["timeline"]
    assert [(e["account_id"], e["status"], e["room"], e["spent"]) for e in timeline] == [
        ("acct-a", 200, True, True),
        ("acct-a", 200, True, True),
        ("acct-a", 200, True, True),
        ("acct-a", 429, False, False),
        ("acct-b", 200, True, True),
    ]
    first = timeline[0]
    assert first["session"] == "thread-1"
    assert first["tag"] == "t1"
    assert first["path"] == "/codex/responses"
    assert timeline[3]["path"] == "/codex/responses/compact"
    # A served answer starts after delay_first_byte; the quota 429 at once.
    assert first["answered"] - first["time"] >= 0.2
    assert timeline[3]["answered"] == timeline[3]["time"]
    assert (first["short_spent"], first["short_capacity"], first["short_end"]) == (
        1,
        3,
        epoch + 600,
    )
    assert (first["weekly_spent"], first["weekly_capacity"]) == (1, 30)
    assert [e["seq"] for e in timeline] == [1, 2, 3, 4, 5]
    since = await (await client.get("/_fake/quota", params={"since": "4"})).json()
    assert [e["seq"] for e in since["timeline"]] == [5]
    assert since["last_seq"] == 5
    assert state.accounts["acct-a"].statuses == {200: 4, 429: 1}  # with /wham/usage

    # A new epoch: every quota afresh, the timeline emptied.
    await client.post("/_fake/quota/start", json={})
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.status == 200
    truth = await (await client.get("/_fake/quota")).json()
    assert truth["epoch"] == pytest.approx(time.time(), abs=2)
    assert len(truth["timeline"]) == 1
    assert truth["accounts"]["acct-a"]["windows"][-1]["spent"] == 1


async def test_quota_mode_scripted_failures_spend_nothing_and_configuration(
    client: TestClient[Any, Any],
) -> None:
    await configure(client, "acct-a", quota={"capacity": 1, "window_seconds": 600}, fail=503)
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.status == 503
    await configure(client, "acct-a", fail=None)
    assert (await client.post("/codex/responses", json=BODY, headers=AUTH)).status == 200
    assert (await client.post("/codex/responses", json=BODY, headers=AUTH)).status == 429
    timeline = (await (await client.get("/_fake/quota")).json())["timeline"]
    assert [(e["status"], e["room"], e["spent"]) for e in timeline] == [
        (503, True, False),
        (200, True, True),
        (429, False, False),
    ]
    # Reconfigured: afresh; turned off: the behaviour's fields again.
    await configure(client, "acct-a", quota={"capacity": 2, "window_seconds": 600})
    assert (await client.post("/codex/responses", json=BODY, headers=AUTH)).status == 200
    await configure(client, "acct-a", quota=None, primary_used_percent=7)
    response = await client.post("/codex/responses", json=BODY, headers=AUTH)
    assert response.headers["x-codex-primary-used-percent"] == "7"
    assert (await (await client.get("/_fake/quota")).json())["accounts"] == {}
    for bad in (
        {"capacity": 1},
        {"capacity": 1, "window_seconds": 0},
        {"capacity": 1.5, "window_seconds": 10},
        {"capacity": 1, "window_seconds": 10, "colour": 1},
        [1, 2],
    ):
        rejected = await client.post("/_fake/accounts/acct-a", json={"quota": bad})
        assert rejected.status == 400, bad
    rejected = await client.post("/_fake/quota/start", json={"epoch": 1.5})
    assert rejected.status == 400
