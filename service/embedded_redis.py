"""The embedded default for one machine: a private ``redis-server`` child process.

It listens only on a Unix socket in the data dir (mode 700, so no other local user can reach
it), keeps its data there with append-only persistence, and is stopped when we exit. If one is
already running on that socket (a ``serve`` while an ``admin`` command runs), it is reused.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 15.0
# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
MAX_SOCKET_PATH = 100


class EmbeddedRedisError(RuntimeError):
    pass


def _ping(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(address)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) the private redis-server; yields its URL."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(exist_ok=True, mode=0o700)
    sock_path = str((data_dir / "redis.sock").resolve())
    use_unix = len(sock_path) <= MAX_SOCKET_PATH

    if use_unix and _ping(sock_path):
        log.info("using the embedded redis-server already running on %s", sock_path)
        yield f"unix://{sock_path}"
        return

    binary = shutil.which("redis-server")
    if binary is None:
        raise EmbeddedRedisError(
            "redis-server not found on PATH: install it (e.g. `apt-get install redis-server`) "
            "or set CODEX_LB_REDIS_URL to an existing Redis"
        )
    args = [
        binary,
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
    address: str | tuple[str, int]
    if use_unix:
        Path(sock_path).unlink(missing_ok=True)
        args += ["--port", "0", "--unixsocket", sock_path, "--unixsocketperm", "700"]
        address, url = sock_path, f"unix://{sock_path}"
    else:
        port = _free_port()
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        address, url = ("127.0.0.1", port), f"redis://127.0.0.1:{port}/0"

    # Its own session: a Ctrl-C in the terminal reaches us, and we stop Redis last, after the
    # workers have finished their requests.
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _ping(address):
            if proc.poll() is not None:
                log_file = redis_dir / "redis.log"
                raise EmbeddedRedisError(
                    f"redis-server exited with status {proc.returncode}; see {log_file}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedRedisError("redis-server did not start in time")
            time.sleep(0.05)
        log.info("embedded redis-server started (pid %s, data in %s)", proc.pid, redis_dir)
        yield url
    finally:
        proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
