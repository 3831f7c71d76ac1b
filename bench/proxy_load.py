"""The network side of ``bench/proxy.py``: the fake upstream as a process, a closed-loop load
generator on one aiohttp session, and the serve worker's memory.

One request of the load: a streamed Responses POST, timed from just before it is sent to the
first ``event:`` bytes of the body (TTFE), then read to its end, which must hold
``response.completed``. Anything else (a status other than 200, a stream cut short, a
connection error) is counted as an error by its kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from bench.common import (
    HOST,
    REPO_ROOT,
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    BenchError,
    children,
)
from tests.fake_upstream import FakeUpstream
from tests.support import free_port

REQUEST_TIMEOUT_SECONDS = 30.0
# Under uvicorn's 5 s keep-alive, so the client never reuses a connection the server is closing.
KEEPALIVE_SECONDS = 4.0
FIRST_EVENT = b"event:"
COMPLETED = b"event: response.completed"

# The request's headers, by its sequence number within one run.
Headers = Callable[[int], Mapping[str, str]]


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    headers: Headers


@dataclass
class Load:
    """What one or more closed-loop runs got: TTFE of each good request, counts, time."""

    ttfe_ms: list[float] = field(default_factory=list)
    ok: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    # CPU seconds each watched process spent during the run(s), by name
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else math.nan

    def add(self, other: Load) -> None:
        self.ttfe_ms += other.ttfe_ms
        self.ok += other.ok
        self.seconds += other.seconds
        self.errors.update(other.errors)
        for name, seconds in other.cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds

    def cpu_ms_per_request(self, name: str) -> float:
        return self.cpu.get(name, math.nan) / self.ok * 1000 if self.ok else math.nan


class _Failed(Exception):
    """A request that got an answer, but not a complete 200 stream."""


def new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
    )


async def _one(session: aiohttp.ClientSession, target: Target, body: bytes, i: int) -> float:
    """TTFE in ms of one streamed request read to its end."""
    started = time.perf_counter()
    first = 0.0
    chunks: list[bytes] = []
    async with session.post(target.url, data=body, headers=target.headers(i)) as response:
        if response.status != 200:
            await response.read()
            raise _Failed(f"HTTP {response.status}")
        async for chunk in response.content.iter_any():
            chunks.append(chunk)
            if not first and FIRST_EVENT in (chunk if len(chunks) == 1 else b"".join(chunks)):
                first = time.perf_counter()
    data = b"".join(chunks)
    if COMPLETED not in data:
        raise _Failed("stream without response.completed")
    return (first - started) * 1000


async def closed_loop(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    concurrency: int,
    *,
    seconds: float = math.inf,
    requests: int | None = None,
    watch: Mapping[str, int] | None = None,
) -> Load:
    """``concurrency`` workers, each sending its next request when its last one ended, until
    ``seconds`` have passed (a request under way then is finished) or ``requests`` were sent;
    the CPU time of the ``watch`` processes (name: pid) is taken over the run."""
    load = Load()
    watched = dict(watch or {})
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    numbers = itertools.count()
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(numbers)
            if requests is not None and i >= requests:
                return
            try:
                load.ttfe_ms.append(await _one(session, target, body, i))
                load.ok += 1
            except _Failed as exc:
                load.errors[str(exc)] += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                load.errors[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.seconds = time.perf_counter() - started
    for name, pid in watched.items():
        load.cpu[name] = cpu_seconds(pid) - cpu_before[name]
    if load.ok == 0 and load.sent:
        raise BenchError(f"{target.label}: no request succeeded ({dict(load.errors)})")
    return load


# --- the fake upstream ------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    """``python -m tests.fake_upstream --no-recording`` on a free loopback port, its log in a
    temporary directory (stderr of the benchmark stays clean)."""
    logdir = Path(tempfile.mkdtemp(prefix="codexlb-bench-fake-"))
    log_path = logdir / "fake-upstream.log"
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fake_upstream",
                "--host",
                HOST,
                "--port",
                str(port),
                "--no-recording",
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    fake = FakeUpstream(port, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the fake upstream exited:\n{log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if fake.http.get("/_fake/stats", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("the fake upstream did not start")
            time.sleep(0.05)
        yield fake
    finally:
        fake.close()
        _stop(proc)
        shutil.rmtree(logdir, ignore_errors=True)


@contextlib.contextmanager
def thin_passthrough(upstream: str) -> Iterator[tuple[str, int]]:
    """``bench.thin_passthrough`` under uvicorn on a free loopback port: (base URL, pid)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.thin_passthrough:app",
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "CODEX_LB_BENCH_UPSTREAM": upstream},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if proc.poll() is not None:
                raise BenchError("the thin passthrough exited at start")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + "/", timeout=1.0)
                break
            if time.monotonic() > deadline:
                raise BenchError("the thin passthrough did not start")
            time.sleep(0.05)
        yield url, proc.pid
    finally:
        _stop(proc)


# --- memory ----------------------------------------------------------------------------------


def serving_pid(pid: int) -> int:
    """The process that serves requests: ``serve --workers 1`` runs the worker in its own
    process (``service/server.py``); with more workers, the supervisor's one spawned worker."""
    workers = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    if len(workers) > 1:
        raise BenchError(f"serve process {pid} has {len(workers)} workers; one is measured")
    return workers[0] if workers else pid


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/stat: {exc}") from None
    fields = stat.rpartition(")")[2].split()
    # After the comm: state is field 3, utime field 14, stime field 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/status: {exc}") from None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no VmRSS")
