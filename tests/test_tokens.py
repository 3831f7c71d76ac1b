"""Token refresh against the (respx-faked) OAuth server, with a real redis-server: before expiry,
after an upstream 401, dead refresh tokens, single flight across two processes, and the refresh
that must not lose a healthy account (a slow or hung exchange, a lost race, a failing store)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
import respx

from service.accounts.tokens import CLIENT_ID, SCOPE, ReauthRequired, RefreshFailed, TokenManager
from service.core.errors import StoreUnavailable
from tests.conftest import AppHarness
from tests.factories import AUTH_CLAIM, auth_json, jwt
from tests.test_accounts import (
    account_hash,
    assert_no_secret,
    dump,
    import_docs,
    listed,
    login,
    opened,
    secrets_of,
    tokens_of,
    wait_live,
)

pytestmark = pytest.mark.timeout(60)

UPSTREAM = "https://chatgpt.com/backend-api"
MODELS = f"{UPSTREAM}/codex/models"
TOKEN_URL = "https://auth.openai.com/oauth/token"
MODEL_LIST = {"models": [{"slug": "gpt-5.1-codex"}, {"slug": "gpt-5.1-codex-mini"}]}


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def new_tokens(tag: str, *, email: str = "user@example.com") -> dict[str, Any]:
    """An OAuth token reply."""
    return {
        "access_token": jwt(
            {"exp": int(time.time()) + 3600, "sub": f"access-{tag}", "secret": f"at-new-{tag}"}
        ),
        "refresh_token": f"rt-new-{tag}",
        "id_token": jwt({"email": email, "exp": int(time.time()) + 3600, AUTH_CLAIM: {}}),
        "expires_in": 3600,
    }


def reply_secrets(reply: dict[str, Any]) -> set[str]:
    return secrets_of(
        {"tokens": {k: reply[k] for k in ("access_token", "refresh_token", "id_token")}}
    )


def models_accepting(*access_tokens: str) -> Callable[[httpx.Request], httpx.Response]:
    """The upstream model list: 200 for the given access tokens, 401 for any other."""
    accepted = {f"Bearer {t}" for t in access_tokens}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") in accepted:
            return httpx.Response(200, json=MODEL_LIST)
        return httpx.Response(401, json={"detail": "token expired"})

    return handler


async def import_one(h: AppHarness, doc: dict[str, Any]) -> str:
    r = await import_docs(h.client, doc)
    assert r.status_code == 200, r.text
    account_id = str(r.json()["results"][0]["account"]["id"])
    await wait_live(h, lambda a: account_id in a)
    return account_id


def refresh_bodies(route: respx.Route) -> list[dict[str, Any]]:
    return [json.loads(call.request.content) for call in route.calls]


def expected_body(refresh_token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "refresh_token": refresh_token,
        "scope": SCOPE,
    }


# --- refresh before expiry and after a 401 ---------------------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "refreshes"),
    [(-30, True), (60, True), (240, True), (299, True), (300, False), (400, False), (3600, False)],
    ids=["expired", "1min", "4min", "4m59s", "5min", "6min", "1h"],
)
async def test_access_token_refreshed_when_it_expires_within_5_minutes(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    expires_in: float,
    refreshes: bool,
) -> None:
    # The manager's clock stands still: the boundary cases do not depend on the test's pace.
    now = float(int(time.time()))  # whole seconds, as in a JWT's exp
    monkeypatch.setattr(harness.parts.tokens, "clock", lambda: now)
    doc = auth_json(access_exp=now + expires_in)
    old = tokens_of(doc)
    reply = new_tokens("a")
    account_id = await import_one(harness, doc)
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=reply)
        models = mock.get(MODELS).mock(
            side_effect=models_accepting(
                reply["access_token"] if refreshes else old["access_token"]
            )
        )
        r = await admin.get("/v1/models")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "object": "list",
            "data": [
                {"id": "gpt-5.1-codex", "object": "model", "created": 0, "owned_by": "openai"},
                {"id": "gpt-5.1-codex-mini", "object": "model", "created": 0, "owned_by": "openai"},
            ],
        }
        assert models.call_count == 1  # refreshed before use, not after a refusal
        upstream = models.calls.last.request
        assert upstream.headers["chatgpt-account-id"] == "acct-1"
        stored = account_hash(raw_redis, prefix, account_id)
        sealed = opened(raw_redis, prefix, account_id)
        if not refreshes:
            assert token.call_count == 0
            assert stored[b"tokens_version"] == b"1"
            assert sealed["access_token"] == old["access_token"]
            return
        assert token.call_count == 1
        assert refresh_bodies(token) == [expected_body("rt-secret-1")]
        assert stored[b"tokens_version"] == b"2"
        assert stored[b"status"] == b"active"
        assert {k: sealed[k] for k in ("access_token", "refresh_token", "id_token")} == {
            k: reply[k] for k in ("access_token", "refresh_token", "id_token")
        }
        assert sealed["access_expires_at"] > time.time() + 3000

        # The fresh token is used from now on; no second exchange.
        await wait_live(harness, lambda a: a[account_id].tokens_version == 2)
        for _ in range(3):
            assert (await admin.get("/v1/models")).status_code == 200
        assert token.call_count == 1
        assert {c.request.headers["authorization"] for c in models.calls} == {
            f"Bearer {reply['access_token']}"
        }

    secrets = secrets_of(doc) | reply_secrets(reply)
    assert_no_secret(dump(raw_redis, prefix), secrets, "Redis")
    assert_no_secret((await admin.get("/api/accounts")).text, secrets, "GET /api/accounts")
    assert_no_secret(logs.text, secrets, "the log")


async def test_a_token_refreshed_for_expiry_and_then_refused_is_refreshed_again(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    """The retry after a 401 must exchange the token it just used, not hand it back again."""
    doc = auth_json(access_exp=time.time() + 60)
    first, second = new_tokens("first"), new_tokens("second")
    account_id = await import_one(harness, doc)
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).mock(
            side_effect=[httpx.Response(200, json=first), httpx.Response(200, json=second)]
        )
        # The upstream has already revoked the first refreshed token.
        models = mock.get(MODELS).mock(side_effect=models_accepting(second["access_token"]))
        r = await admin.get("/v1/models")
        assert r.status_code == 200, r.text
        assert token.call_count == 2
        assert refresh_bodies(token) == [
            expected_body("rt-secret-1"),
            expected_body("rt-new-first"),
        ]
        assert [c.request.headers["authorization"] for c in models.calls] == [
            f"Bearer {first['access_token']}",
            f"Bearer {second['access_token']}",
        ]
    assert account_hash(raw_redis, prefix, account_id)[b"tokens_version"] == b"3"
    assert opened(raw_redis, prefix, account_id)["access_token"] == second["access_token"]


async def test_upstream_401_refreshes_once_and_retries(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = time.time()
    monkeypatch.setattr(harness.parts.tokens, "clock", lambda: now)
    doc = auth_json()  # valid for an hour, but revoked upstream
    account_id = await import_one(harness, doc)
    # An opaque access token: its expiry comes from expires_in; no new refresh token either.
    reply = {"access_token": "opaque-access-token-new", "expires_in": 1800}
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=reply)
        models = mock.get(MODELS).mock(side_effect=models_accepting("opaque-access-token-new"))
        r = await admin.get("/v1/models")
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == ["gpt-5.1-codex", "gpt-5.1-codex-mini"]
        assert token.call_count == 1
        assert refresh_bodies(token) == [expected_body("rt-secret-1")]
        assert [c.request.headers["authorization"] for c in models.calls] == [
            f"Bearer {tokens_of(doc)['access_token']}",
            "Bearer opaque-access-token-new",
        ]
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"tokens_version"] == b"2"
    assert stored[b"status"] == b"active"
    sealed = opened(raw_redis, prefix, account_id)
    assert sealed["access_token"] == "opaque-access-token-new"
    # Kept: the upstream sent no new refresh or id token.
    assert sealed["refresh_token"] == "rt-secret-1"
    assert sealed["id_token"] == tokens_of(doc)["id_token"]
    assert sealed["access_expires_at"] == now + 1800
    assert sealed["refreshed_at"] == now
    secrets = secrets_of(doc) | {"opaque-access-token-new"}
    assert_no_secret(dump(raw_redis, prefix), secrets, "Redis")
    assert_no_secret(logs.text, secrets, "the log")


async def test_a_token_refused_again_after_refresh_is_not_refreshed_in_a_loop(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    account_id = await import_one(harness, auth_json())
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=new_tokens("b"))
        models = mock.get(MODELS).respond(401)
        r = await admin.get("/v1/models")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_accounts"
        assert token.call_count == 1
        assert models.call_count == 2
    assert account_hash(raw_redis, prefix, account_id)[b"tokens_version"] == b"2"


# --- dead refresh tokens ----------------------------------------------------------------------


DEAD = [
    (400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}),
    (
        401,
        {
            "error": {
                "message": "Your refresh token has already been used",
                "type": "invalid_request_error",
                "code": "refresh_token_reused",
            }
        },
    ),
    (400, {"error": {"code": "refresh_token_expired", "message": "expired"}}),
]


@pytest.mark.parametrize(("status", "body"), DEAD, ids=["invalid_grant", "reused", "expired"])
async def test_dead_refresh_token_needs_reimport_and_the_pool_keeps_serving(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    logs: pytest.LogCaptureFixture,
    status: int,
    body: dict[str, Any],
) -> None:
    dead_doc = auth_json(
        account_id="acct-dead",
        email="dead@example.com",
        refresh_token="rt-dead",
        tag="dead",
        access_exp=time.time() + 30,
    )
    good_doc = auth_json(account_id="acct-good", email="good@example.com", tag="good")
    dead = await import_one(harness, dead_doc)
    good = await import_one(harness, good_doc)
    dead_before = account_hash(raw_redis, prefix, dead)
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(status, json=body)
        models = mock.get(MODELS).mock(
            side_effect=models_accepting(tokens_of(good_doc)["access_token"])
        )
        # Routing is random: ask until the dead account has been tried (1 in 2 per request).
        for _ in range(60):
            r = await admin.get("/v1/models")
            assert r.status_code == 200, r.text
            if token.call_count:
                break
        assert token.call_count == 1
        assert refresh_bodies(token) == [expected_body("rt-dead")]

        stored = account_hash(raw_redis, prefix, dead)
        assert stored[b"status"] == b"reauth_required"
        # Only the status changed: the tokens stay as imported (nothing to refresh them with).
        assert {k: v for k, v in stored.items() if k != b"status"} == {
            k: v for k, v in dead_before.items() if k != b"status"
        }
        assert account_hash(raw_redis, prefix, good)[b"status"] == b"active"
        accounts = await listed(admin)
        assert accounts[dead]["status"] == "reauth_required"
        assert accounts[good]["status"] == "active"

        await wait_live(harness, lambda a: a[dead].status == "reauth_required")
        assert [a.id for a in harness.parts.accounts.serving()] == [good]
        calls_before = models.call_count
        for _ in range(5):
            assert (await admin.get("/v1/models")).status_code == 200
        assert token.call_count == 1
        assert models.call_count == calls_before + 5
        assert all(
            c.request.headers["chatgpt-account-id"] == "acct-good"
            for c in list(models.calls)[calls_before:]
        )

        # A refresh asked for directly does not reach the OAuth server again either.
        with pytest.raises(ReauthRequired):
            await harness.parts.tokens.refresh(dead, 1)
        assert token.call_count == 1

    assert_no_secret(logs.text, secrets_of(dead_doc, good_doc), "the log")


async def test_a_pool_of_dead_accounts_answers_no_accounts(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    account_id = await import_one(harness, auth_json(access_exp=time.time() + 10))
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(400, json={"error": "invalid_grant"})
        models = mock.get(MODELS).respond(200, json=MODEL_LIST)
        r = await admin.get("/v1/models")
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "no_accounts"
        assert set(error) == {"message", "type", "code", "param"}
        assert token.call_count == 1
        assert models.call_count == 0
        assert raw_redis.hget(f"{prefix}account:{account_id}", "status") == b"reauth_required"
        await wait_live(harness, lambda a: a[account_id].status == "reauth_required")
        assert (await admin.get("/v1/models")).status_code == 503
        assert token.call_count == 1

        # Re-importing the account (overwrite mode) brings it back.
        fresh = auth_json(refresh_token="rt-reimported", tag="re")
        r = await import_docs(admin, fresh)
        assert r.json()["results"][0]["status"] == "updated"
        assert r.json()["results"][0]["account"]["status"] == "active"
        await wait_live(harness, lambda a: a[account_id].status == "active")
        assert (await admin.get("/v1/models")).status_code == 200
        assert token.call_count == 1
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == "rt-reimported"


async def test_a_passing_refresh_failure_keeps_the_account(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    doc = auth_json(access_exp=time.time() + 10)
    account_id = await import_one(harness, doc)
    before = account_hash(raw_redis, prefix, account_id)
    reply = new_tokens("c")
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL)
        token.side_effect = [
            httpx.Response(500, text="overloaded"),
            httpx.ConnectError("connection refused"),
            httpx.Response(502, text="bad gateway"),
            httpx.Response(200, json=reply),
        ]
        mock.get(MODELS).mock(side_effect=models_accepting(reply["access_token"]))
        for attempt in range(2):
            r = await admin.get("/v1/models")
            assert r.status_code == 503, (attempt, r.text)
            assert account_hash(raw_redis, prefix, account_id) == before
        with pytest.raises(RefreshFailed):
            await harness.parts.tokens.refresh(account_id, 1)
        assert account_hash(raw_redis, prefix, account_id) == before
        r = await admin.get("/v1/models")
        assert r.status_code == 200, r.text
        assert token.call_count == 4
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"status"] == b"active"
    assert stored[b"tokens_version"] == b"2"
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == reply["refresh_token"]
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")


# --- single flight across processes -----------------------------------------------------------


async def test_ten_concurrent_refreshes_on_two_processes_make_one_exchange(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    doc = auth_json()
    account_id = await import_one(harness, doc)
    reply = new_tokens("single")
    exchanges: list[str] = []

    async def exchange(request: httpx.Request) -> httpx.Response:
        exchanges.append(json.loads(request.content)["refresh_token"])
        await asyncio.sleep(0.3)  # slow enough that every trigger overlaps it
        return httpx.Response(200, json=reply)

    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).mock(side_effect=exchange)
        async with AppHarness(harness.config) as other:
            await wait_live(other, lambda a: account_id in a)
            managers = [harness.parts.tokens, other.parts.tokens]
            results = await asyncio.gather(
                *(managers[i % 2].refresh(account_id, 1) for i in range(10))
            )
        assert token.call_count == 1
        assert exchanges == ["rt-secret-1"]
    assert {r.access_token for r in results} == {reply["access_token"]}
    assert {r.refresh_token for r in results} == {reply["refresh_token"]}
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"tokens_version"] == b"2"
    assert stored[b"status"] == b"active"
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == reply["refresh_token"]
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")
    assert_no_secret(logs.text, secrets_of(doc) | reply_secrets(reply), "the log")


async def test_concurrent_401s_on_two_processes_make_one_exchange(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    doc = auth_json()
    account_id = await import_one(harness, doc)
    reply = new_tokens("401")

    async def exchange(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(200, json=reply)

    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).mock(side_effect=exchange)
        models = mock.get(MODELS).mock(side_effect=models_accepting(reply["access_token"]))
        async with AppHarness(harness.config) as other:
            await login(other.client)
            await wait_live(other, lambda a: account_id in a)
            clients = [admin, other.client]
            responses = await asyncio.gather(*(clients[i % 2].get("/v1/models") for i in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        assert token.call_count == 1
        old = f"Bearer {tokens_of(doc)['access_token']}"
        refused = [c for c in models.calls if c.request.headers["authorization"] == old]
        assert len(refused) == 10  # each request met the 401, and one exchange served them all
    assert account_hash(raw_redis, prefix, account_id)[b"tokens_version"] == b"2"
    assert opened(raw_redis, prefix, account_id)["access_token"] == reply["access_token"]


async def test_a_refresh_that_lost_the_race_returns_the_winners_tokens(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    """A caller that saw an older version gets the stored newer tokens, without an exchange."""
    account_id = await import_one(harness, auth_json())
    reply = new_tokens("first")
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=reply)
        first = await harness.parts.tokens.refresh(account_id, 1)
        late = await harness.parts.tokens.refresh(account_id, 1)
        assert token.call_count == 1
        assert late.access_token == first.access_token == reply["access_token"]
        # A caller that already saw version 2 asks for a newer one: a real second exchange.
        token.respond(200, json=new_tokens("second"))
        second = await harness.parts.tokens.refresh(account_id, 2)
        assert token.call_count == 2
        assert refresh_bodies(token)[1]["refresh_token"] == reply["refresh_token"]
    assert second.refresh_token == "rt-new-second"
    assert account_hash(raw_redis, prefix, account_id)[b"tokens_version"] == b"3"


# --- a refresh never kills a healthy account --------------------------------------------------

REUSED = {
    "error": {
        "message": "Your refresh token has already been used",
        "type": "invalid_request_error",
        "code": "refresh_token_reused",
    }
}


def manager(h: AppHarness, **options: Any) -> TokenManager:
    """Another token manager of process ``h`` (its own in-process lock), e.g. a short lease."""
    svc = h.parts
    return TokenManager(
        svc.leases, svc.account_store, svc.box, svc.http, h.config.auth_base_url, **options
    )


def renewals_running() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("renew lease:")]


async def test_a_refresh_that_outlives_its_lease_keeps_it_and_is_the_only_exchange(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A slow exchange renews its lease: a second process waits for it instead of spending the
    same single-use refresh token again (which the upstream would refuse, killing the account)."""
    lease = 0.3
    account_id = await import_one(harness, auth_json())
    reply = new_tokens("slow")
    spent: set[str] = set()
    in_flight = asyncio.Event()

    async def exchange(request: httpx.Request) -> httpx.Response:
        refresh_token = json.loads(request.content)["refresh_token"]
        if refresh_token in spent:
            return httpx.Response(401, json=REUSED)
        spent.add(refresh_token)
        in_flight.set()
        await asyncio.sleep(lease * 4)  # the upstream is slow: longer than the lease
        return httpx.Response(200, json=reply)

    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).mock(side_effect=exchange)
        async with AppHarness(harness.config) as other:
            await wait_live(other, lambda a: account_id in a)
            a = manager(harness, lease_seconds=lease, exchange_seconds=5.0)
            b = manager(other, lease_seconds=lease, exchange_seconds=5.0)
            first = asyncio.create_task(a.refresh(account_id, 1))
            await in_flight.wait()
            second = await b.refresh(account_id, 1)  # asked while A's exchange is in flight
            first_result = await first
        assert first_result == second
        assert token.call_count == 1
        assert refresh_bodies(token) == [expected_body("rt-secret-1")]
    assert second.access_token == reply["access_token"]
    assert second.refresh_token == reply["refresh_token"]
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"status"] == b"active"
    assert stored[b"tokens_version"] == b"2"
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == reply["refresh_token"]
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")
    assert renewals_running() == []  # the renewal stopped with the refresh
    assert "needs re-import" not in logs.text


