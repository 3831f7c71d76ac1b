"""CONTRACT §3: dashboard authentication, against a real Redis.

Every test drives the app in-process (httpx over ASGI) and checks the answer's status, its
error code, and where it matters what Redis holds afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import redis

from service.config import Config
from tests.conftest import AppHarness, make_config, setup_password
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, stored_blob

AUTH = "/api/dashboard-auth"
COOKIE = "dashboard_session"
NEW_PASSWORD = "a brand new passphrase 42"
SETTINGS_BODY = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}


# --- helpers ----------------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, r.text
    assert isinstance(error["message"], str)
    assert error["message"]


def session_set_cookie(r: httpx.Response) -> str:
    """The raw ``Set-Cookie`` header for the session cookie."""
    found = [h for h in r.headers.get_list("set-cookie") if h.startswith(f"{COOKIE}=")]
    assert len(found) == 1, r.headers.get_list("set-cookie")
    return found[0]


def cookie_value(r: httpx.Response) -> str:
    return session_set_cookie(r).split(";", 1)[0].split("=", 1)[1].strip('"')


def cookie_attributes(r: httpx.Response) -> list[str]:
    return [p.strip().lower() for p in session_set_cookie(r).split(";")[1:]]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_client(
    h: AppHarness, base_url: str = "http://testserver", client: tuple[str, int] = ("127.0.0.1", 123)
) -> httpx.AsyncClient:
    """Another browser against the same app: its own cookie jar."""
    transport = httpx.ASGITransport(app=h.app, client=client)
    return httpx.AsyncClient(transport=transport, base_url=base_url)


async def as_token(
    h: AppHarness, method: str, path: str, token: str, **kwargs: Any
) -> httpx.Response:
    """Replay ``token`` explicitly, from a client with an empty cookie jar."""
    async with new_client(h) as c:
        headers = {"Cookie": f"{COOKIE}={token}", **kwargs.pop("headers", {})}
        return await c.request(method, path, headers=headers, **kwargs)


async def login(
    c: httpx.AsyncClient, password: str = PASSWORD, forwarded_for: str | None = None
) -> httpx.Response:
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    return await c.post(f"{AUTH}/password/login", json={"password": password}, headers=headers)


def stored_version(raw_redis: redis.Redis, prefix: str) -> int:
    return int(raw_redis.hget(f"{prefix}settings", "version"))  # type: ignore[arg-type]


def stored_record(raw_redis: redis.Redis, prefix: str) -> bytes:
    return raw_redis.hget(f"{prefix}settings", "record")  # type: ignore[return-value]


def session_exists(raw_redis: redis.Redis, prefix: str, token: str) -> bool:
    return bool(raw_redis.exists(f"{prefix}session:{token_hash(token)}"))


def wrong_code(secret: str) -> str:
    """Six digits that are not valid for ``secret`` anywhere near now."""
    totp = pyotp.TOTP(secret)
    now = time.time()
    valid = {totp.at(now + delta) for delta in range(-120, 121, 30)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in valid)


def next_code(secret: str) -> str:
    """A valid code for the next 30 s step (the server accepts ±1 step)."""
    return pyotp.TOTP(secret).at(time.time() + 30)


async def enroll_totp(c: httpx.AsyncClient) -> tuple[str, str]:
    """Configure TOTP with the current step's code; returns (secret, the code used)."""
    r = await c.post(f"{AUTH}/totp/setup/start")
    assert r.status_code == 200, r.text
    secret = r.json()["secret"]
    code = pyotp.TOTP(secret).now()
    r = await c.post(f"{AUTH}/totp/setup/confirm", json={"code": code})
    assert r.status_code == 200, r.text
    return secret, code


async def require_totp(c: httpx.AsyncClient) -> None:
    r = await c.put("/api/settings", json={**SETTINGS_BODY, "totp_required_on_login": True})
    assert r.status_code == 200, r.text
    assert r.json()["totp_required_on_login"] is True


def retry_after(r: httpx.Response) -> int:
    value = r.headers.get("retry-after")
    assert value is not None, r.headers
    assert value.isdigit(), r.headers
    return int(value)


@asynccontextmanager
async def app_with(
    redis_url: str, prefix: str, tmp_path: Path, **overrides: object
) -> AsyncIterator[AppHarness]:
    async with AppHarness(make_config(redis_url, prefix, tmp_path, **overrides)) as h:
        yield h


def session_view(**overrides: bool) -> dict[str, bool]:
    view = {
        "authenticated": False,
        "password_configured": False,
        "totp_configured": False,
        "totp_required_on_login": False,
        "totp_pending": False,
        "bootstrap_required": True,
    }
    view.update(overrides)
    return view


