"""CONTRACT §1: the embedded redis-server is never open, and there is only ever one per data dir.

Real ``codex-lb serve`` and ``codex-lb admin`` processes without ``CODEX_LB_REDIS_URL``, each
with a data dir of its own: on the Unix socket, and on the loopback TCP fallback taken when the
socket path would not fit in ``sun_path``. All traffic stays on loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service import embedded_redis as embedded
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, base_env, wait_until

AUTH = "/api/dashboard-auth"
NEW_PASSWORD = "set by the operator 42"
# Where the data dir keeps the password, the running server's address and the lock: named here,
# not imported, because operators see these names (README).
PASSWORD_FILE = "redis.password"
RECORD_FILE = "redis.json"
LOCK_FILE = "redis.lock"
# A refused AUTH is a ConnectionError to redis-py, which by default retries it with backoff.
NO_RETRY = Retry(NoBackoff(), 0)


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A data dir whose socket path fits in sun_path: the server listens on the Unix socket."""
    path = Path(tempfile.mkdtemp(prefix="clb-"))
    yield path
    kill_servers_on(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def long_dir() -> Iterator[Path]:
    """A data dir whose socket path does not fit: the server falls back to 127.0.0.1 TCP."""
    top = Path(tempfile.mkdtemp(prefix="clb-"))
    path = top / ("d" * 60) / ("e" * 60)
    assert len(str(path.resolve() / "redis.sock")) > embedded.MAX_SOCKET_PATH
    yield path
    kill_servers_on(path)
    shutil.rmtree(top, ignore_errors=True)


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = base_env("", "codexlb:", data_dir)
    del env["CODEX_LB_REDIS_URL"]
    return env


def redis_servers_on(data_dir: Path) -> list[int]:
    """Every redis-server process working on this data dir (redis-server chdirs to its --dir)."""
    redis_dir = str(data_dir.resolve() / "redis")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if "redis" in (entry / "comm").read_text() and os.readlink(entry / "cwd") == redis_dir:
                found.append(int(entry.name))
    return found


def kill_servers_on(data_dir: Path) -> None:
    for pid in redis_servers_on(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not redis_servers_on(data_dir), 5)


def tcp_port_of(pid: int) -> int:
    """The port a redis-server listens on, from the title it gives itself
    (``redis-server 127.0.0.1:PORT``): works whatever wrote (or failed to write) a record."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    match = re.search(r"127\.0\.0\.1:(\d+)", title)
    assert match, title
    return int(match.group(1))


def the_password(data_dir: Path) -> str:
    return (data_dir / PASSWORD_FILE).read_text().strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def admin(
    env: dict[str, str], *args: str, stdin: str = "", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "admin", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def login(proc: ServeProcess, password: str) -> httpx.Response:
    return httpx.post(f"{proc.url}{AUTH}/password/login", json={"password": password}, timeout=10)


def setup_password(proc: ServeProcess) -> None:
    body = {"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN}
    r = httpx.post(f"{proc.url}{AUTH}/password/setup", json=body, timeout=10)
    assert r.status_code == 200, r.text


def assert_closed_without_password(client: redis.Redis, password: str) -> None:
    """Nothing can be read or written without the password, nor with a wrong one."""
    with pytest.raises(redis.AuthenticationError):
        client.ping()
    with pytest.raises(redis.AuthenticationError):
        client.hset("codexlb:auth", "password_hash", "attacker's hash")
    with pytest.raises(redis.AuthenticationError):
        client.execute_command("AUTH", "not-" + password)
    with pytest.raises(redis.AuthenticationError):
        client.execute_command("AUTH", "default", "")


@contextlib.contextmanager
def serving(data_dir: Path, log_dir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(embedded_env(data_dir), log_dir=log_dir)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate(timeout=20)


# --- the server requires a password ----------------------------------------------------------


def test_tcp_fallback_requires_the_password(long_dir: Path, tmp_path: Path) -> None:
    with serving(long_dir, tmp_path) as proc:
        [server] = redis_servers_on(long_dir)
        port = tcp_port_of(server)
        assert not (long_dir / "redis.sock").exists()

        stranger = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, retry=NO_RETRY)
        try:
            assert_closed_without_password(stranger, "")
        finally:
            stranger.close()

        password = the_password(long_dir)
        assert len(password) >= 32
        assert mode(long_dir / PASSWORD_FILE) == 0o600
        assert mode(long_dir) == 0o700
        record = json.loads((long_dir / RECORD_FILE).read_text())
        assert record == {"pid": server, "host": "127.0.0.1", "port": port}
        assert mode(long_dir / RECORD_FILE) == 0o600

        # It is the server serve uses, and the password is what opens it.
        setup_password(proc)
        owner = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        try:
            assert owner.hget("codexlb:auth", "password_hash")
        finally:
            owner.close()
        # Never where other local users can see it: redis-server's command line (ps).
        assert password not in Path(f"/proc/{server}/cmdline").read_bytes().decode()

    assert proc.proc.returncode == 0
    assert password not in proc.log()
    assert "127.0.0.1:" in proc.log()  # the log says where it listens, without the password
    assert not redis_servers_on(long_dir)
    assert not (long_dir / RECORD_FILE).exists()


def test_unix_socket_requires_the_password(short_dir: Path, tmp_path: Path) -> None:
    sock = short_dir / "redis.sock"
    with serving(short_dir, tmp_path) as proc:
        assert sock.is_socket()
        stranger = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, retry=NO_RETRY)
        try:
            assert_closed_without_password(stranger, "")
        finally:
            stranger.close()

        password = the_password(short_dir)
        assert mode(short_dir / PASSWORD_FILE) == 0o600
        setup_password(proc)
        owner = redis.Redis(unix_socket_path=str(sock), password=password, socket_timeout=2)
        try:
            assert owner.hget("codexlb:auth", "password_hash")
        finally:
            owner.close()
    assert proc.proc.returncode == 0
    assert password not in proc.log()


def test_password_never_on_the_command_line_and_loose_modes_are_tightened(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: what redis-server was started with (it rewrites its own title, so ps after
    the fact proves little), and a data dir and password file left open to other users."""
    short_dir.chmod(0o755)
    password_file = short_dir / PASSWORD_FILE
    password_file.write_text("x" * 43 + "\n")
    password_file.chmod(0o644)
    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        started.append(list(args))
        return real_popen(args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(embedded.subprocess, "Popen", popen)
    with embedded.embedded_redis(short_dir) as url:
        assert mode(short_dir) == 0o700
        assert mode(password_file) == 0o600
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            assert client.ping()
            # The URL carries the password from the file (redis-py's unix:// form).
            assert client.connection_pool.connection_kwargs["password"] == "x" * 43
        finally:
            client.close()
    assert len(started) == 1
    assert not any("x" * 43 in arg for arg in started[0])
    assert not redis_servers_on(short_dir)


# --- one server per data dir -----------------------------------------------------------------


def test_admin_uses_the_running_tcp_server(long_dir: Path, tmp_path: Path) -> None:
    env = embedded_env(long_dir)
    with serving(long_dir, tmp_path) as proc:
        [server] = redis_servers_on(long_dir)
        setup_password(proc)

        # set-password waits for its stdin once it has its Redis: look at the servers then.
        cmd = [sys.executable, "-m", "service", "admin", "set-password"]
        child = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stderr is not None
            lines = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                line = child.stderr.readline()
                if not line:
                    break
                lines.append(line)
                if "embedded redis-server" in line:
                    break
            assert "already running on 127.0.0.1:" in "".join(lines), lines
            assert redis_servers_on(long_dir) == [server]
            out, err = child.communicate(NEW_PASSWORD + "\n", timeout=20)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, err
        assert "password set" in out
        assert the_password(long_dir) not in "".join(lines) + out + err

        # What admin wrote is what serve sees, and serve's server is still the only one.
        assert login(proc, PASSWORD).status_code == 401
        assert login(proc, NEW_PASSWORD).status_code == 200
        assert redis_servers_on(long_dir) == [server]
    assert proc.proc.returncode == 0
    assert the_password(long_dir) not in proc.log()


def test_admin_uses_the_running_unix_socket_server(short_dir: Path, tmp_path: Path) -> None:
    env = embedded_env(short_dir)
    with serving(short_dir, tmp_path):
        [server] = redis_servers_on(short_dir)
        result = admin(env, "bootstrap-token")
        assert result.returncode == 0, result.stderr
        # The token came from the environment, so it is only named, never printed (§3).
        assert BOOTSTRAP_TOKEN not in result.stdout
        assert "CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN" in result.stderr
        assert "already running on" in result.stderr
        assert the_password(short_dir) not in result.stdout + result.stderr
        assert redis_servers_on(short_dir) == [server]


def test_a_killed_serves_server_is_still_the_one_used(long_dir: Path, tmp_path: Path) -> None:
    """serve SIGKILLed: its redis-server lives on (own session) and keeps the lock, so admin
    uses it rather than starting a second server on the same append-only file."""
    proc = ServeProcess(embedded_env(long_dir), log_dir=tmp_path)
    try:
        proc.wait_ready()
        [server] = redis_servers_on(long_dir)
        setup_password(proc)
        proc.proc.kill()
        proc.proc.wait(10)
    finally:
        proc.terminate()

    result = admin(embedded_env(long_dir), "set-password", stdin=NEW_PASSWORD)
    assert result.returncode == 0, result.stderr
    assert "already running on 127.0.0.1:" in result.stderr
    assert redis_servers_on(long_dir) == [server]
    client = redis.Redis(
        host="127.0.0.1",
        port=tcp_port_of(server),
        password=the_password(long_dir),
        socket_timeout=2,
    )
    try:
        assert client.scard("codexlb:sessions") == 0  # set-password ended the session there
    finally:
        client.close()


class Imposter:
    """Something else listening where a stale record points: it must never hear from us."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.received: list[bytes] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    self.received.append(conn.recv(4096))
                    conn.sendall(b"+OK\r\n+PONG\r\n")

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def test_a_stale_record_is_ignored_and_a_fresh_server_starts(
    long_dir: Path, tmp_path: Path
) -> None:
    with serving(long_dir, tmp_path) as proc:
        setup_password(proc)
        stale = json.loads((long_dir / RECORD_FILE).read_text())
        # Both gone at once (power cut, OOM killer): the record stays, the lock does not.
        os.kill(stale["pid"], signal.SIGKILL)
        proc.proc.kill()
        assert wait_until(lambda: not redis_servers_on(long_dir), 5)
    assert (long_dir / RECORD_FILE).exists()

    imposter = Imposter(stale["port"])
    try:
        result = admin(embedded_env(long_dir), "set-password", stdin=NEW_PASSWORD)
    finally:
        imposter.close()
    assert result.returncode == 0, result.stderr
    assert "embedded redis-server started" in result.stderr
    assert imposter.received == []  # the password went nowhere near it
    # admin stopped the server it started, and took its record with it.
    assert not redis_servers_on(long_dir)
    assert not (long_dir / RECORD_FILE).exists()

    # The fresh server had the data from the append-only file, and admin's change persisted.
    with serving(long_dir, tmp_path) as proc:
        assert login(proc, NEW_PASSWORD).status_code == 200


def test_lock_held_but_no_server_answers_is_a_clear_error(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: another process holds the lock (here: another open file description) but
    its server does not answer: fail with one line, never start a second server."""
    monkeypatch.setattr(embedded, "REUSE_TIMEOUT_SECONDS", 0.5, raising=False)
    short_dir.mkdir(exist_ok=True)
    fd = os.open(short_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with (
            pytest.raises(embedded.EmbeddedRedisError, match="does not answer") as info,
            embedded.embedded_redis(short_dir),
        ):
            pass
        assert "\n" not in str(info.value)
        assert not redis_servers_on(short_dir)
    finally:
        os.close(fd)