async def test_a_refused_refresh_token_does_not_kill_an_account_someone_else_refreshed(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    """B's exchange is refused as reused because A spent the token and stored fresh ones
    meanwhile (A's lease was lost, e.g. to a Redis failover): B returns A's tokens and the
    account stays active."""
    account_id = await import_one(harness, auth_json())
    reply = new_tokens("a")
    lease_key = f"{prefix}lease:refresh:{account_id}"
    a_exchanging, b_exchanging = asyncio.Event(), asyncio.Event()
    a_task: asyncio.Task[Any] | None = None

    async def exchange(request: httpx.Request) -> httpx.Response:
        nonlocal a_task
        if not a_exchanging.is_set():  # A's exchange
            assert raw_redis.delete(lease_key) == 1  # A's lease is lost
            a_exchanging.set()
            await b_exchanging.wait()
            return httpx.Response(200, json=reply)
        b_exchanging.set()  # B's exchange: it is refused once A has stored its tokens
        assert a_task is not None
        await a_task
        assert raw_redis.hget(f"{prefix}account:{account_id}", "tokens_version") == b"2"
        return httpx.Response(401, json=REUSED)

    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).mock(side_effect=exchange)
        async with AppHarness(harness.config) as other:
            await wait_live(other, lambda a: account_id in a)
            a_task = asyncio.create_task(harness.parts.tokens.refresh(account_id, 1))
            await a_exchanging.wait()
            b_tokens = await other.parts.tokens.refresh(account_id, 1)
            a_tokens = await a_task
        assert token.call_count == 2
        assert refresh_bodies(token) == [expected_body("rt-secret-1")] * 2
    assert b_tokens == a_tokens
    assert b_tokens.access_token == reply["access_token"]
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"status"] == b"active"
    assert stored[b"tokens_version"] == b"2"
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == reply["refresh_token"]
    assert not raw_redis.exists(lease_key)
    assert "needs re-import" not in logs.text


