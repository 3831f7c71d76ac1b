"""API-key changes reach the gate of every process within 1 s: three real ``codex-lb serve``
processes on one Redis, talked to over loopback HTTP.

Each step polls ``GET /v1/models`` on every process at once with the key, and records when each
one first answers the new way (admitted: anything but 401; with no accounts that is 503
``no_accounts``). Latencies are measured from just before the change was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, base_env, serve_cluster

pytestmark = pytest.mark.timeout(60)

HTTP_TIMEOUT = 5.0
COOKIE = "dashboard_session"
KEYS = "/api/api-keys"
MODELS = "/v1/models"
LIMIT = 1.0  # seconds, from the contract
POLL_SECONDS = 0.005


@pytest.fixture
def cluster(
    redis_url: str, prefix: str, raw_redis: redis.Redis, tmp_path: Path
) -> Iterator[list[ServeProcess]]:
    with serve_cluster(base_env(redis_url, prefix, tmp_path), tmp_path) as procs:
        yield procs


def call(
    proc: ServeProcess, method: str, path: str, token: str | None = None, **kwargs: Any
) -> httpx.Response:
    """One request with the session sent explicitly and never an Origin header."""
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Cookie"] = f"{COOKIE}={token}"
    return httpx.request(method, proc.url + path, headers=headers, timeout=HTTP_TIMEOUT, **kwargs)


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def admitted(r: httpx.Response) -> bool:
    if r.status_code == 401:
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key", r.text
        assert error["param"] is None
        assert r.headers["www-authenticate"] == "Bearer"
        return False
    # Past the gate with an empty pool.
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "no_accounts", r.text
    return True


class Gates:
    """Polls ``GET /v1/models`` on every process at once, over kept-alive connections."""

    def __init__(self, procs: list[ServeProcess]):
        self.clients = [httpx.Client(base_url=p.url, timeout=HTTP_TIMEOUT) for p in procs]
        self.pool = ThreadPoolExecutor(len(procs))

    def close(self) -> None:
        self.pool.shutdown()
        for client in self.clients:
            client.close()

    def answers(self, key: str | None) -> list[bool]:
        return [admitted(c.get(MODELS, headers=bearer(key))) for c in self.clients]

    def flip_times(self, key: str | None, want: bool, timeout: float = 3.0) -> list[float]:
        """Wall-clock time at which each process first answers ``admitted == want``."""

        def one(client: httpx.Client) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                r = client.get(MODELS, headers=bearer(key))
                seen = time.time()
                if admitted(r) == want:
                    return seen
                time.sleep(POLL_SECONDS)
            raise AssertionError(f"{client.base_url} not admitted={want} in {timeout}s")

        return list(self.pool.map(one, self.clients))

    def timed(self, step: str, key: str, want: bool, since: float) -> list[float]:
        latencies = [t - since for t in self.flip_times(key, want)]
        print(f"{step}: " + ", ".join(f"{lat * 1000:.1f} ms" for lat in latencies))
        assert all(lat < LIMIT for lat in latencies), (step, latencies)
        return latencies


@pytest.fixture
def gates(cluster: list[ServeProcess]) -> Iterator[Gates]:
    g = Gates(cluster)
    try:
        for client in g.clients:  # connect now, so no poll pays for it
            client.get("/health/live")
        yield g
    finally:
        g.close()


def test_key_changes_reach_every_process_within_one_second(
    cluster: list[ServeProcess], gates: Gates
) -> None:
    a, b, c = cluster
    r = call(
        a,
        "POST",
        "/api/dashboard-auth/password/setup",
        json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
    )
    assert r.status_code == 200, r.text
    token = r.cookies.get(COOKIE)
    assert token

    # Key auth off: loopback callers are admitted without a key.
    assert gates.answers(None) == [True, True, True]
    body = {
        "sticky_threads_enabled": True,
        "prefer_earlier_reset_accounts": False,
        "api_key_auth_enabled": True,
    }
    r = call(a, "PUT", "/api/settings?wait=true", token, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["api_key_auth_enabled"] is True
    gates.flip_times(None, want=False, timeout=LIMIT)
    assert gates.answers(None) == [False, False, False]

    # Created on A: admitted on B and C (and A) within 1 s.
    sent = time.time()
    r = call(a, "POST", KEYS, token, json={"name": "propagation"})
    assert r.status_code == 201, r.text
    key, key_id = r.json()["key"], r.json()["id"]
    gates.timed("create on A -> admitted on A, B, C", key, True, sent)
    assert gates.answers("sk-clb-" + "A" * 43) == [False, False, False]

    # Deactivated on B: refused on A and C (and B) within 1 s.
    sent = time.time()
    r = call(b, "PATCH", f"{KEYS}/{key_id}", token, json={"is_active": False})
    assert r.status_code == 200, r.text
    gates.timed("deactivate on B -> refused on A, B, C", key, False, sent)

    # Reactivated on A, then deleted on C.
    sent = time.time()
    r = call(a, "PATCH", f"{KEYS}/{key_id}", token, json={"is_active": True})
    assert r.status_code == 200, r.text
    gates.timed("reactivate on A -> admitted on A, B, C", key, True, sent)
    sent = time.time()
    r = call(c, "DELETE", f"{KEYS}/{key_id}", token)
    assert r.status_code == 204, r.text
    gates.timed("delete on C -> refused on A, B, C", key, False, sent)
    assert call(b, "GET", KEYS, token).json() == {"api_keys": []}

    # Expiring 2 s from now: admitted everywhere until then, refused everywhere right after.
    expires = datetime.now(UTC) + timedelta(seconds=2)
    sent = time.time()
    r = call(b, "POST", KEYS, token, json={"name": "short", "expires_at": expires.isoformat()})
    assert r.status_code == 201, r.text
    short = r.json()["key"]
    gates.timed("create expiring on B -> admitted on A, B, C", short, True, sent)
    refused_at = gates.flip_times(short, want=False, timeout=4.0)
    after_expiry = [t - expires.timestamp() for t in refused_at]
    print("expiry -> refused on A, B, C: " + ", ".join(f"{d * 1000:.1f} ms" for d in after_expiry))
    # Not refused before the expiry (each poll before the flip was admitted), and not later
    # than 1 s after it.
    assert all(-0.05 < d < LIMIT for d in after_expiry), after_expiry
    assert gates.answers(short) == [False, False, False]
    # Expired keys stay listed until deleted; nothing was written to refuse it.
    assert [k["name"] for k in call(c, "GET", KEYS, token).json()["api_keys"]] == ["short"]
