"""CONTRACT §4: defaults only for a brand-new deployment. A cold ``codex-lb serve`` that finds
the settings record gone while the deployment still has its password, keys or accounts stays
not ready, answers 503 on proxy routes, says at CRITICAL what to do, and ``codex-lb admin
reset-settings`` brings it back on defaults as a new version."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from service.app import create_app
from service.config import Config
from service.settings.store import SettingsRecord
from tests.conftest import AppHarness, setup_password
from tests.support import PASSWORD, ServeProcess, base_env, wait_until

pytestmark = pytest.mark.timeout(60)

REQUIRED = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}


def ready(proc: ServeProcess) -> httpx.Response:
    return httpx.get(f"{proc.url}/health/ready", timeout=2)


def admin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "admin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_lost_record_is_not_defaulted_until_an_operator_resets_it(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    env = base_env(redis_url, prefix, tmp_path)
    first = ServeProcess(env, log_dir=tmp_path)
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url) as c:
            setup = {
                "password": PASSWORD,
                "bootstrap_token": env["CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN"],
            }
            assert c.post("/api/dashboard-auth/password/setup", json=setup).status_code == 200
            body = {**REQUIRED, "api_key_auth_enabled": True, "routing_strategy": "round_robin"}
            r = c.put("/api/settings", json=body, headers={"Origin": first.url})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 2
    finally:
        assert first.terminate() == 0

    # Evicted by a shared Redis's policy, or left out of a partial restore: only this key.
    raw_redis.delete(f"{prefix}settings")

    cold = ServeProcess(env, log_dir=tmp_path)
    try:
        assert wait_until(lambda: "CRITICAL" in cold.log(), 20), cold.log()
        r = ready(cold)
        assert r.status_code == 503
        assert r.json() == {"status": "settings_lost", "settings_version": None, "redis": "ok"}
        for path in ("/v1/models", "/backend-api/codex/models"):
            r = httpx.get(f"{cold.url}{path}")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "not_ready"
        critical = [line for line in cold.log().splitlines() if "CRITICAL" in line]
        assert len(critical) == 1, cold.log()
        assert "codex-lb admin reset-settings" in critical[0]
        # Nothing was written behind the operator's back (API-key auth would be off).
        assert not raw_redis.exists(f"{prefix}settings")

        result = admin(env, "reset-settings")
        assert result.returncode == 0, result.stderr
        assert "version 3" in result.stdout  # after the last version in the history

        assert wait_until(lambda: ready(cold).status_code == 200, 5), cold.log()
        assert ready(cold).json()["settings_version"] == 3
        stored = json.loads(raw_redis.hget(f"{prefix}settings", "record"))  # type: ignore[arg-type]
        record = SettingsRecord(**stored)
        assert record.version == 3
        assert (record.api_key_auth_enabled, record.routing_strategy) == (False, "usage_weighted")
        assert (record.totp_configured, record.totp_required_on_login) == (False, False)
        with httpx.Client(base_url=cold.url) as c:
            r = c.post("/api/dashboard-auth/password/login", json={"password": PASSWORD})
            assert r.status_code == 200, r.text
            history = c.get("/api/settings/history").json()["changes"]
            assert [h["version"] for h in history] == [3, 2]
    finally:
        assert cold.terminate() == 0


@pytest.mark.parametrize("evidence", ["password", "api_key", "account", "history"])
async def test_any_other_state_means_a_loss_not_a_new_deployment(
    config: Config, raw_redis: redis.Redis, prefix: str, evidence: str
) -> None:
    key = {
        "password": (f"{prefix}auth", "hash"),
        "api_key": (f"{prefix}apikeys", "hash"),
        "account": (f"{prefix}accounts", "set"),
        "history": (f"{prefix}settings:history", "list"),
    }[evidence]
    name, kind = key
    if kind == "hash":
        raw_redis.hset(name, "x", "1")
    elif kind == "set":
        raw_redis.sadd(name, "x")
    else:
        raw_redis.lpush(name, "{}")
    app = create_app(config)
    async with app.router.lifespan_context(app):
        live = app.state.parts.settings
        for _ in range(200):
            if live.settings_lost:
                break
            await asyncio.sleep(0.01)
        assert live.settings_lost
        assert live.current is None
        assert not raw_redis.exists(f"{prefix}settings")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            r = await c.get("/health/ready")
            assert r.status_code == 503
            assert r.json()["status"] == "settings_lost"


async def test_a_brand_new_deployment_still_starts_on_defaults(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    assert harness.parts.settings.get().version == 1
    assert not harness.parts.settings.settings_lost
    assert (await harness.client.get("/health/ready")).status_code == 200
    await setup_password(harness.client)


async def test_reset_settings_keeps_a_configured_totp_and_continues_the_versions(
    admin: httpx.AsyncClient, harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    from service.settings.domain import reset_settings

    raw_redis.hset(f"{prefix}auth", "totp_secret", b"sealed")
    r = await admin.put("/api/settings", json={**REQUIRED, "import_without_overwrite": True})
    assert r.json()["version"] == 2
    record = await reset_settings(harness.parts.settings_store)
    assert record.version == 3
    assert record.totp_configured is True
    assert record.import_without_overwrite is False
    assert (await admin.get("/api/settings")).json()["version"] == 3