async def test_an_exchange_that_never_answers_fails_within_its_bound(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    bound = 0.5
    account_id = await import_one(harness, auth_json())
    before = account_hash(raw_redis, prefix, account_id)
    asked: list[str] = []

    async def never(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content)["refresh_token"])
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with respx.mock(assert_all_called=False) as mock:
        mock.post(TOKEN_URL).mock(side_effect=never)
        tokens = manager(harness, exchange_seconds=bound)
        started = time.monotonic()
        with pytest.raises(RefreshFailed):
            async with asyncio.timeout(bound + 3):  # a hang fails the test, not the run
                await tokens.refresh(account_id, 1)
        elapsed = time.monotonic() - started
    assert asked == ["rt-secret-1"]  # (respx counts only calls that were answered)
    assert bound <= elapsed < bound + 1
    assert account_hash(raw_redis, prefix, account_id) == before  # still active, untouched
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")
    assert renewals_running() == []


def failing_token_stores(
    monkeypatch: pytest.MonkeyPatch, h: AppHarness, times: int, *, written: bool = False
) -> list[str]:
    """The next ``times`` writes of an account's tokens fail as if Redis were unreachable
    (``written``: after the write happened, as when the answer is lost)."""
    store = h.parts.account_store
    update = store.update
    failed: list[str] = []

    async def flaky(account_id: str, values: Any, **options: Any) -> int:
        if "tokens" in values and len(failed) < times:
            failed.append(account_id)
            if written:
                await update(account_id, values, **options)
            raise StoreUnavailable()
        return await update(account_id, values, **options)

    monkeypatch.setattr(store, "update", flaky)
    return failed


