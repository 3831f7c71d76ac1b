"""API keys (``/api/api-keys``), the live check the proxy makes, and the API-key gate in front
of the proxy routes, against a real redis-server.

The gate is reached in-process over ``httpx.ASGITransport``; its client address is 127.0.0.1
unless a test builds its own transport with another peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import msgspec
import pytest
import redis
import respx

from service.api_keys.live import LiveApiKeys
from service.api_keys.schemas import ApiKeyCreate, ApiKeyPatch
from service.app import create_app
from service.config import DEFAULT_UPSTREAM_BASE_URL, Config
from service.core.bodies import NOT_BLANK
from tests.conftest import AppHarness, make_config, setup_password
from tests.factories import auth_json
from tests.support import RedisServer, free_port, stored_under

pytestmark = pytest.mark.timeout(30)

KEYS = "/api/api-keys"
MODELS = "/v1/models"
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
KEY_RE = re.compile(r"^sk-clb-[A-Za-z0-9_-]{43,}$")
VIEW_FIELDS = {"id", "name", "key_prefix", "created_at", "expires_at", "is_active"}
SETTINGS = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}
OPENAI_FIELDS = {"message", "type", "code", "param"}
GATED_POSTS = ("/backend-api/codex/responses", "/backend-api/transcribe", "/v1/responses")


# --- helpers --------------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until ``predicate`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def live_keys(harness: AppHarness) -> LiveApiKeys:
    return harness.parts.api_keys


async def create(admin: httpx.AsyncClient, name: str = "ci", **extra: Any) -> dict[str, Any]:
    r = await admin.post(KEYS, json={"name": name, **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def create_live(
    harness: AppHarness, admin: httpx.AsyncClient, name: str = "ci", **extra: Any
) -> dict[str, Any]:
    """Create a key and wait until this process's live copy admits it."""
    body = await create(admin, name, **extra)
    await eventually(lambda: live_keys(harness).check_key(body["key"]) is not None)
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def peer_client(harness: AppHarness, host: str) -> httpx.AsyncClient:
    """A client reaching the app from ``host`` (no cookies, no session)."""
    transport = httpx.ASGITransport(app=harness.app, client=(host, 5000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def set_key_auth(harness: AppHarness, admin: httpx.AsyncClient, on: bool) -> None:
    r = await admin.put("/api/settings", json={**SETTINGS, "api_key_auth_enabled": on})
    assert r.status_code == 200, r.text
    assert r.json()["api_key_auth_enabled"] is on
    live = harness.parts.settings
    await eventually(lambda: live.get().api_key_auth_enabled is on)


def assert_invalid_key(r: httpx.Response) -> str:
    """The OpenAI-shaped 401 for a missing or bad key; returns its message."""
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == OPENAI_FIELDS
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    assert isinstance(body["error"]["type"], str)
    assert body["error"]["type"]
    message: str = body["error"]["message"]
    assert message
    return message


def assert_admitted_no_accounts(r: httpx.Response) -> None:
    """GET /v1/models past the gate, with an empty pool: 503 no_accounts, OpenAI envelope."""
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body["error"]) == OPENAI_FIELDS
    assert body["error"]["code"] == "no_accounts"
    assert "www-authenticate" not in r.headers


def assert_validation(r: httpx.Response, path: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"]["code"] == "validation_error"
    assert path in body["error"]["message"], body


scan_prefix = stored_under


def apikey_state(raw_redis: redis.Redis, prefix: str) -> tuple[Any, Any]:
    return raw_redis.hgetall(f"{prefix}apikeys"), raw_redis.get(f"{prefix}apikeys:version")


def command_calls(client: redis.Redis) -> int:
    """Commands the server has run, not counting INFO itself (the measuring)."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


# --- create, list, the key shown once -------------------------------------------------------------


async def test_create_shows_the_key_once_and_stores_only_its_sha256(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    pubsub = raw_redis.pubsub()
    pubsub.psubscribe(f"{prefix}*")
    try:
        r = await admin.post(KEYS, json={"name": "laptop"})
        assert r.status_code == 201, r.text
        body = r.json()
        published = []
        deadline = time.monotonic() + 1
        while not published and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.05)
            if message and message["type"] == "pmessage":
                published.append(message["data"])
    finally:
        pubsub.close()
    assert set(body) == {*VIEW_FIELDS, "key"}
    key = body["key"]
    assert KEY_RE.match(key), key
    assert len(key) - len("sk-clb-") >= 43  # >= 256 random bits of url-safe base64
    assert body["name"] == "laptop"
    assert body["id"]
    assert key.startswith(body["key_prefix"])
    assert body["key_prefix"].startswith("sk-clb-")
    assert len(body["key_prefix"]) <= len("sk-clb-") + 8  # a hint, never most of the key
    assert RFC3339_Z.match(body["created_at"]), body["created_at"]
    created = datetime.fromisoformat(body["created_at"])
    assert abs(created.timestamp() - time.time()) < 5
    assert body["expires_at"] is None
    assert body["is_active"] is True

    # Never again: not in the list, nor any later answer.
    later = [
        await admin.get(KEYS),
        await admin.patch(f"{KEYS}/{body['id']}", json={"name": "laptop-2"}),
        await admin.get(KEYS),
        await admin.get("/api/settings"),
    ]
    for response in later:
        assert response.status_code == 200
        assert key not in response.text
        assert key[len("sk-clb-") :] not in response.text
    listed = later[0].json()
    assert set(listed) == {"api_keys"}
    [item] = listed["api_keys"]
    assert set(item) == VIEW_FIELDS
    assert item == {k: v for k, v in body.items() if k != "key"}

    # Raw Redis: the SHA-256 hex somewhere, the key (or its random part) nowhere.
    digest = hashlib.sha256(key.encode()).hexdigest().encode()
    secret = key[len("sk-clb-") :].encode()
    everything = scan_prefix(raw_redis, prefix)
    assert everything
    for name, values in everything.items():
        assert secret not in name
        for value in values:
            assert secret not in value, name
    assert any(digest in v for values in everything.values() for v in values)
    # Nor in what was published to the other processes.
    assert published
    assert all(secret not in m for m in published)
    assert any(digest in m for m in published)


async def test_keys_are_distinct_and_listed_in_creation_order(admin: httpx.AsyncClient) -> None:
    made = [await create(admin, f"k{i}") for i in range(5)]
    assert len({m["key"] for m in made}) == 5
    assert len({m["id"] for m in made}) == 5
    listed = (await admin.get(KEYS)).json()["api_keys"]
    assert [k["id"] for k in listed] == [m["id"] for m in made]


async def test_expires_at_is_kept_as_the_same_instant_in_utc(admin: httpx.AsyncClient) -> None:
    local = datetime.now(timezone(timedelta(hours=2))).replace(microsecond=0) + timedelta(days=3)
    body = await create(admin, "expiring", expires_at=local.isoformat())
    assert RFC3339_Z.match(body["expires_at"]), body["expires_at"]
    assert datetime.fromisoformat(body["expires_at"]) == local
    listed = (await admin.get(KEYS)).json()["api_keys"]
    assert listed[0]["expires_at"] == body["expires_at"]
    # Explicit null is "never expires".
    assert (await create(admin, "forever", expires_at=None))["expires_at"] is None


async def test_expiry_at_the_end_of_year_9999(
    harness: AppHarness, admin: httpx.AsyncClient
) -> None:
    last = "9999-12-31T23:59:59.999999Z"
    made = await create_live(harness, admin, "far", expires_at=last)
    assert made["expires_at"] == last
    # The same instant written with a negative offset is past 9999 in UTC: 422, not a 500.
    r = await admin.post(KEYS, json={"name": "x", "expires_at": "9999-12-31T23:59:59-01:00"})
    assert_validation(r, "$.expires_at")
    assert len((await admin.get(KEYS)).json()["api_keys"]) == 1


async def test_names_are_trimmed_and_100_characters_is_allowed(admin: httpx.AsyncClient) -> None:
    assert (await create(admin, "x" * 100))["name"] == "x" * 100
    assert (await create(admin, "é" * 100))["name"] == "é" * 100
    assert (await create(admin, "  spaced  "))["name"] == "spaced"


def test_the_documented_name_pattern_refuses_exactly_what_the_server_calls_blank() -> None:
    """/openapi.json says a name needs one character matching its pattern; the server strips and
    refuses an empty result. Read the way a client reads it (an ECMA-262 regex, as jsonschema_rs
    and schemathesis do), the pattern must agree with the server on every code point, or a
    client's validator passes names the server answers 422 (``\\S`` did: U+0085, U+001C)."""
    schemas = msgspec.json.schema_components([ApiKeyCreate, ApiKeyPatch])[1]
    for name in ("ApiKeyCreate", "ApiKeyPatch"):
        named = schemas[name]["properties"]["name"]
        assert named["pattern"] == NOT_BLANK, named
    client = jsonschema_rs.validator_for({"type": "string", "pattern": NOT_BLANK})
    server = re.compile(NOT_BLANK)
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue  # a lone surrogate is not a JSON string's character
        blank = not char.strip()
        assert client.is_valid(char) is not blank, hex(code)
        assert (server.search(char) is None) is blank, hex(code)


# --- bad input ------------------------------------------------------------------------------------

FUTURE = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"name": ""}, "$.name"),
        ({"name": "   "}, "$.name"),
        ({"name": "\t\n"}, "$.name"),
        ({"name": "\x85\u3000"}, "$.name"),
        ({"name": "x" * 101}, "$.name"),
        ({"name": 5}, "$.name"),
        ({"name": None}, "$.name"),
        ({}, "$.name"),
        ({"name": "ok", "scopes": ["all"]}, "$.scopes"),
        ({"name": "ok", "key": "sk-clb-chosen-by-the-client-000000000000000000000"}, "$.key"),
        ({"name": "ok", "expires_at": "2001-01-01T00:00:00Z"}, "$.expires_at"),
        ({"name": "ok", "expires_at": "tomorrow"}, "$.expires_at"),
        ({"name": "ok", "expires_at": "2099-13-01T00:00:00Z"}, "$.expires_at"),
        ({"name": "ok", "expires_at": "2099-01-01"}, "$.expires_at"),
        ({"name": "ok", "expires_at": 4102444800}, "$.expires_at"),
        ({"name": "ok", "expires_at": FUTURE[:-1]}, "$.expires_at"),  # naive: no offset
        (["name", "ok"], "$"),
    ],
)
async def test_bad_create_bodies_are_422_naming_the_field_and_write_nothing(
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    body: object,
    path: str,
) -> None:
    before = apikey_state(raw_redis, prefix)
    assert_validation(await admin.post(KEYS, json=body), path)
    assert apikey_state(raw_redis, prefix) == before
    assert (await admin.get(KEYS)).json() == {"api_keys": []}


