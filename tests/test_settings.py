"""GET/PUT /api/settings, history and propagation, against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.config import Config
from service.settings.store import SettingsRecord
from tests.conftest import AppHarness, make_config

DEFAULTS = {
    "sticky_threads_enabled": True,
    "prefer_earlier_reset_accounts": False,
    "routing_strategy": "usage_weighted",
    "import_without_overwrite": False,
    "totp_required_on_login": False,
    "totp_configured": False,
    "api_key_auth_enabled": False,
    "version": 1,
}
REQUIRED = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}


def stored(raw_redis: redis.Redis, prefix: str) -> dict[str, object]:
    raw = raw_redis.hget(f"{prefix}settings", "record")
    assert raw is not None
    return json.loads(raw)


async def test_requires_a_session(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PUT"):
        r = await client.request(method, "/api/settings", json=REQUIRED)
        assert r.status_code == 401
        assert r.json() == {
            "error": {"code": "unauthorized", "message": "Missing or invalid dashboard session"}
        }


async def test_new_deployment_starts_with_defaults_at_version_1(
    admin: httpx.AsyncClient,
) -> None:
    r = await admin.get("/api/settings")
    assert r.status_code == 200
    assert r.json() == DEFAULTS
    assert r.headers["etag"] == '"1"'
    assert r.headers["cache-control"] == "no-store"


async def test_put_updates_every_field_and_bumps_the_version(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    body = {
        "sticky_threads_enabled": False,
        "prefer_earlier_reset_accounts": True,
        "routing_strategy": "round_robin",
        "import_without_overwrite": True,
        "totp_required_on_login": False,
        "api_key_auth_enabled": True,
    }
    r = await admin.put("/api/settings", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {**body, "totp_configured": False, "version": 2}
    assert r.headers["etag"] == '"2"'
    assert (await admin.get("/api/settings")).json() == r.json()
    record = stored(raw_redis, prefix)
    assert record["version"] == 2
    assert record["routing_strategy"] == "round_robin"
    assert raw_redis.hget(f"{prefix}settings", "version") == b"2"


async def test_optional_fields_default_to_current_values(admin: httpx.AsyncClient) -> None:
    first = {**REQUIRED, "routing_strategy": "round_robin", "api_key_auth_enabled": True}
    assert (await admin.put("/api/settings", json=first)).status_code == 200
    r = await admin.put(
        "/api/settings",
        json={"sticky_threads_enabled": False, "prefer_earlier_reset_accounts": True},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["routing_strategy"] == "round_robin"
    assert body["api_key_auth_enabled"] is True
    assert body["sticky_threads_enabled"] is False
    assert body["version"] == 3


async def test_a_get_body_can_be_sent_back_as_is(admin: httpx.AsyncClient) -> None:
    current = (await admin.get("/api/settings")).json()
    # Read-only fields are ignored whatever their value; only If-Match asks for a check.
    r = await admin.put("/api/settings", json={**current, "totp_configured": True, "version": 99})
    assert r.status_code == 200, r.text
    assert r.json()["totp_configured"] is False
    assert r.json()["version"] == 2


async def test_every_put_is_a_new_version_even_without_changes(admin: httpx.AsyncClient) -> None:
    for expected in (2, 3, 4):
        r = await admin.put("/api/settings", json=REQUIRED)
        assert r.json()["version"] == expected


BAD_BODIES = [
    pytest.param(b"{not json", "application/json", 400, "invalid_json", None, id="not-json"),
    pytest.param(b"\xff\xfe", "application/json", 400, "invalid_json", None, id="not-utf8"),
    pytest.param(b"", "application/json", 400, "invalid_json", None, id="empty"),
    pytest.param(
        json.dumps(REQUIRED).encode(),
        "text/plain",
        415,
        "unsupported_media_type",
        None,
        id="text-plain",
    ),
    pytest.param(
        json.dumps(REQUIRED).encode(),
        None,
        415,
        "unsupported_media_type",
        None,
        id="no-content-type",
    ),
    pytest.param(b"[]", "application/json", 422, "validation_error", "$", id="array"),
    pytest.param(b'"x"', "application/json", 422, "validation_error", "$", id="string"),
    pytest.param(
        json.dumps({**REQUIRED, "sticky_threads_enabled": "true"}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.sticky_threads_enabled",
        id="string-for-bool",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "api_key_auth_enabled": 1}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.api_key_auth_enabled",
        id="int-for-bool",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "prefer_earlier_reset_accounts": None}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.prefer_earlier_reset_accounts",
        id="null-required",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "routing_strategy": None}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.routing_strategy",
        id="null-optional",
    ),
    pytest.param(
        json.dumps({"prefer_earlier_reset_accounts": True}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.sticky_threads_enabled",
        id="missing-required",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "routing_strategy": "least_loaded"}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.routing_strategy",
        id="unknown-strategy",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "sticky_threads": True}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.sticky_threads",
        id="unknown-field",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "expected_version": "1"}).encode(),
        "application/json",
        422,
        "validation_error",
        "$.expected_version",
        id="string-version",
    ),
    pytest.param(
        json.dumps({**REQUIRED, "pad": "x" * 70_000}).encode(),
        "application/json",
        413,
        "payload_too_large",
        None,
        id="oversized",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code", "path"), BAD_BODIES)
async def test_bad_input_gets_a_clear_answer_and_writes_nothing(
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
    path: str | None,
) -> None:
    before = raw_redis.hgetall(f"{prefix}settings")
    headers = {"content-type": content_type} if content_type else {}
    r = await admin.put("/api/settings", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    if path is not None:
        assert f"`{path}`" in r.json()["error"]["message"]
    assert raw_redis.hgetall(f"{prefix}settings") == before
    assert raw_redis.llen(f"{prefix}settings:history") == 0


async def test_oversized_body_without_content_length_is_refused(
    admin: httpx.AsyncClient,
) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b" " * 1024

    r = await admin.put(
        "/api/settings", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


async def test_enabling_totp_requirement_without_totp_is_refused(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await admin.put("/api/settings", json={**REQUIRED, "totp_required_on_login": True})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "code": "invalid_totp_config",
            "message": "Cannot enable TOTP requirement without configuring it first",
        }
    }
    assert stored(raw_redis, prefix)["version"] == 1
    assert stored(raw_redis, prefix)["totp_required_on_login"] is False


@pytest.mark.parametrize("how", ["if-match", "body", "weak-etag"])
async def test_stale_version_is_a_conflict_and_writes_nothing(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, how: str
) -> None:
    assert (await admin.put("/api/settings", json=REQUIRED)).status_code == 200  # now v2
    body: dict[str, object] = {**REQUIRED, "routing_strategy": "round_robin"}
    headers = {}
    if how == "if-match":
        headers["If-Match"] = '"1"'
    elif how == "weak-etag":
        headers["If-Match"] = 'W/"1"'
    else:
        body["expected_version"] = 1
    r = await admin.put("/api/settings", json=body, headers=headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "settings_conflict"
    record = stored(raw_redis, prefix)
    assert record["version"] == 2
    assert record["routing_strategy"] == "usage_weighted"


async def test_current_version_is_accepted(admin: httpx.AsyncClient) -> None:
    r = await admin.put("/api/settings", json=REQUIRED, headers={"If-Match": '"1"'})
    assert r.status_code == 200
    r = await admin.put("/api/settings", json={**REQUIRED, "expected_version": 2})
    assert r.status_code == 200
    assert r.json()["version"] == 3


async def test_expected_version_is_any_json_number_without_a_fraction(
    admin: httpx.AsyncClient,
) -> None:
    """JSON has one kind of number: 1.0 names version 1 as 1 does (schemathesis sent 124.0)."""
    r = await admin.put("/api/settings", json={**REQUIRED, "expected_version": 1.0})
    assert r.status_code == 200, r.text
    r = await admin.put("/api/settings", json={**REQUIRED, "expected_version": 1.0})
    assert r.status_code == 409
    assert r.json()["error"]["message"] == "Settings are at version 2, not 1"
    for bad in (2.5, -1, 2**60, True):
        r = await admin.put("/api/settings", json={**REQUIRED, "expected_version": bad})
        assert r.status_code == 422, (bad, r.text)
        assert "$.expected_version" in r.json()["error"]["message"]


@pytest.mark.parametrize("header", ['"2"', "abc", '"1", "2"'])
async def test_if_match_that_does_not_name_the_current_version_conflicts(
    admin: httpx.AsyncClient, header: str
) -> None:
    r = await admin.put("/api/settings", json=REQUIRED, headers={"If-Match": header})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "settings_conflict"


async def test_if_match_and_expected_version_must_agree(admin: httpx.AsyncClient) -> None:
    r = await admin.put(
        "/api/settings", json={**REQUIRED, "expected_version": 2}, headers={"If-Match": '"1"'}
    )
    assert r.status_code == 409


async def test_twenty_concurrent_writers_with_one_version_exactly_one_wins(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    strategies = ["round_robin", "usage_weighted"]

    async def put(i: int) -> httpx.Response:
        body = {
            "sticky_threads_enabled": i % 2 == 0,
            "prefer_earlier_reset_accounts": i % 3 == 0,
            "routing_strategy": strategies[i % 2],
            "api_key_auth_enabled": True,
            "import_without_overwrite": i % 5 == 0,
        }
        return await admin.put("/api/settings", json=body, headers={"If-Match": '"1"'})

    responses = await asyncio.gather(*(put(i) for i in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 19
    winner = next(r for r in responses if r.status_code == 200).json()
    for r in responses:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "settings_conflict"
    record = stored(raw_redis, prefix)
    assert record["version"] == 2
    assert {k: record[k] for k in winner if k in record} == winner
    assert raw_redis.llen(f"{prefix}settings:history") == 1


async def test_concurrent_writers_without_a_version_lose_nothing(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    # Each writer changes a field of its own (the optional ones: the two required fields are in
    # every body), so a lost update shows as a change missing from the final record.
    changes = [
        {"import_without_overwrite": True},
        {"api_key_auth_enabled": True},
        {"routing_strategy": "round_robin"},
    ]
    bodies = [{**REQUIRED, **changes[i % 3]} for i in range(15)]
    responses = await asyncio.gather(*(admin.put("/api/settings", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in responses)
    versions = sorted(r.json()["version"] for r in responses)
    assert versions == list(range(2, 17))
    record = stored(raw_redis, prefix)
    assert record["version"] == 16
    for change in changes:
        assert {k: record[k] for k in change} == change, record
    # And each response shows at least its own change, on top of whatever came before it.
    for body, r in zip(bodies, responses, strict=True):
        assert {k: r.json()[k] for k in body} == body


async def test_history_lists_each_change_newest_first(admin: httpx.AsyncClient) -> None:
    await admin.put("/api/settings", json={**REQUIRED, "routing_strategy": "round_robin"})
    await admin.put(
        "/api/settings",
        json={"sticky_threads_enabled": False, "prefer_earlier_reset_accounts": True},
    )
    r = await admin.get("/api/settings/history")
    assert r.status_code == 200
    changes = r.json()["changes"]
    assert [c["version"] for c in changes] == [3, 2]
    assert changes[0]["changed_fields"] == [
        "sticky_threads_enabled",
        "prefer_earlier_reset_accounts",
    ]
    assert changes[1]["changed_fields"] == ["routing_strategy"]
    for c in changes:
        assert c["changed_at"].endswith("Z")
        assert len(c["changed_at"].split(".")[1]) == 7  # microseconds + Z


async def test_history_keeps_at_least_the_last_100(admin: httpx.AsyncClient) -> None:
    for _ in range(105):
        await admin.put("/api/settings", json=REQUIRED)
    changes = (await admin.get("/api/settings/history")).json()["changes"]
    assert len(changes) >= 100
    assert changes[0]["version"] == 106


async def test_answering_process_uses_the_new_record_at_once(
    admin: httpx.AsyncClient, harness: AppHarness
) -> None:
    r = await admin.put("/api/settings", json={**REQUIRED, "api_key_auth_enabled": True})
    live = harness.parts.settings.get()
    assert isinstance(live, SettingsRecord)
    assert live.version == r.json()["version"]
    assert live.api_key_auth_enabled is True


async def test_propagation_lists_this_process(
    admin: httpx.AsyncClient, harness: AppHarness
) -> None:
    r = await admin.put("/api/settings?wait=true", json=REQUIRED)
    assert r.status_code == 200
    assert r.headers["x-propagation"] == "1/1"
    p = (await admin.get("/api/settings/propagation")).json()
    assert p["version"] == 2
    [worker] = p["workers"]
    assert worker["worker_id"] == harness.parts.hub.worker_id
    assert worker["applied_version"] == 2
    assert worker["pid"] > 0
    assert worker["applied_at"].endswith("Z")
    assert worker["last_seen"].endswith("Z")


async def test_two_processes_converge_through_pubsub(
    admin: httpx.AsyncClient, config: Config, tmp_path: Path
) -> None:
    # With a 30 s reconcile interval on the other process only its pub/sub listener can bring
    # the change inside the bound below.
    slow = make_config(
        config.redis_url, config.redis_prefix, tmp_path, settings_reconcile_seconds=30.0
    )
    async with AppHarness(slow) as other:
        for _ in range(200):  # the newcomer registers with its first heartbeat
            if len((await admin.get("/api/settings/propagation")).json()["workers"]) == 2:
                break
            await asyncio.sleep(0.01)
        start = time.monotonic()
        r = await admin.put(
            "/api/settings?wait=true", json={**REQUIRED, "routing_strategy": "round_robin"}
        )
        elapsed = time.monotonic() - start
        assert r.headers["x-propagation"] == "2/2"
        assert other.parts.settings.get().routing_strategy == "round_robin"
        assert elapsed < 0.5, elapsed