# --- GET /session ---------------------------------------------------------------------------


async def test_session_shape_first_run(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{AUTH}/session")
    assert r.status_code == 200, r.text
    assert r.json() == session_view()


async def test_session_shape_after_setup_and_without_cookie(harness: AppHarness) -> None:
    await setup_password(harness.client)
    r = await harness.client.get(f"{AUTH}/session")
    assert r.status_code == 200, r.text
    assert r.json() == session_view(
        authenticated=True, password_configured=True, bootstrap_required=False
    )
    async with new_client(harness) as anonymous:
        r = await anonymous.get(f"{AUTH}/session")
    assert r.status_code == 200, r.text
    assert r.json() == session_view(password_configured=True, bootstrap_required=False)


async def test_session_shape_totp_pending(harness: AppHarness) -> None:
    admin = harness.client
    await setup_password(admin)
    await enroll_totp(admin)
    await require_totp(admin)
    async with new_client(harness) as c:
        r = await login(c)
        assert r.status_code == 200, r.text
        pending = session_view(
            password_configured=True,
            bootstrap_required=False,
            totp_configured=True,
            totp_required_on_login=True,
            totp_pending=True,
        )
        assert r.json() == pending
        r = await c.get(f"{AUTH}/session")
        assert r.status_code == 200, r.text
        assert r.json() == pending


# --- first run ------------------------------------------------------------------------------

GUARDED = [
    ("GET", "/api/settings"),
    ("PUT", "/api/settings"),
    ("GET", "/api/settings/propagation"),
    ("GET", "/api/settings/history"),
    ("GET", "/api/accounts"),
    ("POST", "/api/accounts/import"),
    ("GET", "/api/api-keys"),
    ("GET", "/api/no-such-route"),
]


@pytest.mark.parametrize("cookie", [None, "forged-token"])
async def test_first_run_every_api_route_is_401(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str, cookie: str | None
) -> None:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    async with new_client(harness) as c:
        for method, path in GUARDED:
            r = await c.request(method, path, json=SETTINGS_BODY, headers=headers)
            assert_error(r, 401, "unauthorized")
        # The login routes and the usage route stay reachable.
        assert (await c.get(f"{AUTH}/session")).status_code == 200
        assert (await c.get("/api/codex/usage")).status_code != 401
    assert stored_version(raw_redis, prefix) == 1


async def test_setup_wrong_bootstrap_token(
    client: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await client.post(
        f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": "not-the-token"}
    )
    assert_error(r, 401, "invalid_bootstrap_token")
    assert "set-cookie" not in r.headers
    assert raw_redis.hget(f"{prefix}auth", "password_hash") is None
    assert (await client.get(f"{AUTH}/session")).json()["bootstrap_required"] is True


async def test_setup_sets_password_and_logs_in(
    client: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await client.post(
        f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN}
    )
    assert r.status_code == 200, r.text
    assert r.json()["authenticated"] is True
    attrs = cookie_attributes(r)
    assert "httponly" in attrs
    assert "samesite=strict" in attrs
    assert "path=/" in attrs
    assert "secure" not in attrs
    token = cookie_value(r)
    # 256 random bits, url-safe base64.
    assert len(token) >= 43
    assert session_exists(raw_redis, prefix, token)
    stored = raw_redis.hget(f"{prefix}auth", "password_hash")
    assert stored is not None
    assert stored.startswith(b"$argon2id$")
    assert (await client.get("/api/settings")).status_code == 200


async def test_setup_twice_is_409(
    client: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    await setup_password(client)
    before = raw_redis.hget(f"{prefix}auth", "password_hash")
    r = await client.post(
        f"{AUTH}/password/setup",
        json={"password": NEW_PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
    )
    assert_error(r, 409, "password_already_configured")
    assert raw_redis.hget(f"{prefix}auth", "password_hash") == before
    assert (await login(client, NEW_PASSWORD)).status_code == 401


@pytest.mark.parametrize("password", ["", "short", "7chars!"])
async def test_setup_short_password_is_422(
    client: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, password: str
) -> None:
    r = await client.post(
        f"{AUTH}/password/setup", json={"password": password, "bootstrap_token": BOOTSTRAP_TOKEN}
    )
    assert_error(r, 422, "validation_error")
    assert "$.password" in r.json()["error"]["message"]
    assert raw_redis.hget(f"{prefix}auth", "password_hash") is None


@pytest.mark.parametrize(
    ("cookie_secure", "base_url", "secure"),
    [
        ("true", "http://testserver", True),
        ("false", "https://testserver", False),
        ("auto", "https://testserver", True),
        ("auto", "http://testserver", False),
    ],
)
async def test_cookie_secure_flag(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
    cookie_secure: str,
    base_url: str,
    secure: bool,
) -> None:
    async with (
        app_with(redis_url, prefix, tmp_path, cookie_secure=cookie_secure) as h,
        new_client(h, base_url) as c,
    ):
        r = await c.post(
            f"{AUTH}/password/setup",
            json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
        )
        assert r.status_code == 200, r.text
        attrs = cookie_attributes(r)
        assert ("secure" in attrs) is secure
        assert {"httponly", "samesite=strict", "path=/"} <= set(attrs)


async def logged_bootstrap_token(caplog: pytest.LogCaptureFixture) -> str | None:
    """The token the process that generated it logged at WARNING (waits up to 2 s)."""
    for _ in range(200):
        for record in caplog.records:
            if "bootstrap token is" in record.getMessage():
                return record.getMessage().rsplit(" ", 1)[1]
        await asyncio.sleep(0.01)
    return None


async def test_generated_bootstrap_token_is_logged_and_works(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with app_with(redis_url, prefix, tmp_path, bootstrap_token=None) as h:
        token = await logged_bootstrap_token(caplog)
        assert token, "the generated bootstrap token was not logged at WARNING"
        assert raw_redis.exists(f"{prefix}auth:bootstrap")
        assert token.encode() not in raw_redis.get(f"{prefix}auth:bootstrap")  # type: ignore[operator]
        r = await h.client.post(
            f"{AUTH}/password/setup",
            json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
        )
        assert_error(r, 401, "invalid_bootstrap_token")
        r = await h.client.post(
            f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": token}
        )
        assert r.status_code == 200, r.text
        # Used up: the token is gone once a password exists.
        assert not raw_redis.exists(f"{prefix}auth:bootstrap")


# --- login, rotation, logout ------------------------------------------------------------------


async def test_login_wrong_password(admin: httpx.AsyncClient) -> None:
    token = admin.cookies[COOKIE]
    r = await login(admin, "wrong password!")
    assert_error(r, 401, "invalid_credentials")
    assert "set-cookie" not in r.headers
    # A failed login leaves the caller's existing session alone.
    assert (await admin.get("/api/settings")).status_code == 200
    assert admin.cookies[COOKIE] == token


async def test_login_rotates_the_session_token(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    old = admin.cookies[COOKIE]
    r = await login(admin)
    assert r.status_code == 200, r.text
    assert r.json() == session_view(
        authenticated=True, password_configured=True, bootstrap_required=False
    )
    new = cookie_value(r)
    assert new != old
    assert admin.cookies[COOKIE] == new
    assert not session_exists(raw_redis, prefix, old)
    assert session_exists(raw_redis, prefix, new)
    assert_error(await as_token(harness, "GET", "/api/settings", old), 401, "unauthorized")
    assert (await as_token(harness, "GET", "/api/settings", new)).status_code == 200


async def test_logout_revokes_server_side(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    token = admin.cookies[COOKIE]
    r = await admin.post(f"{AUTH}/logout")
    assert r.status_code == 200, r.text
    assert r.json()["authenticated"] is False
    header = session_set_cookie(r).lower()
    assert "max-age=0" in header or "expires=thu, 01 jan 1970" in header
    assert COOKIE not in admin.cookies
    assert not session_exists(raw_redis, prefix, token)
    assert not raw_redis.sismember(f"{prefix}sessions", token_hash(token))
    # The old value, replayed by hand, is dead on the server.
    assert_error(await as_token(harness, "GET", "/api/settings", token), 401, "unauthorized")
    assert_error(await admin.get("/api/settings"), 401, "unauthorized")


async def test_logout_without_session_is_harmless(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{AUTH}/logout")
    assert r.status_code == 200, r.text
    assert r.json()["authenticated"] is False


# --- password change ------------------------------------------------------------------------


async def test_password_change(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    async with new_client(harness) as other:
        assert (await login(other)).status_code == 200
        other_token = other.cookies[COOKIE]
        mine = admin.cookies[COOKIE]
        before = raw_redis.hget(f"{prefix}auth", "password_hash")

        r = await admin.post(
            f"{AUTH}/password/change",
            json={"current_password": "not my password", "new_password": NEW_PASSWORD},
        )
        assert_error(r, 401, "invalid_credentials")
        assert raw_redis.hget(f"{prefix}auth", "password_hash") == before
        assert (await other.get("/api/settings")).status_code == 200

        r = await admin.post(
            f"{AUTH}/password/change",
            json={"current_password": PASSWORD, "new_password": "short"},
        )
        assert_error(r, 422, "validation_error")
        assert raw_redis.hget(f"{prefix}auth", "password_hash") == before

        r = await admin.post(
            f"{AUTH}/password/change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        )
        assert r.status_code == 200, r.text
        assert r.json()["authenticated"] is True
        assert raw_redis.hget(f"{prefix}auth", "password_hash") != before

        # Every other session ended; this one goes on.
        assert_error(await other.get("/api/settings"), 401, "unauthorized")
        assert not session_exists(raw_redis, prefix, other_token)
        assert (await admin.get("/api/settings")).status_code == 200
        assert session_exists(raw_redis, prefix, mine)

        assert_error(await login(other, PASSWORD), 401, "invalid_credentials")
        assert (await login(other, NEW_PASSWORD)).status_code == 200
        assert (await other.get("/api/settings")).status_code == 200


async def test_password_change_needs_a_session(harness: AppHarness) -> None:
    await setup_password(harness.client)
    async with new_client(harness) as c:
        r = await c.post(
            f"{AUTH}/password/change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        )
    assert_error(r, 401, "unauthorized")
    assert (await login(harness.client, PASSWORD)).status_code == 200


# --- session lifetimes ----------------------------------------------------------------------


async def test_idle_timeout(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    async with app_with(redis_url, prefix, tmp_path, session_idle_seconds=1) as h:
        token = cookie_value(await setup_password(h.client))
        # Use keeps it alive past the idle timeout...
        for _ in range(5):
            await asyncio.sleep(0.4)
            assert (await as_token(h, "GET", "/api/settings", token)).status_code == 200
        # ...idleness ends it.
        await asyncio.sleep(1.5)
        assert_error(await as_token(h, "GET", "/api/settings", token), 401, "unauthorized")
        assert not session_exists(raw_redis, prefix, token)


async def test_session_index_keeps_only_live_sessions(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    """Sessions that expire on their own leave the index at the next login (it never grows)."""
    async with app_with(redis_url, prefix, tmp_path, session_idle_seconds=1) as h:
        first = cookie_value(await setup_password(h.client))
        await asyncio.sleep(1.5)
        assert not session_exists(raw_redis, prefix, first)
        h.client.cookies.clear()  # a login from elsewhere: nothing ends the old session for it
        r = await h.client.post(f"{AUTH}/password/login", json={"password": PASSWORD})
        assert r.status_code == 200
        second = cookie_value(r)
        assert raw_redis.smembers(f"{prefix}sessions") == {token_hash(second).encode()}


async def test_absolute_lifetime(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    async with app_with(
        redis_url, prefix, tmp_path, session_idle_seconds=10, session_max_seconds=2
    ) as h:
        token = cookie_value(await setup_password(h.client))
        start = time.monotonic()
        while time.monotonic() - start < 1.5:
            assert (await as_token(h, "GET", "/api/settings", token)).status_code == 200
            # Sliding the idle timeout never pushes the record past its absolute expiry.
            assert 0 < raw_redis.pttl(f"{prefix}session:{token_hash(token)}") <= 2000
            await asyncio.sleep(0.5)
        await asyncio.sleep(max(0.0, 2.3 - (time.monotonic() - start)))
        assert_error(await as_token(h, "GET", "/api/settings", token), 401, "unauthorized")
        assert not session_exists(raw_redis, prefix, token)


# --- TOTP -----------------------------------------------------------------------------------


async def test_totp_setup_start(harness: AppHarness, raw_redis: redis.Redis, prefix: str) -> None:
    async with new_client(harness) as anonymous:
        assert_error(await anonymous.post(f"{AUTH}/totp/setup/start"), 401, "unauthorized")
    await setup_password(harness.client)
    r = await harness.client.post(f"{AUTH}/totp/setup/start")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"secret", "otpauth_uri", "qr_svg_data_uri"}
    secret = body["secret"]
    assert len(pyotp.TOTP(secret).now()) == 6
    assert body["otpauth_uri"].startswith("otpauth://totp/")
    assert f"secret={secret}" in body["otpauth_uri"]
    head = "data:image/svg+xml;base64,"
    assert body["qr_svg_data_uri"].startswith(head)
    svg = base64.b64decode(body["qr_svg_data_uri"][len(head) :], validate=True)
    assert svg.lstrip().startswith(b"<svg")
    assert svg.rstrip().endswith(b"</svg>")
    # Starting enrolment does not configure anything yet.
    settings = (await harness.client.get("/api/settings")).json()
    assert settings["totp_configured"] is False
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is None


async def test_totp_confirm(harness: AppHarness, raw_redis: redis.Redis, prefix: str) -> None:
    admin = harness.client
    await setup_password(admin)
    version = (await admin.get("/api/settings")).json()["version"]
    r = await admin.post(f"{AUTH}/totp/setup/start")
    secret = r.json()["secret"]

    r = await admin.post(f"{AUTH}/totp/setup/confirm", json={"code": wrong_code(secret)})
    assert_error(r, 400, "invalid_totp_code")
    settings = (await admin.get("/api/settings")).json()
    assert settings["totp_configured"] is False
    assert settings["version"] == version
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is None

    r = await admin.post(f"{AUTH}/totp/setup/confirm", json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 200, r.text
    assert r.json()["totp_configured"] is True
    assert r.json()["authenticated"] is True
    r = await admin.get("/api/settings")
    assert r.json()["totp_configured"] is True
    assert r.json()["totp_required_on_login"] is False
    assert r.json()["version"] == version + 1
    assert r.headers["etag"] == f'"{version + 1}"'
    assert stored_version(raw_redis, prefix) == version + 1
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is not None

    r = await admin.put("/api/settings", json={**SETTINGS_BODY, "totp_required_on_login": True})
    assert r.status_code == 200, r.text
    assert r.json()["totp_required_on_login"] is True
    assert r.json()["totp_configured"] is True
    assert r.json()["version"] == version + 2


async def test_totp_confirm_needs_a_session(harness: AppHarness) -> None:
    await setup_password(harness.client)
    secret = (await harness.client.post(f"{AUTH}/totp/setup/start")).json()["secret"]
    async with new_client(harness) as anonymous:
        r = await anonymous.post(
            f"{AUTH}/totp/setup/confirm", json={"code": pyotp.TOTP(secret).now()}
        )
    assert_error(r, 401, "unauthorized")
    assert (await harness.client.get("/api/settings")).json()["totp_configured"] is False


async def test_totp_required_before_configured_is_400(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    record = stored_record(raw_redis, prefix)
    version = stored_version(raw_redis, prefix)
    r = await admin.put("/api/settings", json={**SETTINGS_BODY, "totp_required_on_login": True})
    assert_error(r, 400, "invalid_totp_config")
    assert stored_record(raw_redis, prefix) == record
    assert stored_version(raw_redis, prefix) == version
    settings = (await admin.get("/api/settings")).json()
    assert settings["totp_required_on_login"] is False
    assert settings["version"] == version


async def test_totp_login_is_pending_until_verified(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    admin = harness.client
    await setup_password(admin)
    secret, used_code = await enroll_totp(admin)
    await require_totp(admin)

    async with new_client(harness) as c:
        r = await login(c)
        assert r.status_code == 200, r.text
        assert r.json()["authenticated"] is False
        assert r.json()["totp_pending"] is True
        pending = cookie_value(r)

        # The password alone opens nothing.
        assert_error(await c.get("/api/settings"), 401, "totp_required")
        assert_error(await c.put("/api/settings", json=SETTINGS_BODY), 401, "totp_required")
        assert_error(await c.post(f"{AUTH}/totp/setup/start"), 401, "unauthorized")
        r = await c.post(
            f"{AUTH}/password/change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        )
        assert_error(r, 401, "unauthorized")

        # The code that confirmed enrolment was used: its step is spent.
        r = await c.post(f"{AUTH}/totp/verify", json={"code": used_code})
        assert_error(r, 400, "invalid_totp_code")
        r = await c.post(f"{AUTH}/totp/verify", json={"code": wrong_code(secret)})
        assert_error(r, 400, "invalid_totp_code")
        assert (await c.get(f"{AUTH}/session")).json()["totp_pending"] is True

        r = await c.post(f"{AUTH}/totp/verify", json={"code": next_code(secret)})
        assert r.status_code == 200, r.text
        assert r.json()["authenticated"] is True
        assert r.json()["totp_pending"] is False
        full = cookie_value(r)
        assert full != pending
        assert not session_exists(raw_redis, prefix, pending)
        assert session_exists(raw_redis, prefix, full)
        assert (await c.get("/api/settings")).status_code == 200

    # The pending token is dead, the full one works.
    assert_error(await as_token(harness, "GET", "/api/settings", pending), 401, "unauthorized")
    r = await as_token(harness, "POST", f"{AUTH}/totp/verify", pending, json={"code": "000000"})
    assert_error(r, 401, "unauthorized")
    assert (await as_token(harness, "GET", "/api/settings", full)).status_code == 200


async def test_totp_verify_needs_a_pending_session(harness: AppHarness) -> None:
    admin = harness.client
    await setup_password(admin)
    secret, _ = await enroll_totp(admin)
    # A full session has nothing to verify, and no session at all neither.
    r = await admin.post(f"{AUTH}/totp/verify", json={"code": next_code(secret)})
    assert_error(r, 401, "unauthorized")
    async with new_client(harness) as anonymous:
        r = await anonymous.post(f"{AUTH}/totp/verify", json={"code": next_code(secret)})
    assert_error(r, 401, "unauthorized")


async def test_totp_code_is_never_accepted_twice(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    admin = harness.client
    await setup_password(admin)
    secret, _ = await enroll_totp(admin)
    await require_totp(admin)

    async with new_client(harness) as c:
        assert (await login(c)).json()["totp_pending"] is True
        code = next_code(secret)
        assert (await c.post(f"{AUTH}/totp/verify", json={"code": code})).status_code == 200
        assert (await c.post(f"{AUTH}/logout")).status_code == 200

        assert (await login(c)).json()["totp_pending"] is True
        r = await c.post(f"{AUTH}/totp/verify", json={"code": code})
        assert_error(r, 400, "invalid_totp_code")
        assert_error(await c.get("/api/settings"), 401, "totp_required")

    # Nor by disable, with a full session.
    r = await admin.post(f"{AUTH}/totp/disable", json={"code": code})
    assert_error(r, 400, "invalid_totp_code")
    assert (await admin.get("/api/settings")).json()["totp_configured"] is True
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is not None


async def test_totp_code_races_across_replicas(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    """Two replicas on one Redis, the same fresh code sent to both at once: one wins."""
    admin = harness.client
    await setup_password(admin)
    secret, _ = await enroll_totp(admin)
    await require_totp(admin)
    async with AppHarness(harness.config) as replica:
        a, b = harness.client, replica.client
        assert (await login(a)).json()["totp_pending"] is True
        assert (await login(b)).json()["totp_pending"] is True
        code = next_code(secret)
        results = await asyncio.gather(
            a.post(f"{AUTH}/totp/verify", json={"code": code}),
            b.post(f"{AUTH}/totp/verify", json={"code": code}),
        )
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 400], [r.text for r in results]
        loser = next(r for r in results if r.status_code == 400)
        assert_error(loser, 400, "invalid_totp_code")


async def test_totp_disable(harness: AppHarness, raw_redis: redis.Redis, prefix: str) -> None:
    admin = harness.client
    await setup_password(admin)
    secret, used_code = await enroll_totp(admin)
    await require_totp(admin)
    version = stored_version(raw_redis, prefix)

    r = await admin.post(f"{AUTH}/totp/disable", json={"code": used_code})
    assert_error(r, 400, "invalid_totp_code")
    r = await admin.post(f"{AUTH}/totp/disable", json={"code": wrong_code(secret)})
    assert_error(r, 400, "invalid_totp_code")
    assert stored_version(raw_redis, prefix) == version

    async with new_client(harness) as anonymous:
        r = await anonymous.post(f"{AUTH}/totp/disable", json={"code": next_code(secret)})
    assert_error(r, 401, "unauthorized")

    r = await admin.post(f"{AUTH}/totp/disable", json={"code": next_code(secret)})
    assert r.status_code == 200, r.text
    assert r.json()["totp_configured"] is False
    assert r.json()["totp_required_on_login"] is False
    settings = (await admin.get("/api/settings")).json()
    assert settings["totp_configured"] is False
    assert settings["totp_required_on_login"] is False
    assert settings["version"] == version + 1
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is None

    # Logging in is password-only again.
    async with new_client(harness) as c:
        r = await login(c)
        assert r.status_code == 200, r.text
        assert r.json()["authenticated"] is True
        assert r.json()["totp_pending"] is False


# --- failed-attempt limits ------------------------------------------------------------------


async def test_failed_logins_are_rate_limited(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    await setup_password(harness.client)
    async with new_client(harness) as c:
        for _ in range(10):
            assert_error(await login(c, "wrong password!"), 401, "invalid_credentials")
        # Locked out: even the right password is refused now.
        r = await login(c, PASSWORD)
        assert_error(r, 429, "rate_limited")
        assert 0 < retry_after(r) <= 15 * 60
        assert "set-cookie" not in r.headers
        assert_error(await login(c, "wrong password!"), 429, "rate_limited")
        assert COOKIE not in c.cookies
    assert int(raw_redis.get(f"{prefix}failed:ip:127.0.0.1")) == 10  # type: ignore[arg-type]


async def test_forwarded_for_from_untrusted_peer_does_not_dodge_the_limit(
    harness: AppHarness,
) -> None:
    await setup_password(harness.client)
    async with new_client(harness) as c:
        for i in range(10):
            r = await login(c, "wrong password!", f"203.0.113.{i}")
            assert_error(r, 401, "invalid_credentials")
        assert_error(await login(c, PASSWORD, "198.51.100.7"), 429, "rate_limited")


async def test_trusted_proxy_without_forwarded_address_gets_no_guess(
    config: Config, tmp_path: Path, raw_redis: redis.Redis, prefix: str
) -> None:
    """Behind a trusted proxy that sends no X-Forwarded-For the caller is unknown: one shared
    bucket would let anyone lock everybody out, so no credential is even checked."""
    cfg = make_config(
        config.redis_url,
        config.redis_prefix,
        tmp_path,
        trusted_proxy_cidrs=(ipaddress.ip_network("127.0.0.1/32"),),
    )
    async with AppHarness(cfg) as h:
        async with new_client(h, client=("10.0.0.7", 5000)) as direct:
            await setup_password(direct)
        async with new_client(h, client=("127.0.0.1", 5000)) as nginx:
            for password in ("wrong password!", PASSWORD):
                for forwarded in (None, "", "garbage"):
                    r = await login(nginx, password, forwarded)
                    assert_error(r, 401, "invalid_credentials")
                    assert "X-Forwarded-For" in r.json()["error"]["message"]
            counted = [raw_redis.get(k) for k in raw_redis.scan_iter(match=f"{prefix}failed:*")]
            assert all(c == b"0" for c in counted), counted  # no bucket was touched
            # A forwarded client has a bucket of its own, keyed by its address.
            for _ in range(10):
                r = await login(nginx, "wrong password!", "::ffff:198.51.100.7")
                assert_error(r, 401, "invalid_credentials")
            assert_error(await login(nginx, PASSWORD, "198.51.100.7"), 429, "rate_limited")
            assert int(raw_redis.get(f"{prefix}failed:ip:198.51.100.7")) == 10  # type: ignore[arg-type]
            r = await login(nginx, PASSWORD, "198.51.100.8")
            assert r.status_code == 200, r.text


async def test_successful_logins_do_not_count(harness: AppHarness) -> None:
    await setup_password(harness.client)
    async with new_client(harness) as c:
        for _ in range(12):
            assert (await login(c)).status_code == 200
        for _ in range(9):
            assert_error(await login(c, "wrong password!"), 401, "invalid_credentials")
        assert (await login(c)).status_code == 200


async def test_concurrent_failed_logins_cannot_overshoot(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    await setup_password(harness.client)
    async with new_client(harness) as c:
        results = await asyncio.gather(*(login(c, f"wrong password {i}") for i in range(30)))
        statuses = [r.status_code for r in results]
        assert statuses.count(401) <= 10, statuses
        assert statuses.count(401) + statuses.count(429) == 30, statuses
        for r in results:
            if r.status_code == 429:
                assert_error(r, 429, "rate_limited")
                assert retry_after(r) > 0
        assert_error(await login(c, PASSWORD), 429, "rate_limited")
    assert int(raw_redis.get(f"{prefix}failed:ip:127.0.0.1")) <= 10  # type: ignore[arg-type]


async def test_failed_totp_codes_are_rate_limited(harness: AppHarness) -> None:
    admin = harness.client
    await setup_password(admin)
    secret, _ = await enroll_totp(admin)
    await require_totp(admin)
    async with new_client(harness) as c:
        assert (await login(c)).json()["totp_pending"] is True
        bad = wrong_code(secret)
        for _ in range(10):
            r = await c.post(f"{AUTH}/totp/verify", json={"code": bad})
            assert_error(r, 400, "invalid_totp_code")
        r = await c.post(f"{AUTH}/totp/verify", json={"code": next_code(secret)})
        assert_error(r, 429, "rate_limited")
        assert 0 < retry_after(r) <= 15 * 60
        assert (await c.get(f"{AUTH}/session")).json()["totp_pending"] is True
        assert_error(await c.get("/api/settings"), 401, "totp_required")


async def test_failed_bootstrap_tokens_are_rate_limited(
    client: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    for i in range(10):
        r = await client.post(
            f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": f"guess-{i}"}
        )
        assert_error(r, 401, "invalid_bootstrap_token")
    r = await client.post(
        f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN}
    )
    assert_error(r, 429, "rate_limited")
    assert retry_after(r) > 0
    assert raw_redis.hget(f"{prefix}auth", "password_hash") is None


# --- CSRF -----------------------------------------------------------------------------------


async def test_csrf_foreign_origin_is_rejected(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    version = stored_version(raw_redis, prefix)
    record = stored_record(raw_redis, prefix)
    body = {**SETTINGS_BODY, "routing_strategy": "round_robin"}

    r = await admin.put("/api/settings", json=body, headers={"Origin": "https://evil.example"})
    assert_error(r, 403, "csrf_rejected")
    for origin in ("https://testserver", "http://testserver:8080", "null"):
        r = await admin.put("/api/settings", json=body, headers={"Origin": origin})
        assert_error(r, 403, "csrf_rejected")
    r = await admin.put("/api/settings", json=body, headers={"Sec-Fetch-Site": "cross-site"})
    assert_error(r, 403, "csrf_rejected")
    assert stored_version(raw_redis, prefix) == version
    assert stored_record(raw_redis, prefix) == record
    assert (await admin.get("/api/settings")).json()["routing_strategy"] == "usage_weighted"

    r = await admin.put("/api/settings", json=body, headers={"Origin": "http://testserver"})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == version + 1
    r = await admin.put(
        "/api/settings",
        json=SETTINGS_BODY,
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"},
    )
    assert r.status_code == 200, r.text
    assert stored_version(raw_redis, prefix) == version + 2


async def test_csrf_logout_from_foreign_origin_keeps_session(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    token = admin.cookies[COOKIE]
    r = await admin.post(f"{AUTH}/logout", headers={"Origin": "https://evil.example"})
    assert_error(r, 403, "csrf_rejected")
    assert session_exists(raw_redis, prefix, token)
    assert (await as_token(harness, "GET", "/api/settings", token)).status_code == 200


# --- caching --------------------------------------------------------------------------------


async def test_api_responses_are_no_store(harness: AppHarness) -> None:
    c = harness.client
    responses = [
        await c.get(f"{AUTH}/session"),
        await c.get("/api/settings"),  # 401 from the gate
        await c.post(f"{AUTH}/password/login", json={"password": "x" * 10}),  # 401, handler
        await c.post(f"{AUTH}/password/setup", json={"password": "short"}),  # 422
        await c.post(
            f"{AUTH}/password/setup", content=b"{", headers={"Content-Type": "application/json"}
        ),  # 400
    ]
    await setup_password(c)
    responses += [
        await c.get("/api/settings"),
        await c.put("/api/settings", json=SETTINGS_BODY),
        await c.get("/api/settings/history"),
        await c.get("/api/no-such-route"),  # 404
        await c.put(
            "/api/settings", json=SETTINGS_BODY, headers={"Origin": "https://evil.example"}
        ),
    ]
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 401, 401, 422, 400, 200, 200, 200, 404, 403], statuses
    for r in responses:
        assert r.headers.get("cache-control") == "no-store", (r.request.url, r.headers)


# --- secrets at rest ------------------------------------------------------------------------


def everything_stored(raw_redis: redis.Redis, prefix: str) -> bytes:
    """Every key under the prefix and every value it holds (and there is something stored)."""
    blob = stored_blob(raw_redis, prefix)
    assert blob
    return blob


def assert_not_stored(blob: bytes, secrets: dict[str, str]) -> None:
    for name, secret in secrets.items():
        assert secret
        for variant in {secret, secret.lower(), secret.upper()}:
            assert variant.encode() not in blob, f"{name} is stored in the clear"


async def test_secrets_are_not_stored_in_clear(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    # A generated bootstrap token (the env token is never stored at all).
    async with app_with(redis_url, prefix, tmp_path, bootstrap_token=None) as h:
        bootstrap = await logged_bootstrap_token(caplog)
        assert bootstrap
        assert_not_stored(everything_stored(raw_redis, prefix), {"bootstrap token": bootstrap})

        c = h.client
        r = await c.post(
            f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": bootstrap}
        )
        assert r.status_code == 200, r.text
        tokens = {"setup session token": cookie_value(r)}
        r = await c.post(f"{AUTH}/totp/setup/start")
        secret = r.json()["secret"]
        # The pending enrolment seed is sealed as well.
        assert_not_stored(everything_stored(raw_redis, prefix), {"pending TOTP secret": secret})
        r = await c.post(f"{AUTH}/totp/setup/confirm", json={"code": pyotp.TOTP(secret).now()})
        assert r.status_code == 200, r.text
        r = await login(c)
        assert r.status_code == 200, r.text
        tokens["login session token"] = cookie_value(r)
        async with new_client(h) as other:
            r = await login(other)
            assert r.status_code == 200, r.text
            tokens["second session token"] = cookie_value(r)
            await require_totp(c)
            r = await login(other)
            assert r.json()["totp_pending"] is True
            tokens["pending session token"] = cookie_value(r)

        blob = everything_stored(raw_redis, prefix)
        assert_not_stored(
            blob,
            {
                "password": PASSWORD,
                "TOTP secret": secret,
                "bootstrap token": bootstrap,
                "env bootstrap token": BOOTSTRAP_TOKEN,
                **tokens,
            },
        )
        # Sessions are kept under the token's hash.
        assert token_hash(tokens["login session token"]).encode() in blob
