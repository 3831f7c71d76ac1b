"""Real ``codex-lb serve`` processes sharing one Redis, talked to over loopback HTTP.

Settings propagation, session revocation and TOTP replay protection across processes, the
worker registry on SIGTERM and SIGKILL, ``serve --workers N``, and the embedded redis-server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import redis

from service.core.workers import WORKER_TTL_SECONDS
from tests.support import (
    BOOTSTRAP_TOKEN,
    PASSWORD,
    ServeProcess,
    base_env,
    serve_cluster,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

HTTP_TIMEOUT = 5.0
COOKIE = "dashboard_session"
NEW_PASSWORD = "another horse battery staple"
CHANGE = {
    "sticky_threads_enabled": False,
    "prefer_earlier_reset_accounts": True,
    "routing_strategy": "round_robin",
}
AUTH = "/api/dashboard-auth"


# --- talking to the processes ----------------------------------------------------------------


def call(
    proc: ServeProcess, method: str, path: str, token: str | None = None, **kwargs: Any
) -> httpx.Response:
    """One request, no cookie jar: the session (if any) is sent explicitly. Never an Origin."""
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Cookie"] = f"{COOKIE}={token}"
    return httpx.request(method, proc.url + path, headers=headers, timeout=HTTP_TIMEOUT, **kwargs)


def token_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    token = r.cookies.get(COOKIE)
    assert token, r.headers
    return token


def setup(proc: ServeProcess) -> str:
    body = {"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN}
    return token_of(call(proc, "POST", f"{AUTH}/password/setup", json=body))


def login(proc: ServeProcess, password: str = PASSWORD) -> str:
    return token_of(call(proc, "POST", f"{AUTH}/password/login", json={"password": password}))


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def workers(proc: ServeProcess, token: str) -> list[dict[str, Any]]:
    r = call(proc, "GET", "/api/settings/propagation", token)
    assert r.status_code == 200, r.text
    return list(r.json()["workers"])


def wait_workers(
    proc: ServeProcess,
    token: str,
    predicate: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
) -> list[dict[str, Any]]:
    seen: list[list[dict[str, Any]]] = []

    def check() -> bool:
        seen.append(workers(proc, token))
        return predicate(seen[-1])

    assert wait_until(check, timeout), f"propagation never matched: {seen[-1]}"
    return seen[-1]


def epoch(rfc3339: str) -> float:
    return datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def session_key_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


Post = tuple[ServeProcess, str, str, dict[str, Any]]


def race(*requests: Post) -> list[httpx.Response]:
    """Send POSTs (process, path, session, body) from parallel threads, released together."""
    barrier = threading.Barrier(len(requests))

    def send(req: Post) -> httpx.Response:
        proc, path, token, body = req
        barrier.wait(timeout=5)
        return call(proc, "POST", path, token, json=body)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command may hold spaces or parentheses; the fields after the last ')' do not.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate_tree(proc: ServeProcess) -> int:
    """SIGTERM ``serve`` (exit status); then SIGKILL any child it left behind."""
    children = child_pids(proc.proc.pid) if proc.proc.poll() is None else []
    code = proc.terminate(timeout=20)
    for pid in children:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return code


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def env(redis_url: str, prefix: str, raw_redis: redis.Redis, tmp_path: Path) -> dict[str, str]:
    return base_env(redis_url, prefix, tmp_path)


@pytest.fixture
def cluster(env: dict[str, str], tmp_path: Path) -> Iterator[list[ServeProcess]]:
    """Three single-process ``serve`` instances of one deployment (same Redis, prefix, key)."""
    with serve_cluster(env, tmp_path, stop=terminate_tree) as procs:
        yield procs


def all_registered(cluster: list[ServeProcess], token: str) -> list[dict[str, Any]]:
    pids = {p.proc.pid for p in cluster}
    return wait_workers(cluster[0], token, lambda ws: {w["pid"] for w in ws} == pids, 5.0)


# --- settings propagation -----------------------------------------------------------------------


def test_a_put_reaches_every_process(cluster: list[ServeProcess]) -> None:
    a, b, c = cluster
    token = setup(a)
    before = all_registered(cluster, token)
    assert len(before) == 3
    assert all(w["applied_version"] == 1 for w in before)

    r = call(a, "PUT", "/api/settings", token, json=CHANGE)
    returned = time.monotonic()
    assert r.status_code == 200, r.text
    new = r.json()["version"]
    assert new == 2

    # Any process answers with the new version as soon as the PUT has returned.
    for proc in (b, c):
        got = call(proc, "GET", "/api/settings", token)
        assert got.status_code == 200
        assert got.json()["version"] == new
        assert got.json()["routing_strategy"] == "round_robin"
        assert got.headers["etag"] == f'"{new}"'

    after = wait_workers(
        b, token, lambda ws: len(ws) == 3 and all(w["applied_version"] == new for w in ws), 1.0
    )
    assert time.monotonic() - returned < 1.0
    assert {w["pid"] for w in after} == {p.proc.pid for p in cluster}
    assert len({w["worker_id"] for w in after}) == 3

    # applied_at against the commit time in the history: each process's lag.
    history = call(c, "GET", "/api/settings/history", token).json()["changes"]
    committed = epoch(history[0]["changed_at"])
    assert history[0]["version"] == new
    lags = [epoch(w["applied_at"]) - committed for w in after]
    assert all(0 <= lag < 1.0 for lag in lags), lags


def test_put_wait_true_answers_once_every_process_has_it(cluster: list[ServeProcess]) -> None:
    a, b, c = cluster
    token = setup(a)
    all_registered(cluster, token)

    r = call(b, "PUT", "/api/settings?wait=true", token, json=CHANGE)
    assert r.status_code == 200, r.text
    assert r.headers["x-propagation"] == "3/3"
    new = r.json()["version"]
    listed = workers(c, token)
    assert len(listed) == 3
    assert all(w["applied_version"] == new for w in listed)
    for proc in cluster:
        assert call(proc, "GET", "/api/settings", token).json()["version"] == new


def test_serve_with_three_worker_processes(
    env: dict[str, str], tmp_path: Path, raw_redis: redis.Redis, prefix: str
) -> None:
    proc = ServeProcess(env, workers=3, log_dir=tmp_path)
    try:
        proc.wait_ready()
        token = setup(proc)
        listed = wait_workers(proc, token, lambda ws: len(ws) == 3, 10.0)
        pids = {w["pid"] for w in listed}
        assert len(pids) == 3
        assert proc.proc.pid not in pids  # the supervisor serves nothing itself
        assert set(child_pids(proc.proc.pid)) >= pids

        r = call(proc, "PUT", "/api/settings?wait=true", token, json=CHANGE)
        assert r.status_code == 200, r.text
        assert r.headers["x-propagation"] == "3/3"

        assert terminate_tree(proc) == 0
        assert not any(alive(pid) for pid in pids)
        # Each worker took itself out of the registry on its way out.
        assert raw_redis.zrange(f"{prefix}workers", 0, -1) == []
        assert list(raw_redis.scan_iter(match=f"{prefix}workers:*")) == []
    finally:
        terminate_tree(proc)


# --- sessions across processes ------------------------------------------------------------------


def test_logout_on_one_process_ends_the_session_on_every_process(
    cluster: list[ServeProcess], raw_redis: redis.Redis, prefix: str
) -> None:
    a, b, c = cluster
    token = setup(a)
    for proc in cluster:
        assert call(proc, "GET", "/api/settings", token).status_code == 200

    r = call(a, "POST", f"{AUTH}/logout", token)
    assert r.status_code == 200
    assert r.json()["authenticated"] is False

    for proc in (b, c, a):
        r = call(proc, "GET", "/api/settings", token)
        assert r.status_code == 401
        assert error_code(r) == "unauthorized"
    hashed = session_key_hash(token)
    assert raw_redis.exists(f"{prefix}session:{hashed}") == 0
    assert not raw_redis.sismember(f"{prefix}sessions", hashed)


def test_password_change_on_one_process_ends_the_other_sessions_everywhere(
    cluster: list[ServeProcess], raw_redis: redis.Redis, prefix: str
) -> None:
    a, b, c = cluster
    changer = setup(a)
    other = login(a)
    for proc in cluster:
        assert call(proc, "GET", "/api/settings", other).status_code == 200

    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    r = call(b, "POST", f"{AUTH}/password/change", changer, json=body)
    assert r.status_code == 200, r.text

    for proc in cluster:
        r = call(proc, "GET", "/api/settings", other)
        assert r.status_code == 401
        assert error_code(r) == "unauthorized"
        assert call(proc, "GET", "/api/settings", changer).status_code == 200
    assert raw_redis.smembers(f"{prefix}sessions") == {session_key_hash(changer).encode()}
    assert raw_redis.exists(f"{prefix}session:{session_key_hash(other)}") == 0

    r = call(c, "POST", f"{AUTH}/password/login", json={"password": PASSWORD})
    assert r.status_code == 401
    assert error_code(r) == "invalid_credentials"
    login(c, NEW_PASSWORD)


# --- TOTP replay across processes ---------------------------------------------------------------


def configure_totp(proc: ServeProcess, token: str) -> tuple[pyotp.TOTP, int]:
    """Enrol TOTP; returns the generator and the time step the enrolment used up."""
    r = call(proc, "POST", f"{AUTH}/totp/setup/start", token)
    assert r.status_code == 200, r.text
    totp = pyotp.TOTP(r.json()["secret"])
    step = int(time.time() // 30)
    r = call(proc, "POST", f"{AUTH}/totp/setup/confirm", token, json={"code": totp.at(step * 30)})
    assert r.status_code == 200, r.text
    assert r.json()["totp_configured"] is True
    return totp, step


def one_winner(results: list[httpx.Response]) -> tuple[httpx.Response, httpx.Response]:
    assert sorted(r.status_code for r in results) == [200, 400], [r.text for r in results]
    winner, loser = sorted(results, key=lambda r: r.status_code)
    assert error_code(loser) == "invalid_totp_code"
    return winner, loser


def test_a_totp_code_disables_only_once_across_processes(
    cluster: list[ServeProcess], raw_redis: redis.Redis, prefix: str
) -> None:
    a, b, c = cluster
    token = setup(a)
    totp, step = configure_totp(a, token)
    # The next step's code: within the ±1 step window and never used.
    code = {"code": totp.at((step + 1) * 30)}

    one_winner(
        race(
            (b, f"{AUTH}/totp/disable", token, code),
            (c, f"{AUTH}/totp/disable", token, code),
        )
    )

    assert int(raw_redis.get(f"{prefix}auth:totp_last_step") or 0) == step + 1
    assert raw_redis.hget(f"{prefix}auth", "totp_secret") is None
    settings = call(a, "GET", "/api/settings", token).json()
    assert settings["totp_configured"] is False
    assert settings["totp_required_on_login"] is False


def test_a_totp_code_completes_only_one_login_across_processes(
    cluster: list[ServeProcess], raw_redis: redis.Redis, prefix: str
) -> None:
    a, b, c = cluster
    token = setup(a)
    totp, step = configure_totp(a, token)
    body = {**CHANGE, "totp_required_on_login": True}
    r = call(a, "PUT", "/api/settings?wait=true", token, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-propagation"] == "3/3"

    # Two password-only logins, each owing the TOTP step, on two different processes.
    pending_b, pending_c = login(b), login(c)
    for proc, pending in ((b, pending_b), (c, pending_c)):
        r = call(proc, "GET", "/api/settings", pending)
        assert r.status_code == 401
        assert error_code(r) == "totp_required"

    code = {"code": totp.at((step + 1) * 30)}
    winner, _ = one_winner(
        race(
            (b, f"{AUTH}/totp/verify", pending_b, code),
            (c, f"{AUTH}/totp/verify", pending_c, code),
        )
    )

    full = token_of(winner)
    assert winner.json()["authenticated"] is True
    for proc in cluster:
        assert call(proc, "GET", "/api/settings", full).status_code == 200
    assert int(raw_redis.get(f"{prefix}auth:totp_last_step") or 0) == step + 1
    # The loser's session still owes the TOTP step.
    still_pending = [
        t
        for t in (pending_b, pending_c)
        if raw_redis.exists(f"{prefix}session:{session_key_hash(t)}")
    ]
    assert len(still_pending) == 1
    r = call(a, "GET", "/api/settings", still_pending[0])
    assert r.status_code == 401
    assert error_code(r) == "totp_required"


# --- leaving the registry -----------------------------------------------------------------------


def test_sigterm_exits_0_and_sigkill_expires_with_the_heartbeat_ttl(
    cluster: list[ServeProcess],
) -> None:
    a, b, c = cluster
    token = setup(a)
    all_registered(cluster, token)

    # SIGTERM: a clean exit, and the process takes itself out of the registry.
    assert c.terminate(timeout=15) == 0
    assert c.proc.pid not in {w["pid"] for w in workers(a, token)}

    # SIGKILL: nobody deregisters; the entry lapses with the heartbeat TTL.
    b.proc.kill()
    b.proc.wait(5)
    killed = time.monotonic()
    remaining = wait_workers(
        a, token, lambda ws: b.proc.pid not in {w["pid"] for w in ws}, WORKER_TTL_SECONDS + 1
    )
    assert time.monotonic() - killed <= WORKER_TTL_SECONDS + 0.5
    assert [w["pid"] for w in remaining] == [a.proc.pid]


# --- the embedded redis-server ------------------------------------------------------------------


def test_serve_without_a_redis_url_runs_its_own_redis_server(
    tmp_path: Path, redis_url: str
) -> None:
    # A short path of our own: the Unix socket path must fit in sun_path.
    data = Path(tempfile.mkdtemp(prefix="clb-"))
    env = base_env(redis_url, "codexlb:", data)
    del env["CODEX_LB_REDIS_URL"]
    proc = ServeProcess(env, log_dir=tmp_path)
    try:
        proc.wait_ready()
        redis_pids = [
            pid
            for pid in child_pids(proc.proc.pid)
            if "redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        ]
        assert len(redis_pids) == 1, child_pids(proc.proc.pid)
        sock = data / "redis.sock"
        assert sock.is_socket()
        assert (data / "redis" / "appendonlydir").is_dir()

        token = setup(proc)
        r = call(proc, "PUT", "/api/settings", token, json=CHANGE)
        assert r.status_code == 200, r.text
        password = (data / "redis.password").read_text().strip()
        embedded = redis.Redis(unix_socket_path=str(sock), password=password, socket_timeout=2)
        try:
            assert embedded.hget("codexlb:settings", "version") == b"2"
            assert embedded.config_get("appendonly") == {"appendonly": "yes"}
        finally:
            embedded.close()

        assert terminate_tree(proc) == 0
        assert not alive(redis_pids[0])
        # Nothing listens on the socket any more (redis-server removes it on the way out).
        with (
            socket.socket(socket.AF_UNIX) as s,
            pytest.raises((FileNotFoundError, ConnectionRefusedError)),
        ):
            s.connect(str(sock))
        # The data is on disk, in the append-only file.
        aof = b"".join(p.read_bytes() for p in (data / "redis" / "appendonlydir").iterdir())
        assert b"codexlb:settings" in aof
    finally:
        terminate_tree(proc)
        shutil.rmtree(data, ignore_errors=True)
