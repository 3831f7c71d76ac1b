"""CONTRACT §1/§3: the ``codex-lb admin`` commands, run as real subprocesses against a real Redis
shared with an in-process app (same prefix, same encryption key)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pyotp
import redis

from tests.conftest import AppHarness, setup_password
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, base_env

AUTH = "/api/dashboard-auth"
COOKIE = "dashboard_session"
NEW_PASSWORD = "reset by the operator 7"
SETTINGS_BODY = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}


async def run_admin(
    redis_url: str,
    prefix: str,
    data_dir: Path,
    *args: str,
    stdin: str = "",
    drop_env: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    env = base_env(redis_url, prefix, data_dir)
    for name in drop_env:
        env.pop(name, None)
    # Off the event loop, so the in-process app keeps running meanwhile.
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "admin", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


def new_client(h: AppHarness) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://testserver")


async def login(c: httpx.AsyncClient, password: str) -> httpx.Response:
    return await c.post(f"{AUTH}/password/login", json={"password": password})


async def test_set_password_ends_all_sessions(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
) -> None:
    async with new_client(harness) as other:
        assert (await login(other, PASSWORD)).status_code == 200
        assert (await admin.get("/api/settings")).status_code == 200
        before = raw_redis.hget(f"{prefix}auth", "password_hash")

        result = await run_admin(redis_url, prefix, tmp_path, "set-password", stdin=NEW_PASSWORD)
        assert result.returncode == 0, result.stderr

        assert raw_redis.hget(f"{prefix}auth", "password_hash") != before
        assert raw_redis.scard(f"{prefix}sessions") == 0
        assert_error(await admin.get("/api/settings"), 401, "unauthorized")
        assert_error(await other.get("/api/settings"), 401, "unauthorized")

        assert_error(await login(other, PASSWORD), 401, "invalid_credentials")
        r = await login(other, NEW_PASSWORD)
        assert r.status_code == 200, r.text
        assert r.json()["authenticated"] is True
        assert (await other.get("/api/settings")).status_code == 200


async def test_set_password_clears_lockouts(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
) -> None:
    async with new_client(harness) as c:
        for _ in range(10):
            assert_error(await login(c, "wrong password!"), 401, "invalid_credentials")
        r = await login(c, PASSWORD)
        assert_error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) > 0

        result = await run_admin(
            redis_url, prefix, tmp_path, "set-password", stdin=NEW_PASSWORD + "\n"
        )
        assert result.returncode == 0, result.stderr
        assert list(raw_redis.scan_iter(match=f"{prefix}failed:*")) == []

        r = await login(c, NEW_PASSWORD)
        assert r.status_code == 200, r.text
        assert (await c.get("/api/settings")).status_code == 200


async def test_set_password_too_short_is_refused(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
) -> None:
    before = raw_redis.hget(f"{prefix}auth", "password_hash")
    result = await run_admin(redis_url, prefix, tmp_path, "set-password", stdin="short\n")
    assert result.returncode != 0
    assert result.stderr.strip()
    assert raw_redis.hget(f"{prefix}auth", "password_hash") == before
    # Nothing was revoked either.
    assert (await admin.get("/api/settings")).status_code == 200
    async with new_client(harness) as c:
        assert_error(await login(c, "short"), 401, "invalid_credentials")
        assert (await login(c, PASSWORD)).status_code == 200


async def test_set_password_on_first_run(
    harness: AppHarness, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    result = await run_admin(redis_url, prefix, tmp_path, "set-password", stdin=NEW_PASSWORD)
    assert result.returncode == 0, result.stderr
    r = await harness.client.get(f"{AUTH}/session")
    assert r.json()["password_configured"] is True
    assert r.json()["bootstrap_required"] is False
    assert (await login(harness.client, NEW_PASSWORD)).status_code == 200


async def test_reset_totp(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
) -> None:
    r = await admin.post(f"{AUTH}/totp/setup/start")
    secret = r.json()["secret"]
    r = await admin.post(f"{AUTH}/totp/setup/confirm", json={"code": pyotp.TOTP(secret).now()})
    assert r.status_code == 200, r.text
    r = await admin.put("/api/settings", json={**SETTINGS_BODY, "totp_required_on_login": True})
    assert r.status_code == 200, r.text
    version = r.json()["version"]

    result = await run_admin(redis_url, prefix, tmp_path, "reset-totp")
    assert result.returncode == 0, result.stderr

    settings = (await admin.get("/api/settings")).json()
    assert settings["totp_configured"] is False
    assert settings["totp_required_on_login"] is False
    assert settings["version"] == version + 1
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is None
    session = (await admin.get(f"{AUTH}/session")).json()
    assert session["totp_configured"] is False
    assert session["totp_required_on_login"] is False

    # Logging in is password-only again.
    async with new_client(harness) as c:
        r = await login(c, PASSWORD)
        assert r.status_code == 200, r.text
        assert r.json()["authenticated"] is True
        assert r.json()["totp_pending"] is False


async def test_bootstrap_token_from_env(
    client: httpx.AsyncClient, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # The operator supplied it: it is never printed (CONTRACT §3), only where it comes from.
    result = await run_admin(redis_url, prefix, tmp_path, "bootstrap-token")
    assert result.returncode == 0, result.stderr
    assert BOOTSTRAP_TOKEN not in result.stdout + result.stderr
    assert "CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN" in result.stderr

    await setup_password(client)
    result = await run_admin(redis_url, prefix, tmp_path, "bootstrap-token")
    assert result.returncode == 1
    assert result.stdout.strip() == ""
    assert BOOTSTRAP_TOKEN not in result.stdout + result.stderr


async def test_bootstrap_token_generated_for_the_deployment(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    """Without the env variable, the token the app generated is the one the CLI prints."""
    from tests.conftest import make_config

    no_env = ("CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN",)
    async with AppHarness(make_config(redis_url, prefix, tmp_path, bootstrap_token=None)) as h:
        for _ in range(200):
            if raw_redis.exists(f"{prefix}auth:bootstrap"):
                break
            await asyncio.sleep(0.01)
        result = await run_admin(redis_url, prefix, tmp_path, "bootstrap-token", drop_env=no_env)
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert token
        assert token != BOOTSTRAP_TOKEN

        r = await h.client.post(
            f"{AUTH}/password/setup", json={"password": PASSWORD, "bootstrap_token": token}
        )
        assert r.status_code == 200, r.text

        result = await run_admin(redis_url, prefix, tmp_path, "bootstrap-token", drop_env=no_env)
        assert result.returncode == 1
        assert token not in result.stdout


async def test_set_password_before_the_first_serve_is_a_new_deployment(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    """The password set from the CLI before any serve ran is not evidence of a lost record."""
    result = await run_admin(redis_url, prefix, tmp_path, "set-password", stdin=NEW_PASSWORD)
    assert result.returncode == 0, result.stderr
    from tests.conftest import make_config

    async with AppHarness(make_config(redis_url, prefix, tmp_path)) as h:
        assert not h.parts.settings.settings_lost
        assert h.parts.settings.get().version == 1
        assert (await h.client.get("/health/ready")).status_code == 200
        async with new_client(h) as c:
            assert (await login(c, NEW_PASSWORD)).status_code == 200