async def test_bad_patch_bodies_are_422_and_change_nothing(admin: httpx.AsyncClient) -> None:
    made = await create(admin, "kept")
    url = f"{KEYS}/{made['id']}"
    for body, path in [
        ({"name": ""}, "$.name"),
        ({"name": "  "}, "$.name"),
        ({"name": "\x85"}, "$.name"),  # Python strips NEL; ECMA's \S would have let it through
        ({"name": "y" * 101}, "$.name"),
        ({"is_active": "no"}, "$.is_active"),
        ({"is_active": None}, "$.is_active"),
        ({"expires_at": FUTURE}, "$.expires_at"),
        ({"key": "sk-clb-x"}, "$.key"),
    ]:
        assert_validation(await admin.patch(url, json=body), path)
    [item] = (await admin.get(KEYS)).json()["api_keys"]
    assert item["name"] == "kept"
    assert item["is_active"] is True


async def test_other_bad_requests(admin: httpx.AsyncClient) -> None:
    r = await admin.post(KEYS, content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    r = await admin.post(KEYS, content=b'{"name": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = await admin.post(
        KEYS,
        content=b'{"name": "' + b"x" * 70_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert (await admin.get(KEYS)).json() == {"api_keys": []}


async def test_every_route_needs_a_dashboard_session(harness: AppHarness) -> None:
    await setup_password(harness.client)
    async with peer_client(harness, "127.0.0.1") as anonymous:
        for method, path, body in [
            ("POST", KEYS, {"name": "x"}),
            ("GET", KEYS, None),
            ("PATCH", f"{KEYS}/key_0123", {"name": "x"}),
            ("DELETE", f"{KEYS}/key_0123", None),
        ]:
            r = await anonymous.request(method, path, json=body)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]["code"] == "unauthorized"


async def test_an_api_key_is_not_a_dashboard_session(
    harness: AppHarness, admin: httpx.AsyncClient
) -> None:
    made = await create_live(harness, admin)
    await set_key_auth(harness, admin, True)
    async with peer_client(harness, "127.0.0.1") as keyed:
        for path in (KEYS, "/api/settings", "/api/accounts"):
            r = await keyed.get(path, headers=bearer(made["key"]))
            assert r.status_code == 401, path
            assert r.json() == {
                "error": {"code": "unauthorized", "message": "Missing or invalid dashboard session"}
            }
    # The session alone still works for the dashboard with key auth on.
    assert (await admin.get(KEYS)).status_code == 200


# --- rename, (de)activate, delete -----------------------------------------------------------------


async def test_rename_deactivate_reactivate_and_delete(
    harness: AppHarness, admin: httpx.AsyncClient
) -> None:
    made = await create_live(harness, admin, "old")
    key, url = made["key"], f"{KEYS}/{made['id']}"
    live = live_keys(harness)

    r = await admin.patch(url, json={"name": "  new  "})
    assert r.status_code == 200, r.text
    view = r.json()
    assert set(view) == VIEW_FIELDS
    assert view["name"] == "new"
    assert view["id"] == made["id"]
    assert view["created_at"] == made["created_at"]
    assert view["is_active"] is True
    assert live.check_key(key) is not None  # a rename does not touch the key

    r = await admin.patch(url, json={"is_active": False})
    assert r.status_code == 200
    assert r.json()["is_active"] is False
    assert r.json()["name"] == "new"
    await eventually(lambda: live.check_key(key) is None)
    assert (await admin.get(KEYS)).json()["api_keys"][0]["is_active"] is False

    r = await admin.patch(url, json={"is_active": True, "name": "again"})
    assert r.status_code == 200
    assert (r.json()["is_active"], r.json()["name"]) == (True, "again")
    await eventually(lambda: live.check_key(key) is not None)

    r = await admin.patch(url, json={})
    assert r.status_code == 200
    assert r.json()["name"] == "again"

    r = await admin.delete(url)
    assert r.status_code == 204
    assert r.content == b""
    await eventually(lambda: live.check_key(key) is None)
    assert (await admin.get(KEYS)).json() == {"api_keys": []}

    for method, body in (
        ("PATCH", {"name": "x"}),
        ("PATCH", {"is_active": True}),
        ("DELETE", None),
    ):
        r = await admin.request(method, url, json=body)
        assert r.status_code == 404, (method, r.text)
        assert r.json()["error"]["code"] == "not_found"


async def test_concurrent_deletes_one_wins(admin: httpx.AsyncClient) -> None:
    made = await create(admin)
    url = f"{KEYS}/{made['id']}"
    answers = await asyncio.gather(*(admin.delete(url) for _ in range(5)))
    assert sorted(r.status_code for r in answers) == [204, 404, 404, 404, 404]


async def test_unknown_ids_are_404(admin: httpx.AsyncClient) -> None:
    for method, body in (("PATCH", {"name": "x"}), ("DELETE", None)):
        for key_id in ("key_0000000000000000", "nope", "%2e%2e"):
            r = await admin.request(method, f"{KEYS}/{key_id}", json=body)
            assert r.status_code == 404, (method, key_id)
            assert r.json()["error"]["code"] == "not_found"


# --- the live check -------------------------------------------------------------------------------


async def test_check_key_answers_from_the_live_copy(
    harness: AppHarness, admin: httpx.AsyncClient
) -> None:
    live = live_keys(harness)
    a = await create_live(harness, admin, "a")
    b = await create_live(harness, admin, "b")
    record = live.check_key(a["key"])
    assert record is not None
    assert record.id == a["id"]
    assert record.key_hash == hashlib.sha256(a["key"].encode()).hexdigest()
    assert live.check_key(b["key"]).id == b["id"]  # type: ignore[union-attr]

    key = a["key"]
    rest = key[len("sk-clb-") :]
    for garbage in [
        "",
        " ",
        "sk-clb-",
        "sk-clb-" + "A" * 43,
        key[:-1],
        key + "x",
        key + " ",
        " " + key,
        key.upper(),
        f"Bearer {key}",
        "sk-" + rest,  # another prefix, same random part
        "sk-proj-" + rest,
        rest,
        hashlib.sha256(key.encode()).hexdigest(),  # the stored hash is not a key
        "sk-clb-\x00" + rest,
        "sk-clb-ü" + rest,
        "x" * 10_000,
    ]:
        assert live.check_key(garbage) is None, garbage

    assert (await admin.patch(f"{KEYS}/{a['id']}", json={"is_active": False})).status_code == 200
    await eventually(lambda: live.check_key(key) is None)
    assert live.check_key(b["key"]) is not None  # only that key
    assert (await admin.delete(f"{KEYS}/{b['id']}")).status_code == 204
    await eventually(lambda: live.check_key(b["key"]) is None)


async def test_expiry_is_checked_against_the_clock_with_no_write(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    await set_key_auth(harness, admin, True)
    expires = datetime.now(UTC) + timedelta(seconds=2)
    made = await create_live(harness, admin, "short", expires_at=expires.isoformat())
    live = live_keys(harness)
    assert live.check_key(made["key"], now=expires.timestamp() - 0.01) is not None
    assert live.check_key(made["key"], now=expires.timestamp()) is None
    assert_admitted_no_accounts(await harness.client.get(MODELS, headers=bearer(made["key"])))

    before = apikey_state(raw_redis, prefix)
    await asyncio.sleep(max(0.0, expires.timestamp() - time.time()) + 0.05)
    assert live.check_key(made["key"]) is None
    assert_invalid_key(await harness.client.get(MODELS, headers=bearer(made["key"])))
    assert apikey_state(raw_redis, prefix) == before  # nothing was written to refuse it
    # Still listed (with its expiry) until someone deletes it.
    [item] = (await admin.get(KEYS)).json()["api_keys"]
    assert item["id"] == made["id"]


async def test_a_lost_message_is_caught_by_the_reconcile_loop(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    """A change written without its pub/sub message still reaches the copy within ~1 s."""
    made = await create_live(harness, admin)
    live = live_keys(harness)
    records = f"{prefix}apikeys"
    stored = json.loads(raw_redis.hget(records, made["id"]))
    stored["is_active"] = False
    raw_redis.hset(records, made["id"], json.dumps(stored))
    raw_redis.incr(f"{prefix}apikeys:version")  # ...and no PUBLISH
    took = await eventually(lambda: live.check_key(made["key"]) is None, timeout=2.0)
    # reconcile interval (1 s) plus one round trip
    assert took < 1.3, took


async def test_ten_thousand_checks_cost_no_redis_commands(tmp_path: Path) -> None:
    server = RedisServer().start()
    try:
        counter = server.client()
        config = make_config(server.url, "noise:", tmp_path)
        async with AppHarness(config) as h:
            # The gated requests' request-log entries are written in batches, off their path
            # (tests/test_request_log.py); here only the key checks are measured.
            h.parts.log_writer.record = lambda trace: None  # type: ignore[method-assign]
            await setup_password(h.client)
            live = live_keys(h)
            keys = [(await create_live(h, h.client, f"k{i}"))["key"] for i in range(3)]
            wrong = "sk-clb-" + "B" * 43
            await asyncio.sleep(0.3)  # let the create's echoes settle

            window = 1.5
            before = command_calls(counter)
            await asyncio.sleep(window)
            idle = command_calls(counter) - before

            before = command_calls(counter)
            start = time.monotonic()
            admitted = 0
            for i in range(10_000):
                admitted += live.check_key(keys[i % 3] if i % 4 else wrong) is not None
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let the background tasks run as usual
            for _ in range(200):  # and through the gate itself
                r = await h.client.get(MODELS, headers=bearer(keys[0]))
                assert r.status_code == 503
            await asyncio.sleep(max(0.0, window - (time.monotonic() - start)))
            busy = command_calls(counter) - before
        assert admitted == 7_500
        print(f"redis commands: idle {idle}, during 10,000 checks + 200 gated requests {busy}")
        # Only the background noise (reconcile and heartbeat ticks, about 7 commands each
        # second) in both windows: a tick more or less, never anything per check.
        assert busy <= 2 * idle + 4, (idle, busy)
        assert busy < 50
    finally:
        server.stop()


# --- the gate with API-key auth on ----------------------------------------------------------------


@pytest.fixture
async def gated(harness: AppHarness, admin: httpx.AsyncClient) -> str:
    """Key auth on; one live key."""
    made = await create_live(harness, admin, "gate")
    await set_key_auth(harness, admin, True)
    key: str = made["key"]
    return key


async def test_key_auth_on_refuses_without_a_valid_key(harness: AppHarness, gated: str) -> None:
    async with peer_client(harness, "127.0.0.1") as loopback:
        assert_invalid_key(await loopback.get(MODELS))  # loopback is no exception when on
        for headers in [
            {"Authorization": "Bearer sk-clb-" + "A" * 43},
            {"Authorization": "Bearer "},
            {"Authorization": "Bearer"},
            {"Authorization": gated},  # no scheme
            {"Authorization": f"Basic {gated}"},
            {"Authorization": f"Token {gated}"},
            {"X-Api-Key": gated},
            {"Authorization": f"Bearer {gated}x"},
        ]:
            assert_invalid_key(await loopback.get(MODELS, headers=headers))
        for path in GATED_POSTS:
            assert_invalid_key(await loopback.post(path, json={}))
        assert_invalid_key(await loopback.post("/v1/chat/completions", json={}))


async def test_key_auth_on_admits_a_valid_key(harness: AppHarness, gated: str) -> None:
    async with peer_client(harness, "203.0.113.7") as remote:
        assert_admitted_no_accounts(await remote.get(MODELS, headers=bearer(gated)))
        r = await remote.get(MODELS, headers={"authorization": f"bearer  {gated} "})
        assert_admitted_no_accounts(r)
        for path in GATED_POSTS:
            r = await remote.post(path, json={}, headers=bearer(gated))
            assert r.status_code != 401, (path, r.text)
            # Admitted: the pool has no account to forward it on.
            assert_admitted_no_accounts(r)


async def test_usage_is_never_behind_the_gate(harness: AppHarness, gated: str) -> None:
    async with peer_client(harness, "203.0.113.7") as remote:
        r = await remote.get("/api/codex/usage")
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"plan_type", "rate_limit", "credits"}
        assert set(body["rate_limit"]) == {
            "allowed",
            "limit_reached",
            "primary_window",
            "secondary_window",
        }
        assert body["rate_limit"]["allowed"] is False  # empty pool
        # A wrong key does not turn it into a 401 either.
        r = await remote.get("/api/codex/usage", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 200


async def test_models_through_one_active_account(
    harness: AppHarness, admin: httpx.AsyncClient, gated: str
) -> None:
    doc = auth_json(account_id="acct-models", email="m@example.com", tag="m")
    r = await admin.post("/api/accounts/import", json=doc)
    assert r.status_code == 200, r.text
    accounts = harness.parts.accounts
    await eventually(lambda: len(accounts.serving()) == 1)
    upstream_token = doc["tokens"]["access_token"]

    with respx.mock(assert_all_called=True) as mock:
        route = mock.get(f"{DEFAULT_UPSTREAM_BASE_URL}/codex/models").respond(
            200, json={"models": [{"slug": "gpt-5", "extra": 1}, {"slug": "gpt-5-codex"}]}
        )
        assert_invalid_key(await harness.client.get(MODELS))
        assert not route.called  # a refused request never reaches the upstream
        r = await harness.client.get(MODELS, headers=bearer(gated))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "object": "list",
        "data": [
            {"id": "gpt-5", "object": "model", "created": 0, "owned_by": "openai"},
            {"id": "gpt-5-codex", "object": "model", "created": 0, "owned_by": "openai"},
        ],
    }
    sent = route.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {upstream_token}"
    assert sent.headers["chatgpt-account-id"] == "acct-models"
    assert gated not in str(sent.headers)  # our key never goes upstream


# --- the gate with API-key auth off ---------------------------------------------------------------


async def test_key_auth_off_admits_loopback_only(
    harness: AppHarness, admin: httpx.AsyncClient
) -> None:
    made = await create_live(harness, admin)
    assert harness.parts.settings.get().api_key_auth_enabled is False
    for host in ("127.0.0.1", "127.9.9.9", "::1"):
        async with peer_client(harness, host) as local:
            assert_admitted_no_accounts(await local.get(MODELS))
            # A wrong key from loopback: auth is off, so loopback still may.
            assert_admitted_no_accounts(await local.get(MODELS, headers=bearer("sk-clb-bad")))
    for host in ("10.1.2.3", "192.168.1.20", "203.0.113.9", "2001:db8::1"):
        async with peer_client(harness, host) as remote:
            message = assert_invalid_key(await remote.get(MODELS))
            assert "api_key_auth_enabled" in message
            assert "API key" in message
            for path in GATED_POSTS:
                assert_invalid_key(await remote.post(path, json={}))
            assert_invalid_key(await remote.get(MODELS, headers=bearer("sk-clb-" + "A" * 43)))
            # A valid key is accepted from anywhere.
            assert_admitted_no_accounts(await remote.get(MODELS, headers=bearer(made["key"])))
            assert (await remote.get("/api/codex/usage")).status_code == 200


async def test_key_auth_off_forwarded_for_is_ignored_from_untrusted_peers(
    harness: AppHarness,
) -> None:
    async with peer_client(harness, "10.1.2.3") as remote:
        for forwarded in ("127.0.0.1", "::1", "203.0.113.1, 127.0.0.1"):
            r = await remote.get(MODELS, headers={"X-Forwarded-For": forwarded})
            assert_invalid_key(r)
    async with peer_client(harness, "127.0.0.1") as local:
        r = await local.get(MODELS, headers={"X-Forwarded-For": "203.0.113.1"})
        assert_admitted_no_accounts(r)


async def test_key_auth_off_unauthenticated_cidrs(config: Config, tmp_path: Path) -> None:
    cfg = make_config(
        config.redis_url,
        config.redis_prefix,
        tmp_path,
        proxy_unauthenticated_client_cidrs=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("fd00::/8"),
        ),
    )
    async with AppHarness(cfg) as h:
        for host in ("10.1.2.3", "10.255.0.1", "fd00::5", "127.0.0.1"):
            async with peer_client(h, host) as allowed:
                assert_admitted_no_accounts(await allowed.get(MODELS))
        for host in ("11.0.0.1", "192.168.0.1", "fe80::1"):
            async with peer_client(h, host) as refused:
                assert_invalid_key(await refused.get(MODELS))
        # With key auth on, the list grants nothing.
        await setup_password(h.client)
        await set_key_auth(h, h.client, True)
        async with peer_client(h, "10.1.2.3") as listed:
            assert_invalid_key(await listed.get(MODELS))


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def app_with_cidrs(
    config: Config,
    tmp_path: Path,
    trusted: tuple[str, ...] = (),
    unauthenticated: tuple[str, ...] = (),
) -> AppHarness:
    return AppHarness(
        make_config(
            config.redis_url,
            config.redis_prefix,
            tmp_path,
            trusted_proxy_cidrs=nets(*trusted),
            proxy_unauthenticated_client_cidrs=nets(*unauthenticated),
        )
    )


async def test_key_auth_off_trusted_proxy_forwarded_client(config: Config, tmp_path: Path) -> None:
    async with (
        app_with_cidrs(config, tmp_path, trusted=("10.9.0.0/16",)) as h,
        peer_client(h, "10.9.0.2") as proxy,
    ):
        # A forwarded address never counts as loopback: not the client's own claim, and not
        # the proxy's (a local tunnel would make every client of it local).
        for forwarded in (
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "127.0.0.1, 10.9.0.3",
            "203.0.113.4",
            "127.0.0.1, 203.0.113.4",
        ):
            assert_invalid_key(await proxy.get(MODELS, headers={"X-Forwarded-For": forwarded}))
        # The proxy itself is not loopback, and without a forwarded address there is no client.
        assert_invalid_key(await proxy.get(MODELS))
        assert_invalid_key(await proxy.get(MODELS, headers={"X-Forwarded-For": "not-an-ip"}))


@pytest.mark.parametrize("proxy_host", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
async def test_key_auth_off_local_reverse_proxy_is_not_a_local_client(
    config: Config, tmp_path: Path, proxy_host: str
) -> None:
    """nginx on this machine, listed as trusted as the README advises: every request it forwards
    arrives from loopback, and none of them may pass as local."""
    async with (
        app_with_cidrs(config, tmp_path, trusted=("127.0.0.1/32", "::1/128")) as h,
        peer_client(h, proxy_host) as nginx,
    ):
        assert_invalid_key(await nginx.get(MODELS))  # forwarded without X-Forwarded-For
        for forwarded in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "203.0.113.4", ""):
            r = await nginx.get(MODELS, headers={"X-Forwarded-For": forwarded})
            assert_invalid_key(r)
        for path in GATED_POSTS:
            assert_invalid_key(await nginx.post(path, json={}))


async def test_key_auth_off_pod_cannot_claim_loopback_through_a_cluster_range(
    config: Config, tmp_path: Path
) -> None:
    async with (
        app_with_cidrs(config, tmp_path, trusted=("10.0.0.0/8",)) as h,
        peer_client(h, "10.4.5.6") as pod,
    ):
        for forwarded in ("127.0.0.1", "::1", "10.0.0.1"):
            assert_invalid_key(await pod.get(MODELS, headers={"X-Forwarded-For": forwarded}))
        assert_invalid_key(await pod.get(MODELS))


async def test_key_auth_off_client_inside_the_trusted_range(config: Config, tmp_path: Path) -> None:
    """A pod in the cluster's range behind the ingress: every hop is trusted, so the client is
    the leftmost one, and a listed range admits it."""
    async with (
        app_with_cidrs(
            config, tmp_path, trusted=("10.0.0.0/8",), unauthenticated=("10.20.0.0/16",)
        ) as h,
        peer_client(h, "10.9.0.2") as ingress,
    ):
        r = await ingress.get(MODELS, headers={"X-Forwarded-For": "10.20.30.40"})
        assert_admitted_no_accounts(r)
        r = await ingress.get(MODELS, headers={"X-Forwarded-For": "10.20.30.40, 10.9.0.3"})
        assert_admitted_no_accounts(r)
        r = await ingress.get(MODELS, headers={"X-Forwarded-For": "10.30.0.1"})
        assert_invalid_key(r)


async def test_key_auth_off_unauthenticated_cidrs_through_a_trusted_proxy(
    config: Config, tmp_path: Path
) -> None:
    async with (
        app_with_cidrs(
            config, tmp_path, trusted=("127.0.0.1/32",), unauthenticated=("192.168.0.0/16",)
        ) as h,
        peer_client(h, "127.0.0.1") as nginx,
    ):
        for forwarded in ("192.168.1.5", "::ffff:192.168.1.5", "203.0.113.9, 192.168.1.5"):
            r = await nginx.get(MODELS, headers={"X-Forwarded-For": forwarded})
            assert_admitted_no_accounts(r)
        # The rightmost untrusted hop decides; a listed address to its left is a client's claim.
        r = await nginx.get(MODELS, headers={"X-Forwarded-For": "192.168.1.5, 203.0.113.9"})
        assert_invalid_key(r)


async def test_key_auth_off_ipv4_mapped_peers_compare_as_ipv4(
    config: Config, tmp_path: Path
) -> None:
    async with app_with_cidrs(config, tmp_path, unauthenticated=("10.0.0.0/8",)) as h:
        for host in ("::ffff:127.0.0.1", "::ffff:10.1.2.3"):
            async with peer_client(h, host) as allowed:
                assert_admitted_no_accounts(await allowed.get(MODELS))
        async with peer_client(h, "::ffff:203.0.113.9") as remote:
            assert_invalid_key(await remote.get(MODELS))


# --- a process that has not loaded its settings ---------------------------------------------------


async def test_proxy_routes_are_503_until_settings_are_loaded(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(make_config(dead, "dead:", tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            await asyncio.sleep(0.2)
            assert app.state.parts.settings.current is None
            for r in [
                await c.get(MODELS),
                await c.get(MODELS, headers=bearer("sk-clb-" + "A" * 43)),
                await c.post("/backend-api/codex/responses", json={}),
                await c.post("/backend-api/transcribe", json={}),
            ]:
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert set(error) == OPENAI_FIELDS
                assert error["code"] != "no_accounts"
                assert "www-authenticate" not in r.headers
            assert (await c.get("/health/ready")).status_code == 503