async def test_fresh_tokens_are_stored_on_retry_when_the_store_fails_once(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a successful exchange the old refresh token is spent: losing the new tokens to a
    passing store failure would lose the account."""
    account_id = await import_one(harness, auth_json(access_exp=time.time() + 60))
    reply = new_tokens("retry")
    failed = failing_token_stores(monkeypatch, harness, times=1)
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=reply)
        models = mock.get(MODELS).mock(side_effect=models_accepting(reply["access_token"]))
        r = await admin.get("/v1/models")
        assert r.status_code == 200, r.text
        assert failed == [account_id]
        assert token.call_count == 1
        stored = account_hash(raw_redis, prefix, account_id)
        assert stored[b"status"] == b"active"
        assert stored[b"tokens_version"] == b"2"
        sealed = opened(raw_redis, prefix, account_id)
        assert {k: sealed[k] for k in ("access_token", "refresh_token", "id_token")} == {
            k: reply[k] for k in ("access_token", "refresh_token", "id_token")
        }
        # The account keeps working on the stored tokens, without another exchange.
        await wait_live(harness, lambda a: a[account_id].tokens_version == 2)
        for _ in range(2):
            assert (await admin.get("/v1/models")).status_code == 200
        assert token.call_count == 1
        assert {c.request.headers["authorization"] for c in models.calls} == {
            f"Bearer {reply['access_token']}"
        }
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")


async def test_fresh_tokens_that_cannot_be_stored_fail_the_refresh_loudly_and_in_time(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
) -> None:
    lease = 0.6
    account_id = await import_one(harness, auth_json())
    before = account_hash(raw_redis, prefix, account_id)
    reply = new_tokens("lost")
    failed = failing_token_stores(monkeypatch, harness, times=1000)
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=reply)
        tokens = manager(harness, lease_seconds=lease, exchange_seconds=0.4)
        started = time.monotonic()
        with pytest.raises(RefreshFailed):
            await tokens.refresh(account_id, 1)
        elapsed = time.monotonic() - started
        assert token.call_count == 1
    assert len(failed) > 1  # retried
    assert elapsed < lease + 0.5  # no longer than the lease
    assert account_hash(raw_redis, prefix, account_id) == before
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")
    assert renewals_running() == []
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert account_id in errors[0]
    assert_no_secret(logs.text, reply_secrets(reply), "the log")


async def test_a_store_whose_answer_was_lost_is_not_taken_for_a_conflict(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    raw_redis: redis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
) -> None:
    """The first store wrote, but its answer was lost: the retry's compare-and-set fails on our
    own write, which must count as stored, not as someone else's change."""
    account_id = await import_one(harness, auth_json())
    reply = new_tokens("landed")
    failed = failing_token_stores(monkeypatch, harness, times=1, written=True)
    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).respond(200, json=reply)
        fresh = await harness.parts.tokens.refresh(account_id, 1)
        assert token.call_count == 1
    assert failed == [account_id]
    assert fresh.access_token == reply["access_token"]
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"status"] == b"active"
    assert stored[b"tokens_version"] == b"2"
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == reply["refresh_token"]
    assert not [r for r in logs.records if r.levelno >= logging.ERROR]


async def test_a_refresh_whose_caller_is_cancelled_still_stores_its_tokens(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    """A client gone, or shutdown cancelling the usage poller, mid-exchange: the upstream may
    already have spent the refresh token, so the exchange runs on and stores the new tokens,
    and shutdown waits for it (``drain``)."""
    account_id = await import_one(harness, auth_json())
    reply = new_tokens("cancelled")
    in_flight = asyncio.Event()

    async def exchange(request: httpx.Request) -> httpx.Response:
        in_flight.set()
        await asyncio.sleep(0.3)
        return httpx.Response(200, json=reply)

    with respx.mock(assert_all_called=False) as mock:
        token = mock.post(TOKEN_URL).mock(side_effect=exchange)
        tokens = manager(harness)
        caller = asyncio.create_task(tokens.refresh(account_id, 1))
        await in_flight.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await tokens.drain(5.0)
        assert token.call_count == 1
    stored = account_hash(raw_redis, prefix, account_id)
    assert (stored[b"status"], stored[b"tokens_version"]) == (b"active", b"2")
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == reply["refresh_token"]
    assert not raw_redis.exists(f"{prefix}lease:refresh:{account_id}")
