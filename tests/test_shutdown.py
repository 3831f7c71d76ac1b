"""SIGTERM on a real ``codex-lb serve`` (CONTRACT §8): not ready at once, the SSE stream in
flight completes, new proxy requests are refused, the process leaves the worker registry and
exits 0; a stream longer than ``CODEX_LB_DRAIN_SECONDS`` does not hold the exit beyond it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.client_support import Deployment
from tests.fake_upstream import FakeUpstream, running_fake
from tests.proxy_support import RESPONSES, body, event_names
from tests.support import ServeProcess, base_env, wait_until

DELTA_DELAY = 0.25
# Beyond the drain: the app's shutdown, and a busy machine.
EXIT_MARGIN = 8.0


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with running_fake() as fake:
        yield fake


@dataclass
class Stream:
    """One streamed Responses request read to its end on a thread."""

    url: str
    started: threading.Event = field(default_factory=threading.Event)
    raw: bytes = b""
    error: str | None = None
    ended_at: float | None = None

    def run(self) -> threading.Thread:
        thread = threading.Thread(target=self._read, daemon=True)
        thread.start()
        return thread

    def _read(self) -> None:
        try:
            with httpx.stream("POST", self.url + RESPONSES, json=body(), timeout=60) as r:
                assert r.status_code == 200, r.read()
                for chunk in r.iter_bytes():
                    self.raw += chunk
                    self.started.set()
        except httpx.HTTPError as exc:
            self.error = type(exc).__name__
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    @property
    def done(self) -> bool:
        return self.ended_at is not None


@dataclass
class Running:
    serve: ServeProcess
    d: Deployment
    client: redis.Redis
    workers_key: str


Start = Callable[[float, int], Running]


@pytest.fixture
def start(
    fake: FakeUpstream, redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> Iterator[Start]:
    """Starts a ready ``serve`` (drain seconds, workers) with one account on the fake."""
    started: list[Running] = []

    def run(drain_seconds: float, workers: int) -> Running:
        env = base_env(
            redis_url,
            prefix,
            tmp_path,
            CODEX_LB_UPSTREAM_BASE_URL=fake.url,
            CODEX_LB_AUTH_BASE_URL=fake.url,
            CODEX_LB_DRAIN_SECONDS=str(drain_seconds),
        )
        serve = ServeProcess(env, workers=workers, log_dir=tmp_path)
        d = Deployment(serve, fake)
        started.append(Running(serve, d, raw_redis, f"{prefix}workers"))
        serve.wait_ready()
        d.login()
        d.add_accounts("slow")
        d.warm_up()
        assert wait_until(lambda: len(registered(started[-1])) == workers, timeout=10)
        assert len(records(started[-1])) == workers
        return started[-1]

    fake.reset()
    yield run
    for r in started:
        r.d.close()
        r.serve.terminate(5)


def registered(r: Running) -> list[bytes]:
    """The worker ids in this deployment's registry."""
    return list(r.client.zrange(r.workers_key, 0, -1))


def records(r: Running) -> list[bytes]:
    """The workers' own records (each expires 5 s after its last heartbeat)."""
    return list(r.client.scan_iter(match=f"{r.workers_key}:*"))


def stream_in_flight(r: Running, deltas: int) -> tuple[Stream, threading.Thread]:
    r.d.fake.configure("slow", deltas=deltas, delta_delay=DELTA_DELAY)
    stream = Stream(r.serve.url)
    thread = stream.run()
    assert stream.started.wait(15)
    assert not stream.done, stream.error
    return stream, thread


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_the_stream_in_flight(start: Start, workers: int) -> None:
    r = start(30, workers)
    stream, thread = stream_in_flight(r, deltas=24)  # about 6 s
    r.serve.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    def ready_status() -> tuple[int, str]:
        answer = httpx.get(f"{r.serve.url}/health/ready", timeout=5)
        return answer.status_code, answer.json()["status"]

    # Not ready at once, and still answering while the stream goes on.
    assert wait_until(lambda: ready_status() == (503, "draining"), timeout=3)
    assert not stream.done
    refused = httpx.post(f"{r.serve.url}{RESPONSES}", json=body(), timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "not_ready"
    assert not stream.done

    code = r.serve.proc.wait(30 + EXIT_MARGIN)
    thread.join(5)
    assert code == 0
    assert stream.error is None
    assert event_names(stream.raw)[-1] == "response.completed"
    assert stream.ended_at is not None
    assert stream.ended_at - signalled < 30
    assert registered(r) == []
    assert records(r) == []
    # Gone since: new connections are refused.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{r.serve.url}/health/live", timeout=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stream_longer_than_the_drain_does_not_hold_the_exit(start: Start, workers: int) -> None:
    drain = 2.0
    r = start(drain, workers)
    stream, thread = stream_in_flight(r, deltas=160)  # about 40 s
    r.serve.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = r.serve.proc.wait(drain + EXIT_MARGIN)
    took = time.monotonic() - signalled
    thread.join(5)
    assert code == 0
    assert took >= drain  # the stream had its drain time
    assert "response.completed" not in event_names(stream.raw)  # cut at the bound
    assert registered(r) == []
    assert records(r) == []
