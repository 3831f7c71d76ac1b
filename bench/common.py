"""Shared pieces: a private Redis plus ``codex-lb serve`` processes, login, statistics, tables.

Everything listens on loopback only and is stopped (bounded in time) when the ``cluster``
context ends, whether the benchmark finished, failed or was interrupted.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

import httpx
import redis

from tests.support import BOOTSTRAP_TOKEN, PASSWORD, RedisServer, base_env, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
SESSION_COOKIE = "dashboard_session"


class BenchError(RuntimeError):
    """The benchmark could not run (as opposed to a target that was missed)."""


@dataclass(frozen=True)
class Check:
    """One target: what was measured against what was asked."""

    benchmark: str
    name: str
    target: str
    value: str
    passed: bool

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


# --- processes ------------------------------------------------------------------------------


class Serve:
    """One ``python -m service serve`` process on a free loopback port, output to a log file."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, *, workers: int = 1):
        self.port = free_port()
        self.log_path = log_dir / f"serve-{self.port}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, deadline: float) -> None:
        with httpx.Client(base_url=self.url, timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"serve on port {self.port} exited with {self.proc.returncode}:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/health/ready").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise BenchError(f"serve on port {self.port} not ready:\n{self.log_tail()}")
                time.sleep(0.05)

    def signal_stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def stop_all(serves: Sequence[Serve], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM every process at once, then wait; whatever is left at the deadline is killed."""
    for serve in serves:
        serve.signal_stop()
    deadline = time.monotonic() + timeout
    for serve in serves:
        serve.wait_stopped(deadline)


@dataclass
class Cluster:
    redis: RedisServer
    serves: list[Serve]
    prefix: str
    workdir: Path


@contextlib.contextmanager
def cluster(
    processes: int, *, workers: int = 1, extra_env: Mapping[str, str] | None = None
) -> Iterator[Cluster]:
    """A private redis-server and ``processes`` serve processes sharing it, all on loopback.

    ``extra_env`` adds (or overrides) ``CODEX_LB_*`` variables of every serve process.
    """
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server is not installed (scripts/install installs it as root)")
    workdir = Path(tempfile.mkdtemp(prefix="codexlb-bench-"))
    server = RedisServer()
    serves: list[Serve] = []
    try:
        server.start()
        prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        env = base_env(server.url, prefix, workdir / "data", **(extra_env or {}))
        serves = [Serve(env, workdir, workers=workers) for _ in range(processes)]
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for serve in serves:
            serve.wait_ready(deadline)
        yield Cluster(redis=server, serves=serves, prefix=prefix, workdir=workdir)
    finally:
        stop_all(serves)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- HTTP -----------------------------------------------------------------------------------


def login(base_url: str) -> str:
    """Set the first-run dashboard password; the ``dashboard_session`` token it hands out."""
    response = httpx.post(
        f"{base_url}/api/dashboard-auth/password/setup",
        json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
        timeout=30.0,
    )
    if response.status_code != 200:
        raise BenchError(f"password setup: {response.status_code} {response.text}")
    token = response.cookies.get(SESSION_COOKIE)
    if not token:
        raise BenchError("password setup set no dashboard_session cookie")
    return token


def session_client(base_url: str, token: str, timeout: float = 10.0) -> httpx.Client:
    """A keep-alive client carrying the session cookie (and no Origin header)."""
    return httpx.Client(
        base_url=base_url, headers={"Cookie": f"{SESSION_COOKIE}={token}"}, timeout=timeout
    )


def expect(response: httpx.Response, status: int = 200) -> httpx.Response:
    if response.status_code != status:
        raise BenchError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    return response


def epoch(rfc3339: str) -> float:
    """Epoch seconds of an RFC 3339 time such as ``2025-01-02T03:04:05.123456Z``."""
    return datetime.fromisoformat(rfc3339).timestamp()


def unreachable_url() -> str:
    """A loopback URL nothing listens on: an upstream that refuses at once, never the internet."""
    return f"http://{HOST}:{free_port()}"


# --- Redis -----------------------------------------------------------------------------------

# Our own INFO calls land in the counts too; they are the measurement, not the service.
OWN_COMMANDS = frozenset({"info"})


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``)."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(entry["calls"])
        for name, entry in stats.items()
        if isinstance(entry, dict)
    }


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two ``commandstats``, leaving out our own INFO calls."""
    names = set(before) | set(after)
    return {n: after.get(n, 0) - before.get(n, 0) for n in names if n not in OWN_COMMANDS}


# --- statistics and output --------------------------------------------------------------------

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 198th smallest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_row(label: str, values_ms: Sequence[float]) -> list[str]:
    cells = [label, str(len(values_ms))]
    cells += [ms(percentile(values_ms, p)) for p in PERCENTILES]
    cells.append(ms(max(values_ms) if values_ms else math.nan))
    return cells


SUMMARY_HEADERS = ["", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"]


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def heading(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a supervisor would have its workers here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found
