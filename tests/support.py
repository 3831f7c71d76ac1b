"""Test helpers: real redis-server processes, real ``codex-lb serve`` processes, logins."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from tests import leaks

BOOTSTRAP_TOKEN = "test-bootstrap-token-0123456789"
PASSWORD = "correct horse battery staple"
ENCRYPTION_KEY = "k4JjH7m3p0rE1uO9yVqQn2bT5wXz8cD6fG1hJ4lM7oA="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    """The server binary tests start: redis-server from PATH, or the one scripts/test names in
    CODEX_LB_TEST_REDIS_SERVER (its Valkey pass runs the Redis-facing tests on Valkey)."""
    binary = os.environ.get("CODEX_LB_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/test installs it)")
    return binary


class RedisServer:
    """A private redis-server on a free loopback port, which a test may kill and restart."""

    def __init__(self, *, appendonly: bool = False, appendfsync: str = "everysec"):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="codexlb-redis-"))
        self.appendonly = appendonly
        # "always": every write is on disk before Redis answers, so a kill -9 loses none.
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = server_binary()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                self.appendfsync,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


def base_env(redis_url: str, prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_LB_")}
    env.update(
        CODEX_LB_REDIS_URL=redis_url,
        CODEX_LB_REDIS_PREFIX=prefix,
        CODEX_LB_DATA_DIR=str(data_dir),
        CODEX_LB_ENCRYPTION_KEY=ENCRYPTION_KEY,
        CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN=BOOTSTRAP_TOKEN,
        CODEX_LB_SETTINGS_RECONCILE_SECONDS="1.0",
    )
    env.update(extra)
    return env


class ServeProcess:
    """A real ``codex-lb serve`` process on a free loopback port."""

    def __init__(self, env: Mapping[str, str], *, workers: int = 1, log_dir: Path):
        self.port = free_port()
        self.log_path = log_dir / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        leaks.watch_log(self.log_path)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"serve not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextmanager
def serve_cluster(
    env: Mapping[str, str],
    log_dir: Path,
    count: int = 3,
    stop: Callable[[ServeProcess], object] = lambda p: p.terminate(timeout=20),
) -> Iterator[list[ServeProcess]]:
    """``count`` ready ``serve`` processes of one deployment; always stopped afterwards."""
    procs: list[ServeProcess] = []
    try:
        for _ in range(count):
            procs.append(ServeProcess(env, log_dir=log_dir))
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def stored_under(client: redis.Redis, prefix: str) -> dict[bytes, list[bytes]]:
    """Every key under ``prefix`` with all the bytes it holds, whatever its type."""
    out: dict[bytes, list[bytes]] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        kind = client.type(key)
        values: list[Any]
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"list":
            values = list(client.lrange(key, 0, -1))
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            members: list[Any] = client.zrange(key, 0, -1, withscores=True)
            values = [m for m, _ in members]
        elif kind == b"stream":
            entries: list[Any] = client.xrange(key)  # type: ignore[assignment]
            values = [b for _, fields in entries for kv in fields.items() for b in kv]
        else:
            raise AssertionError(f"unexpected key type {kind!r} for {key!r}")
        out[key] = values
    return out


def stored_blob(client: redis.Redis, prefix: str) -> bytes:
    """``stored_under`` as one byte string, for "is this secret anywhere?" checks."""
    return b"\n".join(
        b for key, values in stored_under(client, prefix).items() for b in [key, *values]
    )
