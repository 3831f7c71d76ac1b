"""The embedded default for one machine: a private ``redis-server`` child process (or the
Valkey server that stands in for it when there is none: ``embedded_binary`` says which).

It keeps its data in the data dir (tightened to mode 700: it holds the append-only file, the
Redis password and the generated encryption key) with append-only persistence, and is stopped
when we exit. It only ever listens on a Unix socket, never on TCP: a TCP port can be taken by
any local user the moment our server is gone (or before it binds), and we would send the
password to whoever holds it. The socket is ``redis.sock`` in the data dir or, when that path
does not fit in ``sun_path``, in a short private directory
``$TMPDIR/codex-lb-<uid>-<hash of the data dir>`` (mode 700; one we did not create that way is
refused). It always requires a password, on the socket as well (defence in depth): a random one
generated once into ``redis.password`` (mode 600). The password reaches redis-server through its
stdin, never its command line (which ``ps`` shows to every user), and reaches us in the URL we
yield; neither is ever logged.

One server per data dir, never two on the same append-only file: whoever starts it holds an
exclusive ``flock`` on ``redis.lock`` for the server's lifetime (redis-server inherits the lock,
so it stays held until both are gone, even if we are killed) and records where it listens in
``redis.json`` once it answers, with who owns it (``serve`` or ``admin``, and that process's
pid): the owner stops the server when it exits. One that gets the lock starts its own, and
ignores any record left behind, which is stale by then. One that finds the lock held:

- an ``admin`` command uses the recorded server (it is short-lived, and its owner outlives it
  or is an admin command too);
- a ``serve`` never uses a server that will be stopped under it: it waits for an admin-owned one
  to go away (admin commands are short) and then starts its own, and refuses to run beside a
  live ``serve`` that owns the server. It uses a server whose owning ``serve`` is dead (killed
  with SIGKILL: its redis-server lives on, holding the lock), since nobody will stop that one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from service.embedded_binary import ServerNotFoundError, find_server
from service.embedded_record import Owner, read_record, write_record

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 15.0
# How long a process that finds the lock held waits for the holder's server to answer: it may
# still be starting (loading a large append-only file).
REUSE_TIMEOUT_SECONDS = 15.0
# How long a serve waits for an admin command's server to go away before starting its own.
ADMIN_WAIT_SECONDS = 30.0
# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
MAX_SOCKET_PATH = 100

PASSWORD_FILE = "redis.password"  # noqa: S105 (a file name)
LOCK_FILE = "redis.lock"
RECORD_FILE = "redis.json"
SOCKET_FILE = "redis.sock"
# What we generate (secrets.token_urlsafe) and all we accept from the file: safe unquoted in a
# redis.conf line, and in a URL.
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{16,}")


class EmbeddedRedisError(RuntimeError):
    pass


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = path.resolve()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o700)
        log.warning("the data dir %s was open to other users (mode %o); now 700", path, mode)
    return path


def _password(data_dir: Path) -> str:
    """The embedded server's password, generated into the data dir the first time."""
    path = data_dir / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _create_password(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EmbeddedRedisError(f"{path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("%s was readable by other users (mode %o); now 600", path, mode)
        password = f.read().strip()
    if not _PASSWORD.fullmatch(password):
        # Never echo the content: it may be the password, slightly damaged.
        raise EmbeddedRedisError(
            f"{path} does not hold a usable password (16 or more of A-Z a-z 0-9 - _); "
            "delete it and a new one is generated"
        )
    return password


def _create_password(path: Path) -> None:
    # Written aside with O_EXCL and mode 600 from the first byte, then linked into place: link
    # fails if the file exists, so of several processes starting at once exactly one password
    # wins and nobody reads a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed process that had our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _socket_path(data_dir: Path) -> str:
    """Where the server listens: in the data dir, or in a short private directory of ours when
    that path does not fit in sun_path (never on TCP, see the module docstring)."""
    path = str(data_dir / SOCKET_FILE)
    if len(path) <= MAX_SOCKET_PATH:
        return path
    # Deterministic, so every codex-lb on this data dir computes the same one.
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    name = f"codex-lb-{os.getuid()}-{digest}"
    base = Path(tempfile.gettempdir())
    if len(str(base / name / SOCKET_FILE)) > MAX_SOCKET_PATH:
        base = Path("/tmp")  # noqa: S108 (checked below like any other location)
    private = base / name
    with contextlib.suppress(FileExistsError):
        os.mkdir(private, mode=0o700)
    # Made by someone else (who could then replace our socket, or read what we send it), or
    # opened up: refuse rather than fix, since another user may already be in there. lstat: a
    # symlink is refused too, wherever it points.
    try:
        st = os.lstat(private)
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot use {private} for the redis socket: {exc}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise EmbeddedRedisError(
            f"{private} (for the redis socket, as the data dir path is too long for one) is not "
            "a private directory of this user (mode 700, not a symlink); remove it, or use a "
            "shorter CODEX_LB_DATA_DIR"
        )
    return str(private / SOCKET_FILE)


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _ping(address: str, password: str) -> bool:
    """Whether a redis-server answers there with that password (and has loaded its data)."""
    expected = b"+OK\r\n+PONG\r\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(address)
            s.sendall(_command("AUTH", password) + _command("PING"))
            reply = b""
            while reply.count(b"\r\n") < 2 and len(reply) < 512:
                chunk = s.recv(512)
                if not chunk:
                    break
                reply += chunk
            return reply == expected
    except OSError:
        return False


def _listening(sock_path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(sock_path)
        except OSError:
            return False
        return True


def _url(address: str, password: str) -> str:
    # redis-py reads the password from the userinfo of unix:// URLs too.
    return f"unix://:{quote(password, safe='')}@{quote(address)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def _running_server(lock_fd: int, data_dir: Path, password: str, owner: Owner) -> str | None:
    """The address of the server another process runs on this data dir that we may use, or
    None once we hold the lock (then none runs, and we start one)."""
    deadline = time.monotonic() + REUSE_TIMEOUT_SECONDS
    admin_deadline: float | None = None
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        # Only trusted while the lock is held: the holder wrote it.
        record = read_record(data_dir / RECORD_FILE)
        if record is not None and _ping(record.socket, password):
            if owner == "admin":
                return record.socket
            if record.owner == "admin":
                # It stops its server when it is done: a serve on it would lose Redis then.
                now = time.monotonic()
                if admin_deadline is None:
                    admin_deadline = now + ADMIN_WAIT_SECONDS
                    log.info(
                        "an admin command (pid %s) is using the embedded redis-server; "
                        "waiting for it to finish",
                        record.owner_pid,
                    )
                elif now > admin_deadline:
                    raise EmbeddedRedisError(
                        f"an admin command (pid {record.owner_pid}) has held the embedded "
                        f"redis-server of {data_dir} for over {ADMIN_WAIT_SECONDS:g} s; wait "
                        "for it to finish (or stop it) and try again"
                    )
                # Its server may take a moment to stop once it is done: time that from now.
                deadline = now + REUSE_TIMEOUT_SECONDS
            elif record.owner_pid is not None and _alive(record.owner_pid):
                raise EmbeddedRedisError(
                    f"another codex-lb serve is using this data dir (pid {record.owner_pid}); "
                    "stop it first, or give this one its own CODEX_LB_DATA_DIR"
                )
            else:
                # Its serve is gone (SIGKILL) and nobody will stop it: safe to share.
                return record.socket
        if time.monotonic() > deadline:
            raise EmbeddedRedisError(
                f"another process runs the embedded redis-server of {data_dir} (it holds "
                f"{data_dir / LOCK_FILE}) but the server does not answer; stop that codex-lb "
                "process and try again"
            )
        time.sleep(0.05)


@contextlib.contextmanager
def embedded_redis(data_dir: Path, *, owner: Owner) -> Iterator[str]:
    """Start (or reuse) the private redis-server; yields its URL, password included. ``owner``
    says which command asks: see the module docstring for how each shares a running server."""
    try:
        data_dir = _private_dir(data_dir)
        password = _password(data_dir)
        lock_fd = os.open(
            data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        # One line for the operator (e.g. a data dir of another user), not a traceback.
        raise EmbeddedRedisError(f"cannot use the data dir {data_dir}: {exc}") from None
    try:
        running = _running_server(lock_fd, data_dir, password, owner)
        if running is not None:
            log.info("using the embedded redis-server already running on %s", running)
            yield _url(running, password)
            return
        with _start(data_dir, password, lock_fd, owner) as address:
            yield _url(address, password)
    finally:
        os.close(lock_fd)  # releases the lock, unless our redis-server still holds it


@contextlib.contextmanager
def _start(data_dir: Path, password: str, lock_fd: int, owner: Owner) -> Iterator[str]:
    """Run redis-server for the block's duration (the caller holds the lock)."""
    record_path = data_dir / RECORD_FILE
    # Whoever wrote it is gone (the lock is ours): stale.
    record_path.unlink(missing_ok=True)
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True, mode=0o700)
    sock_path = _socket_path(data_dir)
    if _listening(sock_path):
        # Not ours (we hold the lock): e.g. one started by an older codex-lb, without a lock.
        # A second server on the same append-only file would corrupt it.
        raise EmbeddedRedisError(
            f"a server not started by this codex-lb already listens on {sock_path}; stop it "
            "and try again"
        )

    try:
        server = find_server()
    except ServerNotFoundError as exc:
        raise EmbeddedRedisError(str(exc)) from None
    # "-": read configuration from stdin (the password), then the command-line options.
    args = [
        server.path,
        "-",
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--logfile",
        str(redis_dir / "redis.log"),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
    ]
    Path(sock_path).unlink(missing_ok=True)  # left by a killed server (none listens there)
    args += ["--port", "0", "--unixsocket", sock_path, "--unixsocketperm", "700"]
    address = sock_path

    # Its own session: a Ctrl-C in the terminal reaches us, and we stop Redis last, after the
    # workers have finished their requests. It inherits the lock: if we are killed, the lock
    # stays held as long as this server runs, so nobody starts a second one on its data.
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=(lock_fd,),
    )
    try:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it exited at once: reported below
            proc.stdin.write(f"requirepass {password}\n".encode())
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _ping(address, password):
            if proc.poll() is not None:
                log_file = redis_dir / "redis.log"
                raise EmbeddedRedisError(
                    f"{server.describe()} exited with status {proc.returncode}; see {log_file}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"{server.describe()} did not start in time")
            time.sleep(0.05)
        write_record(record_path, address, proc.pid, owner)
        log.info(
            "embedded redis-server started (pid %s, on %s, data in %s): %s",
            proc.pid,
            address,
            redis_dir,
            server.describe(),
        )
        yield address
    finally:
        # First, so nobody picks up a server that is going away.
        record_path.unlink(missing_ok=True)
        proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
