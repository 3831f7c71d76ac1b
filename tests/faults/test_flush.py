"""A flushed Redis (``FLUSHALL``) under three running ``codex-lb serve`` processes leaves none
of them open (CONTRACT §3, §4): the dashboard sessions, password, API keys and accounts are gone,
so admin routes answer 401 and the old key no longer admits; the processes put back the settings
record they know instead of adopting defaults (API-key auth stays on, so a keyless request is
still refused, and the version never goes back to 1); a process started afterwards finds that
record, not a new deployment. Defaults come only from ``codex-lb admin reset-settings``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.settings.store import SettingsRecord
from tests.faults.deployment import Deployment, deployment
from tests.proxy_support import RESPONSES, body
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, wait_until

pytestmark = pytest.mark.timeout(120)

RECONCILE_SECONDS = 0.2
BOUND_SECONDS = RECONCILE_SECONDS + 1.0


def stored(d: Deployment) -> SettingsRecord | None:
    raw = d.raw().hget(f"{d.prefix}settings", "record")
    return None if raw is None else SettingsRecord(**json.loads(raw))  # type: ignore[arg-type]


def proxy_status(d: Deployment, i: int, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return d.clients[i].post(RESPONSES, json=body(stream=False), headers=headers)


def test_a_flushed_redis_leaves_no_process_open(tmp_path: Path) -> None:
    with deployment(tmp_path, reconcile_seconds=RECONCILE_SECONDS) as d:
        version = d.versions()[0]
        assert version is not None
        assert version > 1
        assert all(proxy_status(d, i, None).status_code == 401 for i in range(3))

        d.raw().flushall()

        # Each process knows the record and puts it back: the same version, not defaults.
        assert wait_until(lambda: stored(d) is not None, BOUND_SECONDS)
        deadline = time.monotonic() + BOUND_SECONDS
        while time.monotonic() < deadline:
            assert d.versions() == [version] * 3
            time.sleep(0.02)
        record = stored(d)
        assert record is not None
        assert (record.version, record.api_key_auth_enabled) == (version, True)
        assert record.routing_strategy == "round_robin"

        for i in range(3):
            r = d.admin("GET", "/api/settings", i)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthorized"
            # Still refused without a key, and the flushed key stops admitting (the keys copy
            # follows the store's new epoch).
            assert proxy_status(d, i, None).status_code == 401
            assert wait_until(lambda i=i: proxy_status(d, i, d.key).status_code == 401, 5)
            r = proxy_status(d, i, d.key)
            assert r.json()["error"]["code"] == "invalid_api_key"
            session = d.clients[i].get("/api/dashboard-auth/session").json()
            assert session["password_configured"] is False
            assert session["bootstrap_required"] is True
            r = d.clients[i].post(
                "/api/dashboard-auth/password/setup",
                json={"password": PASSWORD, "bootstrap_token": "not-the-token"},
            )
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_bootstrap_token"

        # A process started now finds the record put back: not a new deployment.
        late = ServeProcess(d.env, log_dir=tmp_path)
        try:
            late.wait_ready()
            ready = httpx.get(f"{late.url}/health/ready", timeout=5).json()
            assert ready["settings_version"] == version

            reset = subprocess.run(
                [sys.executable, "-m", "service", "admin", "reset-settings"],
                env=d.env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert reset.returncode == 0, reset.stderr
            assert f"version {version + 1}" in reset.stdout
            assert d.wait_versions(version + 1, BOUND_SECONDS) is not None, d.versions()
            assert wait_until(
                lambda: (
                    httpx.get(f"{late.url}/health/ready").json()["settings_version"] == version + 1
                ),
                BOUND_SECONDS,
            )
            record = stored(d)
            assert record is not None
            assert (record.api_key_auth_enabled, record.routing_strategy) == (
                False,
                "usage_weighted",
            )
            # The dashboard opens again only with the bootstrap token.
            r = d.clients[0].post(
                "/api/dashboard-auth/password/setup",
                json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
            )
            assert r.status_code == 200, r.text
        finally:
            assert late.terminate() == 0
