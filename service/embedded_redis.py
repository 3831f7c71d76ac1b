"""The embedded default for one machine: a private ``redis-server`` child process.

It keeps its data in the data dir (tightened to mode 700: it holds the append-only file, the
Redis password and the generated encryption key) with append-only persistence, and is stopped
when we exit. It listens on a Unix socket in the data dir, or on 127.0.0.1 when that path does
not fit in ``sun_path``, and always requires a password, on the socket as well (defence in
depth): a random one generated once into ``redis.password`` (mode 600). The password reaches
redis-server through its stdin, never its command line (which ``ps`` shows to every user), and
reaches us in the URL we yield; neither is ever logged.

If one is already running on that socket (a ``serve`` while an ``admin`` command runs), it is
reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 15.0
# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
MAX_SOCKET_PATH = 100

PASSWORD_FILE = "redis.password"  # noqa: S105 (a file name)
SOCKET_FILE = "redis.sock"
# What we generate (secrets.token_urlsafe) and all we accept from the file: safe unquoted in a
# redis.conf line, and in a URL.
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{16,}")

Address = str | tuple[str, int]


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


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _ping(address: Address, password: str) -> bool:
    """Whether a redis-server answers there with that password (and has loaded its data)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    expected = b"+OK\r\n+PONG\r\n"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _url(address: Address, password: str) -> str:
    secret = quote(password, safe="")
    if isinstance(address, str):
        # redis-py reads the password from the userinfo of unix:// URLs too.
        return f"unix://:{secret}@{quote(address)}"
    host, port = address
    return f"redis://:{secret}@{host}:{port}/0"


def _describe(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) the private redis-server; yields its URL, password included."""
    try:
        data_dir = _private_dir(data_dir)
        password = _password(data_dir)
    except OSError as exc:
        # One line for the operator (e.g. a data dir of another user), not a traceback.
        raise EmbeddedRedisError(f"cannot use the data dir {data_dir}: {exc}") from None
    sock_path = str(data_dir / SOCKET_FILE)
    if len(sock_path) <= MAX_SOCKET_PATH and _ping(sock_path, password):
        log.info("using the embedded redis-server already running on %s", sock_path)
        yield _url(sock_path, password)
        return
    with _start(data_dir, password) as address:
        yield _url(address, password)


@contextlib.contextmanager
def _start(data_dir: Path, password: str) -> Iterator[Address]:
    """Run redis-server for the block's duration."""
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True, mode=0o700)
    sock_path = str(data_dir / SOCKET_FILE)
    use_unix = len(sock_path) <= MAX_SOCKET_PATH

    binary = shutil.which("redis-server")
    if binary is None:
        raise EmbeddedRedisError(
            "redis-server not found on PATH: install it (e.g. `apt-get install redis-server`) "
            "or set CODEX_LB_REDIS_URL to an existing Redis"
        )
    # "-": read configuration from stdin (the password), then the command-line options.
    args = [
        binary,
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
    address: Address
    if use_unix:
        Path(sock_path).unlink(missing_ok=True)
        args += ["--port", "0", "--unixsocket", sock_path, "--unixsocketperm", "700"]
        address = sock_path
    else:
        port = _free_port()
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        address = ("127.0.0.1", port)

    # Its own session: a Ctrl-C in the terminal reaches us, and we stop Redis last, after the
    # workers have finished their requests.
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
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
                    f"redis-server exited with status {proc.returncode}; see {log_file}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedRedisError("redis-server did not start in time")
            time.sleep(0.05)
        log.info(
            "embedded redis-server started (pid %s, on %s, data in %s)",
            proc.pid,
            _describe(address),
            redis_dir,
        )
        yield address
    finally:
        proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
